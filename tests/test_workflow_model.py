"""The workflow model without a database (reference §7.5's model items).

Decision builders, Timer values and their JSON, WorkflowRef, EffectContext, Message
tagging, TaggedUnion and Workflow definition checks.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from workflows import (
    CompletedEvent,
    CompleteInput,
    Increment,
    Incremented,
    Mode,
    Notify,
    Ping,
    Pinged,
    Start,
    Stopped,
    TestWorkflow,
    Timeout,
)

from ironflow_celery import (
    Decision,
    EffectContext,
    InvalidPayload,
    InvalidWorkflowDefinition,
    IronflowError,
    Message,
    Timer,
    Workflow,
    WorkflowRef,
)
from ironflow_celery.model.messages import TaggedUnion, ValueCodec, union_members

# -- Decision ------------------------------------------------------------------------------


def test_accept_single_event() -> None:
    d = Decision.accept(Pinged())
    assert d.events == (Pinged(),)
    assert d.effects == () and d.timers == () and d.cancel_timer_keys == ()
    assert d.is_accept and not d.is_reject


def test_accept_multiple_events_keeps_order() -> None:
    d = Decision.accept(Incremented(value=1), Incremented(value=2), Stopped())
    assert d.events == (Incremented(value=1), Incremented(value=2), Stopped())

    e = Decision.accept_events(iter([Pinged(), Stopped()]))
    assert e.events == (Pinged(), Stopped())
    assert e.is_accept


def test_accept_events_refuses_an_empty_sequence() -> None:
    with pytest.raises(ValueError, match="at least one event"):
        Decision.accept_events([])


def test_try_accept() -> None:
    assert Decision.try_accept([]) is None
    assert Decision.try_accept(x for x in ()) is None
    d = Decision.try_accept([Pinged(), Stopped()])
    assert d is not None and d.events == (Pinged(), Stopped())


def test_reject() -> None:
    d = Decision.reject("validation failed")
    assert d.is_reject and not d.is_accept
    assert d.rejection == "validation failed"
    assert d.events == ()
    # A falsy rejection payload is still a rejection.
    assert Decision.reject(None).is_reject
    assert Decision.reject("").is_reject


def test_effects_timers_and_cancellations_batch_in_order() -> None:
    t1 = Timer.after(10, Timeout(id="a"), key="t1")
    t2 = Timer.after(20, Timeout(id="a"))
    d = (
        Decision.accept(Pinged())
        .with_effect(Notify(message="1"))
        .with_effects([Notify(message="2"), Notify(message="3")])
        .with_timer(t1)
        .with_timers([t2])
        .with_timer_after(timedelta(minutes=1), Timeout(id="a"), key="t3")
        .cancel_timer("old-1")
        .cancel_timers(["old-2", "old-3"])
    )
    assert [e.message for e in d.effects] == ["1", "2", "3"]
    assert d.timers == (t1, t2, Timer(timedelta(minutes=1), Timeout(id="a"), "t3"))
    assert d.cancel_timer_keys == ("old-1", "old-2", "old-3")
    assert d.events == (Pinged(),)


def test_builders_return_new_decisions() -> None:
    base = Decision.accept(Pinged())
    with_effect = base.with_effect(Notify(message="x"))
    assert base.effects == ()
    assert with_effect.effects == (Notify(message="x"),)


def test_builders_are_no_ops_on_reject() -> None:
    rejected = Decision.reject("no")
    d = (
        rejected.with_effect(Notify(message="x"))
        .with_effects([Notify(message="y")])
        .with_timer(Timer.after(1, Timeout(id="a")))
        .with_timers([Timer.after(1, Timeout(id="a"))])
        .with_timer_after(5, Timeout(id="a"))
        .cancel_timer("k")
        .cancel_timers(["k2"])
    )
    assert d == rejected
    assert d.is_reject and d.rejection == "no"
    assert d.effects == () and d.timers == () and d.cancel_timer_keys == ()


def test_decision_repr() -> None:
    assert repr(Decision.reject("no")) == "Decision.reject('no')"
    assert repr(Decision.accept(Pinged())).startswith("Decision.accept(events=[Pinged()]")


# -- Timer ---------------------------------------------------------------------------------


def test_timer_after_accepts_seconds_or_timedelta() -> None:
    assert Timer.after(90, Ping(id="a")).delay == timedelta(seconds=90)
    assert Timer.after(1.5, Ping(id="a")).delay == timedelta(seconds=1.5)
    assert Timer.after(timedelta(hours=1), Ping(id="a")).delay == timedelta(hours=1)
    assert Timer.after(0, Ping(id="a")).delay == timedelta(0)


def test_timer_refuses_bad_delays() -> None:
    with pytest.raises(ValueError, match="negative"):
        Timer.after(-1, Ping(id="a"))
    with pytest.raises(ValueError, match="negative"):
        Timer.after(timedelta(seconds=-0.001), Ping(id="a"))
    with pytest.raises(TypeError):
        Timer.after(True, Ping(id="a"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Timer.after("10", Ping(id="a"))  # type: ignore[arg-type]


def test_timer_keys() -> None:
    plain = Timer.after(5, Ping(id="a"))
    keyed = plain.with_key("reminder")
    assert plain.key is None
    assert keyed.key == "reminder"
    assert keyed.delay == plain.delay and keyed.input == plain.input
    assert Timer.after(5, Ping(id="a"), key="k").key == "k"
    assert Timer.after(5, Ping(id="a"), key="k") == Timer.after(5, Ping(id="a")).with_key("k")


def test_timer_json_omits_absent_key() -> None:
    assert Timer.after(60, Ping(id="a")).to_json() == {
        "delay": {"secs": 60, "nanos": 0},
        "input": {"type": "Ping", "id": "a"},
    }
    assert Timer.after(1.25, Ping(id="a"), key="k").to_json() == {
        "delay": {"secs": 1, "nanos": 250_000_000},
        "input": {"type": "Ping", "id": "a"},
        "key": "k",
    }


def test_timer_json_delay_is_serde_duration() -> None:
    big = timedelta(days=2, seconds=3, microseconds=7)
    assert Timer.after(big, {"type": "Raw"}).to_json()["delay"] == {
        "secs": 2 * 86_400 + 3,
        "nanos": 7_000,
    }
    # A raw JSON input passes through unchanged.
    assert Timer.after(0, {"type": "Raw"}).to_json()["input"] == {"type": "Raw"}


# -- WorkflowRef ---------------------------------------------------------------------------


def test_workflow_ref_display_and_parse() -> None:
    ref = WorkflowRef("orders", "o-1")
    assert str(ref) == "orders:o-1"
    assert WorkflowRef.parse("orders:o-1") == ref
    assert WorkflowRef.parse(str(ref)) == ref
    # The id may contain colons; the type is everything before the first one.
    assert WorkflowRef.parse("orders:2024:o-1") == WorkflowRef("orders", "2024:o-1")


@pytest.mark.parametrize("text", ["orders", ":o-1", "orders:", ""])
def test_workflow_ref_parse_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="workflow_type:workflow_id"):
        WorkflowRef.parse(text)


def test_workflow_ref_equality_and_hashing() -> None:
    assert WorkflowRef("a", "1") == WorkflowRef("a", "1")
    assert WorkflowRef("a", "1") != WorkflowRef("b", "1")  # same id, other type
    assert WorkflowRef("a", "1") != WorkflowRef("a", "2")
    assert len({WorkflowRef("a", "1"), WorkflowRef("a", "1"), WorkflowRef("b", "1")}) == 2
    assert TestWorkflow.ref("x") == WorkflowRef("test_workflow", "x")
    with pytest.raises(AttributeError):
        WorkflowRef("a", "1").workflow_id = "2"  # type: ignore[misc]


# -- EffectContext -------------------------------------------------------------------------


def test_effect_context_idempotency_key_and_retry() -> None:
    effect_id = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
    created = datetime(2026, 1, 1, tzinfo=UTC)
    first = EffectContext(effect_id, WorkflowRef("orders", "o-1"), 1, created)
    second = EffectContext(effect_id, WorkflowRef("orders", "o-1"), 2, created)

    assert first.idempotency_key == "orders:o-1:01890a5d-ac96-774b-bcce-b302099a8057"
    assert second.idempotency_key == first.idempotency_key  # stable across retries
    other = EffectContext(uuid.uuid4(), WorkflowRef("orders", "o-1"), 1, created)
    assert other.idempotency_key != first.idempotency_key  # unique per effect
    assert first.is_retry is False
    assert second.is_retry is True


# -- Message tagging -----------------------------------------------------------------------


def test_message_is_tagged_by_class_name() -> None:
    assert Ping(id="a").to_json() == {"type": "Ping", "id": "a"}
    assert Pinged().to_json() == {"type": "Pinged"}
    assert Start(id="a", mode=Mode(mode="RouteResult")).to_json() == {
        "type": "Start",
        "id": "a",
        "mode": {"mode": "RouteResult"},
    }
    assert Ping.type_tag == "Ping"


def test_type_tag_override() -> None:
    assert CompleteInput.type_tag == "Completed"
    assert CompletedEvent(result="ok").to_json() == {"type": "Completed", "result": "ok"}

    class Renamed(Message):
        type_tag = "OldName"
        x: int

    class Child(Renamed):  # a subclass gets its own class-name tag unless it sets one
        pass

    assert Renamed(x=1).to_json() == {"type": "OldName", "x": 1}
    assert Child.type_tag == "Child"


def test_message_field_named_type_is_refused() -> None:
    with pytest.raises(InvalidWorkflowDefinition, match="field named 'type'"):

        class Bad(Message):
            type: str


def test_messages_are_immutable_values() -> None:
    ping = Ping(id="a")
    assert ping == Ping(id="a")
    with pytest.raises(ValidationError, match="frozen"):
        ping.id = "b"  # type: ignore[misc]


# -- TaggedUnion ---------------------------------------------------------------------------


def test_tagged_union_refuses_duplicate_tags() -> None:
    class A(Message):
        type_tag = "Same"

    class B(Message):
        type_tag = "Same"

    with pytest.raises(InvalidWorkflowDefinition, match="'Same' is used by both"):
        TaggedUnion("wf", "event", [A, B])
    # The same class twice is not a conflict.
    assert TaggedUnion("wf", "event", [A, A]).tags() == ["Same"]


def test_tagged_union_round_trip_and_errors() -> None:
    union = TaggedUnion("wf", "input", [Ping, Increment])
    assert union.tags() == ["Increment", "Ping"]
    assert union.decode({"type": "Ping", "id": "a"}) == Ping(id="a")
    assert union.decode(Ping(id="a")) == Ping(id="a")
    assert union.encode(Increment(id="a")) == {"type": "Increment", "id": "a", "with_effect": False}
    assert Ping(id="a") in union and Pinged() not in union

    with pytest.raises(InvalidPayload, match="Pinged is not one of"):
        union.decode(Pinged())
    with pytest.raises(InvalidPayload, match="expected one of"):
        union.encode(Pinged())
    with pytest.raises(InvalidPayload, match="missing 'type' tag"):
        union.decode({"id": "a"})
    with pytest.raises(InvalidPayload, match="unknown variant 'Nope'"):
        union.decode({"type": "Nope"})
    with pytest.raises(InvalidPayload, match="expected a JSON object"):
        union.decode("Ping")
    with pytest.raises(InvalidPayload, match=r"Ping: id: "):
        union.decode({"type": "Ping", "id": 5})


def test_union_members() -> None:
    assert union_members(Ping | Increment) == (Ping, Increment)
    assert union_members(Ping) == (Ping,)
    assert union_members([Ping, Increment]) == (Ping, Increment)
    assert union_members(None) == ()
    with pytest.raises(InvalidWorkflowDefinition, match="not a Message subclass"):
        union_members(int)


def test_value_codec() -> None:
    class State(BaseModel):
        n: int = 0

    codec = ValueCodec("wf", "state", State)
    assert codec.encode(State(n=2)) == {"n": 2}
    assert codec.decode({"n": 3}) == State(n=3)
    with pytest.raises(InvalidPayload, match="invalid state for workflow type 'wf'"):
        codec.decode({"n": "many"})
    assert ValueCodec("wf", "rejection", str).encode("no") == "no"


# -- Workflow definitions ------------------------------------------------------------------


def _define(**members: Any) -> type[Workflow]:
    """Create a Workflow subclass from members (definition errors raise at creation)."""
    body: dict[str, Any] = {
        "type": "demo",
        "State": BaseModel,
        "Input": Ping,
        "Event": Pinged,
        "evolve": staticmethod(lambda state, event: state),
        "decide": staticmethod(lambda now, state, input: Decision.accept(Pinged())),
    }
    for name, value in members.items():
        if value is _MISSING:
            body.pop(name)
        else:
            body[name] = value
    return type("Demo", (Workflow,), body)


_MISSING = object()


def test_a_complete_workflow_definition() -> None:
    wf = _define()
    assert wf.inputs.tags() == ["Ping"]
    assert wf.events.tags() == ["Pinged"]
    assert not wf.has_effects()
    assert wf.workflow_id(Ping(id="abc")) == "abc"
    assert wf.is_terminal(None) is False
    assert wf.unique_key(Ping(id="abc")) is None
    assert TestWorkflow.has_effects()
    assert TestWorkflow.effects.tags() == ["Notify", "Process"]


@pytest.mark.parametrize("member", ["State", "Input", "Event"])
def test_workflow_missing_a_type_is_refused(member: str) -> None:
    with pytest.raises(InvalidWorkflowDefinition, match=f"must declare {member}"):
        _define(**{member: _MISSING})


@pytest.mark.parametrize("fn", ["decide", "evolve"])
def test_workflow_missing_a_function_is_refused(fn: str) -> None:
    with pytest.raises(InvalidWorkflowDefinition, match=rf"must define {fn}\(\)"):
        _define(**{fn: _MISSING})


@pytest.mark.parametrize("value", ["", "   ", 42])
def test_workflow_type_must_be_a_non_empty_string(value: Any) -> None:
    with pytest.raises(InvalidWorkflowDefinition, match="non-empty string"):
        _define(type=value)


@pytest.mark.parametrize("value", ["or\x00ders", "orders\udcff"])
def test_workflow_type_postgresql_cannot_store_is_refused(value: str) -> None:
    """A type names every row in text columns: NUL or a lone surrogate could never be
    stored, and would fail every claim and write instead of the definition."""
    with pytest.raises(InvalidWorkflowDefinition, match="PostgreSQL cannot store"):
        _define(type=value)


def test_workflow_with_duplicate_input_tags_is_refused() -> None:
    class Again(Message):
        type_tag = "Ping"
        id: str

    with pytest.raises(InvalidWorkflowDefinition, match="input tag 'Ping'"):
        _define(Input=Ping | Again)


def test_workflow_with_a_non_message_input_is_refused() -> None:
    with pytest.raises(InvalidWorkflowDefinition, match="not a Message subclass"):
        _define(Input=dict)


def test_workflow_without_a_type_is_an_abstract_base() -> None:
    class Base(Workflow):
        pass  # no `type`: not checked, can be subclassed

    class Concrete(Base):
        type = "concrete"
        State = BaseModel
        Input = Ping
        Event = Pinged

        @staticmethod
        def evolve(state: Any, event: Any) -> Any:
            return state

        @staticmethod
        def decide(now: datetime, state: Any, input: Any) -> Decision:
            return Decision.accept(Pinged())

    assert Concrete.inputs.tags() == ["Ping"]
    assert not hasattr(Base, "inputs")


def test_workflow_id_from_a_custom_field() -> None:
    class Keyed(Message):
        order_no: str

    wf = _define(Input=Keyed, id_field="order_no")
    assert wf.workflow_id(Keyed(order_no="o-9")) == "o-9"
    no_field = _define(Input=Keyed)
    with pytest.raises(InvalidWorkflowDefinition, match="has no 'id' field"):
        no_field.workflow_id(Keyed(order_no="o-9"))


def test_replay_folds_events_from_the_initial_state() -> None:
    state = TestWorkflow.replay([Incremented(value=1), Incremented(value=2), Stopped()])
    assert state.counter == 2
    assert state.stopped
    assert TestWorkflow.is_terminal(state)
    assert TestWorkflow.replay([]) == TestWorkflow.initial_state()


def test_errors_share_one_base() -> None:
    assert issubclass(InvalidPayload, IronflowError)
    assert issubclass(InvalidWorkflowDefinition, IronflowError)
