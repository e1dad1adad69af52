"""A Celery app whose effect handler is ``async def``, for prefork subprocess workers."""

from __future__ import annotations

import asyncio
import os
import threading

from celery import Celery
from pydantic import BaseModel

from ironflow_celery import Decision, EffectContext, Message, Workflow, install
from ironflow_celery.celery_app import settings_from_env


class Begin(Message):
    id: str


class Finish(Message):
    id: str
    pid: int
    thread: str


class Begun(Message):
    pass


class Finished(Message):
    pid: int
    thread: str


class Work(Message):
    pass


class AsyncState(BaseModel):
    finished: bool = False


class AsyncDemo(Workflow):
    type = "async_demo"
    State = AsyncState
    Input = Begin | Finish
    Event = Begun | Finished
    Effect = Work

    @staticmethod
    def evolve(state: AsyncState, event: Message) -> AsyncState:
        return AsyncState(finished=state.finished or isinstance(event, Finished))

    @staticmethod
    def decide(now, state: AsyncState, input: Message) -> Decision:
        if isinstance(input, Begin):
            return Decision.accept(Begun()).with_effect(Work())
        return Decision.accept(Finished(pid=input.pid, thread=input.thread))

    @staticmethod
    async def handle_effect(effect: Work, ctx: EffectContext) -> Finish:
        await asyncio.sleep(0.05)  # really awaits, on the pool process's own loop
        return Finish(
            id=ctx.workflow.workflow_id, pid=os.getpid(), thread=threading.current_thread().name
        )


app = Celery("e2e_async")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
)
app.conf.update(settings_from_env())
runtime = install(app, workflows=[AsyncDemo])
