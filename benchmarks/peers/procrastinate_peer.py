"""Row 10 peer: procrastinate (PostgreSQL task queue, LISTEN/NOTIFY, no broker).

Configuration: its own fresh database with procrastinate's schema; `WORKER["concurrency"]`
``procrastinate worker`` processes, each ``--concurrency WORKER["concurrency"]`` with
LISTEN/NOTIFY on (its default, the documented way to pick jobs up without polling delay);
tasks are ``async`` so a worker's concurrency is asyncio tasks, not threads. Jobs are kept
(no ``--delete-jobs``): procrastinate's durable completion is the job's ``succeeded``
status, timestamped by its ``procrastinate_events`` row.

- drain: N ``bench.noop`` jobs deferred first (``batch_defer``, 1,000 a statement), then the
  workers start; rate from the first to the last ``succeeded`` event.
- cycle: ``bench.cycle_a`` defers ``bench.cycle_b`` (its own committed job) and returns;
  ``cycle_b``'s success is the terminal record. N ``cycle_a`` deferred from 2 threads (one
  transaction each, as ironflow's inputs); rate = N / (last ``cycle_b`` success - first
  submission).

The worker processes import this module (``--app benchmarks.peers.procrastinate_peer.app``)
and read their database from ``IRONFLOW_BENCH_PEER_DSN``.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import procrastinate
import sqlalchemy as sa

from benchmarks.peers.common import (
    DSN_ENV,
    WARM_UP_S,
    Measure,
    PeerRun,
    completions,
    cycle_measure,
    drain_measure,
)

QUEUE = "bench"

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ.get(DSN_ENV, ""))
)


@app.task(name="bench.noop", queue=QUEUE)
async def noop() -> None:
    return None


@app.task(name="bench.cycle_b", queue=QUEUE)
async def cycle_b(cid: str) -> None:
    return None


@app.task(name="bench.cycle_a", queue=QUEUE)
async def cycle_a(cid: str) -> None:
    await cycle_b.defer_async(cid=cid)


def describe(worker: dict[str, Any]) -> str:
    c = worker["concurrency"]
    return (
        f"procrastinate {procrastinate.__version__}: {c} `procrastinate worker` processes, "
        f"--concurrency {c} each (async tasks), LISTEN/NOTIFY on, jobs kept"
    )


def _setup(run: PeerRun) -> tuple[procrastinate.App, sa.Engine, str]:
    url, dsn = run.database()
    connector = procrastinate.PsycopgConnector(conninfo=dsn)
    run.stack.enter_context(app.replace_connector(connector))
    run.stack.enter_context(app.open())
    app.schema_manager.apply_schema()
    return app, run.engine(url), dsn


def _workers(run: PeerRun, dsn: str) -> None:
    c = str(run.worker["concurrency"])
    for i in range(int(run.worker["concurrency"])):
        run.start(
            f"worker{i}",
            [
                run.script("procrastinate"),
                "--app",
                "benchmarks.peers.procrastinate_peer.app",
                "worker",
                "--queues",
                QUEUE,
                "--concurrency",
                c,
                "--name",
                f"bench-{run.label}-{i}",
            ],
            run.env(**{DSN_ENV: dsn}),
        )


def _succeeded(engine: sa.Engine, task: str) -> tuple[int, float | None, float | None]:
    return completions(
        engine,
        "SELECT count(*), EXTRACT(EPOCH FROM min(e.at)), EXTRACT(EPOCH FROM max(e.at)) "
        "FROM procrastinate_events e JOIN procrastinate_jobs j ON j.id = e.job_id "
        "WHERE e.type = 'succeeded' AND j.task_name = :t",
        t=task,
    )


def drain(run: PeerRun, n: int) -> Measure:
    local, engine, dsn = _setup(run)
    task = local.configure_task("bench.noop", queue=QUEUE)
    for start in range(0, n, 1000):
        task.batch_defer(*({} for _ in range(start, min(start + 1000, n))))
    _workers(run, dsn)
    run.wait(lambda: _succeeded(engine, "bench.noop")[0] >= n, time.monotonic() + run.cap, 0.2)
    done, first, last = _succeeded(engine, "bench.noop")
    return drain_measure(n, done, first, last)


def cycle(run: PeerRun, n: int) -> Measure:
    local, engine, dsn = _setup(run)
    _workers(run, dsn)
    warm = local.configure_task("bench.noop", queue=QUEUE)
    warm.defer()
    run.wait_until_true(
        lambda: _succeeded(engine, "bench.noop")[0] >= 1, WARM_UP_S, "the warm-up job"
    )
    task = local.configure_task("bench.cycle_a", queue=QUEUE)
    t0 = time.time()
    deadline = time.monotonic() + run.cap
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: task.defer(cid=f"c{i}"), range(n), chunksize=50))
    run.wait(lambda: _succeeded(engine, "bench.cycle_b")[0] >= n, deadline, 0.2)
    done, _first, last = _succeeded(engine, "bench.cycle_b")
    return cycle_measure(n, done, t0, last)
