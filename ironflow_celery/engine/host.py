"""What the tasks need from the runtime that hosts them, as a protocol.

`WorkflowRuntime` satisfies it (mypy checks so where the runtime registers its tasks). The
tasks are typed against this and not against the runtime, so the runtime may import the
tasks it registers without the two modules importing each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from ironflow_celery.engine.metrics import Metrics
from ironflow_celery.model.config import AttemptLimits, RetryPolicy, RuntimeConfig
from ironflow_celery.service.workflow_service import Registry, WorkflowService
from ironflow_celery.storage.kinds import Kind
from ironflow_celery.storage.store import PostgresStore

__all__ = ["LeaseKeeping", "TaskHost"]


class LeaseKeeping(Protocol):
    """Keeps a running row's lease alive while its handler runs."""

    def keep(self, kind: Kind, row_id: uuid.UUID, token: str) -> AbstractContextManager[None]:
        """Renew the lease of (kind, row_id) held by `token` until the block exits."""
        ...

    def done(self, kind: Kind, row_id: uuid.UUID) -> None:
        """Stop renewing a row whose outcome is recorded before its `keep` block exits."""
        ...

    def flushing(self, flush: Callable[[], None]) -> AbstractContextManager[None]:
        """Call `flush` often (a group's pending acknowledgements) until the block exits."""
        ...


class TaskHost(Protocol):
    """The runtime as the effect, timer and execute tasks see it."""

    @property
    def config(self) -> RuntimeConfig: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def store(self) -> PostgresStore: ...

    @property
    def service(self) -> WorkflowService: ...

    @property
    def lease_keeper(self) -> LeaseKeeping: ...

    @property
    def attempt_limits(self) -> AttemptLimits:
        """``max_attempts`` per workflow type, as the claim compares them."""
        ...

    def retry_policy_for(self, workflow_type: str, effect_type: str | None = None) -> RetryPolicy:
        """The retry policy of a row: its effect type's, its workflow's, or the runtime's."""
        ...
