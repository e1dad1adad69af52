"""An input that starts a new instance: its creation and first decision in one durable
statement (`WorkflowService._create_with_decision`, migration 0013), and every case where
the usual path (lock, load, decide on the stored state, write) must decide instead:
an existing instance, a taken unique key, a decision with timers, a `decide` that fails on
the initial state, racing creators. Real PostgreSQL; statements counted on the engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from workflows import (
    Increment,
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

from ironflow_celery import (
    Accepted,
    AlreadyCompleted,
    Decision,
    Message,
    PostgresStore,
    Registry,
    Rejected,
    UniqueKeyConflict,
    Workflow,
    WorkflowService,
)


def q(db: sa.Engine, statement: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


@contextmanager
def statements(store: PostgresStore) -> Iterator[list[str]]:
    """The statements `store`'s engine sends meanwhile (BEGIN and COMMIT are not
    statements here: psycopg sends them on its own)."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)


@pytest.fixture
def service(store: PostgresStore) -> WorkflowService:
    registry = Registry([(TestWorkflow, test_handler), (TimerTestWorkflow, timer_test_handler)])
    return WorkflowService(store, registry)


def test_a_new_instance_is_created_with_its_first_decision_in_one_statement(
    service: WorkflowService, store: PostgresStore, db: sa.Engine, database_url: str
) -> None:
    listener = psycopg.connect(
        sa.make_url(database_url).set(drivername="postgresql").render_as_string(False),
        autocommit=True,
    )
    listener.execute("LISTEN ironflow_effects")
    with statements(store) as sent:
        assert service.execute(Start(id="s-1", mode=Mode(mode="RouteResult"))) == Accepted(1)
    assert len(sent) == 1 and "celery_create_with_decision" in sent[0]
    # What the usual path writes: the instance with its counters, the event, the effect,
    # the wake-up for the relays.
    instance = store_row(db, "s-1")
    assert (instance.event_count, instance.completed_at) == (1, None)
    assert instance.last_event_at is not None
    assert q(db, "SELECT payload->>'type' FROM ironflow.events WHERE workflow_id = 's-1'") == (
        "Started"
    )
    assert q(db, "SELECT count(*) FROM ironflow.outbox WHERE workflow_id = 's-1'") == 1
    notifies = list(listener.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload) for n in notifies] == [("ironflow_effects", "test_workflow")]
    listener.close()
    # Committed on its own (autocommit): another session sees it at once, and the next
    # input to the instance decides on the stored state.
    assert service.execute(Increment(id="s-1")) == Accepted(1)
    assert service.execute(Increment(id="s-1")) == Accepted(1)
    events = [e.payload for e in service.fetch_workflow_events("test_workflow", "s-1")]
    assert [(e["type"], e.get("value")) for e in events] == [
        ("Started", None),
        ("Incremented", 1),
        ("Incremented", 2),
    ]


def store_row(db: sa.Engine, wid: str) -> Any:
    with db.connect() as conn:
        return conn.execute(
            sa.text("SELECT * FROM ironflow.workflow_instances WHERE workflow_id = :wid"),
            {"wid": wid},
        ).one()


def test_a_first_decision_that_completes_and_one_with_no_effects(
    service: WorkflowService, db: sa.Engine
) -> None:
    assert service.execute(Stop(id="done")) == Accepted(1)
    assert store_row(db, "done").completed_at is not None
    assert service.execute(Ping(id="done")) == AlreadyCompleted()
    assert service.execute(Ping(id="quiet")) == Accepted(1)
    assert q(db, "SELECT count(*) FROM ironflow.outbox") == 0


def test_an_existing_instance_falls_back_to_the_stored_state(
    service: WorkflowService, store: PostgresStore
) -> None:
    """Increment is accepted on the initial state too: the statement finds the instance,
    writes nothing, and the usual path decides on the stored counter."""
    assert service.execute(Increment(id="c")) == Accepted(1)
    with statements(store) as sent:
        assert service.execute(Increment(id="c")) == Accepted(1)
    assert "celery_create_with_decision" in sent[0] and len(sent) == 3  # + lock-and-load, write
    values = [e.payload["value"] for e in service.fetch_workflow_events("test_workflow", "c")]
    assert values == [1, 2]


def test_a_decision_with_timers_takes_the_usual_path(
    service: WorkflowService, store: PostgresStore, db: sa.Engine
) -> None:
    with statements(store) as sent:
        service.execute(TimerStart(id="t", timeout_secs=60, timer_key="k"))
    assert not any("celery_create_with_decision" in s for s in sent)
    assert q(db, "SELECT count(*) FROM ironflow.timers WHERE workflow_id = 't'") == 1


class Order(Message):
    id: str
    amount: int


class Placed(Message):
    amount: int


class Amended(Message):
    amount: int


class Amend(Message):
    id: str
    amount: int


class OrderState(BaseModel):
    placed: bool = False


class KeyedOrders(Workflow):
    """One active order at a time (a unique key); `Amend` fails on an order never placed
    (its `decide` raises on the initial state, as a workflow's invariant check may)."""

    type = "keyed_orders"
    State = OrderState
    Input = Order | Amend
    Event = Placed | Amended
    Rejection = str

    @staticmethod
    def evolve(state: OrderState, event: Any) -> OrderState:
        return OrderState(placed=True)

    @staticmethod
    def decide(now: datetime, state: OrderState, input: Any) -> Decision:
        if isinstance(input, Amend):
            if not state.placed:
                raise RuntimeError("amending an order never placed")
            return Decision.accept(Amended(amount=input.amount))
        if input.amount > 100:
            return Decision.reject("too big")
        return Decision.accept(Placed(amount=input.amount))

    @staticmethod
    def unique_key(input: Any) -> str | None:
        return "the-only-order" if isinstance(input, Order) else None


def test_a_taken_unique_key_and_a_rejection_are_reported_as_before(
    store: PostgresStore, db: sa.Engine
) -> None:
    service = WorkflowService(store, Registry([KeyedOrders]))
    assert service.execute(Order(id="o-0", amount=500)) == Rejected("too big")
    assert service.execute(Order(id="o-1", amount=5)) == Accepted(1)
    with pytest.raises(UniqueKeyConflict):
        service.execute(Order(id="o-2", amount=5))
    # as before, a taken key is reported before the input is decided
    with pytest.raises(UniqueKeyConflict):
        service.execute(Order(id="o-3", amount=500))
    assert q(db, "SELECT string_agg(workflow_id, ',') FROM ironflow.workflow_instances") == "o-1"


def test_a_decide_that_fails_on_the_initial_state_is_decided_on_the_stored_one(
    store: PostgresStore,
) -> None:
    service = WorkflowService(store, Registry([KeyedOrders]))
    with pytest.raises(RuntimeError, match="never placed"):
        service.execute(Amend(id="o-1", amount=1))
    assert service.execute(Order(id="o-1", amount=5)) == Accepted(1)
    assert service.execute(Amend(id="o-1", amount=7)) == Accepted(1)
    assert [e.payload for e in service.fetch_workflow_events("keyed_orders", "o-1")] == [
        {"type": "Placed", "amount": 5},
        {"type": "Amended", "amount": 7},
    ]


def test_racing_creators_of_one_instance_write_one_first_decision(
    service: WorkflowService, db: sa.Engine
) -> None:
    """Eight threads start the same new instance at once, twenty times: each time exactly
    one creates it, the others decide on what it wrote (each Increment counts once)."""
    for round_ in range(20):
        wid = f"race-{round_}"
        barrier = threading.Barrier(8)
        outcomes: list[Any] = []

        def run(
            wid: str = wid, barrier: threading.Barrier = barrier, outcomes: list[Any] = outcomes
        ) -> None:
            barrier.wait()
            outcomes.append(service.execute(Increment(id=wid)))

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outcomes == [Accepted(1)] * 8
        values = [e.payload["value"] for e in service.fetch_workflow_events("test_workflow", wid)]
        assert values == list(range(1, 9))
        assert store_row(db, wid).event_count == 8
