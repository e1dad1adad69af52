"""Dead letters for operators: the functions and values of
`ironflow_celery.service.dead_letters` (re-exported: the CLI and the public
`ironflow_celery.dead_letters` import them from here), and the same operations as Celery
tasks, ``ironflow.dead_letters.*``, for ``celery call`` and Flower's "apply task"."""

from __future__ import annotations

from typing import Any

from ironflow_celery.engine.host import RuntimeView
from ironflow_celery.model.config import AttemptLimits
from ironflow_celery.service.dead_letters import (
    KINDS,
    DeadLetter,
    DeadLetterQuery,
    InvalidDeadLetterRequest,
    Kind,
    RetryResult,
    count_dead_letters,
    decode_cursor,
    discard_dead_letter,
    encode_cursor,
    explain_row,
    fetch_dead_letters,
    get_dead_letter,
    next_cursor,
    parse_age,
    parse_kind,
    parse_row_id,
    retry_dead_letter,
    retry_dead_letters,
    try_discard_dead_letter,
    try_retry_dead_letter,
)

__all__ = [
    "KINDS",
    "TASK_PREFIX",
    "DeadLetter",
    "DeadLetterQuery",
    "InvalidDeadLetterRequest",
    "Kind",
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
    "register_dead_letter_tasks",
    "retry_dead_letter",
    "retry_dead_letters",
    "try_discard_dead_letter",
    "try_retry_dead_letter",
]

TASK_PREFIX = "ironflow.dead_letters."


def register_dead_letter_tasks(app: Any, runtime: RuntimeView) -> list[str]:
    """Register ``ironflow.dead_letters.{fetch,count,retry,retry_all,discard}`` on `app`.

    Each takes ``kind="effect"`` (or ``"timer"``) and returns a JSON-serialisable dict, so
    ``celery -A proj call ironflow.dead_letters.retry --args='["<id>"]'`` and Flower's
    "apply task" work.
    """

    def max_attempts() -> AttemptLimits:
        return runtime.attempt_limits

    def fetch(
        kind: str = "effect",
        workflow_type: str | None = None,
        workflow_id: str | None = None,
        error: str | None = None,
        older_than: Any = None,
        newer_than: Any = None,
        limit: int = 100,
        after: str | None = None,
    ) -> dict[str, Any]:
        """Dead letters matching the filters, newest first, with the next page's cursor."""
        query = DeadLetterQuery.of(
            workflow_type, workflow_id, error, older_than, newer_than, limit, after
        )
        letters = fetch_dead_letters(
            runtime.store, query, kind=parse_kind(kind), max_attempts=max_attempts()
        )
        return {
            "kind": parse_kind(kind),
            "count": len(letters),
            "items": [d.to_json() for d in letters],
            "next_cursor": next_cursor(letters, query),
        }

    def count(
        kind: str = "effect",
        workflow_type: str | None = None,
        workflow_id: str | None = None,
        error: str | None = None,
        older_than: Any = None,
        newer_than: Any = None,
    ) -> dict[str, Any]:
        """How many dead letters match the filters."""
        query = DeadLetterQuery.of(workflow_type, workflow_id, error, older_than, newer_than)
        n = count_dead_letters(
            runtime.store, query, kind=parse_kind(kind), max_attempts=max_attempts()
        )
        return {"kind": parse_kind(kind), "count": n}

    def retry(row_id: str, kind: str = "effect") -> dict[str, Any]:
        """Retry one dead letter; the result says why when it was refused."""
        return try_retry_dead_letter(
            runtime.store, row_id, kind=parse_kind(kind), max_attempts=max_attempts()
        ).to_json()

    def retry_all(
        kind: str = "effect",
        workflow_type: str | None = None,
        workflow_id: str | None = None,
        error: str | None = None,
        older_than: Any = None,
        newer_than: Any = None,
        max_rows: int | None = None,
        batch_size: int = 500,
    ) -> dict[str, Any]:
        """Retry every dead letter matching the filters, in batches."""
        query = DeadLetterQuery.of(workflow_type, workflow_id, error, older_than, newer_than)
        n = retry_dead_letters(
            runtime.store,
            query,
            kind=parse_kind(kind),
            max_attempts=max_attempts(),
            batch_size=batch_size,
            max_rows=max_rows,
        )
        return {"kind": parse_kind(kind), "retried": n}

    def discard(row_id: str, reason: str, kind: str = "effect") -> dict[str, Any]:
        """Mark one dead letter handled without running it (kept for audit)."""
        return try_discard_dead_letter(
            runtime.store, row_id, reason, kind=parse_kind(kind), max_attempts=max_attempts()
        ).to_json()

    names = []
    for fn in (fetch, count, retry, retry_all, discard):
        name = TASK_PREFIX + fn.__name__
        fn.__module__ = __name__
        # Bad arguments are expected errors: the task fails with the message (shown by
        # `celery call`'s result and Flower) and the worker logs one line, not a traceback.
        app.task(
            name=name, bind=False, shared=False, typing=True, throws=(InvalidDeadLetterRequest,)
        )(fn)
        names.append(name)
    return names
