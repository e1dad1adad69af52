"""Helpers for the operations tests: insert outbox/timer rows in a chosen state by SQL."""

from __future__ import annotations

import json
import uuid
from typing import Any

import sqlalchemy as sa

MAX_ATTEMPTS = 3


def insert_row(
    db: sa.Engine,
    kind: str = "effect",
    *,
    workflow_type: str = "orders",
    workflow_id: str = "o-1",
    attempts: int = MAX_ATTEMPTS,
    dead: bool = True,
    error: str | None = "RuntimeError: boom",
    age_seconds: float = 0.0,
    created_at: Any = None,
    locked_by: str | None = None,
    lease_seconds: float | None = None,
    processed_seconds_ago: float | None = None,
    fire_in_seconds: float = -1.0,
    payload: Any = None,
    discarded: bool = False,
) -> uuid.UUID:
    """One outbox (kind="effect") or timer row; returns its id."""
    row_id = uuid.uuid4()
    table = "ironflow.outbox" if kind == "effect" else "ironflow.timers"
    payload_col = "payload" if kind == "effect" else "input"
    extra_cols = "" if kind == "effect" else ", fire_at"
    extra_vals = "" if kind == "effect" else ", now() + make_interval(secs => :fire_in)"
    statement = sa.text(f"""
        INSERT INTO {table} (id, workflow_type, workflow_id, {payload_col}, attempts,
            last_error, created_at, dead_lettered_at, locked_by, locked_until, processed_at,
            discarded_at, discard_reason {extra_cols})
        VALUES (:id, :wt, :wid, CAST(:payload AS jsonb), :attempts, :error,
            coalesce(CAST(:created_at AS timestamptz), now() - make_interval(secs => :age)),
            CASE WHEN :dead THEN now() END, :locked_by,
            CASE WHEN CAST(:lease AS float8) IS NOT NULL
                 THEN now() + make_interval(secs => CAST(:lease AS float8)) END,
            CASE WHEN CAST(:processed AS float8) IS NOT NULL
                 THEN now() - make_interval(secs => CAST(:processed AS float8)) END,
            CASE WHEN :discarded THEN now() END,
            CASE WHEN :discarded THEN 'audit' END {extra_vals})
    """)
    with db.begin() as conn:
        conn.execute(
            statement,
            {
                "id": row_id,
                "wt": workflow_type,
                "wid": workflow_id,
                "payload": json.dumps(payload or {"type": "Charge", "amount": 1}),
                "attempts": attempts,
                "error": error,
                "age": age_seconds,
                "created_at": created_at,
                "dead": dead,
                "locked_by": locked_by,
                "lease": lease_seconds,
                "processed": processed_seconds_ago,
                "discarded": discarded,
                "fire_in": fire_in_seconds,
            },
        )
    return row_id


def row(db: sa.Engine, row_id: uuid.UUID, kind: str = "effect") -> Any:
    table = "ironflow.outbox" if kind == "effect" else "ironflow.timers"
    with db.connect() as conn:
        statement = sa.text(f"SELECT * FROM {table} WHERE id = :id")
        return conn.execute(statement, {"id": row_id}).first()
