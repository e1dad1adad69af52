"""A workflow type whose effects travel in groups (the default, ``effect_batch_size``) or
one per message, and a Celery app for subprocess workers running it (``celery -A
tests.e2e_apps.batch_app worker``).

``Go(id, jobs)`` decides one ``Job(index, mode)`` effect per entry of `jobs`; the handler:

- ``ok``: returns nothing; ``follow``: returns ``Finish(id, index)`` (a follow-up input);
- ``fail``: always raises; ``perm``: raises `PermanentEffectError`;
- ``flaky``: raises on its first attempt only;
- ``sleep``: sleeps ``BATCH_TEST_SLEEP`` seconds (default 2) on its first attempt only.

With ``BATCH_TEST_MARKS=<dir>`` the handler appends ``start <wid>:<index>`` and
``end <wid>:<index>`` lines to ``<dir>/marks`` (the kill test reads them across processes).
Handler calls are also counted in-process in `CALLS` (in-thread tests).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

from pydantic import BaseModel

from ironflow_celery import Decision, EffectContext, Message, PermanentEffectError, Workflow


class Go(Message):
    id: str
    jobs: list[str]


class Finish(Message):
    id: str
    index: int


class Went(Message):
    pass


class Finished(Message):
    index: int


class Job(Message):
    index: int
    mode: str


class BatchState(BaseModel):
    finished: list[int] = []


class BatchWorkflow(Workflow):
    type = "batch_test"
    State = BatchState
    Input = Go | Finish
    Event = Went | Finished
    Effect = Job
    # BATCH_TEST_SIZE=N: at most N per message (1: one row per message); unset: the
    # runtime's ironflow_effect_batch_size (the default groups)
    effect_batch_size = int(os.environ.get("BATCH_TEST_SIZE") or 0) or None

    @staticmethod
    def evolve(state: BatchState, event: Message) -> BatchState:
        if isinstance(event, Finished):
            return state.model_copy(update={"finished": [*state.finished, event.index]})
        return state

    @staticmethod
    def decide(now, state: BatchState, input: Message) -> Decision:
        if isinstance(input, Go):
            jobs = [Job(index=i, mode=m) for i, m in enumerate(input.jobs)]
            return Decision.accept(Went()).with_effects(jobs)
        assert isinstance(input, Finish)
        return Decision.accept(Finished(index=input.index))


class Calls:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, int]] = Counter()

    def record(self, wid: str, index: int) -> None:
        with self.lock:
            self.counts[(wid, index)] += 1


CALLS = Calls()


def _mark(what: str, wid: str, index: int) -> None:
    marks = os.environ.get("BATCH_TEST_MARKS")
    if marks:
        with open(os.path.join(marks, "marks"), "a") as f:
            f.write(f"{what} {wid}:{index}\n")


def handle_job(effect: Job, ctx: EffectContext) -> Message | None:
    wid = ctx.workflow.workflow_id
    CALLS.record(wid, effect.index)
    _mark("start", wid, effect.index)
    try:
        match effect.mode:
            case "ok":
                return None
            case "follow":
                return Finish(id=wid, index=effect.index)
            case "fail":
                raise RuntimeError(f"job {effect.index} fails")
            case "perm":
                raise PermanentEffectError(f"job {effect.index} fails for good")
            case "flaky":
                if ctx.attempt == 1:
                    raise RuntimeError(f"job {effect.index} fails once")
                return None
            case "sleep":
                if ctx.attempt == 1:
                    time.sleep(float(os.environ.get("BATCH_TEST_SLEEP", "2")))
                return None
        raise AssertionError(f"unknown mode {effect.mode!r}")
    finally:
        _mark("end", wid, effect.index)


if os.environ.get("BATCH_TEST_APP"):  # a subprocess worker: the Celery app
    from celery import Celery

    from ironflow_celery import install
    from ironflow_celery.celery_app import settings_from_env

    app = Celery("e2e_batches")
    app.conf.update(
        broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
    )
    app.conf.update(settings_from_env())
    runtime = install(app, workflows=[(BatchWorkflow, handle_job)])
