"""What the tasks, the dead-letter, retention and metrics operations and a relay process's
duties need from the runtime, as protocols.

`WorkflowRuntime` satisfies them (mypy checks so where the runtime registers its tasks and
where `install` hands it to the operations and duties). Code is typed against these and not
against the runtime, so the runtime may import the tasks it registers without the two
modules importing each other, and each caller states what it uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ironflow_celery.engine.metrics import Metrics
from ironflow_celery.model.config import AttemptLimits, RetryPolicy, RuntimeConfig
from ironflow_celery.service.workflow_service import Registry, WorkflowService
from ironflow_celery.storage.kinds import Kind
from ironflow_celery.storage.store import PostgresStore

__all__ = [
    "Duty",
    "DutyHost",
    "HandlerTiming",
    "LeaseKeeping",
    "RuntimeView",
    "Stopping",
    "TaskHost",
]


class HandlerTiming(Protocol):
    """Handler time per workflow type, as this process measured it."""

    def note(self, workflow_type: str, seconds: float) -> None: ...

    def mean(self, workflow_type: str) -> float | None: ...


class LeaseKeeping(Protocol):
    """Keeps running rows' leases alive while their handlers run."""

    def keep_rows(
        self, kind: Kind, rows: Sequence[tuple[uuid.UUID, str]]
    ) -> AbstractContextManager[None]:
        """Renew the leases of `rows`, (row id, run token) each, until the block exits
        (a group's rows registered at once)."""
        ...

    def done_rows(self, kind: Kind, row_ids: Iterable[uuid.UUID]) -> None:
        """Stop renewing rows whose outcomes are recorded before their `keep_rows` block
        exits."""
        ...

    def flushing(self, flush: Callable[[], None]) -> AbstractContextManager[None]:
        """Call `flush` often (a group's pending acknowledgements) until the block exits."""
        ...


class RuntimeView(Protocol):
    """The runtime as the operations see it (dead letters, metrics, retention)."""

    @property
    def store(self) -> PostgresStore: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def attempt_limits(self) -> AttemptLimits:
        """``max_attempts`` per workflow type, as the claim compares them."""
        ...


class Stopping(Protocol):
    """A threading or multiprocessing ``Event``: what a relay process and its duties wait
    on to stop."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class DutyHost(RuntimeView, Protocol):
    """The runtime as a relay process's duties see it (`WorkflowRuntime.duties`)."""

    @property
    def app(self) -> Any:
        """The Celery app (untyped library), None before `install`."""
        ...


Duty = Callable[[DutyHost, Any, Stopping], object]
"""A relay process's other duty (metrics endpoint, retention, unregistered-task watch):
called with the runtime, the Celery app's ``conf`` and the process's stop event."""


class TaskHost(RuntimeView, Protocol):
    """The runtime as the effect, timer and execute tasks see it."""

    @property
    def config(self) -> RuntimeConfig: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def service(self) -> WorkflowService: ...

    @property
    def lease_keeper(self) -> LeaseKeeping: ...

    @property
    def handler_times(self) -> HandlerTiming:
        """This process's handler time per workflow type (`engine.sharing.HandlerTimes`)."""
        ...

    def retry_policy_for(self, workflow_type: str, effect_type: str | None = None) -> RetryPolicy:
        """The retry policy of a row: its effect type's, its workflow's, or the runtime's."""
        ...
