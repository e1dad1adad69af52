"""ironflow's test fixtures, in Python: TestWorkflow, TimerTestWorkflow, EffectlessWorkflow.

JSON shapes match ironflow's (internally tagged by ``type``); where an input and an event
share a tag (``Completed``) the Python classes differ and ``type_tag`` keeps the tag.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Literal

from pydantic import BaseModel

from ironflow_celery import Decision, EffectContext, Message, Timer, Workflow

ModeName = Literal["FireAndForget", "RouteResult", "TransientFailure", "PermanentFailure"]


class Mode(BaseModel):
    """ironflow serialises the mode enum as ``{"mode": "RouteResult"}``."""

    mode: ModeName


# -- TestWorkflow ("test_workflow") ----------------------------------------------------


class Ping(Message):
    id: str


class Increment(Message):
    id: str
    with_effect: bool = False


class Start(Message):
    id: str
    mode: Mode


class CompleteInput(Message):
    type_tag = "Completed"
    id: str
    result: str


class FailInput(Message):
    type_tag = "Failed"
    id: str
    error: str


class Stop(Message):
    id: str


class ForceReject(Message):
    id: str
    reason: str


class Pinged(Message):
    pass


class Incremented(Message):
    value: int


class Started(Message):
    mode: Mode


class CompletedEvent(Message):
    type_tag = "Completed"
    result: str


class FailedEvent(Message):
    type_tag = "Failed"
    error: str


class Stopped(Message):
    pass


class Process(Message):
    mode: Mode


class Notify(Message):
    message: str


class TestState(BaseModel):
    counter: int = 0
    stopped: bool = False
    result: str | None = None


class TestWorkflow(Workflow):
    __test__ = False  # not a pytest test class
    type = "test_workflow"
    State = TestState
    Input = Ping | Increment | Start | CompleteInput | FailInput | Stop | ForceReject
    Event = Pinged | Incremented | Started | CompletedEvent | FailedEvent | Stopped
    Effect = Process | Notify
    Rejection = str

    @staticmethod
    def evolve(state: TestState, event: Message) -> TestState:
        match event:
            case Incremented(value=v):
                return state.model_copy(update={"counter": v})
            case Stopped():
                return state.model_copy(update={"stopped": True})
            case CompletedEvent(result=r):
                return state.model_copy(update={"result": r})
        return state

    @staticmethod
    def decide(now, state: TestState, input: Message) -> Decision:
        match input:
            case Ping():
                return Decision.accept(Pinged())
            case Increment(with_effect=with_effect):
                value = state.counter + 1
                decision = Decision.accept(Incremented(value=value))
                if with_effect:
                    decision = decision.with_effect(Notify(message=f"Counter is now {value}"))
                return decision
            case Start(mode=mode):
                return Decision.accept(Started(mode=mode)).with_effect(Process(mode=mode))
            case CompleteInput(result=r):
                return Decision.accept(CompletedEvent(result=r))
            case FailInput(error=e):
                return Decision.accept(FailedEvent(error=e))
            case Stop():
                return Decision.accept(Stopped())
            case ForceReject(reason=reason):
                return Decision.reject(reason)
        raise AssertionError(f"unexpected input {input!r}")

    @staticmethod
    def is_terminal(state: TestState) -> bool:
        return state.stopped


class HandlerCalls:
    """Thread-safe record of effect handler invocations (for in-thread workers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[str, int]] = []
        self.counter: Counter[str] = Counter()

    def record(self, ctx: EffectContext) -> None:
        with self._lock:
            self.calls.append((str(ctx.effect_id), ctx.attempt))
            self.counter[str(ctx.effect_id)] += 1

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.counter.clear()


CALLS = HandlerCalls()


def test_handler(effect: Message, ctx: EffectContext) -> Message | None:
    """ironflow's TestWorkflow handler."""
    CALLS.record(ctx)
    match effect:
        case Process(mode=Mode(mode="FireAndForget")):
            return None
        case Process(mode=Mode(mode="RouteResult")):
            return CompleteInput(id=ctx.workflow.workflow_id, result="success")
        case Process(mode=Mode(mode="TransientFailure")):
            if ctx.attempt == 1:
                raise RuntimeError("transient failure on first attempt")
            return CompleteInput(id=ctx.workflow.workflow_id, result="success")
        case Process(mode=Mode(mode="PermanentFailure")):
            raise RuntimeError("permanent failure")
        case Notify():
            return None
    raise AssertionError(f"unexpected effect {effect!r}")


test_handler.__test__ = False  # type: ignore[attr-defined]


# -- TimerTestWorkflow ("timer_test") --------------------------------------------------


class TimerStart(Message):
    type_tag = "Start"
    id: str
    timeout_secs: float
    timer_key: str | None = None


class Complete(Message):
    id: str
    cancel_timer_key: str | None = None


class Timeout(Message):
    id: str


class TimerStarted(Message):
    type_tag = "Started"


class TimerCompleted(Message):
    type_tag = "Completed"


class TimerCancelled(Message):
    key: str


class TimedOut(Message):
    pass


class TimerProcess(Message):
    type_tag = "Process"


class TimerState(BaseModel):
    started: bool = False
    completed: bool = False
    timed_out: bool = False


class TimerTestWorkflow(Workflow):
    type = "timer_test"
    State = TimerState
    Input = TimerStart | Complete | Timeout
    Event = TimerStarted | TimerCompleted | TimerCancelled | TimedOut
    Effect = TimerProcess

    @staticmethod
    def evolve(state: TimerState, event: Message) -> TimerState:
        match event:
            case TimerStarted():
                return state.model_copy(update={"started": True})
            case TimerCompleted():
                return state.model_copy(update={"completed": True})
            case TimedOut():
                return state.model_copy(update={"timed_out": True})
        return state

    @staticmethod
    def decide(now, state: TimerState, input: Message) -> Decision:
        match input:
            case TimerStart(id=wid, timeout_secs=secs, timer_key=key):
                return (
                    Decision.accept(TimerStarted())
                    .with_effect(TimerProcess())
                    .with_timer(Timer.after(secs, Timeout(id=wid), key=key))
                )
            case Complete(cancel_timer_key=key) if key is not None:
                return Decision.accept(TimerCompleted(), TimerCancelled(key=key)).cancel_timer(key)
            case Complete():
                return Decision.accept(TimerCompleted())
            case Timeout():
                return Decision.accept(TimedOut())
        raise AssertionError(f"unexpected input {input!r}")


def timer_test_handler(effect: Message, ctx: EffectContext) -> Message:
    """ironflow's TimerTestWorkflow handler: complete and cancel the "timeout" timer."""
    CALLS.record(ctx)
    return Complete(id=ctx.workflow.workflow_id, cancel_timer_key="timeout")


# -- EffectlessWorkflow ("effectless") -------------------------------------------------


class EffectlessIncrement(Message):
    type_tag = "Increment"
    id: str


class EffectlessIncremented(Message):
    type_tag = "Incremented"
    value: int


class Count(BaseModel):
    value: int = 0


class EffectlessWorkflow(Workflow):
    type = "effectless"
    State = Count
    Input = EffectlessIncrement
    Event = EffectlessIncremented

    @staticmethod
    def evolve(state: Count, event: EffectlessIncremented) -> Count:
        return Count(value=event.value)

    @staticmethod
    def decide(now, state: Count, input: EffectlessIncrement) -> Decision:
        return Decision.accept(EffectlessIncremented(value=state.value + 1))
