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

from sqlalchemy import text

if TYPE_CHECKING:
    from ironflow_celery.storage.store import PostgresStore

from ironflow_celery.model.config import AttemptLimits
from ironflow_celery.storage import sql

_DEAD = f"(dead_lettered_at IS NOT NULL OR attempts >= {sql.MAX_ATTEMPTS})"

STATUS = text(f"""
    WITH e AS (
        SELECT workflow_type, created_at, locked_by, locked_until, {_DEAD} AS dead
        FROM ironflow.outbox WHERE processed_at IS NULL
    ), t AS (
        SELECT workflow_type, fire_at, locked_by, locked_until, {_DEAD} AS dead
        FROM ironflow.timers WHERE processed_at IS NULL
    ), effects AS (
        SELECT workflow_type,
            count(*) FILTER (WHERE NOT dead AND (locked_until IS NULL OR locked_until <= now()))
                AS pending,
            count(*) FILTER (WHERE NOT dead AND locked_by IS NOT NULL AND locked_until > now())
                AS in_flight,
            count(*) FILTER (WHERE NOT dead AND locked_by IS NULL AND locked_until > now())
                AS backing_off,
            count(*) FILTER (WHERE dead) AS dead,
            EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE NOT dead)) AS oldest
        FROM e GROUP BY workflow_type
    ), timers AS (
        SELECT workflow_type,
            count(*) FILTER (WHERE NOT dead AND fire_at <= now()
                             AND (locked_until IS NULL OR locked_until <= now())) AS due,
            count(*) FILTER (WHERE NOT dead AND fire_at > now()
                             AND (locked_until IS NULL OR locked_until <= now())) AS pending,
            count(*) FILTER (WHERE NOT dead AND locked_by IS NOT NULL AND locked_until > now())
                AS in_flight,
            count(*) FILTER (WHERE NOT dead AND locked_by IS NULL AND locked_until > now())
                AS backing_off,
            count(*) FILTER (WHERE dead) AS dead,
            EXTRACT(EPOCH FROM now() - min(fire_at) FILTER (
                WHERE NOT dead AND fire_at <= now()
                  AND (locked_until IS NULL OR locked_until <= now()))) AS oldest
        FROM t GROUP BY workflow_type
    )
    SELECT coalesce(e.workflow_type, t.workflow_type) AS workflow_type,
           coalesce(e.pending, 0) AS e_pending, coalesce(e.in_flight, 0) AS e_in_flight,
           coalesce(e.backing_off, 0) AS e_backing_off, coalesce(e.dead, 0) AS e_dead,
           e.oldest AS e_oldest,
           coalesce(t.due, 0) AS t_due, coalesce(t.pending, 0) AS t_pending,
           coalesce(t.in_flight, 0) AS t_in_flight, coalesce(t.backing_off, 0) AS t_backing_off,
           coalesce(t.dead, 0) AS t_dead, t.oldest AS t_oldest
    FROM effects e FULL JOIN timers t ON e.workflow_type = t.workflow_type
    ORDER BY 1
""")


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


def _age(value: Any) -> float | None:
    return None if value is None else round(max(float(value), 0.0), 3)


def queue_status(
    store: PostgresStore,
    *,
    max_attempts: int | AttemptLimits,
    workflow_types: tuple[str, ...] = (),
) -> list[TypeStatus]:
    """Depth per workflow type, one statement; `workflow_types` are listed even when idle."""
    rows = store._run(STATUS, AttemptLimits.of(max_attempts).params())
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
