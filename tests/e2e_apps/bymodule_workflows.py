"""A workflow module named by its module path (issue 23 §3): it imports the app that names
it, as a Django or Celery project's workflows module often does."""

from __future__ import annotations

from pydantic import BaseModel

from ironflow_celery import Decision, Message, Workflow
from tests.e2e_apps import bymodule_app  # noqa: F401  (the circular import a project has)


class Open(Message):
    id: str


class Opened(Message):
    pass


class OpenState(BaseModel):
    opened: bool = False


class ByModuleWorkflow(Workflow):
    type = "bymodule"
    State = OpenState
    Input = Open
    Event = Opened

    @staticmethod
    def evolve(state: OpenState, event: Message) -> OpenState:
        return state.model_copy(update={"opened": True})

    @staticmethod
    def decide(now, state: OpenState, input: Message) -> Decision:
        return Decision.accept(Opened())
