"""One effect or timer row as stored (`RowInfo`), with its state and when it is due: the one
row type the store returns for an outbox or timer row read whole -- by ``effects list/show``
and ``timers list/show`` (`ironflow_celery.operations.inspection`), a web view, dead
letters (`ironflow_celery.service.dead_letters`) and cancel (`ironflow_celery.operations.cancel`).
Its columns: `sql.row_columns`."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ironflow_celery.model.workflow import WorkflowRef
from ironflow_celery.storage import sql
from ironflow_celery.storage.kinds import Kind

__all__ = ["ROW_STATES", "AttemptRecord", "RowInfo", "RowState", "encode_cursor"]

RowState = Literal[
    "pending", "scheduled", "in_flight", "backing_off", "dead", "cancelled", "processed"
]
"""Exactly one per row (`sql.ROW_STATES`): ``pending`` claimable now; ``scheduled`` a timer
whose fire time is ahead; ``in_flight`` leased (published and waiting, or running);
``backing_off`` waiting to retry after a failed attempt; ``dead`` a dead letter;
``cancelled`` closed without running (cancelled, revoked or a discarded dead letter,
``discard_reason`` says which); ``processed`` done."""

ROW_STATES: tuple[RowState, ...] = sql.ROW_STATES  # type: ignore[assignment]
"""Every state a row can be in (`RowState`)."""


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque page cursor for ``(created_at, id)``."""
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt of a row as its history keeps it (migration 0011): who ran it, when,
    and how it ended. The history holds the last `sql.ATTEMPT_HISTORY_LIMIT` attempts our
    workers started (rows ironflow ran itself have none)."""

    n: int | None
    """The attempt's number (1 = first; a retried dead letter starts again at 1)."""
    worker: str | None
    """The Celery worker's name (``celery@host``), or the host's name outside a worker."""
    pid: int | None
    """The process that ran it (a prefork pool's child)."""
    task_id: str | None
    """The Celery task id of the message that carried it."""
    started_at: datetime | None
    finished_at: datetime | None
    outcome: str | None
    """``processed``, ``failed`` (retried later), ``dead-lettered``, ``lost`` (its run
    never recorded an outcome: the worker died or lost the lease; closed by the next start
    guard), ``re-armed`` (a keyed timer scheduled again meanwhile), ``cancelled``; None
    while it runs."""
    error: str | None = None
    """Its error (the first `sql.ATTEMPT_ERROR_CHARS` characters); a cancel's reason."""

    @property
    def runner(self) -> str:
        """``celery@host pid 4711``: who ran it."""
        who = self.worker or "?"
        return who if self.pid is None else f"{who} pid {self.pid}"

    @classmethod
    def of(cls, entry: Any) -> AttemptRecord:
        """From one element of the stored JSON array (unknown keys are ignored)."""
        item = entry if isinstance(entry, dict) else {}
        n, pid = item.get("n"), item.get("pid")
        return cls(
            n=n if isinstance(n, int) else None,
            worker=item.get("worker"),
            pid=pid if isinstance(pid, int) else None,
            task_id=item.get("task"),
            started_at=_time(item.get("started")),
            finished_at=_time(item.get("finished")),
            outcome=item.get("outcome"),
            error=item.get("error"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "worker": self.worker,
            "pid": self.pid,
            "task_id": self.task_id,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "outcome": self.outcome,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class RowInfo:
    """One effect (outbox row) or timer as stored, with its state.

    ``locked_by`` holds the lease: a relay's claim token while the message waits in the
    broker, a run token (``<claim>><delivery>``) once a worker's start guard took it;
    ``run_started_at`` is when the running handler started (the holder's "since").
    ``attempts`` counts finished attempts; ``attempt_history`` says who ran each of the
    last ones, when, and how it ended. ``payload`` and ``attempt_history`` are filled by
    `show`, not by `list` (``payload`` also by dead letters and cancel). A dead letter
    (`ironflow_celery.service.dead_letters.DeadLetter`) is a `RowInfo` in state ``dead``."""

    kind: Kind
    id: uuid.UUID
    workflow: WorkflowRef
    effect_type: str | None
    state: RowState
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    due_at: datetime | None
    fire_at: datetime | None = None
    key: str | None = None
    locked_by: str | None = None
    locked_until: datetime | None = None
    run_started_at: datetime | None = None
    processed_at: datetime | None = None
    dead_lettered_at: datetime | None = None
    discarded_at: datetime | None = None
    discard_reason: str | None = None
    payload: Any = None
    read_at: datetime | None = None
    """The database's clock when the row was read (`show`): what lease times compare to."""
    attempt_history: tuple[AttemptRecord, ...] = ()
    """Its last attempts, oldest first (`show`; see `AttemptRecord`)."""

    @property
    def workflow_type(self) -> str:
        return self.workflow.workflow_type

    @property
    def workflow_id(self) -> str:
        return self.workflow.workflow_id

    @property
    def in_flight(self) -> bool:
        """A live lease holds it (``locked_by`` set, ``locked_until`` after `read_at`),
        whatever its state: a retry or discard waits for the lease to end."""
        return (
            self.locked_by is not None
            and self.locked_until is not None
            and self.read_at is not None
            and self.locked_until > self.read_at
        )

    @property
    def running(self) -> bool:
        """A handler holds it: started under a live lease."""
        return self.run_started_at is not None and self.in_flight

    @property
    def is_dead(self) -> bool:
        """A dead letter: open, and dead-lettered or out of attempts."""
        return self.state == "dead"

    @property
    def cursor(self) -> str:
        """The opaque cursor of the page that follows this row (newest first)."""
        return encode_cursor(self.created_at, self.id)

    @property
    def held_by(self) -> str | None:
        """Who holds the live lease: ``relay`` (claimed, the message not started yet) or
        ``worker`` (a start guard took it: a handler runs); None without a live lease."""
        if self.state != "in_flight":
            return None
        return "worker" if self.run_started_at is not None else "relay"

    @classmethod
    def of(cls, kind: Kind, row: Any) -> RowInfo:
        """From a row of `sql.INSPECT_STATEMENTS` (payload and read_at when selected)."""
        fields = row._asdict()
        return cls(
            kind=kind,
            id=row.id,
            workflow=WorkflowRef(row.workflow_type, row.workflow_id),
            effect_type=row.effect_type,
            state=row.state,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            last_error=row.last_error,
            created_at=row.created_at,
            due_at=row.due_at,
            fire_at=row.fire_at,
            key=row.key,
            locked_by=row.locked_by,
            locked_until=row.locked_until,
            run_started_at=row.run_started_at,
            processed_at=row.processed_at,
            dead_lettered_at=row.dead_lettered_at,
            discarded_at=row.discarded_at,
            discard_reason=row.discard_reason,
            payload=fields.get("payload"),
            read_at=fields.get("read_at"),
            attempt_history=tuple(AttemptRecord.of(e) for e in fields.get("attempt_history") or ()),
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form: ids as strings, datetimes as ISO 8601."""
        return {
            "kind": self.kind,
            "id": str(self.id),
            "workflow": str(self.workflow),
            "workflow_type": self.workflow_type,
            "workflow_id": self.workflow_id,
            "effect_type": self.effect_type,
            "state": self.state,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "last_error": self.last_error,
            "created_at": _iso(self.created_at),
            "due_at": _iso(self.due_at),
            "fire_at": _iso(self.fire_at),
            "key": self.key,
            "locked_by": self.locked_by,
            "locked_until": _iso(self.locked_until),
            "held_by": self.held_by,
            "run_started_at": _iso(self.run_started_at),
            "processed_at": _iso(self.processed_at),
            "dead_lettered_at": _iso(self.dead_lettered_at),
            "discarded_at": _iso(self.discarded_at),
            "discard_reason": self.discard_reason,
            "payload": self.payload,
            "attempt_history": [a.to_json() for a in self.attempt_history],
        }
