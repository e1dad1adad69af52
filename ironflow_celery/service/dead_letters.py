"""Dead letters: find, count, inspect, retry and discard them: the query values and the
rules (which row may be retried or discarded, and why not), over the store's dead-letter
statements (`PostgresStore.fetch_dead_letter_rows`, …). Service, not storage: the rules are
ironflow's, and `WorkflowRuntime`'s dead-letter methods (engine) call them. The same
operations are Celery tasks (``ironflow.dead_letters.*``,
`ironflow_celery.operations.dead_letters`) and the ``dead-letters`` CLI
(`ironflow_celery.cli.operations`).

A dead letter is an unprocessed outbox (``kind="effect"``) or timer (``kind="timer"``) row
that was dead-lettered explicitly (``dead_lettered_at``) or has used up its attempts::

    processed_at IS NULL AND (dead_lettered_at IS NOT NULL OR attempts >= max_attempts)

Unlike ironflow, a retry touches only rows that really are dead letters and never a row
whose lease is live (``locked_by`` set and ``locked_until`` in the future), and it wakes
the relays with ``pg_notify``. A discard marks the row handled (``processed_at``) and keeps
it for audit with ``discarded_at`` and ``discard_reason``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from ironflow_celery.errors import InvalidDeadLetterRequest
from ironflow_celery.model.config import AttemptLimits
from ironflow_celery.model.storable import text_problem
from ironflow_celery.model.workflow import WorkflowRef
from ironflow_celery.storage.inspection import RowInfo, encode_cursor
from ironflow_celery.storage.kinds import KIND_NAMES, Kind

if TYPE_CHECKING:
    from ironflow_celery.storage.store import PostgresStore

__all__ = [
    "KINDS",
    "DeadLetter",
    "DeadLetterQuery",
    "InvalidDeadLetterRequest",
    "Kind",
    "Reason",
    "RetryResult",
    "count_dead_letters",
    "decode_cursor",
    "discard_dead_letter",
    "encode_cursor",
    "explain_row",
    "fetch_dead_letters",
    "get_dead_letter",
    "next_cursor",
    "parse_age",
    "parse_kind",
    "parse_row_id",
    "retry_dead_letter",
    "retry_dead_letters",
    "try_discard_dead_letter",
    "try_retry_dead_letter",
]

KINDS: tuple[Kind, ...] = KIND_NAMES
"""The kinds' names, ``("effect", "timer")`` (their data: `ironflow_celery.storage.kinds`)."""

# -- errors and values ----------------------------------------------------------------------


def parse_kind(kind: str) -> Kind:
    """``"effect"`` or ``"timer"`` (plural and case are tolerated), else a clear error."""
    value = str(kind).strip().lower().rstrip("s")
    for name in KIND_NAMES:
        if value == name:
            return name
    raise InvalidDeadLetterRequest(f"kind must be 'effect' or 'timer', got {kind!r}")


def parse_row_id(row_id: uuid.UUID | str) -> uuid.UUID:
    """A row id as a UUID, or `InvalidDeadLetterRequest` naming the bad value."""
    if isinstance(row_id, uuid.UUID):
        return row_id
    try:
        return uuid.UUID(str(row_id).strip())
    except (ValueError, AttributeError, TypeError):
        raise InvalidDeadLetterRequest(f"not a valid row id (UUID): {row_id!r}") from None


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(value: timedelta | float | int | str | None) -> timedelta | None:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"``, seconds or a timedelta."""
    if value is None or value == "":
        return None
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _AGE.match(str(value))
    if not match:
        raise InvalidDeadLetterRequest(
            f"not an age: {value!r} (use e.g. 90s, 15m, 12h, 7d or a number of seconds)"
        )
    return timedelta(seconds=float(match.group(1)) * _UNIT[(match.group(2) or "s").lower()])


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The ``(created_at, id)`` of an opaque cursor, or `InvalidDeadLetterRequest`."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, _, row_id = base64.urlsafe_b64decode(padded).decode().partition("|")
        return datetime.fromisoformat(stamp), uuid.UUID(row_id)
    except (ValueError, binascii.Error, UnicodeDecodeError, TypeError):
        raise InvalidDeadLetterRequest(f"not a dead-letter page cursor: {cursor!r}") from None


def _check_filter_text(what: str, value: str | None) -> None:
    """A filter PostgreSQL cannot compare (NUL, lone surrogate) is a usage error."""
    problem = text_problem(value) if isinstance(value, str) else None
    if problem is not None:
        raise InvalidDeadLetterRequest(f"invalid {what} {value!r}: {problem}")


@dataclass(frozen=True, slots=True)
class DeadLetterQuery:
    """Which dead letters: builder methods as ironflow's, plus error text, age and keyset
    pagination. Newest first; `limit` defaults to 100 (`count` ignores it and the cursor).

    ``DeadLetterQuery.new().workflow_type("orders").error_contains("timeout").limit(20)``
    """

    type_filter: str | None = None
    id_filter: str | None = None
    error_filter: str | None = None
    min_age: timedelta | None = None
    max_age: timedelta | None = None
    max_rows: int = 100
    cursor: tuple[datetime, uuid.UUID] | None = None

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise InvalidDeadLetterRequest(f"limit must be at least 1, got {self.max_rows}")
        for what, value in (
            ("workflow type", self.type_filter),
            ("workflow id", self.id_filter),
            ("error filter", self.error_filter),
        ):
            _check_filter_text(what, value)

    @classmethod
    def new(cls) -> DeadLetterQuery:
        """Every dead letter, newest first, 100 per page."""
        return cls()

    @classmethod
    def of(
        cls,
        workflow_type: str | None = None,
        workflow_id: str | None = None,
        error: str | None = None,
        older_than: timedelta | float | str | None = None,
        newer_than: timedelta | float | str | None = None,
        limit: int | None = None,
        after: str | tuple[datetime, uuid.UUID] | None = None,
    ) -> DeadLetterQuery:
        """A query from plain keyword values (CLI options, Celery task kwargs)."""
        cursor = decode_cursor(after) if isinstance(after, str) and after else after or None
        return cls(
            type_filter=workflow_type or None,
            id_filter=workflow_id or None,
            error_filter=error or None,
            min_age=parse_age(older_than),
            max_age=parse_age(newer_than),
            max_rows=100 if limit is None else int(limit),
            cursor=cursor,
        )

    def workflow_type(self, workflow_type: str) -> DeadLetterQuery:
        return dataclasses.replace(self, type_filter=workflow_type)

    def workflow_id(self, workflow_id: str) -> DeadLetterQuery:
        return dataclasses.replace(self, id_filter=workflow_id)

    def error_contains(self, fragment: str) -> DeadLetterQuery:
        """Case-insensitive substring of ``last_error``."""
        return dataclasses.replace(self, error_filter=fragment)

    def older_than(self, age: timedelta | float | str) -> DeadLetterQuery:
        """Rows created more than `age` ago."""
        return dataclasses.replace(self, min_age=parse_age(age))

    def newer_than(self, age: timedelta | float | str) -> DeadLetterQuery:
        """Rows created at most `age` ago."""
        return dataclasses.replace(self, max_age=parse_age(age))

    def limit(self, limit: int) -> DeadLetterQuery:
        return dataclasses.replace(self, max_rows=int(limit))

    def after(self, cursor: str | tuple[datetime, uuid.UUID] | DeadLetter) -> DeadLetterQuery:
        """The page after `cursor`: an opaque cursor, ``(created_at, id)`` or a DeadLetter."""
        if isinstance(cursor, DeadLetter):
            value = (cursor.created_at, cursor.id)
        elif isinstance(cursor, str):
            value = decode_cursor(cursor)
        else:
            value = (cursor[0], parse_row_id(cursor[1]))
        return dataclasses.replace(self, cursor=value)

    def params(self) -> dict[str, Any]:
        """Bind parameters of the filter (and page) SQL."""
        return {
            "wt": self.type_filter,
            "wid": self.id_filter,
            "error": self.error_filter,
            "older": None if self.min_age is None else self.min_age.total_seconds(),
            "newer": None if self.max_age is None else self.max_age.total_seconds(),
            "after_at": self.cursor[0] if self.cursor else None,
            "after_id": self.cursor[1] if self.cursor else None,
            "limit": self.max_rows,
        }


DeadLetter = RowInfo
"""A dead-lettered effect (payload = the effect) or timer (payload = its input): the one
outbox/timer row type, `RowInfo`, in state ``dead`` (its `cursor` pages on)."""


Reason = Literal[
    "retried",
    "discarded",
    "dead_letter",
    "not_found",
    "not_dead_letter",
    "in_flight",
    "already_processed",
    "already_discarded",
]


@dataclass(frozen=True, slots=True)
class RetryResult:
    """What a retry or discard did, and why it was refused. Truthy when it happened."""

    ok: bool
    reason: Reason
    kind: Kind
    row_id: uuid.UUID
    message: str
    workflow: WorkflowRef | None = None

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "kind": self.kind,
            "row_id": str(self.row_id),
            "workflow": None if self.workflow is None else str(self.workflow),
            "message": self.message,
        }


# -- functions ----------------------------------------------------------------------------


def fetch_dead_letters(
    store: PostgresStore,
    query: DeadLetterQuery | None = None,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
) -> list[DeadLetter]:
    """Dead letters matching `query`, newest first (``created_at DESC, id DESC``)."""
    row_kind = parse_kind(kind)
    query = query or DeadLetterQuery()
    params = {**query.params(), **AttemptLimits.of(max_attempts).params()}
    return store.fetch_dead_letter_rows(row_kind, params)


def next_cursor(letters: list[DeadLetter], query: DeadLetterQuery | None = None) -> str | None:
    """The cursor of the next page, or None when `letters` was the last page."""
    limit = (query or DeadLetterQuery()).max_rows
    return letters[-1].cursor if letters and len(letters) >= limit else None


def count_dead_letters(
    store: PostgresStore,
    query: DeadLetterQuery | None = None,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
) -> int:
    """How many dead letters match `query` (its limit and cursor are ignored)."""
    row_kind = parse_kind(kind)
    query = query or DeadLetterQuery()
    params = {**query.params(), **AttemptLimits.of(max_attempts).params()}
    return store.count_dead_letter_rows(row_kind, params)


def get_dead_letter(
    store: PostgresStore,
    row_id: uuid.UUID | str,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
) -> DeadLetter | None:
    """One dead letter by id; None when the row is missing or not a dead letter."""
    row_kind, rid = parse_kind(kind), parse_row_id(row_id)
    row = store.get_dead_letter_row(row_kind, rid, AttemptLimits.of(max_attempts).params())
    if row is None or not row.is_dead:
        return None
    return row


def explain_row(
    store: PostgresStore,
    row_id: uuid.UUID | str,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
) -> RetryResult:
    """Whether the row is a dead letter that may be retried now, and if not, why."""
    row_kind, rid = parse_kind(kind), parse_row_id(row_id)
    row = store.get_dead_letter_row(row_kind, rid, AttemptLimits.of(max_attempts).params())
    refusal = _refusal(row_kind, rid, row, max_attempts)
    if refusal is not None:
        return refusal
    assert row is not None  # _refusal refuses a missing row
    ref = WorkflowRef(row.workflow_type, row.workflow_id)
    return RetryResult(
        True,
        "dead_letter",
        row_kind,
        rid,
        f"{row_kind} {rid} is a dead letter: retry or discard it",
        ref,
    )


def _refusal(
    kind: Kind, rid: uuid.UUID, row: RowInfo | None, max_attempts: int | AttemptLimits
) -> RetryResult | None:
    """Why `row` may not be retried or discarded (None when it may)."""
    if row is None:
        return RetryResult(False, "not_found", kind, rid, f"no {kind} row with id {rid}")
    ref = WorkflowRef(row.workflow_type, row.workflow_id)
    if row.processed_at is not None and row.discarded_at is not None:
        # discarded (or cancelled): said as such, with why, not as "processed"
        why = f" ({row.discard_reason})" if row.discard_reason else ""
        return RetryResult(
            False,
            "already_discarded",
            kind,
            rid,
            f"{kind} {rid} was already discarded at {row.discarded_at.isoformat()}{why}",
            ref,
        )
    if row.processed_at is not None:
        what = f"processed at {row.processed_at.isoformat()}"
        return RetryResult(False, "already_processed", kind, rid, f"{kind} {rid} was {what}", ref)
    if row.in_flight:
        return RetryResult(
            False,
            "in_flight",
            kind,
            rid,
            f"{kind} {rid} is in flight: leased by {row.locked_by} until "
            f"{row.locked_until.isoformat() if row.locked_until else None}; retry it after the "
            "lease ends",
            ref,
        )
    if not row.is_dead:
        return RetryResult(
            False,
            "not_dead_letter",
            kind,
            rid,
            f"{kind} {rid} is not a dead letter (attempts {row.attempts} of "
            f"{AttemptLimits.of(max_attempts).for_type(row.workflow_type)}, "
            "not dead-lettered); the relay will run it",
            ref,
        )
    return None


def try_retry_dead_letter(
    store: PostgresStore,
    row_id: uuid.UUID | str,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
) -> RetryResult:
    """Make one dead letter claimable again (attempts 0, error and lease cleared) and wake
    the relays; refused, with the reason, for a missing, processed, live or healthy row."""
    row_kind, rid = parse_kind(kind), parse_row_id(row_id)
    with store.transaction() as conn:
        params = AttemptLimits.of(max_attempts).params()
        row = store.get_dead_letter_row(row_kind, rid, params, connection=conn)
        refusal = _refusal(row_kind, rid, row, max_attempts)
        if refusal is not None:
            return refusal
        assert row is not None  # _refusal refuses a missing row
        store.retry_dead_letter_row(row_kind, rid, connection=conn)
    ref = WorkflowRef(row.workflow_type, row.workflow_id)
    return RetryResult(
        True, "retried", row_kind, rid, f"{row_kind} {rid} ({ref}) will run again", ref
    )


def retry_dead_letter(
    store: PostgresStore,
    row_id: uuid.UUID | str,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
) -> bool:
    """`try_retry_dead_letter` as ironflow's bool: True iff the row was retried."""
    return try_retry_dead_letter(store, row_id, kind=kind, max_attempts=max_attempts).ok


def retry_dead_letters(
    store: PostgresStore,
    query: DeadLetterQuery | None = None,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
    batch_size: int = 500,
    max_rows: int | None = None,
) -> int:
    """Retry every dead letter matching `query`'s filters (its limit and cursor are
    ignored; `max_rows` caps the total), one short transaction per batch, skipping rows
    that are locked or leased. Returns how many were retried."""
    row_kind = parse_kind(kind)
    if batch_size < 1:
        raise InvalidDeadLetterRequest("batch_size must be at least 1")
    query = query or DeadLetterQuery()
    # now(), the clock dead_lettered_at is written with (a test clock's, in the testing
    # kit); in this one-statement transaction it is the same instant as clock_timestamp().
    cutoff = store.database_now()
    total = 0
    while max_rows is None or total < max_rows:
        batch = batch_size if max_rows is None else min(batch_size, max_rows - total)
        params = {
            **query.params(),
            **AttemptLimits.of(max_attempts).params(),
            "cutoff": cutoff,
            "batch": batch,
        }
        retried = store.retry_dead_letter_batch(row_kind, params)
        total += retried
        if retried < batch:
            break
    return total


def try_discard_dead_letter(
    store: PostgresStore,
    row_id: uuid.UUID | str,
    reason: str,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
) -> RetryResult:
    """Mark a dead letter handled without running it: ``processed_at``, ``discarded_at``
    and ``discard_reason`` are set and the row stays for audit."""
    row_kind, rid = parse_kind(kind), parse_row_id(row_id)
    reason = (reason or "").strip()
    if not reason:
        raise InvalidDeadLetterRequest("a discard needs a reason (kept for audit)")
    _check_filter_text("discard reason", reason)
    with store.transaction() as conn:
        params = AttemptLimits.of(max_attempts).params()
        row = store.get_dead_letter_row(row_kind, rid, params, connection=conn)
        refusal = _refusal(row_kind, rid, row, max_attempts)
        if refusal is not None:
            return refusal
        assert row is not None  # _refusal refuses a missing row
        store.discard_dead_letter_row(row_kind, rid, reason, connection=conn)
    ref = WorkflowRef(row.workflow_type, row.workflow_id)
    return RetryResult(True, "discarded", row_kind, rid, f"{row_kind} {rid} ({ref}) discarded", ref)


def discard_dead_letter(
    store: PostgresStore,
    row_id: uuid.UUID | str,
    reason: str,
    *,
    kind: str = "effect",
    max_attempts: int | AttemptLimits,
) -> bool:
    """`try_discard_dead_letter` as a bool: True iff the row was discarded."""
    return try_discard_dead_letter(store, row_id, reason, kind=kind, max_attempts=max_attempts).ok
