"""Chains of effects with follow-ups, for the crash test (``chain_app`` runs them).

``Begin(id, steps)`` appends ``Begun`` and decides ``Step(n=1)``; the handler records the
step's idempotency key in an external system (a Redis set per step, under the key prefix
in ``IRONFLOW_TEST_RECORDER``) and returns ``StepDone(n)``, which appends ``Stepped(n)`` and
decides ``Step(n+1)`` -- or ``Finished`` after the last step. One step seen under two
idempotency keys means an acknowledgement was lost after its follow-up had been acted on.
"""

from __future__ import annotations

import os
import threading

import redis
from pydantic import BaseModel

from ironflow_celery import Decision, EffectContext, Message, Workflow


class Begin(Message):
    id: str
    steps: int


class StepDone(Message):
    id: str
    n: int


class Begun(Message):
    steps: int


class Stepped(Message):
    n: int


class Finished(Message):
    pass


class Step(Message):
    n: int


class ChainState(BaseModel):
    steps: int = 0
    done: int = 0
    finished: bool = False


_local = threading.local()


def recorder() -> redis.Redis:
    client = getattr(_local, "client", None)
    if client is None or getattr(_local, "pid", None) != os.getpid():
        client = redis.Redis.from_url(os.environ["IRONFLOW_TEST_RECORDER_URL"])
        _local.client, _local.pid = client, os.getpid()
    return client


class ChainWorkflow(Workflow):
    type = "e2e_chain"
    State = ChainState
    Input = Begin | StepDone
    Event = Begun | Stepped | Finished
    Effect = Step

    @staticmethod
    def evolve(state: ChainState, event: Message) -> ChainState:
        match event:
            case Begun(steps=steps):
                return state.model_copy(update={"steps": steps})
            case Stepped(n=n):
                return state.model_copy(update={"done": n})
            case Finished():
                return state.model_copy(update={"finished": True})
        return state

    @staticmethod
    def decide(now, state: ChainState, input: Message) -> Decision:
        match input:
            case Begin(steps=steps):
                return Decision.accept(Begun(steps=steps)).with_effect(Step(n=1))
            case StepDone(n=n) if n == state.done + 1:
                if n >= state.steps:
                    return Decision.accept(Stepped(n=n), Finished())
                return Decision.accept(Stepped(n=n)).with_effect(Step(n=n + 1))
        return Decision.reject(f"unexpected {input!r} in {state!r}")

    @staticmethod
    def handle_effect(effect: Step, ctx: EffectContext) -> StepDone:
        prefix = os.environ["IRONFLOW_TEST_RECORDER"]
        recorder().sadd(f"{prefix}:{ctx.workflow.workflow_id}:{effect.n}", ctx.idempotency_key)
        return StepDone(id=ctx.workflow.workflow_id, n=effect.n)
