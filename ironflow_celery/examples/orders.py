"""An order saga: reserve stock, charge the card, ship — and compensate when payment fails.

- ``PlaceOrder`` reserves stock (the inventory service times out once for SKUs marked
  flaky: a transient failure, retried with backoff from the outbox).
- Stock reserved: charge the card and arm a keyed ``payment-timeout`` timer.
- Paid: cancel the timer, ship. Shipped is terminal.
- A declined card makes ``ChargePayment`` fail on every attempt; after ``max_attempts`` the
  effect is dead-lettered and ``on_dead_letter`` turns that into ``PaymentFailed`` in the
  same transaction: the saga releases the stock and ends ``cancelled`` — never stranded.

Run a worker for it with ``IRONFLOW_WORKFLOWS=ironflow_celery.examples.orders celery -A
ironflow_celery worker``. It ships in the package so the docs' examples need no checkout;
``examples/orders`` in the repository runs it end to end.
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from ironflow_celery import (
    DeadLetterNotice,
    Decision,
    EffectContext,
    Message,
    PermanentEffectError,
    StateMachineDefinition,
    Workflow,
)

PAYMENT_TIMEOUT = timedelta(minutes=2)
DECLINED_CARD_SUFFIX = "0002"
FLAKY_SKU_PREFIX = "FLAKY-"

__all__ = [
    "DECLINED_CARD_SUFFIX",
    "FLAKY_SKU_PREFIX",
    "PAYMENT_TIMEOUT",
    "ChargePayment",
    "Order",
    "OrderCancelled",
    "OrderPlaced",
    "OrderSaga",
    "OrderShipped",
    "PaymentCaptured",
    "PaymentDeclined",
    "PaymentFailed",
    "PaymentSucceeded",
    "PaymentTimedOut",
    "PlaceOrder",
    "ReleaseStock",
    "ReserveStock",
    "ShipOrder",
    "Shipped",
    "Status",
    "StockReleased",
    "StockReserved",
    "StockWasReserved",
    "expected_status",
]

# -- inputs ----------------------------------------------------------------------------


class PlaceOrder(Message):
    id: str
    sku: str
    quantity: int = Field(gt=0)
    amount_cents: int = Field(gt=0)
    card: str


class StockReserved(Message):
    id: str
    reservation: str


class PaymentSucceeded(Message):
    id: str
    charge_id: str


class PaymentFailed(Message):
    id: str
    reason: str


class PaymentTimedOut(Message):
    id: str


class OrderShipped(Message):
    id: str
    tracking: str


class StockReleased(Message):
    id: str


# -- events ----------------------------------------------------------------------------


class OrderPlaced(Message):
    sku: str
    quantity: int
    amount_cents: int
    card: str


class StockWasReserved(Message):
    reservation: str


class PaymentCaptured(Message):
    charge_id: str


class PaymentDeclined(Message):
    reason: str


class Shipped(Message):
    tracking: str


class OrderCancelled(Message):
    reason: str


# -- effects ----------------------------------------------------------------------------


class ReserveStock(Message):
    sku: str
    quantity: int


class ChargePayment(Message):
    amount_cents: int
    card: str


class ShipOrder(Message):
    sku: str
    quantity: int


class ReleaseStock(Message):
    reservation: str


# -- state --------------------------------------------------------------------------------

Status = Literal[
    "new", "reserving", "awaiting_payment", "shipping", "compensating", "shipped", "cancelled"
]


class Order(BaseModel):
    status: Status = "new"
    sku: str = ""
    quantity: int = 0
    amount_cents: int = 0
    card: str = ""
    reservation: str | None = None
    charge_id: str | None = None
    tracking: str | None = None
    cancel_reason: str | None = None


class OrderSaga(Workflow):
    """Reserve stock, charge payment, ship; compensate on a failed payment."""

    type = "orders"
    State = Order
    Input = (
        PlaceOrder
        | StockReserved
        | PaymentSucceeded
        | PaymentFailed
        | PaymentTimedOut
        | OrderShipped
        | StockReleased
    )
    Event = (
        OrderPlaced
        | StockWasReserved
        | PaymentCaptured
        | PaymentDeclined
        | Shipped
        | OrderCancelled
    )
    Effect = ReserveStock | ChargePayment | ShipOrder | ReleaseStock

    @staticmethod
    def evolve(state: Order, event: Message) -> Order:
        match event:
            case OrderPlaced():
                return state.model_copy(update={**event.model_dump(), "status": "reserving"})
            case StockWasReserved(reservation=r):
                return state.model_copy(update={"status": "awaiting_payment", "reservation": r})
            case PaymentCaptured(charge_id=c):
                return state.model_copy(update={"status": "shipping", "charge_id": c})
            case PaymentDeclined(reason=r):
                return state.model_copy(update={"status": "compensating", "cancel_reason": r})
            case Shipped(tracking=t):
                return state.model_copy(update={"status": "shipped", "tracking": t})
            case OrderCancelled(reason=r):
                return state.model_copy(update={"status": "cancelled", "cancel_reason": r})
        return state

    @staticmethod
    def decide(now: datetime, state: Order, input: Message) -> Decision:
        match (state.status, input):
            case ("new", PlaceOrder()):
                return Decision.accept(
                    OrderPlaced(
                        sku=input.sku,
                        quantity=input.quantity,
                        amount_cents=input.amount_cents,
                        card=input.card,
                    )
                ).with_effect(ReserveStock(sku=input.sku, quantity=input.quantity))
            case ("reserving", StockReserved(reservation=r)):
                return (
                    Decision.accept(StockWasReserved(reservation=r))
                    .with_effect(ChargePayment(amount_cents=state.amount_cents, card=state.card))
                    .with_timer_after(
                        PAYMENT_TIMEOUT, PaymentTimedOut(id=input.id), key="payment-timeout"
                    )
                )
            case ("awaiting_payment", PaymentSucceeded(charge_id=c)):
                return (
                    Decision.accept(PaymentCaptured(charge_id=c))
                    .cancel_timer("payment-timeout")
                    .with_effect(ShipOrder(sku=state.sku, quantity=state.quantity))
                )
            case ("awaiting_payment", PaymentFailed(reason=reason)):
                return (
                    Decision.accept(PaymentDeclined(reason=reason))
                    .cancel_timer("payment-timeout")
                    .with_effect(ReleaseStock(reservation=state.reservation or ""))
                )
            case ("awaiting_payment", PaymentTimedOut()):
                return Decision.accept(PaymentDeclined(reason="payment timed out")).with_effect(
                    ReleaseStock(reservation=state.reservation or "")
                )
            case ("shipping", OrderShipped(tracking=t)):
                return Decision.accept(Shipped(tracking=t))
            case ("compensating", StockReleased()):
                return Decision.accept(OrderCancelled(reason=state.cancel_reason or "cancelled"))
        return Decision.reject(f"{type(input).__name__} is not expected while {state.status}")

    @staticmethod
    def is_terminal(state: Order) -> bool:
        return state.status in ("shipped", "cancelled")

    @staticmethod
    def on_dead_letter(notice: DeadLetterNotice) -> Message | None:
        """A payment that can never succeed becomes a PaymentFailed: the saga compensates."""
        if notice.kind == "effect" and isinstance(notice.decoded, ChargePayment):
            return PaymentFailed(id=notice.workflow.workflow_id, reason=notice.last_error)
        return None

    @staticmethod
    def handle_effect(effect: Message, ctx: EffectContext) -> Message | None:
        """The side effects, against pretend services (each call takes a few ms)."""
        order_id = ctx.workflow.workflow_id
        time.sleep(random.uniform(0.001, 0.005))
        match effect:
            case ReserveStock(sku=sku):
                if sku.startswith(FLAKY_SKU_PREFIX) and ctx.attempt == 1:
                    raise TimeoutError("inventory service timed out")
                return StockReserved(id=order_id, reservation=f"res-{ctx.effect_id.hex[:12]}")
            case ChargePayment(card=card):
                if card.endswith(DECLINED_CARD_SUFFIX):
                    raise RuntimeError("card declined by issuer")
                # The idempotency key makes a retried charge safe at the payment provider.
                return PaymentSucceeded(id=order_id, charge_id=f"ch-{ctx.idempotency_key[-12:]}")
            case ShipOrder():
                return OrderShipped(id=order_id, tracking=f"TRK{ctx.effect_id.hex[-10:].upper()}")
            case ReleaseStock():
                return StockReleased(id=order_id)
        raise PermanentEffectError(f"unknown effect {effect!r}")

    @classmethod
    def state_machine(cls) -> StateMachineDefinition:
        return (
            StateMachineDefinition.builder(initial="new")
            .states("reserving", "awaiting_payment", "shipping", "compensating")
            .terminal("shipped")
            .terminal("cancelled")
            .transition("new", "reserving", "PlaceOrder", effects=["ReserveStock"])
            .transition(
                "reserving",
                "awaiting_payment",
                "StockReserved",
                effects=["ChargePayment"],
                timers=["payment-timeout"],
            )
            .transition("awaiting_payment", "shipping", "PaymentSucceeded", effects=["ShipOrder"])
            .transition(
                "awaiting_payment", "compensating", "PaymentFailed", effects=["ReleaseStock"]
            )
            .transition(
                "awaiting_payment", "compensating", "PaymentTimedOut", effects=["ReleaseStock"]
            )
            .transition("shipping", "shipped", "OrderShipped")
            .transition("compensating", "cancelled", "StockReleased")
            .build()
        )


def expected_status(order: PlaceOrder) -> Status:
    """What a correct run ends in for this order."""
    return "cancelled" if order.card.endswith(DECLINED_CARD_SUFFIX) else "shipped"
