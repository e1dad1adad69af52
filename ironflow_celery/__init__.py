"""ironflow_celery: durable, event-sourced workflows on PostgreSQL, executed by Celery."""

from .errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DuplicateWorkflowType,
    EventDeserializationError,
    InvalidPayload,
    InvalidWorkflowDefinition,
    IronflowError,
    MigrationError,
    PermanentEffectError,
    StorageError,
    UniqueKeyConflict,
    UnknownWorkflowType,
)
from .messages import Message
from .service import Registry, WorkflowService, WorkflowServiceConfig
from .store import PostgresStore, StoredEvent, WorkflowInstanceSummary
from .workflow import (
    Accepted,
    AlreadyCompleted,
    DeadLetterNotice,
    Decision,
    EffectContext,
    ExecuteOutcome,
    Rejected,
    Timer,
    Workflow,
    WorkflowRef,
)

__all__ = [
    "Accepted",
    "AlreadyCompleted",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DeadLetterNotice",
    "Decision",
    "DuplicateWorkflowType",
    "EffectContext",
    "EventDeserializationError",
    "ExecuteOutcome",
    "InvalidPayload",
    "InvalidWorkflowDefinition",
    "IronflowError",
    "Message",
    "MigrationError",
    "PermanentEffectError",
    "PostgresStore",
    "Registry",
    "Rejected",
    "StorageError",
    "StoredEvent",
    "Timer",
    "UniqueKeyConflict",
    "UnknownWorkflowType",
    "Workflow",
    "WorkflowInstanceSummary",
    "WorkflowRef",
    "WorkflowService",
    "WorkflowServiceConfig",
]
