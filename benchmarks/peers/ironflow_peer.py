"""Row 10, ironflow_celery's side: the same workloads as the peers, on the Bench's database.

- drain: N ``bench_noop`` effects inserted into the outbox first (as row 2 does, one
  ``INSERT … SELECT``), then one benchmark worker (`WORKER`: prefork, its relay inside)
  drains them; completion = the row's durable acknowledgement (``processed_at``).
- cycle: a warmed-up worker, then N ``Begin`` inputs of ``benchmarks.workloads``'
  ``CycleWorkflow`` from 2 submit threads (as row 3 does): Begin → Work effect → Finish
  input → terminal; completion = the instance's ``completed_at``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.peers.common import (
    WARM_UP_S,
    Measure,
    PeerRun,
    cycle_measure,
    drain_measure,
    epoch,
)


def describe(worker: dict[str, Any]) -> str:
    return (
        f"1 celery worker, -P {worker['pool']} -c {worker['concurrency']} (so "
        f"{worker['concurrency']} processes running tasks), prefetch multiplier "
        f"{worker['prefetch_multiplier']}, relay inside the worker; durable acknowledgements"
    )


def drain(run: PeerRun, n: int) -> Measure:
    bench = run.bench
    prefix = f"r10d-{run.label}-"
    bench.prefill_effects("bench_noop", prefix, n)
    queue = bench.queue(f"r10-{run.label}")
    run.adopt(bench.worker(f"r10-{run.label}", queue))
    run.wait(lambda: bench.unprocessed(prefix) == 0, time.monotonic() + run.cap, every=0.2)
    row = _one(
        bench,
        "SELECT count(processed_at), EXTRACT(EPOCH FROM min(processed_at)), "
        "EXTRACT(EPOCH FROM max(processed_at)) FROM ironflow.outbox WHERE workflow_id LIKE :p",
        p=prefix + "%",
    )
    _clear(run, prefix)
    return drain_measure(n, int(row[0]), epoch(row[1]), epoch(row[2]))


def cycle(run: PeerRun, n: int) -> Measure:
    from benchmarks.workloads import Begin

    bench = run.bench
    queue = bench.queue(f"r10-{run.label}")
    proc = bench.worker(f"r10-{run.label}", queue)
    run.adopt(proc)
    bench.warm_up(proc, timeout=WARM_UP_S)
    prefix = f"r10c-{run.label}-"
    ids = [f"{prefix}{i}" for i in range(n)]
    t0 = time.time()
    deadline = time.monotonic() + run.cap
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: bench.service.execute(Begin(id=i)), ids, chunksize=50))

    def counts() -> Any:
        return _one(
            bench,
            "SELECT count(completed_at), EXTRACT(EPOCH FROM max(completed_at)) "
            "FROM ironflow.workflow_instances "
            "WHERE workflow_type = 'bench_cycle' AND workflow_id LIKE :p",
            p=prefix + "%",
        )

    run.wait(lambda: counts()[0] >= n, deadline, every=0.2)
    done, last = counts()
    _clear(run, prefix)
    return cycle_measure(n, int(done), t0, epoch(last))


def _clear(run: PeerRun, prefix: str) -> None:
    """Stop the worker, then drop what a cut (partial) run left pending in the outbox: the
    Bench's database is shared by the rounds, and a leftover backlog would be drained by
    the next ironflow measurement before its own work (the peers get a fresh database
    each)."""
    for proc in run.procs:
        run.stop(proc)
    run.bench.execute(
        "DELETE FROM ironflow.outbox WHERE processed_at IS NULL AND workflow_id LIKE :p",
        p=prefix + "%",
    )


def _one(bench: Any, statement: str, **params: Any) -> Any:
    import sqlalchemy as sa

    with bench.engine.connect() as conn:
        return conn.execute(sa.text(statement), params).one()
