"""The order saga tested with the testing kit, as a user would test their own workflow.

No Celery worker and no sleeping: ``drain()`` runs the due effects and timers in-process
through the real handlers and ack path, and the test clock decides what is due.
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from runtime_helpers import delete_queue

from ironflow_celery import EffectContext, Message
from ironflow_celery.examples.orders import (
    PAYMENT_TIMEOUT,
    ChargePayment,
    OrderCancelled,
    OrderPlaced,
    OrderSaga,
    PaymentCaptured,
    PaymentDeclined,
    PlaceOrder,
    Shipped,
    StockWasReserved,
)
from ironflow_celery.testing import TestClock, WorkflowTestEnv


@pytest.fixture
def ironflow_workflows() -> list:
    return [OrderSaga]


def order(order_id: str, *, card: str = "4000-0000-0000-4242", sku: str = "SKU-1") -> PlaceOrder:
    return PlaceOrder(id=order_id, sku=sku, quantity=1, amount_cents=1250, card=card)


def test_happy_path_ships_and_cancels_the_payment_timeout(ironflow_env: WorkflowTestEnv):
    assert ironflow_env.execute(order("o-1")).is_accepted

    ran = ironflow_env.drain()

    assert [(r.type, r.status, r.follow_up) for r in ran] == [
        ("ReserveStock", "processed", "StockReserved"),
        ("ChargePayment", "processed", "PaymentSucceeded"),
        ("ShipOrder", "processed", "OrderShipped"),
    ]
    assert ran[1].returned.charge_id.startswith("ch-")  # what the handler returned
    assert ironflow_env.state(OrderSaga, "o-1").status == "shipped"
    ironflow_env.assert_events(
        OrderSaga, "o-1", [OrderPlaced, StockWasReserved, PaymentCaptured, Shipped]
    )
    assert ironflow_env.pending_effects() == []
    assert ironflow_env.pending_timers() == []  # PaymentSucceeded cancelled the timeout
    assert ironflow_env.drain() == []


def test_payment_timeout_fires_when_the_clock_passes_it_and_compensates(
    ironflow_database_url: str, ironflow_clock: TestClock
):
    def provider_never_answers(effect: Message, ctx: EffectContext) -> Message | None:
        if isinstance(effect, ChargePayment):
            return None  # the charge is sent; the provider's answer never comes
        return OrderSaga.handle_effect(effect, ctx)

    with WorkflowTestEnv(
        ironflow_database_url, [(OrderSaga, provider_never_answers)], clock=ironflow_clock
    ) as env:
        env.execute(order("o-2"))
        assert [r.type for r in env.drain()] == ["ReserveStock", "ChargePayment"]
        [timeout] = env.pending_timers(OrderSaga, "o-2")
        assert (timeout.type, timeout.key) == ("PaymentTimedOut", "payment-timeout")
        assert timeout.due_at == ironflow_clock.now() + PAYMENT_TIMEOUT

        ironflow_clock.advance(PAYMENT_TIMEOUT - timedelta(seconds=1))
        assert env.drain() == []  # a second early: nothing is due
        assert env.state(OrderSaga, "o-2").status == "awaiting_payment"

        ironflow_clock.advance(seconds=1)
        ran = env.drain()

        assert [(r.kind, r.type, r.status) for r in ran] == [
            ("timer", "PaymentTimedOut", "processed"),
            ("effect", "ReleaseStock", "processed"),
        ]
        assert ran[0].outcome == "accepted"
        final = env.state(OrderSaga, "o-2")
        assert (final.status, final.cancel_reason) == ("cancelled", "payment timed out")
        env.assert_events(
            OrderSaga,
            "o-2",
            [
                OrderPlaced,
                StockWasReserved,
                PaymentDeclined(reason="payment timed out"),
                OrderCancelled(reason="payment timed out"),
            ],
        )


def test_dead_lettered_payment_compensates(ironflow_env: WorkflowTestEnv):
    clock = ironflow_env.clock
    started = clock.now()
    ironflow_env.execute(order("o-3", card="4000-0000-0000-0002"))  # declined every time

    first = ironflow_env.drain()
    assert [(r.type, r.status) for r in first] == [
        ("ReserveStock", "processed"),
        ("ChargePayment", "failed-will-retry"),
    ]
    assert first[1].error == "RuntimeError: card declined by issuer"
    [backing_off] = ironflow_env.pending_effects(OrderSaga, "o-3")
    assert backing_off.due_at == started + timedelta(seconds=1)  # backoff on the test clock

    rest = ironflow_env.drain(skip_time=True)  # jump over each backoff

    assert [(r.type, r.attempt, r.status) for r in rest] == [
        ("ChargePayment", 2, "failed-will-retry"),
        ("ChargePayment", 3, "failed-will-retry"),
        ("ChargePayment", 4, "failed-will-retry"),
        ("ChargePayment", 5, "dead-lettered"),
        ("ReleaseStock", 1, "processed"),
    ]
    # Backoffs of 1, 2, 4 and 8 s: the payment timeout (2 min) never came into play.
    assert timedelta(seconds=15) <= clock.now() - started < timedelta(seconds=16)
    [dead] = ironflow_env.dead_letters(OrderSaga, "o-3")
    assert (dead.type, dead.attempts, dead.handled) == ("ChargePayment", 5, True)
    assert ironflow_env.pending_timers() == []  # PaymentFailed cancelled the timeout
    final = ironflow_env.state(OrderSaga, "o-3")
    assert final.status == "cancelled"
    assert "card declined" in (final.cancel_reason or "")


def test_flaky_inventory_retries_only_once_its_backoff_has_passed(ironflow_env: WorkflowTestEnv):
    ironflow_env.execute(order("o-4", sku="FLAKY-SKU-9"))

    assert [(r.type, r.status) for r in ironflow_env.drain()] == [
        ("ReserveStock", "failed-will-retry")
    ]
    ironflow_env.clock.advance(seconds=1)
    assert ironflow_env.drain() == []  # a backoff ends strictly after its delay (as claims do)
    ironflow_env.clock.advance(milliseconds=1)
    assert [(r.type, r.attempt, r.status) for r in ironflow_env.drain()] == [
        ("ReserveStock", 2, "processed"),
        ("ChargePayment", 1, "processed"),
        ("ShipOrder", 1, "processed"),
    ]


def test_the_same_saga_through_a_real_celery_worker(ironflow_env: WorkflowTestEnv):
    """drain(worker=True): the kit claims and publishes, an in-thread worker runs the tasks."""
    broker = os.environ.get("IRONFLOW_TEST_BROKER_URL", "redis://127.0.0.1:6379/5")
    queue = f"kit-orders-{uuid.uuid4().hex[:8]}"
    app = Celery(queue, broker=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, worker_hijack_root_logger=False)
    ironflow_env.install(app)
    try:
        with start_worker(
            app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"
        ):
            ironflow_env.execute(order("o-5"))
            ironflow_env.execute(order("o-6", card="4000-0000-0000-0002"))
            ran = ironflow_env.drain(worker=True, skip_time=True, timeout=120)
    finally:
        delete_queue(queue, broker)

    shipped = [(r.type, r.status) for r in ran if r.workflow.workflow_id == "o-5"]
    assert shipped == [
        ("ReserveStock", "processed"),
        ("ChargePayment", "processed"),
        ("ShipOrder", "processed"),
    ]
    declined = [(r.type, r.attempt, r.status) for r in ran if r.workflow.workflow_id == "o-6"]
    assert declined == [
        ("ReserveStock", 1, "processed"),
        *[("ChargePayment", n, "failed-will-retry") for n in range(1, 5)],
        ("ChargePayment", 5, "dead-lettered"),
        ("ReleaseStock", 1, "processed"),
    ]
    assert ironflow_env.state(OrderSaga, "o-5").status == "shipped"
    assert ironflow_env.state(OrderSaga, "o-6").status == "cancelled"
