"""A Celery app for the operations e2e tests (Flower, ``celery call``, the CLI).

``celery -A tests.e2e_apps.ops_app worker -E …``: broker from ``CELERY_BROKER_URL``, other
``CELERY_<SETTING>`` values (e.g. ``CELERY_TASK_DEFAULT_QUEUE``) from the environment,
database and runtime settings from ``IRONFLOW_*``.

``ops_demo``: ``Submit`` appends ``Submitted`` and enqueues a ``Deliver`` effect. The handler
fails permanently (the effect is dead-lettered at once) unless the file
``$IRONFLOW_OPS_FLAG_DIR/<workflow id>`` exists; then it returns ``Delivered``. A test
creates the file and retries the dead letter, which is then processed. An instance whose
id starts with ``flaky-`` fails with an ordinary (retryable) exception instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from pydantic import BaseModel

from ironflow_celery import (
    Decision,
    EffectContext,
    Message,
    PermanentEffectError,
    StateMachineDefinition,
    Workflow,
    install,
)
from ironflow_celery.celery_app import settings_from_env
from ironflow_celery.model.views import StateInfo, StateMachineView


class Submit(Message):
    id: str


class Delivered(Message):
    id: str


class Submitted(Message):
    pass


class DeliveredEvent(Message):
    type_tag = "Delivered"


class Deliver(Message):
    recipient: str


class OpsState(BaseModel):
    submitted: bool = False
    delivered: bool = False


def _allowed(workflow_id: str) -> bool:
    flag_dir = os.environ.get("IRONFLOW_OPS_FLAG_DIR")
    return bool(flag_dir) and (Path(flag_dir) / workflow_id).exists()


class OpsDemoWorkflow(StateMachineView, Workflow):
    type = "ops_demo"
    State = OpsState
    Input = Submit | Delivered
    Event = Submitted | DeliveredEvent
    Effect = Deliver

    @staticmethod
    def evolve(state: OpsState, event: Message) -> OpsState:
        if isinstance(event, Submitted):
            return state.model_copy(update={"submitted": True})
        return state.model_copy(update={"delivered": True})

    @staticmethod
    def decide(now, state: OpsState, input: Message) -> Decision:
        if isinstance(input, Submit):
            return Decision.accept(Submitted()).with_effect(Deliver(recipient=input.id))
        return Decision.accept(DeliveredEvent())

    @classmethod
    def state_machine(cls) -> StateMachineDefinition:
        return (
            StateMachineDefinition.builder(initial="new")
            .state("submitted")
            .terminal("delivered")
            .transition("new", "submitted", "Submit", effects=["Deliver"])
            .transition("submitted", "delivered", "Delivered")
            .build()
        )

    @staticmethod
    def state_info(state: OpsState) -> StateInfo:
        status = "delivered" if state.delivered else "submitted" if state.submitted else "new"
        return StateInfo(status, is_terminal=state.delivered)

    @staticmethod
    def handle_effect(effect: Deliver, ctx: EffectContext) -> Message:
        if not _allowed(ctx.workflow.workflow_id) and ctx.workflow.workflow_id.startswith("flaky-"):
            raise ConnectionError(f"recipient {effect.recipient} timed out")
        if not _allowed(ctx.workflow.workflow_id):
            raise PermanentEffectError(f"recipient {effect.recipient} is unreachable")
        return Delivered(id=ctx.workflow.workflow_id)


app = Celery("ops_app")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
)
app.conf.update(settings_from_env())
runtime = install(app, workflows=[OpsDemoWorkflow])
