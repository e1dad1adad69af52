"""Row 10 peer: django-celery-outbox (a transactional outbox for Celery tasks in Django).

Configuration: its own fresh database (Django's ``migrate`` creates ``celery_outbox``), the
same Redis broker with a private queue; one relay process (``manage.py celery_outbox_relay``
as ``python -m django``) with ``--batch-size`` `RELAY_BATCH` (its default, and ironflow's
claim batch) and ``--idle-time`` `RELAY_IDLE_S` (its default is 1 s, slept after every
batch that is not full: the knob its relay has for latency and throughput), publishing
serially (its default); and one ``celery worker`` with exactly the benchmark's `WORKER`
settings (``-P prefork -c 2``, prefetch multiplier 4). Tasks are submitted the way its
docs say, ``task.delay()`` inside ``transaction.atomic()``, so the outbox row commits with
the business data; the relay publishes each row and deletes it.

Completion: django-celery-outbox records none (the relay publishes and forgets; results are
Celery's business, and ironflow's durable acknowledgement has no counterpart here), so:

- drain: the no-op task appends ``time.time()`` to a file when it runs; N tasks submitted
  first (1,000 per transaction), then relay and worker start; rate from the first to the
  last task run. This is a lighter completion than the other systems' durable ones.
- cycle: the input is a transaction inserting a ``bench_outbox_cycle`` row and submitting
  ``cycle_a``; ``cycle_a`` submits ``cycle_b`` through the outbox (its own transaction);
  ``cycle_b`` sets the row's ``done_at`` (the durable terminal). N inputs from 2 threads;
  rate = N / (last ``done_at`` - first submission).

Submissions run in a helper process (``python -m benchmarks.peers.outbox_peer submit``),
because Django binds one database per process and each measurement has a fresh one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import django
import sqlalchemy as sa
from celery import Celery

from benchmarks.peers.common import (
    DSN_ENV,
    ROOT,
    WARM_UP_S,
    Measure,
    PeerRun,
    cycle_measure,
    drain_measure,
)

SETTINGS = "benchmarks.peers.outbox_settings"
RELAY_BATCH = 100
RELAY_IDLE_S = 0.1
DONE_DIR_ENV = "IRONFLOW_BENCH_DONE_DIR"
CYCLE_TABLE = "CREATE TABLE bench_outbox_cycle (id text PRIMARY KEY, done_at timestamptz)"

app: Celery
if os.environ.get("DJANGO_SETTINGS_MODULE") == SETTINGS:
    # A worker, the relay or the submitter: Django bound to this measurement's database.
    django.setup()
    from django.db import connection, transaction
    from django_celery_outbox import OutboxCelery

    app = OutboxCelery("bench_outbox")
    app.conf.update(
        broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery"),
    )
    _done: tuple[int, int] | None = None

    @app.task(name="bench_outbox.noop", ignore_result=True)
    def noop() -> None:
        global _done
        pid = os.getpid()
        if _done is None or _done[0] != pid:
            path = os.path.join(os.environ[DONE_DIR_ENV], f"{pid}.done")
            _done = (pid, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        os.write(_done[1], f"{time.time():.6f}\n".encode())

    @app.task(name="bench_outbox.cycle_a", ignore_result=True)
    def cycle_a(cid: str) -> None:
        with transaction.atomic():
            cycle_b.delay(cid)

    @app.task(name="bench_outbox.cycle_b", ignore_result=True)
    def cycle_b(cid: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE bench_outbox_cycle SET done_at = clock_timestamp() WHERE id = %s", [cid]
            )


def describe(worker: dict[str, Any]) -> str:
    from importlib.metadata import version

    return (
        f"django-celery-outbox {version('django-celery-outbox')} (Django {django.__version__}):"
        f" 1 relay process (--batch-size {RELAY_BATCH}, --idle-time {RELAY_IDLE_S}) + 1 celery"
        f" worker -P {worker['pool']} -c {worker['concurrency']}, prefetch multiplier "
        f"{worker['prefetch_multiplier']}; completion: the task ran (drain), a row update "
        "(cycle)"
    )


# -- the benchmark process's side --------------------------------------------------------


def _sentry2() -> str | None:
    """A directory holding sentry-sdk 2.x for the peer's processes, when this environment
    has 3.x: django-celery-outbox 0.4.3 calls ``sentry_sdk.start_span(op=...)`` on every
    submission, which sentry-sdk 3 removed (TypeError). Installed once, with pip."""
    from importlib.metadata import version

    if int(version("sentry-sdk").split(".")[0]) < 3:
        return None
    target = ROOT / ".ironflow" / "peer-sentry2"
    if not (target / "sentry_sdk").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        subprocess.run([*pip, str(target), "sentry-sdk>=2,<3"], check=True)
    return str(target)


def _setup(run: PeerRun) -> tuple[sa.Engine, str, dict[str, str], str]:
    url, dsn = run.database()
    queue = run.bench.queue(f"r10-{run.label}")
    done_dir = run.bench.tmp / f"r10-{run.label}"
    done_dir.mkdir()
    env = {
        DSN_ENV: dsn,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        DONE_DIR_ENV: str(done_dir),
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "CELERY_BROKER_URL": run.bench.broker_url,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), _sentry2(), os.environ.get("PYTHONPATH")])
        ),
    }
    migrate = run.start(
        "migrate", [sys.executable, "-m", "django", "migrate", "-v", "0"], run.env(**env)
    )
    run.procs.remove(migrate)  # it is meant to exit
    if migrate.wait(120) != 0:
        raise RuntimeError(f"django migrate exited with {migrate.returncode}")
    engine = run.engine(url)
    with engine.connect() as conn:
        conn.execute(sa.text(CYCLE_TABLE))
    return engine, queue, env, str(done_dir)


def _submit(run: PeerRun, env: dict[str, str], workload: str, n: int) -> float:
    """Submit in a helper process; returns the epoch second its first submission began."""
    proc = run.start(
        f"submit-{workload}",
        [sys.executable, "-m", __name__, "submit", workload, str(n)],
        run.env(**env),
    )
    run.procs.remove(proc)  # it is meant to exit
    if proc.wait(600) != 0:
        raise RuntimeError(f"outbox submitter exited with {proc.returncode}")
    return float((Path(env[DONE_DIR_ENV]) / f"t0-{workload}").read_text())


def _relay_and_worker(run: PeerRun, queue: str, env: dict[str, str]) -> None:
    relay = [
        sys.executable, "-m", "django", "celery_outbox_relay",
        "--batch-size", str(RELAY_BATCH), "--idle-time", str(RELAY_IDLE_S),
    ]  # fmt: skip
    run.start("relay", relay, run.env(**env))
    run.adopt(run.bench.worker(f"r10-{run.label}", queue, app=__name__, **env))


def _ran(done_dir: str) -> tuple[int, float | None, float | None]:
    stamps: list[float] = []
    for path in Path(done_dir).glob("*.done"):
        stamps.extend(float(x) for x in path.read_text().split())
    return len(stamps), min(stamps, default=None), max(stamps, default=None)


def drain(run: PeerRun, n: int) -> Measure:
    _engine, queue, env, done_dir = _setup(run)
    _submit(run, env, "drain", n)
    _relay_and_worker(run, queue, env)
    run.wait(lambda: _ran(done_dir)[0] >= n, time.monotonic() + run.cap, 0.2)
    done, first, last = _ran(done_dir)
    return drain_measure(n, done, first, last)


def cycle(run: PeerRun, n: int) -> Measure:
    engine, queue, env, _done_dir = _setup(run)
    _relay_and_worker(run, queue, env)
    _submit(run, env, "warmup", 1)

    def finished() -> tuple[int, float | None]:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT count(done_at), EXTRACT(EPOCH FROM max(done_at)) "
                    "FROM bench_outbox_cycle WHERE id LIKE :p"
                ),
                {"p": "c%"},
            ).one()
        return int(row[0]), None if row[1] is None else float(row[1])

    run.wait_until_true(lambda: _warm(engine), WARM_UP_S, "the warm-up cycle")
    t0 = _submit(run, env, "cycle", n)
    deadline = time.monotonic() + run.cap
    run.wait(lambda: finished()[0] >= n, deadline, 0.2)
    done, last = finished()
    return cycle_measure(n, done, t0, last)


def _warm(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                sa.text("SELECT count(done_at) FROM bench_outbox_cycle WHERE id = 'warmup'")
            ).scalar()
        )


# -- the submitter process -----------------------------------------------------------------


def submit(workload: str, n: int) -> None:
    done_dir = Path(os.environ[DONE_DIR_ENV])
    if workload == "drain":
        (done_dir / "t0-drain").write_text(f"{time.time():.6f}")
        for start in range(0, n, 1000):
            with transaction.atomic():
                for _ in range(start, min(start + 1000, n)):
                    noop.delay()
        return

    def one(cid: str) -> None:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO bench_outbox_cycle (id) VALUES (%s)", [cid])
            cycle_a.delay(cid)

    t0 = time.time()
    if workload == "warmup":
        one("warmup")
    else:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, [f"c{i}" for i in range(n)], chunksize=50))
    (done_dir / f"t0-{workload}").write_text(f"{t0:.6f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["submit"]:
        submit(sys.argv[2], int(sys.argv[3]))
