"""Run the order saga end to end through a real Celery worker.

    python -m examples.orders [--orders 200] [--concurrency 4] [--timeout 120]

Finds PostgreSQL and a broker (IRONFLOW_DATABASE_URL / CELERY_BROKER_URL, else the local
servers, else embedded ones, saying so), upgrades the schema, starts
``celery -A ironflow_celery worker`` (relays included) with this example's workflows,
waits until it is ready, submits a batch of orders, waits for every order to finish,
prints a summary and stops the worker. Exits 1, with the reason, if any order does not end
as expected; Ctrl-C stops the worker and ends with one line (exit code 130).

Every run works in a database and a broker queue of its own, both removed when it ends
(Ctrl-C included), so no run inherits the unfinished orders of an interrupted one; the
databases of runs that were killed outright are dropped by the next run, which says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import psycopg
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[2]
#: Piped to a file or a CI log there is no terminal width to honour: rich would assume 80
#: columns and wrap; keep each line whole instead.
console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)
#: What `celery worker` logs once it consumes (after its bootsteps, relays included).
READY_MARK = " ready."
#: A run's own database is ``<prefix><unix time>_<run id>`` and its queue ``<prefix><run id>``.
RUN_DATABASE_PREFIX = "ironflow_example_"
QUEUE_PREFIX = "ironflow-orders-example-"
#: A run's database older than this with nobody connected belongs to a killed run.
ABANDONED_AFTER = 60.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.orders", description=__doc__)
    parser.add_argument("--orders", type=int, default=200, help="orders to place (default 200)")
    parser.add_argument("--concurrency", type=int, default=4, help="worker processes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    return parser.parse_args(argv)


def make_orders(run: str, count: int):
    """Mostly ordinary orders; every 5th uses a flaky SKU, every 10th a declined card."""
    from ironflow_celery.examples.orders import DECLINED_CARD_SUFFIX, FLAKY_SKU_PREFIX, PlaceOrder

    rng = random.Random(run)
    orders = []
    for n in range(1, count + 1):
        declined = n % 10 == 0 or (count < 10 and n == count)
        flaky = n % 5 == 1
        orders.append(
            PlaceOrder(
                id=f"order-{run}-{n:05d}",
                sku=(FLAKY_SKU_PREFIX if flaky else "") + f"SKU-{rng.randint(100, 999)}",
                quantity=rng.randint(1, 3),
                amount_cents=rng.randint(500, 50_000),
                card="4000-0000-0000-" + (DECLINED_CARD_SUFFIX if declined else "4242"),
            )
        )
    return orders


def start_worker(run: str, queue: str, concurrency: int, log_path: Path) -> subprocess.Popen:
    """``celery -A ironflow_celery worker`` for this example, in its own process group."""
    env = dict(os.environ)
    env.update(
        IRONFLOW_WORKFLOWS="ironflow_celery.examples.orders",
        IRONFLOW_MAX_ATTEMPTS="3",
        IRONFLOW_BACKOFF_BASE="0.2",
        IRONFLOW_BACKOFF_MAX="1",
        CELERY_TASK_DEFAULT_QUEUE=queue,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "ironflow_celery",
        "worker",
        "-l",
        "INFO",
        "-c",
        str(concurrency),
        "-n",
        f"orders-example-{run}@%h",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
    ]
    log = open(log_path, "w")  # noqa: SIM115 - closed when the worker is stopped
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def wait_until_ready(process: subprocess.Popen, log_path: Path, timeout: float) -> float:
    """Block until the worker logs that it is ready; seconds it took. Raises if it exits."""
    started = time.monotonic()
    with console.status("starting the worker (Celery bootsteps, relays)…", spinner="dots"):
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise WorkerFailed(f"the worker exited with code {process.returncode}")
            if READY_MARK in log_path.read_text(errors="replace"):
                return time.monotonic() - started
            time.sleep(0.1)
    raise WorkerFailed(f"the worker was not ready within {timeout:.0f} s")


class WorkerFailed(Exception):
    """The worker exited or never became ready (the message says which)."""


def stop_worker(process: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """Warm shutdown (SIGTERM), then SIGKILL if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    process.log.close()  # type: ignore[attr-defined]
    return process.returncode


def _admin_url(url: str, database: str = "postgres") -> str:
    """`url` (any SQLAlchemy driver spelling) as a libpq URL of `database` on that server."""
    return (
        sa.engine.make_url(url)
        .set(drivername="postgresql", database=database)
        .render_as_string(hide_password=False)
    )


def sweep_abandoned_runs(server_url: str, broker_url: str) -> list[str]:
    """Drop the databases (and queues) of earlier runs that were killed before cleaning up.

    Only a database nobody is connected to is dropped (``DROP DATABASE`` without FORCE
    refuses otherwise), so a run going on at the same time keeps its own.
    """
    dropped = []
    with psycopg.connect(_admin_url(server_url), autocommit=True) as conn:
        names = [
            row[0]
            for row in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s",
                [RUN_DATABASE_PREFIX.replace("_", r"\_") + "%"],
            )
        ]
        for name in names:
            stamp, _, run_id = name.removeprefix(RUN_DATABASE_PREFIX).partition("_")
            if not stamp.isdigit() or time.time() - int(stamp) < ABANDONED_AFTER:
                continue
            try:
                conn.execute(f'DROP DATABASE "{name}"')
            except psycopg.errors.ObjectInUse:
                continue  # a run still going on
            except psycopg.errors.InvalidCatalogName:
                continue  # another run's sweep dropped it first
            delete_queue(broker_url, QUEUE_PREFIX + run_id)
            dropped.append(name)
    return dropped


def own_database(run_id: str, stack: ExitStack) -> None:
    """Point IRONFLOW_DATABASE_URL at a new database for this run, dropped when it ends."""
    configured = os.environ["IRONFLOW_DATABASE_URL"]
    url = sa.engine.make_url(configured)
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    abandoned = sweep_abandoned_runs(configured, os.environ["CELERY_BROKER_URL"])
    if abandoned:
        console.print(
            f"cleanup: dropped {len(abandoned)} database(s) and queue(s) of earlier runs that "
            f"were killed before cleaning up: {', '.join(abandoned)}"
        )
    name = f"{RUN_DATABASE_PREFIX}{int(time.time())}_{run_id}"
    try:
        with psycopg.connect(_admin_url(configured), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.errors.InsufficientPrivilege as exc:
        console.print(
            f"database: {url.database} on {where} as configured (no database of this run's own: "
            f"{str(exc).strip()}); work an interrupted run left there is run first"
        )
        return

    def drop() -> None:
        try:
            with psycopg.connect(_admin_url(configured), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as exc:  # say so; the next run drops it once nobody uses it
            console.print(f"cleanup: could not drop {name}: {str(exc).strip()}")

    stack.callback(drop)
    os.environ["IRONFLOW_DATABASE_URL"] = url.set(database=name).render_as_string(
        hide_password=False
    )
    console.print(f"database: {name} on {where}, this run's own (dropped when the run ends)")


def delete_queue(broker_url: str, queue: str) -> None:
    """Delete a run's queue and its binding (Redis keeps both after the worker stops)."""
    from kombu import Connection, Exchange, Queue

    try:
        with Connection(broker_url, connect_timeout=10) as conn:
            # Declared as Celery declares its default queue, so the binding removed is that.
            bound = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)(
                conn.default_channel
            )
            bound.declare()
            bound.delete()
    except Exception as exc:  # the broker went away: say so rather than end in a traceback
        console.print(f"cleanup: could not delete the queue {queue}: {exc}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from devtools.local_services import resolve_services

    with ExitStack() as stack:
        if not (os.environ.get("IRONFLOW_DATABASE_URL") and os.environ.get("CELERY_BROKER_URL")):
            services = stack.enter_context(resolve_services(announce=console.print))
            os.environ["IRONFLOW_DATABASE_URL"] = services.database_url
            os.environ["CELERY_BROKER_URL"] = services.broker_url
        os.environ.setdefault("IRONFLOW_WORKFLOWS", "ironflow_celery.examples.orders")
        run_id = uuid.uuid4().hex[:8]
        own_database(run_id, stack)
        return run(args, stack, run_id)


class _InterruptedReset(logging.Filter):
    """Drops a log record whose exception is a KeyboardInterrupt.

    Ctrl-C can land while SQLAlchemy's pool resets a returned connection; the pool logs
    that reset's failure, traceback included, before the KeyboardInterrupt goes on to stop
    the run, which then says so in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, KeyboardInterrupt)


def quiet_interrupted_resets() -> None:
    """`_InterruptedReset` on the handlers a record of this process can reach: logging's
    last resort (stderr; nothing configures logging here) and any root handler."""
    for handler in [logging.lastResort, *logging.getLogger().handlers]:
        if handler is not None:
            handler.addFilter(_InterruptedReset())


def run_interruptibly(argv: list[str] | None = None) -> int:
    """`main`, with Ctrl-C ending in one line: the ExitStack has stopped what it started."""
    # Started from a script with `&`, SIGINT arrives ignored; Ctrl-C must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    quiet_interrupted_resets()
    try:
        return main(argv)
    except KeyboardInterrupt:
        console.print("interrupted: the worker and any embedded servers were stopped")
        return 130


def run(args: argparse.Namespace, stack: ExitStack, run_id: str) -> int:
    import ironflow_celery
    from ironflow_celery.examples.orders import OrderSaga, expected_status

    app = ironflow_celery.app
    runtime = app.ironflow
    applied = runtime.upgrade_schema()
    if applied:
        console.print(f"schema: applied migrations {applied}")
    service = runtime.service

    queue = f"{QUEUE_PREFIX}{run_id}"
    # After the worker stops (callbacks run last-in first-out): nothing is left queued.
    stack.callback(delete_queue, os.environ["CELERY_BROKER_URL"], queue)
    log_path = ROOT / ".ironflow" / "example-worker.log"
    log_path.parent.mkdir(exist_ok=True)
    worker = start_worker(run_id, queue, args.concurrency, log_path)
    stack.callback(stop_worker, worker)
    console.print(
        f"worker: celery -A ironflow_celery worker -c {args.concurrency} (pid {worker.pid}, "
        f"log {log_path.relative_to(ROOT)})"
    )
    try:
        boot = wait_until_ready(worker, log_path, args.timeout)
    except WorkerFailed as exc:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        console.print(f"[red]FAILED[/red]: {exc}; the end of {log_path}:", *tail, sep="\n")
        return 1
    console.print(f"worker: ready after {boot:.1f} s")

    orders = make_orders(run_id, args.orders)
    started = time.monotonic()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    pending = {o.id for o in orders}
    with Progress(*columns, console=console) as progress:
        submitted = progress.add_task("submitting orders", total=len(orders))
        finished = progress.add_task("orders finished  ", total=len(orders))
        for order in orders:
            service.execute(order)
            progress.advance(submitted)
        deadline = time.monotonic() + args.timeout
        query = sa.text(
            "SELECT workflow_id FROM ironflow.workflow_instances "
            "WHERE workflow_type = :wt AND workflow_id LIKE :prefix AND completed_at IS NOT NULL"
        )
        while pending and time.monotonic() < deadline:
            if worker.poll() is not None:
                break
            with runtime.store.engine.connect() as conn:
                done = {
                    r[0]
                    for r in conn.execute(
                        query, {"wt": OrderSaga.type, "prefix": f"order-{run_id}-%"}
                    )
                }
            pending -= done
            progress.update(finished, completed=len(orders) - len(pending))
            time.sleep(0.05)
    elapsed = time.monotonic() - started

    final = {o.id: service.fetch_latest_state(OrderSaga, o.id) for o in orders}
    outcome = Counter(s.status for s in final.values())
    expected = Counter(expected_status(o) for o in orders)
    with runtime.store.engine.connect() as conn:
        # Throughput from the first effect the worker finished to the last order finished,
        # in the database's own clock: neither the boot nor our polling counts.
        first, last = conn.execute(
            sa.text(
                "SELECT (SELECT min(processed_at) FROM ironflow.outbox WHERE workflow_type = :wt "
                "        AND workflow_id LIKE :prefix), "
                "       (SELECT max(completed_at) FROM ironflow.workflow_instances "
                "        WHERE workflow_type = :wt AND workflow_id LIKE :prefix)"
            ),
            {"wt": OrderSaga.type, "prefix": f"order-{run_id}-%"},
        ).one()
        dead_letters = conn.execute(
            sa.text(
                "SELECT count(*) FROM ironflow.outbox WHERE workflow_type = :wt "
                "AND workflow_id LIKE :prefix AND dead_lettered_at IS NOT NULL"
            ),
            {"wt": OrderSaga.type, "prefix": f"order-{run_id}-%"},
        ).scalar_one()

    console.print(f"order saga: {len(orders)} orders through a real Celery worker")
    table = Table()
    table.add_column("final state")
    table.add_column("orders", justify="right")
    table.add_column("expected", justify="right")
    for status in sorted(set(outcome) | set(expected)):
        mark = "" if outcome[status] == expected[status] else "  ✗"
        table.add_row(status, str(outcome[status]), f"{expected[status]}{mark}")
    console.print(table)
    window = (last - first).total_seconds() if first and last else 0.0
    console.print(
        f"payments dead-lettered and compensated: {dead_letters}  ·  elapsed {elapsed:.2f} s"
    )
    if window > 0:
        console.print(
            f"throughput: {len(orders) / window:.0f} orders/s "
            f"({window:.2f} s from the first processed order to the last)"
        )

    code = stop_worker(worker)  # the stack's own call later finds it stopped
    problems = [
        f"{o.id}: {final[o.id].status}, expected {expected_status(o)}"
        for o in orders
        if final[o.id].status != expected_status(o)
    ]
    if worker.returncode not in (0, None) and code not in (0, -signal.SIGTERM):
        problems.append(f"worker exited with code {code} (see {log_path})")
    if problems:
        console.print(f"[red]FAILED[/red]: {len(problems)} problem(s):")
        for line in problems[:20]:
            console.print(f"  {line}")
        return 1
    console.print("[green]all orders reached their expected final state[/green]; worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(run_interruptibly())
