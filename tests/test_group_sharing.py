"""How much of a group message one worker process runs (`engine.sharing`): rows of fast
handlers stay together, a slow type's group is handed back to the broker so other
processes run it meanwhile, and every row still runs once. Real PostgreSQL, Redis, an
in-thread Celery worker (a threads pool of 4), and two worker processes under distinct
host names."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import TestApp, rows, test_config

from ironflow_celery.engine.sharing import SMOOTHING, UNMEASURED_ROWS, HandlerTimes, share
from ironflow_celery.storage.store import PostgresStore
from tests.e2e import BIN, REDIS_URL, Processes, make_env, redis_queue_cleanup, sql, wait_until
from tests.e2e_apps.batch_app import CALLS, BatchWorkflow, Go, handle_job

WT = BatchWorkflow.type


@dataclass
class Row:
    row_id: str
    ref: str = "t:w"
    attempt: int = 1
    lease: str = "relay#1"
    effect_type: str | None = None
    due: float | None = None
    trace: str | None = None


def test_a_process_takes_on_what_fits_in_the_budget_and_hands_back_the_rest() -> None:
    group = [Row(str(i)) for i in range(25)]
    # fast handlers (1 ms, budget 0.1 s): the whole group
    assert share(group, 0.001, 0.1) == (group, [])
    # 30 ms: 3 rows here, the rest in messages of 3
    kept, rest = share(group, 0.03, 0.1)
    assert kept == group[:3] and [len(m) for m in rest] == [3] * 7 + [1]
    assert [r for m in rest for r in m] == group[3:]
    # slower than the budget: one row here, every other row alone
    kept, rest = share(group, 2.0, 0.1)
    assert kept == group[:1] and rest == [[r] for r in group[1:]]
    # not measured yet: the first rows here, the rest in one message for the next process
    kept, rest = share(group, None, 0.1)
    assert kept == group[:UNMEASURED_ROWS] and rest == [group[UNMEASURED_ROWS:]]
    assert share(group[:UNMEASURED_ROWS], None, 0.1) == (group[:UNMEASURED_ROWS], [])
    # budget 0 (off) and a lone row: run whole
    assert share(group, 2.0, 0) == (group, [])
    assert share(group[:1], 2.0, 0.1) == (group[:1], [])


def test_handler_times_are_a_mean_with_a_long_memory_per_type() -> None:
    """The plain mean of a type's first 20 rows, then a weight of `SMOOTHING` per row: a
    preempted no-op (5 ms among 20 µs rows) barely moves it, one 1 s row still does."""
    times = HandlerTimes()
    assert times.mean("a") is None
    times.note("a", 1.0)
    assert times.mean("a") == 1.0
    times.note("a", 0.0)
    assert times.mean("a") == pytest.approx(0.5)
    assert times.mean("b") is None
    for _ in range(200):
        times.note("b", 20e-6)
    times.note("b", 5e-3)
    assert times.mean("b") < 0.3e-3  # still a whole group of 100 in a 0.1 s budget
    times.note("b", 1.0)
    assert times.mean("b") > 0.04  # the next group is shared
    assert SMOOTHING == 0.05


def test_a_slow_types_group_is_spread_over_processes_and_each_row_runs_once(
    store: PostgresStore, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a row of the type took 0.3 s here, a group of 6 of its rows (budget 0.1 s)
    keeps one row and hands five back as messages of one: six tasks, run by the pool's
    threads side by side, each row processed once at its first attempt."""
    monkeypatch.setenv("BATCH_TEST_SLEEP", "0.3")
    app = TestApp(store, workflows=((BatchWorkflow, handle_job),), config=test_config())
    try:
        wid = _run_after_measuring(app, db, "sleep", 6)
        assert app.runtime.handler_times.mean(WT) >= 0.3
        history = [
            r.celery_attempts
            for r in rows(
                db, "SELECT celery_attempts FROM ironflow.outbox WHERE workflow_id = :w", w=wid
            )
        ]
        assert all(len(h) == 1 and h[0]["outcome"] == "processed" for h in history)
        tasks = {h[0]["task"] for h in history}
        assert len(tasks) == 6, f"expected six tasks (one kept, five handed back): {history}"
        assert all(CALLS.counts[(wid, i)] == 1 for i in range(6))
    finally:
        app.stop()


def test_fast_handlers_keep_their_group_together(store: PostgresStore, db: sa.Engine) -> None:
    app = TestApp(store, workflows=((BatchWorkflow, handle_job),), config=test_config())
    try:
        wid = _run_after_measuring(app, db, "ok", 30)
        tasks = {
            r.task
            for r in rows(
                db,
                "SELECT celery_attempts -> 0 ->> 'task' AS task FROM ironflow.outbox"
                " WHERE workflow_id = :w",
                w=wid,
            )
        }
        assert len(tasks) == 1  # one message, one task, all 30 rows
    finally:
        app.stop()


def _run_after_measuring(app: TestApp, db: sa.Engine, mode: str, rows_: int) -> str:
    """Start `app`, let one row of `mode` teach it the type's handler time, then run a
    group of `rows_` such rows; the group's workflow id."""
    app.start()
    first = f"m-{uuid.uuid4().hex[:6]}"
    app.service.execute(Go(id=first, jobs=[mode]))
    app.wait_until(lambda: _processed(db, first) == 1, what="the type measured")
    wid = f"g-{uuid.uuid4().hex[:6]}"
    app.service.execute(Go(id=wid, jobs=[mode] * rows_))
    app.wait_until(lambda: _processed(db, wid) == rows_, what="the group processed")
    return wid


def _processed(db: sa.Engine, wid: str) -> Any:
    with db.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM ironflow.outbox WHERE workflow_id = :w"
                " AND processed_at IS NOT NULL"
            ),
            {"w": wid},
        ).scalar()


@pytest.mark.e2e
def test_a_slow_group_reaches_the_workers_of_two_hosts(
    database_url: str, store: PostgresStore, tmp_path: Path, queue: str
) -> None:
    """Two worker processes under distinct host names, one thread each, both with their
    relays, the defaults otherwise (groups of up to 100, a 0.1 s budget): 0.3 s handlers
    claimed as groups of 12 end up run by both hosts, every row once, at its first
    attempt, and a worker says what it handed back."""
    from runtime_helpers import build_runtime

    service = build_runtime(store, None, test_config(), [(BatchWorkflow, handle_job)]).service
    workers = Processes(tmp_path)
    try:
        with redis_queue_cleanup(queue):
            env = make_env(database_url, REDIS_URL, queue)
            env.update(BATCH_TEST_APP="1", BATCH_TEST_SLEEP="0.3")
            procs = []
            for host in ("host-a", "host-b"):
                argv = [
                    str(BIN / "celery"), "-A", "tests.e2e_apps.batch_app", "worker", "-l",
                    "info", "-P", "threads", "-c", "1", "-n", f"{host}-{uuid.uuid4().hex[:6]}@%h",
                    "--without-heartbeat", "--without-gossip", "--without-mingle",
                ]  # fmt: skip
                procs.append(workers.spawn(host, argv, env))
            for proc in procs:
                proc.wait_for_output("ironflow relay started", 60)
            wids = [f"h-{uuid.uuid4().hex[:6]}" for _ in range(2)]
            for wid in wids:  # the first group teaches the type's handler time
                service.execute(Go(id=wid, jobs=["sleep"] * 12))
                wait_until(
                    lambda wid=wid: _processed_e2e(database_url, wid) == 12,
                    120,
                    lambda: "every row processed\n" + "\n".join(p.output()[-2000:] for p in procs),
                )
            history = sql(
                database_url,
                "SELECT celery_attempts FROM ironflow.outbox WHERE workflow_id IN"
                f" ('{wids[0]}', '{wids[1]}')",
            )
            entries = [row[0] for row in history]
            assert all(len(h) == 1 and h[0]["outcome"] == "processed" for h in entries), entries
            hosts = {h[0]["worker"][: len("host-a")] for h in entries}
            assert hosts == {"host-a", "host-b"}, entries
            assert any("handed" in p.output() for p in procs)
            for proc in procs:
                assert proc.terminate(30) == 0, proc.output()[-3000:]
    finally:
        workers.kill_all()
        print(workers.report())


def _processed_e2e(database_url: str, wid: str) -> int:
    rows_ = sql(
        database_url,
        f"SELECT count(*) FROM ironflow.outbox WHERE workflow_id = '{wid}'"
        " AND processed_at IS NOT NULL",
    )
    return int(rows_[0][0])
