"""ironflow_celery: durable, event-sourced workflows on PostgreSQL, executed by Celery."""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import RetryPolicy, RuntimeConfig
from .errors import (
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
from .messages import Message
from .runtime import WorkflowBuilder, WorkflowRuntime
from .service import Registry, WorkflowService, WorkflowServiceConfig
from .store import PostgresStore, StoredEvent, WorkflowInstanceSummary
from .views import StateMachineDefinition
from .workflow import (
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

if TYPE_CHECKING:
    from celery import Celery

    app: Celery


def install(app: Any, workflows: Any = (), **kwargs: Any) -> WorkflowRuntime:
    """Add ironflow to an existing Celery app (see `ironflow_celery.celery_app.install`)."""
    from .celery_app import install as _install

    return _install(app, workflows, **kwargs)


def __getattr__(name: str) -> Any:
    # The package's Celery app, created on first access so that importing the package
    # has no side effects; ``celery -A ironflow_celery worker`` finds it here.
    if name in ("app", "celery"):
        from .celery_app import default_app

        return default_app()
    raise AttributeError(f"module 'ironflow_celery' has no attribute {name!r}")


__all__ = [
    "Accepted",
    "AlreadyCompleted",
    "CancelNotice",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DeadLetterNotice",
    "Decision",
    "DuplicateWorkflowType",
    "EffectContext",
    "EventDeserializationError",
    "ExecuteOutcome",
    "InvalidPayload",
    "InvalidText",
    "InvalidWorkflowDefinition",
    "IronflowError",
    "Message",
    "MigrationError",
    "PermanentEffectError",
    "PostgresStore",
    "Registry",
    "Rejected",
    "RetryPolicy",
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
    "install",
]
