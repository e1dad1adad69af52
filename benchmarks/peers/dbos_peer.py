"""Row 10 peer: DBOS Transact (durable workflows and queues in PostgreSQL, no broker).

Configuration: its own fresh database as DBOS's system database (schema ``dbos``, created by
a first ``DBOS.launch()`` before anything is enqueued); `WORKER["concurrency"]` executor
processes (``python -m benchmarks.peers.dbos_peer worker``, each with its own
``executor_id``), all dequeuing from one queue registered with ``worker_concurrency``
`WORKER_CONCURRENCY` (workflows one executor runs at once) and ``polling_interval_sec``
`POLL_S` (DBOS's default is 1 s; a queue is read only once per poll, so the shorter
interval is the documented knob for throughput). Enqueues go through ``DBOSClient``.
DBOS's durable completion is the workflow's ``SUCCESS`` status in ``dbos.workflow_status``
(``updated_at``, milliseconds).

- drain: N ``bench_noop`` workflows (no step) enqueued first, all in one transaction
  (``enqueue_in_transaction``), then the executors start; rate from the first to the last
  ``SUCCESS``.
- cycle: N ``bench_cycle`` workflows (step ``bench_effect`` → step ``bench_follow_up``,
  each step's result checkpointed), enqueued from 2 threads, one transaction each; rate =
  N / (last ``SUCCESS`` - first submission).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, DBOSClient

from benchmarks.peers.common import (
    DSN_ENV,
    WARM_UP_S,
    Measure,
    PeerRun,
    completions,
    cycle_measure,
    drain_measure,
)

APP = "ironflow-bench"
QUEUE = "bench"
WORKER_CONCURRENCY = 100
POLL_S = 0.1


@DBOS.workflow(name="bench_noop")
def noop_workflow() -> None:
    return None


@DBOS.step(name="bench_effect")
def effect_step(cid: str) -> str:
    return cid


@DBOS.step(name="bench_follow_up")
def follow_up_step(cid: str) -> None:
    return None


@DBOS.workflow(name="bench_cycle")
def cycle_workflow(cid: str) -> None:
    follow_up_step(effect_step(cid))


def describe(worker: dict[str, Any]) -> str:
    return (
        f"dbos {_version()}: {worker['concurrency']} executor processes, one queue with "
        f"worker_concurrency {WORKER_CONCURRENCY} and polling_interval_sec {POLL_S}, "
        "enqueued through DBOSClient"
    )


def _version() -> str:
    from importlib.metadata import version

    return version("dbos")


def _launch(dsn: str) -> None:
    DBOS(
        config={
            "name": APP,
            "system_database_url": dsn,
            "executor_id": f"bench-{os.getpid()}",
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=WORKER_CONCURRENCY, polling_interval_sec=POLL_S)


def main(argv: list[str]) -> None:
    """``migrate``: create the system database's schema and the queue, then exit;
    ``worker``: an executor process, until SIGTERM."""
    dsn = os.environ[DSN_ENV]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _launch(dsn)
    if argv[:1] == ["worker"]:
        stop.wait()
    DBOS.destroy()


def _setup(run: PeerRun) -> tuple[DBOSClient, sa.Engine, str]:
    url, dsn = run.database()
    migrate = run.start("migrate", [sys.executable, "-m", __name__, "migrate"], _env(run, dsn))
    run.procs.remove(migrate)  # it is meant to exit
    if migrate.wait(120) != 0:
        raise RuntimeError(f"DBOS migrate exited with {migrate.returncode}")
    client = DBOSClient(system_database_url=url, application_name=APP)
    run.stack.callback(client.destroy)
    return client, run.engine(url), dsn


def _env(run: PeerRun, dsn: str) -> dict[str, str]:
    return run.env(**{DSN_ENV: dsn})


def _workers(run: PeerRun, dsn: str) -> None:
    for i in range(int(run.worker["concurrency"])):
        run.start(f"worker{i}", [sys.executable, "-m", __name__, "worker"], _env(run, dsn))


def _succeeded(engine: sa.Engine, name: str) -> tuple[int, float | None, float | None]:
    return completions(
        engine,
        "SELECT count(*), min(updated_at) / 1000.0, max(updated_at) / 1000.0 "
        "FROM dbos.workflow_status WHERE status = 'SUCCESS' AND name = :n",
        n=name,
    )


def drain(run: PeerRun, n: int) -> Measure:
    client, engine, dsn = _setup(run)
    options: Any = {"queue_name": QUEUE, "workflow_name": "bench_noop"}
    with engine.connect() as conn, conn.begin():
        for _ in range(n):
            client.enqueue_in_transaction(conn, options)
    _workers(run, dsn)
    run.wait(lambda: _succeeded(engine, "bench_noop")[0] >= n, time.monotonic() + run.cap, 0.2)
    done, first, last = _succeeded(engine, "bench_noop")
    return drain_measure(n, done, first, last)


def cycle(run: PeerRun, n: int) -> Measure:
    client, engine, dsn = _setup(run)
    _workers(run, dsn)
    client.enqueue({"queue_name": QUEUE, "workflow_name": "bench_noop"})  # warm-up
    run.wait_until_true(lambda: _succeeded(engine, "bench_noop")[0] >= 1, WARM_UP_S, "the warm-up")
    options: Any = {"queue_name": QUEUE, "workflow_name": "bench_cycle"}
    t0 = time.time()
    deadline = time.monotonic() + run.cap
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: client.enqueue(options, f"c{i}"), range(n), chunksize=50))
    run.wait(lambda: _succeeded(engine, "bench_cycle")[0] >= n, deadline, 0.2)
    done, _first, last = _succeeded(engine, "bench_cycle")
    return cycle_measure(n, done, t0, last)


if __name__ == "__main__":
    main(sys.argv[1:])
