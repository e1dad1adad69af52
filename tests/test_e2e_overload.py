"""End-to-end: overload, a database that goes away before the start guard, and crashes.

- A backlog that takes many leases to drain, on a machine kept busy by a CPU burner,
  drains without stale copies: waiting in the broker is not failing (invariant 10).
- A worker that takes messages while PostgreSQL is down sends them back instead of
  dropping them, so its rows do not wait out a lease (invariant 7).
- PostgreSQL crashes (``pg_ctl stop -m immediate``) while chains of effects run lose no
  acknowledgement that others acted on: every chain completes, no step reaches the
  external recorder under two idempotency keys, and every event a projection saw still
  exists (invariant 9).

Real ``celery worker`` processes, a real Redis, disposable PostgreSQL servers for the
tests that stop one; waits are for progress, with generous bounds.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from ironflow_celery.operations.projections import ProjectionEvent, projection, run_projections
from ironflow_celery.service.workflow_service import Registry, WorkflowService
from ironflow_celery.storage import schema
from ironflow_celery.storage.db import create_engine
from ironflow_celery.storage.store import PostgresStore
from tests.e2e import (
    PG_BIN,
    REDIS_URL,
    DisposablePostgres,
    Processes,
    make_env,
    outbox_counts,
    redis_queue_cleanup,
    scalar,
    sql,
    wait_until,
)
from tests.e2e_apps.chains import Begin, ChainWorkflow
from tests.waiting import wait_for_progress

# Waits are for progress (a stall fails them), so no fixed wall time cuts them short.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# Each row's worker log line (tasks.ROW_LINE), in every delivery mode: a group's Celery
# "Task … succeeded" line carries many rows' results.
ROW_OUTCOME = re.compile(
    r"ironflow effect \S+ of \S+ \([^)]*\) attempt \d+ "
    r"(processed|stale-skipped|failed|dead-lettered)"
)


@contextmanager
def cpu_burner() -> Iterator[None]:
    """A process that keeps one core busy, as another tenant of the machine would."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        burner.kill()
        burner.wait(10)


def deliveries(log: str) -> dict[str, int]:
    """Row outcomes a worker logged, by status (one line per row)."""
    counts: dict[str, int] = {}
    for status in ROW_OUTCOME.findall(log):
        counts[status] = counts.get(status, 0) + 1
    return counts


# -- 1. overload -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [20, 1], ids=["grouped", "single-row"])
def test_backlog_of_many_leases_drains_without_stale_copies(
    database_url: str,
    procs: Processes,
    queue: str,
    size: int,
) -> None:
    """600 effects of 20 ms behind a 2 s lease, 2 pool processes, a CPU burner beside:
    every effect completes, and stale deliveries stay at or below 1 % of all deliveries.
    (Before the relay kept waiting rows' leases alive, most of the backlog expired in the
    broker and was published again and again.)"""
    n = 600
    env = make_env(
        database_url,
        REDIS_URL,
        queue,
        effect_lock_duration=2,
        max_attempts=50,
        effect_batch_size=size,
    )
    with redis_queue_cleanup(queue), cpu_burner():
        worker = procs.worker("worker", env, pool="prefork", concurrency=2)
        worker.wait_for_output("ironflow relay started (process)", 60)
        sql(
            database_url,
            "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload) "
            "SELECT 'e2e_order', 'ov-' || g, "
            """'{"type": "Charge", "sleep": 0.02, "record": false, "follow_up": false}'"""
            "::jsonb FROM generate_series(1, %s) AS g",
            (n,),
        )
        sql(database_url, "SELECT pg_notify('ironflow_effects', 'e2e_order')")
        wait_for_progress(lambda: outbox_counts(database_url)[0], n, f"{n} effects")
        time.sleep(1.0)  # late duplicate deliveries would show in the log now
        counts = deliveries(worker.output())
    total = sum(counts.values())
    stale = counts.get("stale-skipped", 0)
    assert counts.get("processed", 0) == n, counts
    assert stale <= 0.01 * total, counts


# -- 2. the database is down when a worker takes the message -----------------------------


@pytest.mark.parametrize("size", [20, 1], ids=["grouped", "single-row"])
def test_database_down_at_the_start_guard_redelivers_instead_of_dropping(
    procs: Processes,
    queue: str,
    size: int,
) -> None:
    """Messages consumed while PostgreSQL is down go back to the broker (a transport retry,
    no attempt counted) and run once it is back -- well within their 600 s lease, which
    is how long a dropped message would have stranded its row."""
    n = 20
    pg = DisposablePostgres()
    try:
        pg.init()
        sql(pg.url, "CREATE DATABASE e2e")
        url = pg.url.rsplit("/", 1)[0] + "/e2e"
        engine = create_engine(url, pool_size=1)
        schema.upgrade(engine)
        engine.dispose()
        env = make_env(url, REDIS_URL, queue, effect_lock_duration=600, effect_batch_size=size)
        messages = n // size  # one group of 20, or 20 single-row messages
        with redis_queue_cleanup(queue) as client:
            procs.relay("relay", env)
            sql(
                url,
                "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload) "
                "SELECT 'e2e_order', 'down-' || g, "
                """'{"type": "Charge", "record": false, "follow_up": false}'::jsonb """
                "FROM generate_series(1, %s) AS g",
                (n,),
            )
            wait_until(
                lambda: client.llen(queue) == messages, 60, f"{messages} messages in the queue"
            )
            pg._ctl("stop", "-m", "fast")
            worker = procs.worker("worker", env, pool="threads", concurrency=4, relay=False)
            worker.wait_for_output("start guard failed", 60)
            pg.start()
            began = time.monotonic()
            wait_for_progress(lambda: outbox_counts(url)[0], n, f"{n} effects after the outage")
            assert time.monotonic() - began < 300  # half the lease: no row waited it out
            # no attempt counted; if one was, its attempt history says how it ended
            counted = sql(
                url,
                "SELECT workflow_id, attempts, last_error, celery_attempts"
                " FROM ironflow.outbox WHERE attempts > 0 ORDER BY workflow_id",
            )
            assert counted == [], counted
            assert deliveries(worker.output()).get("processed") == n
    finally:
        procs.kill_all()
        pg.destroy()


# -- 3. PostgreSQL crashes ---------------------------------------------------------------


class CrashablePostgres(DisposablePostgres):
    """A disposable server whose WAL writer wakes only every 10 s: a commit that does not
    wait for its WAL flush stays at risk for seconds instead of a fraction of one, so a
    lost acknowledgement shows in most runs rather than in some. Commits that wait for
    their flush (synchronous_commit = on) are unaffected."""

    def _ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.dir}"
            " -c wal_writer_delay=10000 -c wal_writer_flush_after=0"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), action, "-D", str(self.data), "-l", str(self.logfile),
            "-o", options, "-w", "-t", "30", *extra,
        )  # fmt: skip


@pytest.mark.parametrize("size", [20, 1], ids=["grouped", "single-row"])
def test_postgres_crashes_lose_no_acknowledgement(
    procs: Processes,
    queue: str,
    size: int,
) -> None:
    """Four chains of 150 effect-and-follow-up steps run while PostgreSQL is crashed
    (``pg_ctl stop -m immediate``) five times, in both delivery modes (the chains' due
    steps travel together by default). After recovery every chain completes, no step
    reached the external recorder under two idempotency keys, every event the projection
    saw still exists, and per row: every effect is processed, none dead-lettered, and no
    row's worker log says it was processed twice."""
    chains, steps, crashes = 4, 150, 5
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    pg = CrashablePostgres()
    recorder = redis.Redis.from_url(REDIS_URL)
    stop_projection = threading.Event()
    projection_thread: threading.Thread | None = None
    try:
        pg.init()
        sql(pg.url, "CREATE DATABASE e2e")
        url = pg.url.rsplit("/", 1)[0] + "/e2e"
        engine = create_engine(url, pool_size=1)
        schema.upgrade(engine)
        engine.dispose()
        env = make_env(
            url, REDIS_URL, queue,
            effect_lock_duration=3, max_attempts=1000, backoff_base=0.1, backoff_max=0.5,
            effect_batch_size=size,
        )  # fmt: skip
        env.update(IRONFLOW_TEST_RECORDER=prefix, IRONFLOW_TEST_RECORDER_URL=REDIS_URL)

        seen_key = f"{prefix}:seen"

        @projection(f"seen_{prefix}".replace("-", "_"), types=[ChainWorkflow.type])
        def seen(event: ProjectionEvent) -> None:
            recorder.sadd(seen_key, f"{event.workflow_id}|{event.sequence}|{event.raw['type']}")

        store = PostgresStore.from_url(url)
        projection_thread = threading.Thread(
            target=run_projections, args=(store, [seen], stop_projection), daemon=True
        )
        projection_thread.start()

        def stepped() -> int:
            return sum(
                recorder.scard(k) > 0 for k in recorder.scan_iter(f"{prefix}:c*:*", count=1000)
            )

        def diagnose() -> str:
            unfinished = sql(
                url,
                "SELECT id, workflow_id, payload, attempts, locked_by, locked_until - now(),"
                " last_error, dead_lettered_at FROM ironflow.outbox WHERE processed_at IS NULL",
            )
            last = sql(
                url,
                "SELECT DISTINCT ON (workflow_id) workflow_id, sequence, payload"
                " FROM ironflow.events ORDER BY workflow_id, sequence DESC",
            )
            ids = [str(row[0]) for row in unfinished]
            lines = [line for line in worker.output().splitlines() if any(i in line for i in ids)]
            return f"unfinished: {unfinished}\nlast events: {last}\n" + "\n".join(lines)

        with redis_queue_cleanup(queue):
            worker = procs.worker(
                "worker", env, pool="prefork", concurrency=2, app="tests.e2e_apps.chain_app"
            )
            worker.wait_for_output("ironflow relay started (process)", 60)
            service = WorkflowService(
                store, Registry([(ChainWorkflow, ChainWorkflow.handle_effect)])
            )
            for c in range(chains):
                service.execute(Begin(id=f"c{c}", steps=steps))
            total = chains * steps
            for i in range(1, crashes + 1):
                # Crash while acknowledgements and follow-ups are in full flow.
                wait_for_progress(
                    stepped, i * total // (crashes + 2), "chain steps", diagnose=diagnose
                )
                pg._ctl("stop", "-m", "immediate")
                pg.start()
            # Progress is every step recorded; then the chains' last acks land.
            wait_for_progress(stepped, total, "chain steps", diagnose=diagnose)
            wait_for_progress(
                lambda: scalar(
                    url, "SELECT count(*) FROM ironflow.events WHERE payload->>'type' = 'Finished'"
                ),
                chains,
                "every chain to finish",
                stall=120,
                diagnose=diagnose,
            )
            time.sleep(1.0)  # a late duplicate run would record now
        twice = {
            k.decode(): sorted(m.decode() for m in recorder.smembers(k))
            for k in recorder.scan_iter(f"{prefix}:c*:*", count=1000)
            if recorder.scard(k) > 1
        }
        assert twice == {}, f"steps recorded under two idempotency keys: {twice}"
        assert stepped() == total
        events = {
            f"{wid}|{seq}|{kind}"
            for wid, seq, kind in sql(
                url, "SELECT workflow_id, sequence, payload->>'type' FROM ironflow.events"
            )
        }
        assert len(events) == chains * (steps + 2)
        wait_for_progress(lambda: recorder.scard(seen_key), len(events), "the projection")
        seen_events = {m.decode() for m in recorder.smembers(seen_key)}
        assert seen_events - events == set(), "the projection saw events that were lost"
        # Per row, whatever travelled with it: processed, never dead-lettered, and at most
        # one "processed" line (an acknowledgement whose commit reply the crash lost has
        # none: its row is processed all the same).
        effects = {
            str(row_id): (processed, dead)
            for row_id, processed, dead in sql(
                url,
                "SELECT id, processed_at IS NOT NULL, dead_lettered_at IS NOT NULL"
                " FROM ironflow.outbox",
            )
        }
        assert len(effects) == total
        assert all(processed and not dead for processed, dead in effects.values())
        log = worker.output()
        processed_lines = Counter(
            re.findall(r"ironflow effect (\S+) of \S+ \([^)]*\) attempt \d+ processed", log)
        )
        assert set(processed_lines) <= set(effects)
        assert max(processed_lines.values()) == 1, processed_lines.most_common(3)
        # at most a group's rows per crash lose their commit's reply
        assert len(processed_lines) >= total - chains * crashes, len(processed_lines)
        # The mode ran as asked: a message whose task id is no row id is a group of rows.
        task_ids = set(
            re.findall(r"Task ironflow\.e2e_chain\.effect\[([0-9a-f-]+)\] received", log)
        )
        groups = task_ids - set(effects)
        assert bool(groups) == (size > 1), f"{len(groups)} group message(s) with size {size}"
    finally:
        stop_projection.set()
        if projection_thread is not None:
            projection_thread.join(30)
        procs.kill_all()
        for key in recorder.scan_iter(f"{prefix}:*", count=1000):
            recorder.delete(key)
        recorder.close()
        pg.destroy()
