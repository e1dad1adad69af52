"""Every exception ironflow_celery raises, in one tree.

Framework failures are exceptions; a workflow's own "no" is a `Rejected` outcome,
never an exception. Every failing call leaves the database as it was. Errors caused by
a wrong argument also subclass the builtin a caller would catch (``ValueError``,
``TypeError``, ``LookupError``/``KeyError``, ``TimeoutError``)::

    IronflowError
    ├── ConfigurationError             a setting or the wiring is missing or wrong
    │   └── NotInstalled               runtime_of(app) before install(app)   (LookupError)
    ├── InvalidArgument                a value the API does not accept        (ValueError)
    │   ├── InvalidText                text PostgreSQL cannot store (NUL, lone surrogate)
    │   ├── UnknownRowKind             a row kind other than 'effect' or 'timer'
    │   └── InvalidOperationRequest    a malformed operations request (any of the four below)
    │       ├── InvalidDeadLetterRequest  a malformed row id, cursor, age, kind, limit, reason
    │       │   └── InvalidRetentionRequest  a malformed purge (age, batch size)
    │       ├── InvalidCancelRequest   a malformed cancel (ids, kind, workflow, reason)
    │       └── InvalidInspectionRequest  a malformed list/show (state, time, cursor, limit)
    ├── InvalidArgumentType            an argument of the wrong type           (TypeError)
    ├── UnknownName                    a name a definition does not declare    (KeyError)
    ├── UnknownWorkflowType            a workflow type that is not registered
    ├── DuplicateWorkflowType          the same workflow type registered twice
    ├── InvalidWorkflowDefinition      a Workflow class missing or misdeclaring a member
    ├── InvalidPayload                 an input, event, effect or state that does not validate
    ├── InputRefused                   the execute task's input refused; nothing written
    ├── EventDeserializationError      a stored event that no longer decodes
    ├── UniqueKeyConflict              a unique key held by another active instance
    ├── UnitOfWorkFinished             a unit of work used after its commit or rollback
    ├── StorageError                   PostgreSQL failed; the transaction was rolled back
    │   ├── DatabaseUnavailable        PostgreSQL could not be reached at all
    │   ├── MigrationError             the schema could not be brought up to date
    │   └── StartGuardUnavailable      a task's start guard could not reach the database
    ├── AcknowledgementFailed          a grouped acknowledgement rolled back (engine-internal)
    ├── GroupInputFailed               one input of a group's follow-ups failed (engine-internal)
    ├── PublishError                   a relay's publish to the broker failed mid-batch
    ├── ProjectionError                a projection handler failed at one event
    ├── PermanentEffectError           raised by a handler: dead-letter now, no retries
    ├── DeadLettered                   raised by a task after dead-lettering its row
    ├── DrainLimitExceeded             testing kit: drain() ran max_steps, rows still due
    └── DrainTimedOut                  testing kit: no worker finished the rows  (TimeoutError)

Deliberately outside the tree: ``NotImplementedError`` of abstract methods,
``AttributeError`` of the package's module ``__getattr__``, ``AssertionError`` of the
testing kit's ``assert_*`` helpers, Celery's ``Retry`` and SQLAlchemy's
``DisconnectionError`` (protocols those libraries define). Classes are re-exported
where they were first defined (e.g. `ironflow_celery.dead_letters`,
`ironflow_celery.engine.relay`, `ironflow_celery.testing`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AcknowledgementFailed",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DeadLettered",
    "DrainLimitExceeded",
    "DrainTimedOut",
    "DuplicateWorkflowType",
    "EventDeserializationError",
    "GroupInputFailed",
    "InputRefused",
    "InvalidArgument",
    "InvalidArgumentType",
    "InvalidCancelRequest",
    "InvalidDeadLetterRequest",
    "InvalidInspectionRequest",
    "InvalidOperationRequest",
    "InvalidPayload",
    "InvalidRetentionRequest",
    "InvalidText",
    "InvalidWorkflowDefinition",
    "IronflowError",
    "MigrationError",
    "NotInstalled",
    "PermanentEffectError",
    "ProjectionError",
    "PublishError",
    "StartGuardUnavailable",
    "StorageError",
    "UniqueKeyConflict",
    "UnitOfWorkFinished",
    "UnknownName",
    "UnknownRowKind",
    "UnknownWorkflowType",
]


class IronflowError(Exception):
    """Base class of every error raised by ironflow_celery."""


class ConfigurationError(IronflowError):
    """A setting is missing or wrong (database URL, workflow modules, ...)."""


class NotInstalled(ConfigurationError, LookupError):
    """ironflow is not installed on a Celery app (`runtime_of` before `install`)."""


class InvalidArgument(IronflowError, ValueError):
    """An argument has a value the API does not accept (a usage error, not a database one)."""


class InvalidArgumentType(IronflowError, TypeError):
    """An argument is of a type the API does not accept."""


class UnknownName(IronflowError, KeyError):
    """A name (e.g. a state of a state machine) that the definition does not declare."""


class UnknownWorkflowType(IronflowError):
    """A workflow type that is not registered was asked for."""

    def __init__(self, workflow_type: str, registered: Iterable[str] | None = None) -> None:
        self.workflow_type = workflow_type
        self.registered = tuple(registered) if registered is not None else None
        message = f"unknown workflow type: {workflow_type}"
        if self.registered is not None:
            message += f" (registered: {', '.join(self.registered) or 'none'})"
        super().__init__(message)


class DuplicateWorkflowType(IronflowError):
    """The same workflow type was registered twice."""

    def __init__(self, workflow_type: str) -> None:
        self.workflow_type = workflow_type
        super().__init__(f"duplicate workflow type registration: {workflow_type}")


class InvalidWorkflowDefinition(IronflowError):
    """A `Workflow` subclass is missing a member or declares it wrongly."""


class InvalidPayload(IronflowError):
    """A payload (input, event, effect, state) does not validate for its workflow type.

    The message names the workflow type, what kind of payload it was and what is wrong.
    """

    def __init__(self, workflow_type: str, kind: str, detail: str) -> None:
        self.workflow_type = workflow_type
        self.kind = kind
        self.detail = detail
        super().__init__(f"invalid {kind} for workflow type '{workflow_type}': {detail}")


class UnknownRowKind(InvalidArgument):
    """A row kind other than ``"effect"`` or ``"timer"`` (`storage.kinds.kind_of`)."""


class InvalidText(InvalidArgument):
    """A text argument (workflow id or type, filter, name, reason) that PostgreSQL cannot
    store: it contains a NUL character or a lone surrogate (an undecodable byte)."""

    def __init__(self, what: str, value: str, problem: str) -> None:
        self.what = what
        self.value = value
        self.problem = problem
        shown = f" {value!r}" if value else ""
        super().__init__(f"invalid {what}{shown}: {problem}")


class EventDeserializationError(IronflowError):
    """A stored event does not deserialise, in a replay or for a projection (a corrupt or
    outdated row)."""

    def __init__(self, workflow_type: str, workflow_id: str, sequence: int, detail: str) -> None:
        self.workflow_type = workflow_type
        self.workflow_id = workflow_id
        self.sequence = sequence
        self.detail = detail
        super().__init__(
            f"failed to deserialize event at sequence {sequence} "
            f"for {workflow_type}:{workflow_id}: {detail}"
        )


class UniqueKeyConflict(IronflowError):
    """A new instance's unique key is already held by another active instance of its type."""

    def __init__(self, workflow_type: str, unique_key: str) -> None:
        self.workflow_type = workflow_type
        self.unique_key = unique_key
        super().__init__(
            f"unique key conflict: workflow type '{workflow_type}' already has an active "
            f"instance with key '{unique_key}'"
        )


class UnitOfWorkFinished(IronflowError):
    """A unit of work was written to after its commit or rollback (or on a completed
    instance): begin a new one. A programming error; nothing was written."""


class StorageError(IronflowError):
    """PostgreSQL failed or could not be reached; the transaction was rolled back."""


class DatabaseUnavailable(StorageError):
    """PostgreSQL could not be reached at all (refused, down, wrong address)."""


class MigrationError(StorageError):
    """The schema could not be brought up to date."""


class StartGuardUnavailable(StorageError):
    """The start guard could not reach the database: the row was not started."""


class AcknowledgementFailed(IronflowError):
    """A grouped acknowledgement rolled back: executing `ran`'s follow-up input, or (`ran`
    None) the whole transaction. Raised and caught inside the engine's completer."""

    def __init__(self, ran: Any, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.ran = ran
        self.cause = cause


class GroupInputFailed(IronflowError):
    """`WorkflowService.execute_group`: the input at `index` failed (its decision raised or
    its output cannot be stored); `cause` is why. Nothing of the group was written. Raised by
    the service and caught by the engine's completer, which records only that row as failed."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"input {index} of the group failed: {cause}")
        self.index = index
        self.cause = cause


# -- operations -----------------------------------------------------------------------


class InvalidOperationRequest(InvalidArgument):
    """A malformed operations request -- dead letters, cancel, inspection, retention: what
    the CLI reports as a usage error (exit 2), whichever operation refused it."""


class InvalidDeadLetterRequest(InvalidOperationRequest):
    """A malformed row id, cursor, age or kind (a usage error, not a database one)."""


class InvalidCancelRequest(InvalidOperationRequest):
    """A malformed cancel: bad row id, kind, workflow type or id, or reason (a usage error)."""


class InvalidInspectionRequest(InvalidOperationRequest):
    """A malformed ``effects list`` / ``show`` / ``workflows show`` request: an unknown
    state, a time that does not parse, a bad cursor, limit or row id (a usage error)."""


class InvalidRetentionRequest(InvalidDeadLetterRequest):
    """A malformed purge: an age that is not one, a batch size below 1. A subclass of
    `InvalidDeadLetterRequest` only because that is what ``purge`` raised before."""


class InputRefused(IronflowError):
    """The execute task refused its input (not an object, unknown tag, invalid fields, a held
    unique key); nothing was written. One message argument, so Celery rebuilds it."""


class PublishError(IronflowError):
    """Publishing a batch failed after `published` rows went out."""

    def __init__(self, published: list[uuid.UUID], cause: BaseException) -> None:
        self.published = published
        self.cause = cause
        super().__init__(f"publish failed after {len(published)} messages: {cause!r}")


class ProjectionError(IronflowError):
    """A handler (or the decoding of an event) failed at one event."""

    def __init__(self, event_sequence: int, message: str) -> None:
        super().__init__(message)
        self.global_sequence = event_sequence


# -- effects and timers -----------------------------------------------------------------


class PermanentEffectError(IronflowError):
    """Raised by an effect handler to dead-letter its effect at once, without retries.

    Any other exception is a retryable failure, counted in the outbox until
    `max_attempts` is reached.
    """


class DeadLettered(IronflowError):
    """What an effect or timer task raises after dead-lettering its row, so that Celery
    marks the task FAILURE: Flower's Failed view, ``task_failure`` receivers and Sentry's
    CeleryIntegration see it. The row's outcome is already committed in the outbox; the
    handler's exception, when there was one, is the ``__cause__``."""

    def __init__(
        self,
        kind: str,
        row_id: str,
        workflow: str,
        effect_type: str | None,
        attempts: int,
        error: str,
    ) -> None:
        self.kind = kind
        self.row_id = row_id
        self.workflow = workflow
        self.effect_type = effect_type
        self.attempts = attempts
        self.error = error
        # args are the constructor's: Celery rebuilds an exception from its args (pickled
        # back from a prefork child, or JSON in a result backend)
        super().__init__(kind, row_id, workflow, effect_type, attempts, error)

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.row_id} of {self.workflow} "
            f"({self.effect_type or 'unknown type'}) dead-lettered after {self.attempts} "
            f"attempt(s): {self.error}"
        )

    def __repr__(self) -> str:  # what Flower and Celery's log show
        return f"{type(self).__name__}({str(self)!r})"


# -- the testing kit ----------------------------------------------------------------------


class DrainLimitExceeded(IronflowError):
    """`drain` ran `max_steps` rows and rows were still due: a workflow that never settles."""


class DrainTimedOut(IronflowError, TimeoutError):
    """``drain(worker=True)``: no Celery worker finished the published rows in time."""
