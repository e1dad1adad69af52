"""Benchmark workflows, imported by the benchmark's ``celery worker`` processes
(``IRONFLOW_WORKFLOWS=benchmarks.workloads``).

- ``bench_noop``: ``Kick`` → one ``Noop`` effect whose handler does nothing;
- ``bench_cycle``: ``Begin`` → ``Work`` effect → handler returns ``Finish`` → terminal;
- ``bench_timer``: ``Arm`` → timer → ``Fire`` → terminal (row 5 inserts timers directly).

With ``IRONFLOW_BENCH_MARKS=<dir>`` the no-op handler appends ``<workflow_id> <time.time()>``
to ``<dir>/<pid>.marks`` when it starts (handler-start clock for the latency row). With
``IRONFLOW_BENCH_RT_DIR=<dir>`` every process counts its database round trips
(`benchmarks.rtcount`). With ``IRONFLOW_BENCH_BATCH=N`` ``bench_noop`` sends at most N
effects per message (``effect_batch_size``; unset: the runtime's default, 1: one per
message); ``IRONFLOW_BENCH_BATCH_CYCLES=N`` does the same for ``bench_cycle``.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from ironflow_celery import Decision, EffectContext, Message, Timer, Workflow

if os.environ.get("IRONFLOW_BENCH_RT_DIR"):
    from . import rtcount

    rtcount.install(os.environ["IRONFLOW_BENCH_RT_DIR"])

_MARKS_DIR = os.environ.get("IRONFLOW_BENCH_MARKS") or None
_marks_fd: tuple[int, int] | None = None  # (pid, fd)


def _mark(workflow_id: str) -> None:
    global _marks_fd
    now = time.time()
    pid = os.getpid()
    if _marks_fd is None or _marks_fd[0] != pid:
        fd = os.open(
            os.path.join(_MARKS_DIR, f"{pid}.marks"),  # type: ignore[arg-type]
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o644,
        )
        _marks_fd = (pid, fd)
    os.write(_marks_fd[1], f"{workflow_id} {now:.6f}\n".encode())


# -- bench_noop ----------------------------------------------------------------------------


class Kick(Message):
    id: str


class Kicked(Message):
    pass


class Noop(Message):
    pass


class NoopState(BaseModel):
    kicked: bool = False


def handle_noop(effect: Noop, ctx: EffectContext) -> None:
    """Does nothing (records its start time when the latency row asks for it)."""
    if _MARKS_DIR is not None and ctx.workflow.workflow_id.startswith("lat-"):  # row 4
        _mark(ctx.workflow.workflow_id)
    return None


class NoopWorkflow(Workflow):
    type = "bench_noop"
    # `python -m benchmarks --batch N`: at most N effects per message (None: the default).
    effect_batch_size = int(os.environ.get("IRONFLOW_BENCH_BATCH") or 0) or None
    State = NoopState
    Input = Kick
    Event = Kicked
    Effect = Noop
    handle_effect = staticmethod(handle_noop)

    @staticmethod
    def evolve(state: NoopState, event: Message) -> NoopState:
        return NoopState(kicked=True)

    @staticmethod
    def decide(now, state: NoopState, input: Message) -> Decision:
        return Decision.accept(Kicked()).with_effect(Noop())


# -- bench_cycle ---------------------------------------------------------------------------


class Begin(Message):
    id: str


class Finish(Message):
    id: str


class Begun(Message):
    pass


class Finished(Message):
    pass


class Work(Message):
    pass


class CycleState(BaseModel):
    begun: bool = False
    finished: bool = False


def handle_work(effect: Work, ctx: EffectContext) -> Finish:
    """The effect's result is the follow-up input that finishes the instance."""
    return Finish(id=ctx.workflow.workflow_id)


class CycleWorkflow(Workflow):
    type = "bench_cycle"
    # `python -m benchmarks --batch-cycles N`: at most N per message (follow-ups included).
    effect_batch_size = int(os.environ.get("IRONFLOW_BENCH_BATCH_CYCLES") or 0) or None
    State = CycleState
    Input = Begin | Finish
    Event = Begun | Finished
    Effect = Work
    handle_effect = staticmethod(handle_work)

    @staticmethod
    def evolve(state: CycleState, event: Message) -> CycleState:
        if isinstance(event, Begun):
            return state.model_copy(update={"begun": True})
        return state.model_copy(update={"finished": True})

    @staticmethod
    def decide(now, state: CycleState, input: Message) -> Decision:
        if isinstance(input, Begin):
            if state.begun:
                return Decision.reject("already begun")
            return Decision.accept(Begun()).with_effect(Work())
        return Decision.accept(Finished())

    @staticmethod
    def is_terminal(state: CycleState) -> bool:
        return state.finished


# -- bench_timer ---------------------------------------------------------------------------


class Arm(Message):
    id: str
    delay: float


class Fire(Message):
    id: str


class Armed(Message):
    pass


class Fired(Message):
    pass


class TimerState(BaseModel):
    fired: bool = False


class TimerWorkflow(Workflow):
    type = "bench_timer"
    State = TimerState
    Input = Arm | Fire
    Event = Armed | Fired

    @staticmethod
    def evolve(state: TimerState, event: Message) -> TimerState:
        return TimerState(fired=isinstance(event, Fired) or state.fired)

    @staticmethod
    def decide(now, state: TimerState, input: Message) -> Decision:
        if isinstance(input, Arm):
            return Decision.accept(Armed()).with_timer(Timer.after(input.delay, Fire(id=input.id)))
        return Decision.accept(Fired())

    @staticmethod
    def is_terminal(state: TimerState) -> bool:
        return state.fired
