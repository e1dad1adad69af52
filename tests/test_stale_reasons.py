"""A stale delivery says what actually happened to its row (not "re-claimed or done").

The start guard refuses a delivery whose claim token no longer holds the row; the task
then reads the row once and names the reason. Each state is set up directly in SQL on one
claimed row, and the delivery is replayed with the original claim token: a stale delivery
changes nothing and never runs the handler.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import TestApp, execute, insert_effect, insert_timer, test_config
from workflows import CALLS, TestWorkflow

from ironflow_celery.engine.tasks import run_effect, run_timer
from ironflow_celery.model.config import RetryPolicy
from ironflow_celery.storage.store import PostgresStore

T = TestWorkflow.type
LEASE = "relay#1"
PROCESS = {"type": "Process", "mode": {"mode": "FireAndForget"}}

# (what happened to the row, in SQL; the reason the stale delivery must give)
EFFECT_CASES = [
    ("UPDATE ironflow.outbox SET processed_at = now(), locked_by = NULL", "already processed"),
    (
        "UPDATE ironflow.outbox SET attempts = 3, dead_lettered_at = now(), locked_by = NULL",
        "is a dead letter",
    ),
    (
        # dead-lettered by ironflow: only attempts >= max_attempts says so
        "UPDATE ironflow.outbox SET attempts = 3, locked_by = NULL",
        "is a dead letter",
    ),
    (
        "UPDATE ironflow.outbox SET processed_at = now(), discarded_at = now(),"
        " dead_lettered_at = now(), locked_by = NULL",
        "was closed without running (cancelled, or a discarded dead letter)",
    ),
    (
        # a duplicate broker delivery of the same claim passed the start guard first
        f"UPDATE ironflow.outbox SET locked_by = '{LEASE}>host:1:abcd',"
        " locked_until = now() + interval '1 minute', run_started_at = now()",
        "another delivery of this claim is running the row (duplicate message)",
    ),
    (
        f"UPDATE ironflow.outbox SET locked_by = '{LEASE}>host:1:abcd',"
        " locked_until = now() - interval '1 second', run_started_at = now()",
        "another delivery of this claim started the row and its lease expired",
    ),
    (
        "UPDATE ironflow.outbox SET locked_by = 'relay-b#7',"
        " locked_until = now() + interval '1 minute'",
        "was re-claimed under another lease (relay-b#7)",
    ),
    (
        "UPDATE ironflow.outbox SET locked_by = 'relay-b#7',"
        " locked_until = now() - interval '1 second'",
        "is held by another, expired lease (relay-b#7)",
    ),
    (
        # a failure was recorded: released with a backoff
        "UPDATE ironflow.outbox SET attempts = 1, locked_by = NULL,"
        " locked_until = now() + interval '1 minute'",
        "was released: it waits for its backoff or its next claim",
    ),
    ("DELETE FROM ironflow.outbox", "no longer exists"),
]


def snapshot(db: sa.Engine, table: str) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT * FROM ironflow.{table} ORDER BY id")))


@pytest.fixture
def app(store: PostgresStore) -> Any:
    app = TestApp(store, config=test_config())
    yield app
    app.stop()


def test_each_stale_effect_delivery_names_what_happened(app: TestApp, db: sa.Engine) -> None:
    CALLS.reset()
    for change, reason in EFFECT_CASES:
        execute(db, "DELETE FROM ironflow.outbox")
        row_id = insert_effect(
            db, T, "stale", PROCESS, locked_by=LEASE, attempts=0, run_started_at=None
        )
        execute(db, "UPDATE ironflow.outbox SET locked_until = now() + interval '1 minute'")
        execute(db, change)
        before = snapshot(db, "outbox")
        result = run_effect(app.runtime, f"{T}:stale", str(row_id), 1, LEASE)
        assert result["status"] == "stale-skipped", change
        assert reason in result["reason"], (change, result["reason"])
        assert "re-claimed or done" not in result["reason"]
        assert snapshot(db, "outbox") == before, change  # a stale delivery changes nothing
    assert CALLS.calls == []


def test_a_stale_timer_delivery_names_what_happened(app: TestApp, db: sa.Engine) -> None:
    timer_id = insert_timer(db, T, "stale-timer", {"type": "Ping", "id": "stale-timer"})
    ref = f"{T}:stale-timer"
    execute(
        db,
        "UPDATE ironflow.timers SET locked_by = 'relay-b#2',"
        " locked_until = now() + interval '1 minute'",
    )
    result = run_timer(app.runtime, ref, str(timer_id), 1, LEASE)
    assert result["status"] == "stale-skipped"
    assert "the timer was re-claimed under another lease (relay-b#2)" in result["reason"]

    execute(db, "UPDATE ironflow.timers SET processed_at = now(), locked_by = NULL")
    result = run_timer(app.runtime, ref, str(timer_id), 1, LEASE)
    assert "the timer is already processed" in result["reason"]
    assert app.store.fetch_workflow_events(T, "stale-timer") == []  # the input never ran


class PatientWorkflow(TestWorkflow):
    """A type whose own retry policy allows more attempts than the runtime's (3)."""

    __test__ = False
    type = "stale_patient"
    retry_policy = RetryPolicy(max_attempts=10, base_delay=0.05, max_delay=0.1)


def test_a_row_under_its_own_types_limit_is_not_called_a_dead_letter(
    store: PostgresStore, db: sa.Engine
) -> None:
    """6 attempts under the type's limit of 10 (global 3): the row waits for its next claim."""
    app = TestApp(store, config=test_config(), workflows=[(PatientWorkflow, lambda *a, **k: None)])
    try:
        row_id = insert_effect(
            db, PatientWorkflow.type, "patient", PROCESS, locked_by=LEASE, attempts=0
        )
        execute(
            db,
            "UPDATE ironflow.outbox SET attempts = 6, locked_by = NULL,"
            " locked_until = now() + interval '1 minute'",
        )
        ref = f"{PatientWorkflow.type}:patient"
        result = run_effect(app.runtime, ref, str(row_id), 1, LEASE)
        assert result["status"] == "stale-skipped"
        assert "dead letter" not in result["reason"], result["reason"]
        assert "was released: it waits for its backoff or its next claim" in result["reason"]

        execute(db, "UPDATE ironflow.outbox SET attempts = 10")  # ironflow's dead letter
        result = run_effect(app.runtime, ref, str(row_id), 1, LEASE)
        assert "is a dead letter" in result["reason"], result["reason"]
    finally:
        app.stop()
