"""One exception hierarchy for everything the engine raises.

Framework failures are exceptions; a workflow's own "no" is a `Rejected` outcome,
never an exception. Every failing call leaves the database as it was.
"""

from __future__ import annotations

from collections.abc import Iterable


class IronflowError(Exception):
    """Base class of every error raised by ironflow_celery."""


class ConfigurationError(IronflowError):
    """A setting is missing or wrong (database URL, workflow modules, ...)."""


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


class InvalidText(IronflowError, ValueError):
    """A text argument (workflow id or type, filter, name, reason) that PostgreSQL cannot
    store: it contains a NUL character or a lone surrogate (an undecodable byte)."""

    def __init__(self, what: str, value: str, problem: str) -> None:
        self.what = what
        self.value = value
        self.problem = problem
        shown = f" {value!r}" if value else ""
        super().__init__(f"invalid {what}{shown}: {problem}")


class EventDeserializationError(IronflowError):
    """A stored event does not deserialise during replay (a corrupt or outdated row)."""

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


class StorageError(IronflowError):
    """PostgreSQL failed or could not be reached; the transaction was rolled back."""


class DatabaseUnavailable(StorageError):
    """PostgreSQL could not be reached at all (refused, down, wrong address)."""


class MigrationError(StorageError):
    """The schema could not be brought up to date."""


class PermanentEffectError(Exception):
    """Raised by an effect handler to dead-letter its effect at once, without retries.

    Any other exception is a retryable failure, counted in the outbox until
    `max_attempts` is reached.
    """


class DeadLettered(Exception):
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
