"""Runtime configuration: ironflow's `RuntimeConfig` and `RetryPolicy` with the same
defaults, plus the relay settings ironflow lacks, and `runtime_config_from`, which builds
one from a Celery app's ``ironflow_*`` settings (their table and reader:
`ironflow_celery.model.settings`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ironflow_celery.errors import ConfigurationError
from ironflow_celery.model.settings import Settings, read_settings

__all__ = [
    "AttemptLimits",
    "RetryPolicy",
    "RuntimeConfig",
    "results_ignored",
    "runtime_config_from",
    "seconds",
]


def seconds(value: timedelta | float | int | str) -> float:
    """A duration as float seconds (accepts timedelta, numbers and numeric strings)."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"expected a duration in seconds, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for failed effects and timers; attempts are counted in the outbox.

    ``backoff_duration(n) = min(base_delay * 2**(n-1), max_delay)`` for the n-th failed
    attempt (1-based). ``jitter`` (0..1, default 0 like ironflow) scales the delay down
    by a random fraction up to that amount, so a burst of failures does not retry in step.
    """

    max_attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 300.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_delay", seconds(self.base_delay))
        object.__setattr__(self, "max_delay", seconds(self.max_delay))
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigurationError("jitter must be between 0 and 1")

    def backoff_duration(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        exponent = max(0, attempt - 1)
        delay = self.max_delay if exponent >= 64 else self.base_delay * (2**exponent)
        delay = min(delay, self.max_delay)
        if self.jitter:
            delay *= 1.0 - random.random() * self.jitter
        return delay

    def delay_for_attempt(self, attempt: int) -> float:
        """Same as `backoff_duration` (ironflow's name)."""
        return self.backoff_duration(attempt)

    def next_attempt_at(self, attempt: int) -> datetime:
        """App-clock time of the next attempt (informational; the database decides)."""
        return datetime.now(UTC) + timedelta(seconds=self.backoff_duration(attempt))

    def should_retry(self, attempt: int) -> bool:
        """True while failed attempt `attempt` leaves attempts to go."""
        return attempt < self.max_attempts


@dataclass(frozen=True, slots=True)
class AttemptLimits:
    """``max_attempts`` per workflow type (a workflow's own `RetryPolicy`), with the global
    value for every other type: what the claim, dead-letter and status queries compare
    ``attempts`` against, so one database may hold types with different limits."""

    default: int = 5
    by_type: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default < 1 or any(n < 1 for n in self.by_type.values()):
            raise ConfigurationError("max_attempts must be at least 1")

    @classmethod
    def of(cls, value: int | AttemptLimits) -> AttemptLimits:
        """`value` as limits (a plain int is the same limit for every type)."""
        return value if isinstance(value, AttemptLimits) else cls(int(value))

    def for_type(self, workflow_type: str) -> int:
        """The max attempts of `workflow_type`'s rows."""
        return self.by_type.get(workflow_type, self.default)

    def params(self) -> dict[str, Any]:
        """Bind parameters of `sql.MAX_ATTEMPTS` (``:max_attempts``, ``:max_types``,
        ``:max_values``)."""
        return {
            "max_attempts": self.default,
            "max_types": list(self.by_type),
            "max_values": list(self.by_type.values()),
        }


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """ironflow's runtime settings (same defaults), plus the relay's.

    How they map onto Celery: ``effect_workers``/``timer_workers`` are the relay threads
    that claim and publish in one process (handler concurrency is the Celery worker's
    ``--concurrency``); ``*_poll_interval`` is an idle relay's safety poll (ironflow
    polls every 0.1 s / 1 s; these relays wake on NOTIFY and at the next due time, so
    the poll only covers a lost NOTIFY: 5 s keeps an idle relay under a statement a
    second); ``*_lock_duration`` is the lease a claimed row holds (renewed while a handler
    runs); ``shutdown_timeout`` bounds `WorkflowRuntime.run`'s stop; ``retry_policy`` is
    applied by the task's ack path, never by Celery's own retries.
    """

    effect_poll_interval: float = 5.0
    timer_poll_interval: float = 5.0
    effect_lock_duration: float = 300.0
    timer_lock_duration: float = 300.0
    shutdown_timeout: float = 30.0
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    worker_id: str | None = None
    effect_workers: int = 1
    timer_workers: int = 1
    # -- beyond ironflow ---------------------------------------------------------
    claim_batch_size: int = 200
    """Rows one claim statement takes (ironflow: always 1)."""
    effect_batch_size: int = 200
    """At most this many effects of one type, claimed together, travel in one message and
    are acknowledged together (a lone row travels alone; 1: one message per effect). A
    workflow's own ``effect_batch_size`` overrides it."""
    group_run_budget: float = 0.1
    """Seconds of handler time a worker process takes on from one group message: from a
    group whose rows would run longer (by the handler time of the type measured in that
    process), it keeps what fits and gives the rest back to the broker as messages of that
    size, so other processes run them meanwhile; slow handlers end up one row per
    message. 0: a group is always run whole."""
    max_in_flight: int = 1000
    """Back-pressure, per queue: a relay stops claiming rows for a queue while this many of
    its published rows there are still waiting to start (in the broker, or prefetched by a
    worker), so a queue nobody consumes never takes the room of the others."""
    dispatch_timeout: float = 1800.0
    """How long a relay keeps the lease of a published row that has not started yet alive.

    Waiting is not failing: a row whose message waits in the broker behind a backlog stays
    held by its relay (the relay renews its lease) instead of expiring and being published
    again. This bounds that hold, so a message the broker lost (a Redis restart without
    persistence, a purge, a worker that discarded it) is claimed and published again at
    most ``dispatch_timeout`` + the lease after it was first published."""
    relay_types: tuple[str, ...] | None = None
    """The workflow types this process's relays claim (``*``: every registered type).
    None: inside ``celery worker``, the types whose tasks route to a queue the worker
    consumes (``-Q``); elsewhere every registered type."""
    release_lost_deliveries: bool = True
    """Redis: relays release published rows whose message a worker that is gone had taken
    (kombu's ``unacked`` hash, held by no live worker), instead of waiting for
    ``dispatch_timeout`` (see `ironflow_celery.engine.deliveries`)."""
    publish_retry_delay: float = 1.0
    """Pause after a failed publish (its claims are released at once)."""
    tracing: bool = True
    """With opentelemetry-api installed: relays forward each row's stored trace context in
    its message headers (one primary-key query per published batch) and tasks run in
    ``ironflow.effect``/``ironflow.timer`` spans. False turns both off."""
    relaxed_acknowledgements: bool = False
    """Opt-in: commit acknowledgements (and their follow-up inputs) with
    ``synchronous_commit = off``. Faster, but a PostgreSQL crash can lose an acknowledgement
    others already acted on (see `PostgresStore._commit_mode`). Off by default."""

    def __post_init__(self) -> None:
        for name in (
            "effect_poll_interval",
            "timer_poll_interval",
            "effect_lock_duration",
            "timer_lock_duration",
            "shutdown_timeout",
            "publish_retry_delay",
            "dispatch_timeout",
            "group_run_budget",
        ):
            object.__setattr__(self, name, seconds(getattr(self, name)))
        object.__setattr__(self, "effect_workers", max(1, int(self.effect_workers)))
        object.__setattr__(self, "timer_workers", max(1, int(self.timer_workers)))
        if self.relay_types is not None:
            object.__setattr__(self, "relay_types", tuple(self.relay_types))
        if self.claim_batch_size < 1 or self.max_in_flight < 1 or self.effect_batch_size < 1:
            raise ConfigurationError(
                "claim_batch_size, effect_batch_size and max_in_flight must be positive"
            )

    def replace(self, **changes: Any) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)


# -- Celery settings ---------------------------------------------------------------------


def results_ignored(conf: Mapping[str, Any]) -> bool:
    """Whether effect and timer results go unstored: Celery's own rule, ``task_ignore_result``
    or no ``result_backend`` configured (then storing would be a wasted round trip)."""
    return bool(conf.get("task_ignore_result")) or not conf.get("result_backend")


def runtime_config_from(
    conf: Mapping[str, Any] | Settings, base: RuntimeConfig | None = None
) -> RuntimeConfig:
    """A `RuntimeConfig` from ``ironflow_*`` settings (a conf, or `Settings` read from one),
    over `base` (or the defaults): only the settings that are set change a field."""
    settings = conf if isinstance(conf, Settings) else read_settings(conf)
    base = base or RuntimeConfig()
    changes: dict[str, Any] = settings.fields("RuntimeConfig")
    retry = settings.fields("RetryPolicy")
    if retry:
        changes["retry_policy"] = dataclasses.replace(base.retry_policy, **retry)
    return dataclasses.replace(base, **changes) if changes else base
