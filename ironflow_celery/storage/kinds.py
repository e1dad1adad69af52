"""The two kinds of claimable row, effects and timers, as data.

An effect (``ironflow.outbox``) and a timer (``ironflow.timers``) go through the same
states -- claimed by a relay, started by a worker's start guard, then processed, failed
into backoff, or dead-lettered; retried or discarded as a dead letter; cancelled -- with
the same transitions (River's single job table is the model). What differs between them is
written down once here: the table and payload column, the NOTIFY channel that wakes their
relays, the settings that size their leases and relays, the Celery task name, and their
statements (`ironflow_celery.storage.sql.RowStatements`). Code that handles rows takes a
`RowKind` (or its name) and reads these fields instead of branching on the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ironflow_celery.errors import UnknownRowKind
from ironflow_celery.model.tasknames import KIND_NAMES, Kind, task_name_for
from ironflow_celery.storage import sql

__all__ = [
    "EFFECT",
    "KINDS",
    "KIND_NAMES",
    "TIMER",
    "Kind",
    "RowKind",
    "kind_of",
]


@dataclass(frozen=True, slots=True, eq=False)  # two singletons: compared and hashed by identity
class RowKind:
    """What one kind of claimable row is, and where its differences live."""

    name: Kind
    """``"effect"`` or ``"timer"``: the task-name suffix, metric label and signal kind."""
    plural: str
    """``"effects"`` / ``"timers"``: the `CancelNotice` / `CancelResult` field of its ids."""
    noun: str
    """What messages about a stale delivery call the row (``"row"`` / ``"timer"``)."""
    table: str
    """Its table (``ironflow.outbox`` / ``ironflow.timers``)."""
    payload_column: str
    """The JSON column holding what a handler runs (an effect / the timer's input)."""
    channel: str
    """The NOTIFY channel that wakes this kind's relays."""
    lock_duration_setting: str
    """The `RuntimeConfig` field with the lease of a claimed or running row, in seconds."""
    poll_interval_setting: str
    """The `RuntimeConfig` field with the relay's safety poll, in seconds."""
    workers_setting: str
    """The `RuntimeConfig` field with how many relays of this kind a process runs."""
    payload_union: str
    """The workflow attribute that decodes the payload: ``effects`` or ``inputs``."""
    due_when_written: bool
    """Whether a new row is claimable at once (an effect), so a NOTIFY announces work due
    now; a timer's announces a ``fire_at`` (the relays' `_yield_delay` reads this)."""
    typed_retry_policies: bool
    """Whether the payload's type tag selects a retry policy (a workflow's per-effect-type
    policies); a timer's input uses its workflow's policy."""
    statements: sql.RowStatements
    """Every statement on this kind's table (claim, start, outcomes, leases, dead letters,
    cancel, retention)."""
    lost_after_work: str
    """Why a run's outcome is dropped when its lease was lost (the engine's log line)."""
    ack_failure: str
    """How the engine's log names a failed acknowledgement (ironflow's wording)."""
    pooled_poll: float
    """Seconds between a relay's wake-ups behind a transaction pooler without a listen URL,
    at most (no NOTIFY arrives there; see `ironflow_celery.engine.relay.POOLED_POLL`)."""

    @property
    def retention_name(self) -> str:
        """What a purge's counts call this kind's table: ``outbox`` / ``timers``."""
        return self.table.removeprefix("ironflow.")

    def task_name(self, workflow_type: str) -> str:
        """The Celery task of a workflow type: ``ironflow.<type>.effect`` / ``.timer``."""
        return task_name_for(workflow_type, self.name)

    def lock_duration(self, config: Any) -> float:
        """The lease of this kind's rows under `config` (a `RuntimeConfig`)."""
        return float(getattr(config, self.lock_duration_setting))

    def poll_interval(self, config: Any) -> float:
        return float(getattr(config, self.poll_interval_setting))

    def workers(self, config: Any) -> int:
        return int(getattr(config, self.workers_setting))

    def union_of(self, workflow: Any) -> Any:
        """The workflow's message union that decodes this kind's payloads."""
        return getattr(workflow, self.payload_union)

    def __str__(self) -> str:
        return self.name


EFFECT = RowKind(
    name="effect",
    plural="effects",
    noun="row",
    table=sql.OUTBOX,
    payload_column=sql.OUTBOX_PAYLOAD,
    channel=sql.EFFECTS_CHANNEL,
    lock_duration_setting="effect_lock_duration",
    poll_interval_setting="effect_poll_interval",
    workers_setting="effect_workers",
    payload_union="effects",
    due_when_written=True,
    typed_retry_policies=True,
    statements=sql.EFFECT_STATEMENTS,
    lost_after_work="lease lost while the handler ran; result discarded",
    ack_failure="Failed to route result",
    pooled_poll=0.2,
)

TIMER = RowKind(
    name="timer",
    plural="timers",
    noun="timer",
    table=sql.TIMERS,
    payload_column=sql.TIMERS_PAYLOAD,
    channel=sql.TIMERS_CHANNEL,
    lock_duration_setting="timer_lock_duration",
    poll_interval_setting="timer_poll_interval",
    workers_setting="timer_workers",
    payload_union="inputs",
    due_when_written=False,
    typed_retry_policies=False,
    statements=sql.TIMER_STATEMENTS,
    lost_after_work="lease lost before the timer ran",
    ack_failure="Failed to execute timer input",
    pooled_poll=1.0,
)

_BY_NAME: dict[str, RowKind] = {k.name: k for k in (EFFECT, TIMER)}
KINDS: tuple[RowKind, ...] = tuple(_BY_NAME[name] for name in KIND_NAMES)
"""Every kind, in `KIND_NAMES` order (a name without its `RowKind` fails at import)."""


def kind_of(kind: str | RowKind) -> RowKind:
    """The `RowKind` of a name (``"effect"`` / ``"timer"``); a `RowKind` is returned as is.
    Any other name raises `UnknownRowKind`."""
    if isinstance(kind, RowKind):
        return kind
    try:
        return _BY_NAME[kind]
    except KeyError:
        raise UnknownRowKind(
            f"unknown row kind {kind!r}; expected one of {', '.join(KIND_NAMES)}"
        ) from None
