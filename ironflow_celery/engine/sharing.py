"""How much of a group message one worker process runs, and the rest handed back.

A group runs its handlers one after another in one process: cheap for handlers of
microseconds (one message, one start guard and one commit for many rows), but for slow
handlers it would keep work from idle processes -- a group of 200 one-second rows is 200
seconds in one process. So a process takes on at most ``group_run_budget`` seconds of
handler time from a group, by the handler time of the type it measured itself
(`HandlerTimes`), and publishes the rest back to the broker in messages of that many rows
before it starts any: other processes (other hosts too) run them meanwhile, and a type
whose handlers take the whole budget travels one row per message. Until a process has
measured a type, it takes up to `UNMEASURED_ROWS` rows of a group and hands back the rest
in one message (which the next process sizes by its own measure).

Handing back is safe by construction: the rows handed back were never started here, so
they still wait under the relay's claim (the relay keeps their leases, and counts them
against its in-flight limit, as for any published row); a row that ends up in two
messages (a publish that failed half-way) is run by whichever start guard comes first,
the other skips it as stale. A process that dies before the rest is published leaves
those rows to the relay's dispatch timeout, like a lost message.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from ironflow_celery.engine.relay import celery_publisher
from ironflow_celery.errors import PublishError
from ironflow_celery.storage.kinds import EFFECT
from ironflow_celery.storage.store import ClaimedRow

__all__ = ["SMOOTHING", "UNMEASURED_ROWS", "HandlerTimes", "hand_back", "share"]

log = logging.getLogger("ironflow_celery.tasks")

UNMEASURED_ROWS = 10
"""Rows of a group a process takes on before it has measured the type's handlers."""


SMOOTHING = 0.05
"""Weight of a new row in a type's mean handler time once it has 20 rows (before: the plain
mean of its rows so far). Times are wall-clock (a handler waiting on the network is
slow), so a row preempted on a busy machine reads milliseconds for a no-op: a long
memory keeps such a spike from splitting the next group, and one slow row is still
enough to share the next group of a type measured fast (a 1 s row moves a 20 µs mean to
50 ms)."""


class HandlerTimes:
    """Per process (per runtime): each workflow type's mean handler time per row, as this
    process measured it: the mean of its first 20 rows, then exponentially weighted."""

    def __init__(self) -> None:
        self._mean: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()  # a threads pool's rows note concurrently

    def note(self, workflow_type: str, seconds: float) -> None:
        with self._lock:
            mean, rows = self._mean.get(workflow_type, (0.0, 0))
            rows += 1
            weight = max(SMOOTHING, 1 / rows)
            self._mean[workflow_type] = (mean + weight * (seconds - mean), rows)

    def mean(self, workflow_type: str) -> float | None:
        """The type's mean handler time in seconds; None before its first row here."""
        known = self._mean.get(workflow_type)
        return None if known is None else known[0]


class _Row(Protocol):
    """What `share` needs of a row of a group (an `engine.tasks.Delivery`)."""

    row_id: str
    ref: str
    attempt: int
    lease: str
    effect_type: str | None
    due: float | None
    trace: str | None


R = TypeVar("R", bound=_Row)


def share(rows: Sequence[R], mean: float | None, budget: float) -> tuple[list[R], list[list[R]]]:
    """The rows this process runs, and the messages it hands back (in order).

    With a measured handler time, as many rows as fit in `budget` (at least one), the rest
    in messages of that size; unmeasured, `UNMEASURED_ROWS`, the rest in one message;
    a `budget` of 0 (off), or a group that fits: every row."""
    if budget <= 0 or len(rows) <= 1:
        return list(rows), []
    if mean is None:
        keep = UNMEASURED_ROWS
        return list(rows[:keep]), [list(rows[keep:])] if len(rows) > keep else []
    keep = max(1, int(budget / max(mean, 1e-9)))
    if keep >= len(rows):
        return list(rows), []
    rest = rows[keep:]
    return list(rows[:keep]), [list(rest[i : i + keep]) for i in range(0, len(rest), keep)]


def hand_back(
    app: Any, workflow_type: str, messages: Sequence[Sequence[_Row]], *, traces: bool
) -> set[str]:
    """Publish `messages` (rows of `workflow_type` a process does not run) with the relay's
    publisher, each as the relay would have sent it; the ids of the rows sent. A failure
    to publish is logged and leaves its rows to the caller (it runs them itself)."""
    claimed = [[_claimed(workflow_type, row) for row in message] for message in messages]
    try:
        sent = celery_publisher(app, forward_traces=traces)(EFFECT.name, claimed)
    except PublishError as exc:
        log.warning(
            "ironflow effect group of %s: could not hand %d rows back to the broker (%s); "
            "running them here",
            workflow_type,
            sum(len(m) for m in messages),
            exc.__cause__ or exc,
        )
        sent = exc.published
    return {str(row_id) for row_id in sent}


def _claimed(workflow_type: str, row: _Row) -> ClaimedRow:
    """A row of a group as its relay claimed it (what the publisher sends of it)."""
    due = datetime.fromtimestamp(row.due, UTC) if row.due is not None else None
    created = due or datetime.now(UTC)  # a group's rows are first attempts: due at creation
    return ClaimedRow(
        uuid.UUID(row.row_id),
        workflow_type,
        row.ref.partition(":")[2],
        row.attempt - 1,
        created,
        row.lease,
        effect_type=row.effect_type,
        due_at=due,
        trace_context=row.trace,
    )
