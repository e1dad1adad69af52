"""WorkflowService and Registry against ironflow's service.rs checklist (reference §7.2).

ironflow's builder tests (1-3, 5) are covered here through `Registry` and
`WorkflowService`, their equivalents; the `WorkflowRuntime` builder versions live in
tests/test_runtime.py.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from workflows import (
    Complete,
    CompletedEvent,
    EffectlessIncrement,
    EffectlessWorkflow,
    ForceReject,
    Increment,
    Incremented,
    Mode,
    Ping,
    Start,
    Stop,
    TestWorkflow,
    TimerStart,
    TimerTestWorkflow,
    test_handler,
    timer_test_handler,
)
from workflows import (
    TestState as CounterState,
)

from ironflow_celery import (
    Accepted,
    AlreadyCompleted,
    Decision,
    DuplicateWorkflowType,
    EffectContext,
    InvalidPayload,
    InvalidWorkflowDefinition,
    Message,
    PostgresStore,
    Registry,
    Rejected,
    UniqueKeyConflict,
    UnknownWorkflowType,
    Workflow,
    WorkflowRef,
    WorkflowService,
    WorkflowServiceConfig,
)
from ironflow_celery.model.workflow import ExecuteOutcome

T = TestWorkflow.type


def q(db: sa.Engine, statement: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


def rows(db: sa.Engine, statement: str, **params: Any) -> list[Any]:
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).all()


def event_payloads(service: WorkflowService, wid: str, wt: str = T) -> list[Any]:
    return [e.payload for e in service.fetch_workflow_events(wt, wid)]


@pytest.fixture
def registry() -> Registry:
    return Registry([(TestWorkflow, test_handler), (TimerTestWorkflow, timer_test_handler)])


@pytest.fixture
def service(store: PostgresStore, registry: Registry) -> WorkflowService:
    return WorkflowService(store, registry)


@pytest.fixture
def observed(store: PostgresStore, registry: Registry) -> WorkflowService:
    """A service that records input observations."""
    return WorkflowService(store, registry, WorkflowServiceConfig(record_input_observations=True))


# -- extra workflows used below ------------------------------------------------------------


class Stamp(Message):
    id: str


class Stamped(Message):
    at: datetime


class StampState(BaseModel):
    last: datetime | None = None


class ClockWorkflow(Workflow):
    """Records the `now` the engine passes to decide."""

    type = "clock"
    State = StampState
    Input = Stamp
    Event = Stamped

    @staticmethod
    def evolve(state: StampState, event: Stamped) -> StampState:
        return StampState(last=event.at)

    @staticmethod
    def decide(now: datetime, state: StampState, input: Stamp) -> Decision:
        return Decision.accept(Stamped(at=now))


class Order(Message):
    id: str
    amount: int


class Placed(Message):
    amount: int


class Refusal(BaseModel):
    code: str
    limit: int


class OrderWorkflow(Workflow):
    """Typed (pydantic model) rejections and a unique key per customer-free order id."""

    type = "orders"
    State = StampState
    Input = Order
    Event = Placed
    Rejection = Refusal

    @staticmethod
    def evolve(state: Any, event: Any) -> Any:
        return state

    @staticmethod
    def decide(now: datetime, state: Any, input: Order) -> Decision:
        if input.amount > 100:
            return Decision.reject(Refusal(code="too_big", limit=100))
        return Decision.accept(Placed(amount=input.amount))

    @staticmethod
    def unique_key(input: Order) -> str | None:
        return "the-only-order"


class SharedPing(Workflow):
    """Takes TestWorkflow's Ping too: typed dispatch by class becomes ambiguous."""

    type = "shared_ping"
    State = StampState
    Input = Ping
    Event = Placed

    @staticmethod
    def evolve(state: Any, event: Any) -> Any:
        return state

    @staticmethod
    def decide(now: datetime, state: Any, input: Ping) -> Decision:
        return Decision.accept(Placed(amount=0))


# -- 1-5: registry / builder ---------------------------------------------------------------


def test_builder_creates_runtime(store: PostgresStore) -> None:
    registry = Registry([(TestWorkflow, test_handler)])
    service = WorkflowService(store, registry)

    assert len(registry) == 1
    assert registry.types == (T,)
    assert T in registry
    registration = registry.get(T)
    assert registration.workflow is TestWorkflow
    assert registration.handler is test_handler
    assert registration.workflow_type == T
    assert [r.workflow_type for r in registry] == [T]
    assert service.registry is registry
    assert service.config == WorkflowServiceConfig()
    assert service.config.record_input_observations is False


def test_builder_with_custom_config(store: PostgresStore, db: sa.Engine) -> None:
    config = WorkflowServiceConfig(record_input_observations=True)
    fixed = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    service = WorkflowService(store, Registry([ClockWorkflow]), config, clock=lambda: fixed)

    assert service.config is config
    service.execute(Stamp(id="c-1"))

    assert service.fetch_latest_state(ClockWorkflow, "c-1").last == fixed
    assert q(db, "SELECT count(*) FROM ironflow.input_observations") == 1


def test_builder_rejects_duplicate_registration() -> None:
    with pytest.raises(DuplicateWorkflowType) as info:
        Registry([(TestWorkflow, test_handler), (TestWorkflow, test_handler)])
    assert info.value.workflow_type == T
    assert str(info.value) == "duplicate workflow type registration: test_workflow"

    registry = Registry([(TestWorkflow, test_handler)])
    with pytest.raises(DuplicateWorkflowType):
        registry.register(TestWorkflow, timer_test_handler)
    with pytest.raises(DuplicateWorkflowType):
        registry.register_without_effects(TestWorkflow)

    class Impostor(TestWorkflow):  # another class claiming the same type name
        type = "test_workflow"

    with pytest.raises(DuplicateWorkflowType):
        registry.register(Impostor, test_handler)
    # The first registration wins and is intact.
    assert registry.get(T).workflow is TestWorkflow
    assert registry.get(T).handler is test_handler
    assert len(registry) == 1


def test_registry_takes_a_workflows_own_handle_effect() -> None:
    """The README's way to register a handler: ``handle_effect`` on the workflow itself,
    as the order saga does; a workflow with effects and no handler at all is refused."""
    from ironflow_celery.examples.orders import OrderSaga

    registry = Registry([OrderSaga])
    assert registry.get(OrderSaga.type).handler is OrderSaga.handle_effect
    # An explicit handler still wins over handle_effect.
    explicit = Registry([(OrderSaga, test_handler)])
    assert explicit.get(OrderSaga.type).handler is test_handler

    with pytest.raises(InvalidWorkflowDefinition) as info:
        Registry([TestWorkflow])  # effects, no handle_effect, no handler
    assert "'test_workflow' declares effects but no handler was given" in str(info.value)
    assert "handle_effect" in str(info.value)


def test_register_populates_both_dispatch_paths(service: WorkflowService) -> None:
    assert service.execute(Ping(id="typed")) == Accepted(events_appended=1)
    assert service.execute_dynamic(T, {"type": "Ping", "id": "dynamic"}) == Accepted(1)
    assert service.execute(Ping(id="explicit"), workflow=TestWorkflow) == Accepted(1)

    assert event_payloads(service, "typed") == [{"type": "Pinged"}]
    assert event_payloads(service, "dynamic") == [{"type": "Pinged"}]
    assert event_payloads(service, "explicit") == [{"type": "Pinged"}]


def test_builder_register_without_effects(
    store: PostgresStore, db: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry()
    registration = registry.register_without_effects(EffectlessWorkflow)
    service = WorkflowService(store, registry)

    assert service.execute(EffectlessIncrement(id="e-1")) == Accepted(1)

    assert event_payloads(service, "e-1", "effectless") == [{"type": "Incremented", "value": 1}]
    assert q(db, "SELECT count(*) FROM ironflow.outbox") == 0
    assert service.fetch_latest_state(EffectlessWorkflow, "e-1").value == 1
    # Its handler ignores any effect, with a warning.
    ctx = EffectContext(uuid.uuid4(), WorkflowRef("effectless", "e-1"), 1, datetime.now(UTC))
    with caplog.at_level(logging.WARNING):
        assert registration.handler({"type": "Anything"}, ctx) is None
    assert "should not emit effects" in caplog.text


def test_register_requires_a_handler_for_workflows_with_effects() -> None:
    with pytest.raises(InvalidWorkflowDefinition, match="declares effects but no handler"):
        Registry([TestWorkflow])
    with pytest.raises(InvalidWorkflowDefinition, match="not callable"):
        Registry([(TestWorkflow, "not a handler")])
    with pytest.raises(InvalidWorkflowDefinition, match="not a concrete Workflow"):
        Registry([(Workflow, test_handler)])
    assert len(Registry([EffectlessWorkflow])) == 1  # no effects: no handler needed


# -- 6-8: routing --------------------------------------------------------------------------


def test_execute_dynamic_unknown_workflow_fails(service: WorkflowService, db: sa.Engine) -> None:
    with pytest.raises(UnknownWorkflowType) as info:
        service.execute_dynamic("nope", {"type": "Ping", "id": "x"})
    assert info.value.workflow_type == "nope"
    assert str(info.value).startswith("unknown workflow type: nope (registered: ")
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 0


def test_execute_dynamic_routes_to_workflow(service: WorkflowService) -> None:
    outcome = service.execute_dynamic(T, {"type": "Ping", "id": "wf-1"})

    assert outcome == Accepted(1)
    assert event_payloads(service, "wf-1") == [{"type": "Pinged"}]


def test_execute_dynamic_takes_the_instance_id_from_the_input(service: WorkflowService) -> None:
    """The id comes from the deserialised input, never from surrounding metadata."""
    service.execute_dynamic("timer_test", {"type": "Complete", "id": "target"})
    assert event_payloads(service, "target", "timer_test") == [{"type": "Completed"}]


def test_execute_typed_routes_to_workflow(service: WorkflowService) -> None:
    assert service.execute(Ping(id="wf-1")) == Accepted(1)
    assert len(service.fetch_workflow_events(T, "wf-1")) == 1


# -- 9-14: execution -----------------------------------------------------------------------


def test_execute_on_new_workflow(service: WorkflowService, db: sa.Engine) -> None:
    service.execute(Increment(id="wf-1"))

    assert event_payloads(service, "wf-1") == [{"type": "Incremented", "value": 1}]
    assert q(db, "SELECT count(*) FROM ironflow.outbox") == 0
    assert q(db, "SELECT event_count FROM ironflow.workflow_instances") == 1


def test_execute_replays_existing_events(
    service: WorkflowService, store: PostgresStore, db: sa.Engine
) -> None:
    with store.begin(T, "wf-1") as uow:
        uow.append_events(
            [{"type": "Incremented", "value": 1}, {"type": "Incremented", "value": 2}]
        )
        uow.commit()

    service.execute(Increment(id="wf-1", with_effect=True))

    assert event_payloads(service, "wf-1")[-1] == {"type": "Incremented", "value": 3}
    assert len(event_payloads(service, "wf-1")) == 3
    assert q(db, "SELECT payload->>'message' FROM ironflow.outbox") == "Counter is now 3"


def test_execute_enqueues_effects(service: WorkflowService, db: sa.Engine) -> None:
    service.execute(Increment(id="wf-1", with_effect=True))

    (effect,) = rows(db, "SELECT workflow_type, workflow_id, payload FROM ironflow.outbox")
    assert (effect.workflow_type, effect.workflow_id) == (T, "wf-1")
    assert effect.payload == {"type": "Notify", "message": "Counter is now 1"}


def test_execute_detects_terminal_state(service: WorkflowService, db: sa.Engine) -> None:
    service.execute(Ping(id="wf-1"))
    service.execute(Stop(id="wf-1"))

    assert event_payloads(service, "wf-1") == [{"type": "Pinged"}, {"type": "Stopped"}]
    assert q(db, "SELECT completed_at IS NOT NULL FROM ironflow.workflow_instances") is True


def test_execute_skips_completed_workflow(service: WorkflowService, db: sa.Engine) -> None:
    service.execute(Ping(id="wf-1"))
    service.execute(Stop(id="wf-1"))

    service.execute(Ping(id="wf-1"))
    service.execute(Increment(id="wf-1", with_effect=True))

    assert event_payloads(service, "wf-1") == [{"type": "Pinged"}, {"type": "Stopped"}]
    assert q(db, "SELECT count(*) FROM ironflow.outbox") == 0


def test_execute_records_input_observation_when_enabled(
    observed: WorkflowService, db: sa.Engine
) -> None:
    observed.execute(Ping(id="wf-1"))

    (obs,) = rows(db, "SELECT * FROM ironflow.input_observations")
    assert (obs.workflow_type, obs.workflow_id, obs.input_type) == (T, "wf-1", "Ping")
    assert obs.payload == {"type": "Ping", "id": "wf-1"}
    assert obs.payload["type"] == "Ping"
    assert (obs.outcome, obs.rejection_payload) == ("accepted", None)


def test_observation_input_type_uses_the_json_tag(observed: WorkflowService, db: sa.Engine) -> None:
    # CompleteInput's class name differs from its tag "Completed": the tag is recorded.
    observed.execute_dynamic(T, {"type": "Completed", "id": "wf-1", "result": "ok"})
    from workflows import CompleteInput

    observed.execute(CompleteInput(id="wf-2", result="ok"))
    assert [
        r.input_type for r in rows(db, "SELECT input_type FROM ironflow.input_observations")
    ] == [
        "Completed",
        "Completed",
    ]


def test_observations_not_written_when_disabled(service: WorkflowService, db: sa.Engine) -> None:
    service.execute(Ping(id="wf-1"))
    service.execute(Stop(id="wf-1"))
    service.execute(Ping(id="wf-1"))
    assert q(db, "SELECT count(*) FROM ironflow.input_observations") == 0


# -- 15-17: queries ------------------------------------------------------------------------


def test_list_workflows_filters_by_type(service: WorkflowService) -> None:
    service.execute(Ping(id="a"))
    service.execute(Ping(id="b"))
    service.execute(TimerStart(id="c", timeout_secs=3600))

    everything = service.list_workflows()
    assert len(everything) == 3
    assert [w.workflow_id for w in everything] == ["c", "b", "a"]  # most recent first
    only = service.list_workflows(T)
    assert len(only) == 2
    assert all(w.workflow_type == T for w in only)
    assert [w.workflow_id for w in service.list_workflows(T, limit=1, offset=1)] == ["a"]
    first = only[0]
    assert (first.event_count, first.completed_at) == (1, None)
    assert first.last_event_at is not None and first.created_at is not None


def test_fetch_workflow_events_returns_history(service: WorkflowService) -> None:
    service.execute(Ping(id="wf-1"))
    service.execute(Increment(id="wf-1"))

    events = service.fetch_workflow_events(T, "wf-1")

    assert [e.sequence for e in events] == [1, 2]
    assert [e.payload["type"] for e in events] == ["Pinged", "Incremented"]
    assert all((e.workflow_type, e.workflow_id) == (T, "wf-1") for e in events)
    assert events[0].global_sequence < events[1].global_sequence
    assert service.fetch_workflow_events(T, "unknown") == []


def test_fetch_latest_state_returns_json(service: WorkflowService, db: sa.Engine) -> None:
    service.execute(Increment(id="wf-1"))
    service.execute(Increment(id="wf-1"))

    state = service.fetch_latest_state(TestWorkflow, "wf-1")
    assert isinstance(state, CounterState)
    assert state.counter == 2
    assert service.fetch_latest_state_dynamic(T, "wf-1") == {
        "counter": 2,
        "stopped": False,
        "result": None,
    }
    # Unknown id: the default state, and no instance row is created.
    assert service.fetch_latest_state(TestWorkflow, "nobody") == CounterState()
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 1
    # Works on completed instances.
    service.execute(Stop(id="wf-1"))
    assert service.fetch_latest_state(TestWorkflow, "wf-1").stopped is True
    # Unregistered workflows are refused.
    with pytest.raises(UnknownWorkflowType):
        service.fetch_latest_state(EffectlessWorkflow, "wf-1")
    with pytest.raises(UnknownWorkflowType):
        service.fetch_latest_state_dynamic("effectless", "wf-1")


# -- 18-26: outcomes -----------------------------------------------------------------------


def test_execute_returns_accepted_with_event_count(service: WorkflowService) -> None:
    outcome = service.execute(Ping(id="wf-1"))
    assert outcome == Accepted(events_appended=1)
    assert outcome.is_accepted and not outcome.is_rejected and not outcome.is_already_completed

    service.execute(TimerStart(id="t-1", timeout_secs=60, timer_key="timeout"))
    two = service.execute(Complete(id="t-1", cancel_timer_key="timeout"))
    assert two == Accepted(events_appended=2)


def test_execute_returns_rejected_with_typed_reason(service: WorkflowService) -> None:
    outcome = service.execute(ForceReject(id="wf-1", reason="validation failed"))

    assert outcome == Rejected("validation failed")
    assert outcome.is_rejected


def test_rejected_input_does_not_append_events(service: WorkflowService, db: sa.Engine) -> None:
    service.execute(Ping(id="wf-1"))

    service.execute(ForceReject(id="wf-1", reason="no"))

    assert event_payloads(service, "wf-1") == [{"type": "Pinged"}]
    assert q(db, "SELECT event_count FROM ironflow.workflow_instances") == 1


def test_rejected_bootstrap_rolls_back_instance_row(
    service: WorkflowService, db: sa.Engine
) -> None:
    service.execute(ForceReject(id="ghost", reason="no"))

    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 0
    assert service.list_workflows() == []


def test_rejection_persisted_when_observations_enabled(
    observed: WorkflowService, db: sa.Engine
) -> None:
    observed.execute(ForceReject(id="wf-1", reason="boom"))

    (obs,) = rows(db, "SELECT * FROM ironflow.input_observations")
    assert (obs.outcome, obs.rejection_payload, obs.input_type) == (
        "rejected",
        "boom",
        "ForceReject",
    )
    assert obs.payload == {"type": "ForceReject", "id": "wf-1", "reason": "boom"}
    # Still no ghost instance.
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 0


def test_rejection_not_persisted_when_observations_disabled(
    service: WorkflowService, db: sa.Engine
) -> None:
    service.execute(ForceReject(id="wf-1", reason="boom"))
    assert q(db, "SELECT count(*) FROM ironflow.input_observations") == 0


def test_execute_returns_already_completed_for_terminal_workflow(service: WorkflowService) -> None:
    service.execute(Stop(id="wf-1"))

    outcome = service.execute(Ping(id="wf-1"))

    assert outcome == AlreadyCompleted()
    assert outcome.is_already_completed
    assert service.execute_dynamic(T, {"type": "Ping", "id": "wf-1"}) == AlreadyCompleted()
    # decide is not even called: a rejecting input is not rejected either.
    assert service.execute(ForceReject(id="wf-1", reason="x")) == AlreadyCompleted()


def test_already_completed_persisted_when_observations_enabled(
    observed: WorkflowService, db: sa.Engine
) -> None:
    observed.execute(Stop(id="wf-1"))
    observed.execute(Ping(id="wf-1"))

    got = rows(
        db,
        "SELECT input_type, outcome, rejection_payload FROM ironflow.input_observations"
        " ORDER BY id",
    )
    assert [tuple(r) for r in got] == [
        ("Stop", "accepted", None),
        ("Ping", "already_completed", None),
    ]


def test_execute_dynamic_returns_json_rejection(service: WorkflowService) -> None:
    outcome = service.execute_dynamic(
        T, {"type": "ForceReject", "id": "wf-1", "reason": "from-dynamic"}
    )
    assert outcome == Rejected("from-dynamic")


# -- beyond the checklist ------------------------------------------------------------------


def test_execute_outcome_map() -> None:
    assert Rejected("boom").map(str.upper) == Rejected("BOOM")
    assert Rejected({"code": 1}).map(lambda r: r["code"]) == Rejected(1)
    assert Accepted(3).map(str.upper) == Accepted(3)
    assert AlreadyCompleted().map(str.upper) == AlreadyCompleted()
    for outcome in (Accepted(1), Rejected("x"), AlreadyCompleted()):
        assert isinstance(outcome, ExecuteOutcome)
    assert [o.kind for o in (Accepted(1), Rejected("x"), AlreadyCompleted())] == [
        "accepted",
        "rejected",
        "already_completed",
    ]


def test_execute_outcome_map_on_a_real_rejection(service: WorkflowService) -> None:
    outcome = service.execute(ForceReject(id="wf-1", reason="too small"))
    assert outcome.map(len) == Rejected(9)
    assert service.execute(Ping(id="wf-1")).map(len) == Accepted(1)


def test_typed_and_json_rejection_of_a_model(store: PostgresStore, db: sa.Engine) -> None:
    service = WorkflowService(
        store, Registry([OrderWorkflow]), WorkflowServiceConfig(record_input_observations=True)
    )

    typed = service.execute(Order(id="o-1", amount=500))
    assert typed == Rejected(Refusal(code="too_big", limit=100))
    assert isinstance(typed.reason, Refusal)  # type: ignore[attr-defined]

    dynamic = service.execute_dynamic("orders", {"type": "Order", "id": "o-1", "amount": 500})
    assert dynamic == Rejected({"code": "too_big", "limit": 100})
    stored = [r[0] for r in rows(db, "SELECT rejection_payload FROM ironflow.input_observations")]
    assert stored == [{"code": "too_big", "limit": 100}] * 2


def test_typed_execute_with_the_wrong_workflow(service: WorkflowService, db: sa.Engine) -> None:
    with pytest.raises(InvalidPayload) as info:
        service.execute(Ping(id="wf-1"), workflow=TimerTestWorkflow)
    assert info.value.workflow_type == "timer_test"
    assert "Ping" in str(info.value) and "timer_test" in str(info.value)

    with pytest.raises(UnknownWorkflowType, match="effectless"):
        service.execute(EffectlessIncrement(id="wf-1"), workflow=EffectlessWorkflow)
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 0


def test_execute_input_no_registered_workflow_takes(
    service: WorkflowService, db: sa.Engine
) -> None:
    with pytest.raises(UnknownWorkflowType, match="EffectlessIncrement"):
        service.execute(EffectlessIncrement(id="wf-1"))

    class Stray(Message):
        id: str

    with pytest.raises(UnknownWorkflowType, match="Stray"):
        service.execute(Stray(id="x"))
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 0


def test_input_class_shared_by_two_workflows_needs_workflow(store: PostgresStore) -> None:
    service = WorkflowService(store, Registry([(TestWorkflow, test_handler), SharedPing]))
    with pytest.raises(InvalidWorkflowDefinition, match="pass workflow="):
        service.execute(Ping(id="p"))
    assert service.execute(Ping(id="p"), workflow=SharedPing) == Accepted(1)
    assert service.execute(Ping(id="p"), workflow=TestWorkflow) == Accepted(1)
    assert [e.payload for e in service.fetch_workflow_events("shared_ping", "p")] == [
        {"type": "Placed", "amount": 0}
    ]


def test_timers_and_cancellation_through_the_service(
    service: WorkflowService, db: sa.Engine
) -> None:
    before = datetime.now(UTC)
    service.execute(TimerStart(id="t-1", timeout_secs=90, timer_key="timeout"))

    (timer,) = rows(db, "SELECT * FROM ironflow.timers")
    assert timer.input == {"type": "Timeout", "id": "t-1"}
    assert timer.key == "timeout"
    assert (
        before + timedelta(seconds=89) <= timer.fire_at <= datetime.now(UTC) + timedelta(seconds=91)
    )
    assert q(db, "SELECT payload FROM ironflow.outbox") == {"type": "Process"}

    service.execute(Complete(id="t-1", cancel_timer_key="timeout"))

    assert q(db, "SELECT count(*) FROM ironflow.timers WHERE processed_at IS NULL") == 0
    assert event_payloads(service, "t-1", "timer_test") == [
        {"type": "Started"},
        {"type": "Completed"},
        {"type": "TimerCancelled", "key": "timeout"},
    ]


def test_unique_key_conflict_through_the_service(store: PostgresStore, db: sa.Engine) -> None:
    service = WorkflowService(store, Registry([OrderWorkflow]))
    assert service.execute(Order(id="o-1", amount=5)) == Accepted(1)
    # Re-executing the holder is fine.
    assert service.execute(Order(id="o-1", amount=6)) == Accepted(1)

    with pytest.raises(UniqueKeyConflict) as info:
        service.execute(Order(id="o-2", amount=5))

    assert (info.value.workflow_type, info.value.unique_key) == ("orders", "the-only-order")
    assert q(db, "SELECT string_agg(workflow_id, ',') FROM ironflow.workflow_instances") == "o-1"


def test_unique_key_conflict_leaves_the_callers_transaction_usable(
    store: PostgresStore, db: sa.Engine
) -> None:
    service = WorkflowService(store, Registry([OrderWorkflow]))
    assert service.execute(Order(id="o-1", amount=5)) == Accepted(1)
    with store.transaction() as conn:
        conn.execute(sa.text("CREATE TABLE audit (note text)"))
        with pytest.raises(UniqueKeyConflict):
            service.execute(Order(id="o-2", amount=5), connection=conn)
        # The caller's transaction is not aborted: it goes on and commits its own work.
        conn.execute(sa.text("INSERT INTO audit VALUES ('o-2 refused')"))
        assert service.execute(Order(id="o-1", amount=7), connection=conn) == Accepted(1)
    assert q(db, "SELECT string_agg(note, ',') FROM audit") == "o-2 refused"
    assert q(db, "SELECT string_agg(workflow_id, ',') FROM ironflow.workflow_instances") == "o-1"
    assert q(db, "SELECT count(*) FROM ironflow.events") == 2


def test_execute_inside_a_caller_transaction(service: WorkflowService, db: sa.Engine) -> None:
    store = service.store
    with store.transaction() as conn:
        assert service.execute(Ping(id="wf-1"), connection=conn) == Accepted(1)
        assert service.execute(ForceReject(id="ghost", reason="no"), connection=conn) == (
            Rejected("no")
        )
        assert q(db, "SELECT count(*) FROM ironflow.events") == 0  # not committed yet
    assert event_payloads(service, "wf-1") == [{"type": "Pinged"}]
    assert q(db, "SELECT string_agg(workflow_id, ',') FROM ironflow.workflow_instances") == "wf-1"

    class Abort(Exception):
        pass

    with pytest.raises(Abort), store.transaction() as conn:
        service.execute(Ping(id="wf-2"), connection=conn)
        raise Abort
    assert service.fetch_workflow_events(T, "wf-2") == []


def test_effect_routing_payloads_match_ironflow(service: WorkflowService, db: sa.Engine) -> None:
    service.execute(Start(id="wf-1", mode=Mode(mode="RouteResult")))
    assert q(db, "SELECT payload FROM ironflow.outbox") == {
        "type": "Process",
        "mode": {"mode": "RouteResult"},
    }
    # What the handler returns is executed as JSON, exactly as a relay would.
    routed = CompletedEvent(result="success")
    assert service.execute_dynamic(T, {"type": "Completed", "id": "wf-1", "result": "success"}) == (
        Accepted(1)
    )
    assert event_payloads(service, "wf-1")[-1] == routed.to_json()
    assert service.fetch_latest_state(TestWorkflow, "wf-1").result == "success"
    assert Incremented(value=1).to_json() == {"type": "Incremented", "value": 1}
