"""How much of a group message one worker process runs (`engine.sharing`): rows of fast
handlers stay together, a slow type's group is handed back to the broker so other
processes run it meanwhile, and every row still runs once. Real PostgreSQL, Redis and an
in-thread Celery worker (a threads pool of 4)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import TestApp, rows, test_config

from ironflow_celery.engine.sharing import UNMEASURED_ROWS, HandlerTimes, share
from ironflow_celery.storage.store import PostgresStore
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


def test_handler_times_are_smoothed_per_type() -> None:
    times = HandlerTimes()
    assert times.mean("a") is None
    times.note("a", 1.0)
    assert times.mean("a") == 1.0
    times.note("a", 0.0)
    assert times.mean("a") == pytest.approx(0.7)
    assert times.mean("b") is None


def test_a_slow_types_group_is_spread_over_processes_and_each_row_runs_once(
    store: PostgresStore, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a row of the type took 0.3 s here, a group of 6 of its rows (budget 0.1 s)
    keeps one row and hands five back as messages of one: six tasks, run by the pool's
    threads side by side, each row processed once at its first attempt."""
    monkeypatch.setenv("BATCH_TEST_SLEEP", "0.3")
    app = TestApp(store, workflows=((BatchWorkflow, handle_job),), config=test_config())
    try:
        app.start()
        first = f"s-{uuid.uuid4().hex[:6]}"
        app.service.execute(Go(id=first, jobs=["sleep"]))
        app.wait_until(lambda: _processed(db, first) == 1, what="the type measured")
        assert app.runtime.handler_times.mean(WT) >= 0.3

        wid = f"s-{uuid.uuid4().hex[:6]}"
        app.service.execute(Go(id=wid, jobs=["sleep"] * 6))
        app.wait_until(lambda: _processed(db, wid) == 6, what="the group processed")
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
        app.start()
        first = f"f-{uuid.uuid4().hex[:6]}"
        app.service.execute(Go(id=first, jobs=["ok"]))
        app.wait_until(lambda: _processed(db, first) == 1, what="the type measured")
        wid = f"f-{uuid.uuid4().hex[:6]}"
        app.service.execute(Go(id=wid, jobs=["ok"] * 30))
        app.wait_until(lambda: _processed(db, wid) == 30, what="the group processed")
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


def _processed(db: sa.Engine, wid: str) -> Any:
    with db.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM ironflow.outbox WHERE workflow_id = :w"
                " AND processed_at IS NOT NULL"
            ),
            {"w": wid},
        ).scalar()
