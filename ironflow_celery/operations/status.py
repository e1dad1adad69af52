"""Queue depth per workflow type, read from PostgreSQL: what ``ironflow-celery status``
prints and what the metrics collector exports at scrape time.

Every unprocessed row is in exactly one state (dead first, then by its lease):

effects
    ``pending``      claimable now (never leased, or its lease/backoff has ended);
    ``in_flight``    leased: ``locked_by`` set and ``locked_until`` in the future;
    ``backing_off``  failed, waiting: ``locked_by`` NULL and ``locked_until`` in the future;
    ``dead``         ``dead_lettered_at`` set or ``attempts >= max_attempts``.
timers
    ``due`` (fire time passed, claimable), ``pending`` (fire time in the future),
    ``in_flight``, ``backing_off``, ``dead``.

``oldest_pending_age`` is the age in seconds of the oldest live (not dead) effect, and for
timers how far the most overdue claimable timer is behind its fire time: the lag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ironflow_celery.model.config import AttemptLimits

if TYPE_CHECKING:
    from ironflow_celery.storage.store import PostgresStore

__all__ = [
    "EffectDepth",
    "TimerDepth",
    "TypeStatus",
    "queue_status",
]


@dataclass(frozen=True, slots=True)
class EffectDepth:
    """Unprocessed outbox rows of one workflow type, by state."""

    pending: int = 0
    in_flight: int = 0
    backing_off: int = 0
    dead: int = 0
    oldest_pending_age: float | None = None


@dataclass(frozen=True, slots=True)
class TimerDepth:
    """Unprocessed timers of one workflow type, by state."""

    due: int = 0
    pending: int = 0
    in_flight: int = 0
    backing_off: int = 0
    dead: int = 0
    oldest_due_age: float | None = None


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """One workflow type's effect and timer depth."""

    workflow_type: str
    effects: EffectDepth
    timers: TimerDepth

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow_type": self.workflow_type,
            "effects": asdict(self.effects),
            "timers": asdict(self.timers),
        }


def _age(value: float | None) -> float | None:
    return None if value is None else round(max(float(value), 0.0), 3)


def queue_status(
    store: PostgresStore,
    *,
    max_attempts: int | AttemptLimits,
    workflow_types: tuple[str, ...] = (),
) -> list[TypeStatus]:
    """Depth per workflow type, one statement (`sql.QUEUE_STATUS`); `workflow_types` are
    listed even when idle."""
    rows = store.queue_status_rows(max_attempts=max_attempts)
    found: dict[str, TypeStatus] = {}
    for r in rows:
        found[r.workflow_type] = TypeStatus(
            r.workflow_type,
            EffectDepth(r.e_pending, r.e_in_flight, r.e_backing_off, r.e_dead, _age(r.e_oldest)),
            TimerDepth(
                r.t_due, r.t_pending, r.t_in_flight, r.t_backing_off, r.t_dead, _age(r.t_oldest)
            ),
        )
    for wt in workflow_types:
        found.setdefault(wt, TypeStatus(wt, EffectDepth(), TimerDepth()))
    return [found[k] for k in sorted(found)]
