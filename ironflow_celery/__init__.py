"""ironflow_celery: durable, event-sourced workflows on PostgreSQL, executed by Celery."""

from typing import TYPE_CHECKING, Any

from ironflow_celery._version import __version__
from ironflow_celery.celery_app import default_app, install
from ironflow_celery.engine.runtime import WorkflowBuilder, WorkflowRuntime
from ironflow_celery.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DuplicateWorkflowType,
    EventDeserializationError,
    InvalidPayload,
    InvalidText,
    InvalidWorkflowDefinition,
    IronflowError,
    MigrationError,
    PermanentEffectError,
    StorageError,
    UniqueKeyConflict,
    UnknownWorkflowType,
)
from ironflow_celery.model.config import RetryPolicy, RuntimeConfig, runtime_config_from
from ironflow_celery.model.messages import Message
from ironflow_celery.model.views import StateMachineDefinition
from ironflow_celery.model.workflow import (
    Accepted,
    AlreadyCompleted,
    CancelNotice,
    DeadLetterNotice,
    Decision,
    EffectContext,
    ExecuteOutcome,
    Rejected,
    Timer,
    Workflow,
    WorkflowRef,
)
from ironflow_celery.operations.cancel import (
    CancelResult,
    cancel_effect,
    cancel_instance,
    cancel_row,
    cancel_timer,
)
from ironflow_celery.operations.projections import (
    FunctionProjection,
    Projection,
    ProjectionConfig,
    ProjectionEvent,
    ProjectionRunner,
    projection,
    run_projections,
)
from ironflow_celery.operations.retention import purge
from ironflow_celery.operations.status import queue_status
from ironflow_celery.service.dead_letters import DeadLetter, DeadLetterQuery, RetryResult
from ironflow_celery.service.workflow_service import (
    Registry,
    WorkflowService,
    WorkflowServiceConfig,
)
from ironflow_celery.storage.store import PostgresStore, StoredEvent, WorkflowInstanceSummary

if TYPE_CHECKING:
    from celery import Celery

    app: Celery


def __getattr__(name: str) -> Any:
    # The package's Celery app, created on first access so that importing the package
    # has no side effects; ``celery -A ironflow_celery worker`` finds it here.
    if name in ("app", "celery"):
        return default_app()
    raise AttributeError(f"module 'ironflow_celery' has no attribute {name!r}")


__all__ = [
    "Accepted",
    "AlreadyCompleted",
    "CancelNotice",
    "CancelResult",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DeadLetter",
    "DeadLetterNotice",
    "DeadLetterQuery",
    "Decision",
    "DuplicateWorkflowType",
    "EffectContext",
    "EventDeserializationError",
    "ExecuteOutcome",
    "FunctionProjection",
    "InvalidPayload",
    "InvalidText",
    "InvalidWorkflowDefinition",
    "IronflowError",
    "Message",
    "MigrationError",
    "PermanentEffectError",
    "PostgresStore",
    "Projection",
    "ProjectionConfig",
    "ProjectionEvent",
    "ProjectionRunner",
    "Registry",
    "Rejected",
    "RetryPolicy",
    "RetryResult",
    "RuntimeConfig",
    "StateMachineDefinition",
    "StorageError",
    "StoredEvent",
    "Timer",
    "UniqueKeyConflict",
    "UnknownWorkflowType",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowInstanceSummary",
    "WorkflowRef",
    "WorkflowRuntime",
    "WorkflowService",
    "WorkflowServiceConfig",
    "__version__",
    "cancel_effect",
    "cancel_instance",
    "cancel_row",
    "cancel_timer",
    "install",
    "projection",
    "purge",
    "queue_status",
    "run_projections",
    "runtime_config_from",
]
