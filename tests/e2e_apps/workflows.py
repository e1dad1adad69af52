"""The e2e workflow only (no Celery app): ``IRONFLOW_WORKFLOWS=tests.e2e_apps.workflows``.

``e2e_order``: ``Place`` appends ``Placed``, enqueues a ``Charge`` effect and optionally
arms an ``Expire`` timer; the handler records every invocation durably in the table
``e2e_calls`` of the database in ``IRONFLOW_DATABASE_URL`` (its own autocommit
connection), so a test can count handler runs across processes, then sleeps as the
payload asks and returns ``ChargeDone``, which appends ``Charged``. Every ``ChargeDone``
is accepted, so a duplicated follow-up shows as a second ``Charged`` event.
"""

from __future__ import annotations

import os
import threading
import time

import psycopg
from pydantic import BaseModel

from ironflow_celery import Decision, EffectContext, Message, Timer, Workflow

CALLS_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS e2e_calls (
    effect_id uuid NOT NULL,
    attempt   int  NOT NULL,
    pid       int  NOT NULL,
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class Place(Message):
    id: str
    sleep: float = 0.0
    sleep_once: bool = False
    timer_secs: float | None = None


class ChargeDone(Message):
    id: str


class Expire(Message):
    id: str


class Placed(Message):
    pass


class Charged(Message):
    pass


class Expired(Message):
    pass


class Charge(Message):
    sleep: float = 0.0
    sleep_once: bool = False
    """Sleep only on the first recorded run of this effect (a re-run finishes at once)."""
    record: bool = True
    follow_up: bool = True


class OrderState(BaseModel):
    placed: bool = False
    charged: int = 0
    expired: bool = False


def _plain_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


_local = threading.local()


def _connection() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or getattr(_local, "pid", None) != os.getpid():
        conn = psycopg.connect(
            _plain_url(os.environ["IRONFLOW_DATABASE_URL"]),
            autocommit=True,
            connect_timeout=5,
            prepare_threshold=None,  # the URL may be a transaction pooler's (PgBouncer)
        )
        _local.conn, _local.pid = conn, os.getpid()
    return conn


def record_call(ctx: EffectContext) -> int:
    """Insert one row into e2e_calls; returns how many runs this effect has had so far."""
    sql = (
        "WITH ins AS (INSERT INTO e2e_calls (effect_id, attempt, pid) VALUES (%s, %s, %s)) "
        "SELECT count(*) + 1 FROM e2e_calls WHERE effect_id = %s"
    )
    params = (ctx.effect_id, ctx.attempt, os.getpid(), ctx.effect_id)
    for tries in (1, 2):
        try:
            row = _connection().execute(sql, params).fetchone()
            return int(row[0]) if row else 1
        except psycopg.OperationalError:
            _local.conn = None  # the server went away (a restart test): reconnect once
            if tries == 2:
                raise
    raise AssertionError("unreachable")


class OrderWorkflow(Workflow):
    type = "e2e_order"
    State = OrderState
    Input = Place | ChargeDone | Expire
    Event = Placed | Charged | Expired
    Effect = Charge

    @staticmethod
    def evolve(state: OrderState, event: Message) -> OrderState:
        match event:
            case Placed():
                return state.model_copy(update={"placed": True})
            case Charged():
                return state.model_copy(update={"charged": state.charged + 1})
            case Expired():
                return state.model_copy(update={"expired": True})
        return state

    @staticmethod
    def decide(now, state: OrderState, input: Message) -> Decision:
        match input:
            case Place(id=wid, sleep=sleep, sleep_once=once, timer_secs=secs):
                decision = Decision.accept(Placed()).with_effect(
                    Charge(sleep=sleep, sleep_once=once)
                )
                if secs is not None:
                    decision = decision.with_timer(Timer.after(secs, Expire(id=wid), key="expire"))
                return decision
            case ChargeDone():
                return Decision.accept(Charged())
            case Expire():
                return Decision.accept(Expired())
        raise AssertionError(f"unexpected input {input!r}")

    @staticmethod
    def handle_effect(effect: Charge, ctx: EffectContext) -> ChargeDone | None:
        runs = record_call(ctx) if effect.record else 1
        if effect.sleep and (not effect.sleep_once or runs == 1):
            time.sleep(effect.sleep)
        return ChargeDone(id=ctx.workflow.workflow_id) if effect.follow_up else None
