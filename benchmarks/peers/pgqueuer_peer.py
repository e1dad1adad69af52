"""Row 10 peer: pgqueuer (PostgreSQL job queue, LISTEN/NOTIFY, no broker).

Configuration: its own fresh database with pgqueuer's schema at its default durability
(``durable``: every table logged); `WORKER["concurrency"]` ``pgq run`` processes on asyncpg
(its fastest driver, the ``asyncpg`` extra), ``--batch-size`` `BATCH_SIZE` (its default:
jobs claimed per dequeue; acknowledgements are buffered and written in groups of the same
size), no ``--max-concurrent-tasks`` cap (its default), async entrypoints. pgqueuer's
durable completion is the job's ``successful`` row in ``pgqueuer_log`` (written by that
buffered acknowledgement, in the same statement that deletes the job).

- drain: N ``bench_noop`` jobs enqueued first (1,000 a statement), then the workers start;
  rate from the first to the last ``successful`` log row.
- cycle: ``bench_cycle_a`` enqueues ``bench_cycle_b`` (committed before A is acknowledged)
  and returns; ``bench_cycle_b``'s success is the terminal record. N ``bench_cycle_a``
  enqueued from 2 threads, one job per statement; rate = N / (last ``bench_cycle_b``
  success - first submission).

``create`` is the factory the worker processes load; they read their database from
``IRONFLOW_BENCH_PEER_DSN``. A worker is ``python -m benchmarks.peers.pgqueuer_peer``: what
``pgq run`` does (`pgqueuer.run`, the same supervisor, on uvloop), because pgqueuer 1.6's
``pgq run`` command fails before starting (its log-level option reaches the logger set-up
as a str where it wants its LogLevel enum).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pgqueuer
import sqlalchemy as sa
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, PgQueuer, Queries

from benchmarks.peers.common import (
    DSN_ENV,
    WARM_UP_S,
    Measure,
    PeerRun,
    completions,
    cycle_measure,
    drain_measure,
)

BATCH_SIZE = 10


@asynccontextmanager
async def create() -> AsyncIterator[PgQueuer]:
    """The worker's PgQueuer: one connection for the queue manager, a pool for enqueues."""
    dsn = os.environ[DSN_ENV]
    conn = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    pgq = PgQueuer(AsyncpgDriver(conn))
    enqueue = Queries(AsyncpgPoolDriver(pool))

    @pgq.entrypoint("bench_noop")
    async def noop(job: pgqueuer.Job) -> None:
        return None

    @pgq.entrypoint("bench_cycle_a")
    async def cycle_a(job: pgqueuer.Job) -> None:
        await enqueue.enqueue("bench_cycle_b", job.payload)

    @pgq.entrypoint("bench_cycle_b")
    async def cycle_b(job: pgqueuer.Job) -> None:
        return None

    try:
        yield pgq
    finally:
        await pool.close()
        await conn.close()


def describe(worker: dict[str, Any]) -> str:
    return (
        f"pgqueuer {pgqueuer.__version__} (asyncpg, uvloop): {worker['concurrency']} worker "
        f"processes (pgqueuer.run, as `pgq run`), --batch-size {BATCH_SIZE}, no "
        "max-concurrent-tasks cap, async entrypoints, durability 'durable'"
    )


async def _install_and_enqueue(dsn: str, entrypoint: str, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        for start in range(0, n, 1000):
            k = min(start + 1000, n) - start
            await queries.enqueue([entrypoint] * k, [None] * k, [0] * k)
    finally:
        await conn.close()


def _workers(run: PeerRun, dsn: str) -> None:
    for i in range(int(run.worker["concurrency"])):
        run.start(
            f"worker{i}",
            [sys.executable, "-m", "benchmarks.peers.pgqueuer_peer", f"--batch-size={BATCH_SIZE}"],
            run.env(**{DSN_ENV: dsn}),
        )


def _succeeded(engine: sa.Engine, entrypoint: str) -> tuple[int, float | None, float | None]:
    return completions(
        engine,
        "SELECT count(*), EXTRACT(EPOCH FROM min(created)), "
        "EXTRACT(EPOCH FROM max(created)) FROM pgqueuer_log "
        "WHERE status = 'successful' AND entrypoint = :e",
        e=entrypoint,
    )


def drain(run: PeerRun, n: int) -> Measure:
    url, dsn = run.database()
    engine = run.engine(url)
    asyncio.run(_install_and_enqueue(dsn, "bench_noop", n))
    _workers(run, dsn)
    run.wait(lambda: _succeeded(engine, "bench_noop")[0] >= n, time.monotonic() + run.cap, 0.2)
    done, first, last = _succeeded(engine, "bench_noop")
    return drain_measure(n, done, first, last)


def cycle(run: PeerRun, n: int) -> Measure:
    url, dsn = run.database()
    engine = run.engine(url)
    asyncio.run(_install_and_enqueue(dsn, "bench_noop", 1))  # schema, and a warm-up job
    _workers(run, dsn)
    run.wait_until_true(
        lambda: _succeeded(engine, "bench_noop")[0] >= 1, WARM_UP_S, "the warm-up job"
    )

    def submit(ids: range) -> None:
        async def go() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                queries = Queries(AsyncpgDriver(conn))
                for i in ids:
                    await queries.enqueue("bench_cycle_a", f"c{i}".encode())
            finally:
                await conn.close()

        asyncio.run(go())

    t0 = time.time()
    deadline = time.monotonic() + run.cap
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(submit, [range(0, n, 2), range(1, n, 2)]))
    run.wait(lambda: _succeeded(engine, "bench_cycle_b")[0] >= n, deadline, 0.2)
    done, _first, last = _succeeded(engine, "bench_cycle_b")
    return cycle_measure(n, done, t0, last)


def main(argv: list[str]) -> None:
    """A worker process: ``pgqueuer.run(create, batch_size=…)`` until SIGTERM."""
    import argparse
    import logging

    import uvloop

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.pgqueuer_peer")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(pgqueuer.run(create, batch_size=args.batch_size))


if __name__ == "__main__":
    main(sys.argv[1:])
