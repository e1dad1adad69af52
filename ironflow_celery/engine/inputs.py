"""Inputs through Celery: ``ironflow.<type>.execute(input, idempotency_key=None)``.

Other services (and ``celery call``) talk to the broker, not to PostgreSQL. This task
executes one tagged JSON input of its workflow type through the service and returns the
outcome as JSON (`ExecuteOutcome.to_json` plus ``workflow``, ``idempotency_key`` and
``duplicate``).

Idempotency. The key is the ``idempotency_key`` argument, else the Celery task id. In
the input's own transaction the task takes a transaction-scoped advisory lock on
(workflow type, key), looks for an earlier record of that key on the instance, and either
returns the recorded outcome (``duplicate: true``, nothing executed) or executes the input
and writes the record -- a row in ``ironflow.input_observations`` with ``input_type`` =
`RECORD_TYPE` -- in that same transaction. So a redelivered message, or the same key sent
twice (even concurrently), applies the input at most once, and every delivery answers the
first outcome. Not covered: the same input published under two different keys (use a
workflow ``unique_key`` or let ``decide`` reject repeats), and keys whose record retention
purged (``retention purge --include-observations`` removes records of long-completed
instances; a completed instance answers ``already_completed`` anyway).

The message is acknowledged after the task finishes (``acks_late``): the broker holds the
only copy of the input until its transaction has committed, and the record makes a
redelivery after a worker crash harmless; while PostgreSQL cannot be reached the task is
sent back through the broker (same task id, so the same key) instead of failing. Bad
input (not an object, unknown tag, invalid fields, a held unique key) fails the task with
`InputRefused`, an expected error: one log line without a traceback, FAILURE in the
result backend and Flower, nothing written.
"""

from __future__ import annotations

import logging
from typing import Any

from ironflow_celery.engine.host import TaskHost
from ironflow_celery.engine.redelivery import send_back
from ironflow_celery.errors import (
    DatabaseUnavailable,
    InputRefused,
    InvalidPayload,
    UniqueKeyConflict,
    UnknownWorkflowType,
)
from ironflow_celery.model.tasknames import task_name_for
from ironflow_celery.model.workflow import ExecuteOutcome
from ironflow_celery.service.workflow_service import input_type_of

__all__ = [
    "RECORD_TYPE",
    "execute_input",
    "execute_task_name",
    "recorded_outcome",
    "register_execute_tasks",
]

log = logging.getLogger("ironflow_celery.inputs")

RECORD_TYPE = "ironflow.celery.execute"
"""``input_type`` of the observation row that records an idempotency key and its outcome."""


def execute_task_name(workflow_type: str) -> str:
    """``ironflow.<type>.execute``."""
    return task_name_for(workflow_type, "execute")


def execute_input(
    runtime: TaskHost, workflow_type: str, payload: Any, idempotency_key: str | None
) -> dict[str, Any]:
    """Execute one JSON input at most once per idempotency key; the outcome as JSON."""
    registration = runtime.registry.get(workflow_type)
    workflow = registration.workflow
    if not isinstance(payload, dict):
        raise InvalidPayload(
            workflow_type,
            "input",
            f"expected a JSON object tagged with 'type', got {type(payload).__name__}",
        )
    workflow_id = workflow.workflow_id(workflow.inputs.decode(payload))
    if idempotency_key is not None and not isinstance(idempotency_key, str):
        raise InputRefused(
            f"idempotency_key must be a string, got {type(idempotency_key).__name__}"
        )
    answer = {"workflow": f"{workflow_type}:{workflow_id}", "idempotency_key": idempotency_key}
    if not idempotency_key:  # called without a task id (a plain function call): no record
        outcome = runtime.service.execute_dynamic(workflow_type, payload)
        return {**outcome.to_json(), **answer, "duplicate": False}

    store = runtime.store
    with store.transaction() as conn:  # an input: durable like every execute
        # Two deliveries of one key queue here, so the second sees the first's record.
        lock = f"ironflow.execute:{workflow_type}:{idempotency_key}"
        store.lock_idempotency_key(lock, connection=conn)
        earlier = store.find_execute_record(
            workflow_type, workflow_id, RECORD_TYPE, idempotency_key, connection=conn
        )
        if earlier is not None:
            log.info(
                "ironflow: %s %s already executed (key %s); answering its recorded outcome",
                execute_task_name(workflow_type),
                answer["workflow"],
                idempotency_key,
            )
            return {**earlier, **answer, "duplicate": True}
        outcome = runtime.service.execute_dynamic(workflow_type, payload, connection=conn)
        result = outcome.to_json()
        store.record_execute(
            workflow_type,
            workflow_id,
            RECORD_TYPE,
            {
                "idempotency_key": idempotency_key,
                "input_type": input_type_of(payload, "?"),
                "input": payload,
                "outcome": result,
            },
            outcome.kind,
            rejection=result.get("reason"),
            rejected=outcome.is_rejected,
            connection=conn,
        )
    return {**result, **answer, "duplicate": False}


def recorded_outcome(
    runtime: TaskHost, workflow_type: str, workflow_id: str, idempotency_key: str
) -> ExecuteOutcome[Any] | None:
    """The outcome recorded for an idempotency key on an instance, or None."""
    store = runtime.store
    with store.transaction() as conn:
        found = store.find_execute_record(
            workflow_type, workflow_id, RECORD_TYPE, idempotency_key, connection=conn
        )
    return None if found is None else ExecuteOutcome.from_json(found)


# -- Celery registration ------------------------------------------------------------------

_REFUSED = (InvalidPayload, UnknownWorkflowType, UniqueKeyConflict)


def register_execute_tasks(app: Any, runtime: TaskHost, workflow_types: list[str]) -> list[str]:
    """Register ``ironflow.<type>.execute`` for these workflow types."""
    names = []
    for workflow_type in workflow_types:
        name = execute_task_name(workflow_type)
        app.task(
            name=name,
            bind=True,
            # The broker holds the only copy of the input until it commits; a redelivery
            # after a crash finds the record and answers the first outcome.
            acks_late=True,
            # Expected failures: logged at INFO without a traceback, still FAILURE.
            throws=(InputRefused,),
            max_retries=None,  # a message sent back (send_back) is never dropped
            typing=False,
            shared=False,
        )(_bind(runtime, workflow_type, name))
        names.append(name)
    return names


def _bind(runtime: TaskHost, workflow_type: str, name: str) -> Any:
    def task(self: Any, input: Any, idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key if idempotency_key is not None else self.request.id
        try:
            return execute_input(runtime, workflow_type, input, key)
        except _REFUSED as exc:
            raise InputRefused(str(exc)) from None
        except DatabaseUnavailable as exc:
            # The message is the input's only copy: failing would drop it. Send it back
            # through the broker (same task id, so the same key) until PostgreSQL answers.
            retries = self.request.retries or 0
            delay = min(0.5 * 2 ** min(retries, 5), 10.0)
            log.warning("ironflow %s: %s; retrying in %.1fs", name, exc, delay)
            raise send_back(self, exc, delay=delay) from exc

    task.__name__ = name.replace(".", "_")
    task.__qualname__ = task.__name__
    task.__doc__ = f"Execute one JSON input of workflow type {workflow_type!r} (at most once)."
    task.__module__ = __name__
    return task
