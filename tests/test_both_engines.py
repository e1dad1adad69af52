"""One database, two engines (DESIGN.md invariant 12): a dead letter that ironflow (the Rust
engine) revives with its own SQL is live again for ironflow_celery too.

ironflow knows nothing of our additive ``dead_lettered_at``; migration 0007's trigger
clears it when an update lowers an open dead letter's attempts.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from runtime_helpers import (
    DEFAULT_WORKFLOWS,
    TestApp,
    execute,
    insert_timer,
    rows,
    running_app,
    test_config,
)
from workflows import Mode, Start, TestWorkflow, test_handler

from ironflow_celery import EffectContext, PermanentEffectError
from ironflow_celery import dead_letters as dl
from ironflow_celery.engine.tasks import run_effect, run_timer
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

T = TestWorkflow.type
MAX = 3

# ironflow's retry statements, verbatim (reference/ironflow-behaviour.md), $1 bound as :id.
IRONFLOW_RETRY_EFFECT = (
    "UPDATE ironflow.outbox SET attempts = 0, locked_until = NULL, locked_by = NULL,"
    " last_error = NULL WHERE id = :id AND processed_at IS NULL"
)
IRONFLOW_RETRY_TIMER = (
    "UPDATE ironflow.timers SET attempts = 0, locked_until = NULL, locked_by = NULL,"
    " last_error = NULL WHERE id = :id AND processed_at IS NULL"
)


def make_app(store: PostgresStore, handler: Any) -> TestApp:
    workflows = [(TestWorkflow, handler), *DEFAULT_WORKFLOWS[1:]]
    return TestApp(store, workflows=workflows, config=test_config())  # max_attempts = 3


def claim(app: TestApp, token: str, kind: str) -> list[ClaimedRow]:
    return app.store.claim(kind, token, [T], lease_seconds=60, max_attempts=MAX, limit=10)


def one_row(db: sa.Engine, table: str, row_id: Any) -> Any:
    [row] = rows(db, f"SELECT * FROM ironflow.{table} WHERE id = :id", id=row_id)
    return row


def test_an_effect_dead_letter_revived_by_ironflow_is_claimed_and_processed(
    store: PostgresStore, db: sa.Engine
) -> None:
    outcomes = iter(["permanent", "succeed"])

    def handler(effect: Any, ctx: EffectContext) -> Any:
        if next(outcomes) == "permanent":
            raise PermanentEffectError("card declined")
        return None

    app = make_app(store, handler)
    app.service.execute(Start(id="revived", mode=Mode(mode="FireAndForget")))
    [row] = claim(app, "relay#1", "effect")
    ref = f"{T}:revived"
    assert run_effect(app.runtime, ref, str(row.id), 1, row.token)["status"] == "dead-lettered"
    assert dl.count_dead_letters(store, kind="effect", max_attempts=MAX) == 1
    assert claim(app, "relay#2", "effect") == []

    execute(db, IRONFLOW_RETRY_EFFECT, id=row.id)  # what `ironflow` retry runs

    revived = one_row(db, "outbox", row.id)
    assert (revived.attempts, revived.dead_lettered_at, revived.run_started_at) == (0, None, None)
    assert dl.count_dead_letters(store, kind="effect", max_attempts=MAX) == 0
    assert dl.fetch_dead_letters(store, kind="effect", max_attempts=MAX) == []
    [again] = claim(app, "relay#3", "effect")
    assert again.id == row.id
    assert run_effect(app.runtime, ref, str(row.id), 1, again.token)["status"] == "processed"
    assert one_row(db, "outbox", row.id).processed_at is not None
    app.stop()


def test_a_timer_dead_letter_revived_by_ironflow_is_claimed_and_processed(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = make_app(store, test_handler)
    timer_id = insert_timer(
        db, T, "timer-revived", {"type": "Ping", "id": "timer-revived"}, notify=False
    )
    # Every run dies before recording an outcome: the last start guard dead-letters it.
    for n in range(1, MAX + 1):
        [row] = claim(app, f"relay#{n}", "timer")
        assert app.store.start("timer", row.id, row.token, f"run-{n}", lease_seconds=60)
        execute(db, "UPDATE ironflow.timers SET locked_until = now() - interval '1 second'")
    [last] = claim(app, "relay#last", "timer")
    ref = f"{T}:timer-revived"
    assert run_timer(app.runtime, ref, str(timer_id), 1, last.token)["status"] == "dead-lettered"
    assert dl.count_dead_letters(store, kind="timer", max_attempts=MAX) == 1

    execute(db, IRONFLOW_RETRY_TIMER, id=timer_id)

    revived = one_row(db, "timers", timer_id)
    assert (revived.attempts, revived.dead_lettered_at, revived.run_started_at) == (0, None, None)
    assert dl.count_dead_letters(store, kind="timer", max_attempts=MAX) == 0
    [again] = claim(app, "relay#again", "timer")
    assert run_timer(app.runtime, ref, str(timer_id), 1, again.token)["status"] == "processed"
    assert [e.payload["type"] for e in store.fetch_workflow_events(T, "timer-revived")] == [
        "Pinged"
    ]
    app.stop()


def test_ordinary_updates_leave_a_dead_letter_alone(store: PostgresStore, db: sa.Engine) -> None:
    """Only a revival (lower attempts, still open) clears the marker: raising attempts, a
    lease write, or a discard keep it."""
    with db.begin() as conn:
        dead_id = conn.execute(
            sa.text(
                "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload, attempts,"
                " dead_lettered_at) VALUES (:t, 'x', '{}', 3, now()) RETURNING id"
            ),
            {"t": T},
        ).scalar_one()
    execute(
        db, "UPDATE ironflow.outbox SET attempts = 5, locked_by = 'a' WHERE id = :id", id=dead_id
    )
    assert one_row(db, "outbox", dead_id).dead_lettered_at is not None
    execute(
        db,
        "UPDATE ironflow.outbox SET processed_at = now(), attempts = 0 WHERE id = :id",
        id=dead_id,
    )
    assert one_row(db, "outbox", dead_id).dead_lettered_at is not None  # kept for audit


def test_a_running_deployment_picks_up_a_row_revived_by_ironflow(
    store: PostgresStore, db: sa.Engine
) -> None:
    """End to end: relays and a Celery worker running; ironflow's retry sends no NOTIFY,
    so the relay's poll finds the revived row, and the worker processes it."""
    fail = {"now": True}

    def handler(effect: Any, ctx: EffectContext) -> Any:
        if fail["now"]:
            raise PermanentEffectError("not yet")
        return test_handler(effect, ctx)

    workflows = [(TestWorkflow, handler), *DEFAULT_WORKFLOWS[1:]]
    with running_app(store, workflows=workflows, config=test_config()) as app:
        app.service.execute(Start(id="e2e", mode=Mode(mode="RouteResult")))
        app.wait_until(
            lambda: dl.count_dead_letters(store, kind="effect", max_attempts=MAX) == 1,
            timeout=120,
            what="the effect dead-lettered",
        )
        [dead] = dl.fetch_dead_letters(store, kind="effect", max_attempts=MAX)
        fail["now"] = False
        execute(db, IRONFLOW_RETRY_EFFECT, id=dead.id)
        app.wait_for_events(T, "e2e", ["Started", "Completed"], timeout=120)
        assert one_row(db, "outbox", dead.id).processed_at is not None
        assert dl.count_dead_letters(store, kind="effect", max_attempts=MAX) == 0
