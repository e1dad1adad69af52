"""An exception message PostgreSQL cannot store (NUL, lone surrogate) is still recorded.

A handler's or projection's error text goes into ``last_error``; unescaped, such text made
the failure itself unrecordable, so the row could never record an outcome.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import DEFAULT_WORKFLOWS, TestApp, rows, test_config
from workflows import Mode, Start, TestWorkflow

from ironflow_celery import EffectContext, PermanentEffectError
from ironflow_celery.engine.tasks import run_effect
from ironflow_celery.operations.projections import ProjectionRunner, projection
from ironflow_celery.storage.store import PostgresStore

T = TestWorkflow.type


def test_a_handler_error_with_nul_or_surrogate_text_is_recorded(
    store: PostgresStore, db: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    messages = iter(["bad \x00 byte", "bad \udcff byte"])

    def handler(effect: Any, ctx: EffectContext) -> Any:
        message = next(messages)
        if ctx.attempt == 1:
            raise RuntimeError(message)
        raise PermanentEffectError(message)

    app = TestApp(
        store, workflows=[(TestWorkflow, handler), *DEFAULT_WORKFLOWS[1:]], config=test_config()
    )
    app.service.execute(Start(id="err", mode=Mode(mode="FireAndForget")))
    expected = [
        ("failed-will-retry", "RuntimeError: bad \\x00 byte"),
        ("dead-lettered", "PermanentEffectError: bad \\udcff byte"),
    ]
    for status, error in expected:
        execute_after_backoff(db)
        [row] = app.store.claim(
            "effect", f"relay#{status}", [T], lease_seconds=60, max_attempts=3, limit=1
        )
        result = run_effect(app.runtime, f"{T}:err", str(row.id), row.attempts + 1, row.token)
        assert result["status"] == status, result
        [stored] = rows(db, "SELECT last_error FROM ironflow.outbox WHERE id = :id", id=row.id)
        assert stored.last_error == error
    # and logged escaped too: a lone surrogate in a log line breaks UTF-8 log handlers
    assert "bad \\udcff byte" in caplog.text
    caplog.text.encode("utf-8")  # raises on an unescaped surrogate
    app.stop()


def execute_after_backoff(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE ironflow.outbox SET locked_until = now() - interval '1 second'"
                " WHERE locked_by IS NULL"
            )
        )


def test_a_projection_error_with_nul_text_is_recorded(store: PostgresStore, db: sa.Engine) -> None:
    app = TestApp(store, config=test_config())
    app.service.execute(Start(id="p", mode=Mode(mode="FireAndForget")))

    @projection("nul-errors")
    def fails(event: Any) -> None:
        raise ValueError("poison \x00 here")

    runner = ProjectionRunner(store, fails)
    runner.run_once()
    [position] = rows(
        db,
        "SELECT last_error FROM ironflow.projection_positions WHERE projection_name = 'nul-errors'",
    )
    assert position.last_error == "ValueError: poison \\x00 here"
    app.stop()
