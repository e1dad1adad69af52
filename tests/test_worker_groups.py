"""Worker groups and queues (issue 20 §5, DESIGN invariant 13): which workflow types a
worker's relays claim (from its ``-Q``, or ``ironflow_relay_types``), back-pressure per
queue, and rows whose queue nobody consumes held instead of published again.

Real PostgreSQL and Redis; the worker's queues come from Celery's own ``WorkController``
set-up (constructed, not started), as ``celery worker -Q`` makes them. The end-to-end run
with two worker groups is ``test_e2e_partitions.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from runtime_helpers import (
    AMQP_URL,
    BROKER_URL,
    DEFAULT_WORKFLOWS,
    celery_app,
    delete_queue,
    insert_effect,
    insert_timer,
    require_rabbitmq,
    test_config,
    wait_until,
)
from workflows import TestWorkflow, TimerTestWorkflow

from ironflow_celery import install
from ironflow_celery.engine.relay import Kind, Relay, celery_publisher, celery_queue_depth
from ironflow_celery.errors import ConfigurationError
from ironflow_celery.integration.queue_check import relay_types
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

T = TestWorkflow.type
TT = TimerTestWorkflow.type
FIRE_AND_FORGET = {"type": "Process", "mode": {"mode": "FireAndForget"}}


def worker_app(*, queues: list[str] | None, per_type: bool = True, **conf: Any) -> Celery:
    """An app with both test workflows, set up as ``celery worker [-Q queues]`` sets it up."""
    app = Celery(f"groups-{uuid.uuid4().hex[:8]}", broker=BROKER_URL, set_as_current=False)
    app.conf.update(
        ironflow_queue_per_workflow_type=per_type,
        ironflow_database_url="postgresql://unused@127.0.0.1/unused",
        **conf,
    )
    install(app, workflows=DEFAULT_WORKFLOWS)
    app.WorkController(hostname="a@test", queues=queues, pool_cls="solo", without_heartbeat=True)
    return app


@pytest.mark.parametrize(
    ("queues", "per_type", "expected"),
    [
        # -Q of one group's queue: that group's type only, effects and timers
        ([f"ironflow.{T}"], True, [T]),
        ([f"ironflow.{T}", f"ironflow.{TT}"], True, [T, TT]),
        # no -Q, per-type queues not declared: the worker consumes none of ironflow's
        # queues, a relay host for workers elsewhere: every type, as before
        (None, True, [T, TT]),
        (["celery"], True, [T, TT]),
        # no -Q and the default routing: everything goes to the queue it consumes
        (None, False, [T, TT]),
    ],
)
def test_relay_types_follow_the_queues_the_worker_consumes(
    queues: list[str] | None, per_type: bool, expected: list[str]
) -> None:
    app = worker_app(queues=queues, per_type=per_type)
    runtime = app.ironflow
    types = relay_types(runtime)
    assert types == {"effect": expected, "timer": expected}
    routes = runtime.relay_routes(types)
    assert sorted(routes["effect"]) == expected
    if per_type:
        assert routes["effect"] == {t: f"ironflow.{t}" for t in expected}


def test_relay_types_setting_overrides_the_worker_queues_and_refuses_unknown_types() -> None:
    app = worker_app(queues=[f"ironflow.{T}"], ironflow_relay_types=TT)
    assert app.ironflow.relay_routes(relay_types(app.ironflow)) == {
        "effect": {TT: f"ironflow.{TT}"},
        "timer": {TT: f"ironflow.{TT}"},
    }
    everything = worker_app(queues=[f"ironflow.{T}"], ironflow_relay_types="*")
    assert sorted(everything.ironflow.relay_routes(relay_types(everything.ironflow))["timer"]) == [
        T,
        TT,
    ]
    wrong = worker_app(queues=None, ironflow_relay_types=f"{T}, no_such_type")
    with pytest.raises(ConfigurationError, match="unknown workflow types no_such_type"):
        wrong.ironflow.relay_routes()


class Recorder:
    """A publisher that keeps what it was asked to publish (nobody consumes it)."""

    def __init__(self) -> None:
        self.published: list[ClaimedRow] = []

    def __call__(self, kind: Kind, messages: Sequence[Sequence[ClaimedRow]]) -> list[uuid.UUID]:
        rows = [r for m in messages for r in m]
        self.published.extend(rows)
        return [r.id for r in rows]


def test_back_pressure_holds_per_queue_so_a_stalled_queue_leaves_room_for_the_others(
    store: PostgresStore, db: sa.Engine
) -> None:
    """The older rows go to a queue nobody consumes: they take that queue's budget, not the
    relay's, and the other queue's rows are published all the same."""
    stalled = [insert_effect(db, TT, f"b{i}", FIRE_AND_FORGET) for i in range(8)]
    other = [insert_effect(db, T, f"a{i}", FIRE_AND_FORGET) for i in range(6)]
    publish = Recorder()
    relay = Relay(
        "effect",
        store,
        [T, TT],
        test_config(max_in_flight=4, claim_batch_size=2),
        publish,
        name="groups",
        wake=threading.Event(),
        stop=threading.Event(),
        queues={T: "queue-a", TT: "queue-b"},
    )
    for _ in range(20):
        if not relay.step():
            break
    by_type = {t: [r.id for r in publish.published if r.workflow_type == t] for t in (T, TT)}
    assert by_type[TT] == stalled[:4]  # the stalled queue's budget, oldest first
    assert sorted(by_type[T]) == sorted(other[:4])  # its own budget, not the rest of B's
    assert relay.rooms() == {"queue-a": 0, "queue-b": 0}


@pytest.mark.scale  # several relays or worker groups at once: its own CI step
def test_rows_in_a_queue_nobody_consumes_are_held_not_published_again(
    store: PostgresStore, db: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``dispatch_timeout`` a row whose queue still holds the relay's messages and
    moved no row since stays held (one message per row in the queue); once the broker has
    lost them (the queue emptied), the rows are given up and published again."""
    ids = [insert_effect(db, T, f"w{i}", FIRE_AND_FORGET) for i in range(3)]
    queue = f"t-{uuid.uuid4().hex}"
    app = celery_app(queue)
    client = redis.Redis.from_url(BROKER_URL)
    config = test_config(effect_lock_duration=1.0, dispatch_timeout=1.0)
    relay = Relay(
        "effect",
        store,
        [T],
        config,
        celery_publisher(app),
        name="held",
        wake=threading.Event(),
        stop=threading.Event(),
        queues={T: queue},
        queue_depth=celery_queue_depth(app),
    )
    caplog.set_level(logging.WARNING, logger="ironflow_celery.relay")
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: relay.held_total >= 6, 60, what="two dispatch timeouts held")
        assert client.llen(queue) == 3
        assert relay.given_up_total == 0
        assert relay.published_total == 3
        assert "stay held" in caplog.text

        client.delete(queue)  # the broker lost them
        wait_until(lambda: relay.given_up_total >= 3, 60, what="the lost rows given up")
        wait_until(lambda: relay.published_total >= 6, 60, what="the rows published again")
        assert sorted(set(uuid.UUID(i) for i in _task_ids(client, queue))) == sorted(ids)
    finally:
        relay.stop.set()
        relay.wake.set()
        thread.join(10)
        client.close()
        delete_queue(queue)


def _task_ids(client: redis.Redis, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)]


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_queue_depth_is_read_from_the_broker(broker: str) -> None:
    """What the hold decision reads: the messages waiting in a queue, on Redis and on
    RabbitMQ; a queue that does not exist holds none; an unreachable broker is unknown."""
    if broker == "amqp":
        require_rabbitmq()
    queue = f"t-{uuid.uuid4().hex}"
    app = celery_app(queue, BROKER_URL if broker == "redis" else AMQP_URL)
    depth = celery_queue_depth(app)
    try:
        assert depth(queue) == 0
        with app.producer_or_acquire() as producer:
            for i in range(3):
                app.send_task("ironflow.depth.effect", args=[i], producer=producer)
        wait_until(lambda: depth(queue) == 3, 30, what="three messages counted")
    finally:
        with app.connection_for_write() as conn, contextlib.suppress(Exception):
            conn.default_channel.queue_delete(queue)
        if broker == "redis":
            delete_queue(queue)
    assert celery_queue_depth(celery_app(queue, "redis://127.0.0.1:1/0"))(queue) is None


class CountingStore:
    """The real store, counting the relay's statements by method."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def test_due_rows_of_a_queue_at_its_limit_do_not_make_the_relay_spin(
    store: PostgresStore, db: sa.Engine
) -> None:
    """Timers of a stalled queue stay due while its budget is full: the relay sleeps its
    poll interval instead of waking at once for a row it may not claim."""
    for i in range(4):
        insert_timer(db, TT, f"w{i}", {"type": "TimeoutFired", "id": f"w{i}"}, notify=False)
    config = test_config(max_in_flight=2, claim_batch_size=2, timer_poll_interval=0.2)
    counting = CountingStore(store)
    relay = Relay(
        "timer",
        counting,  # type: ignore[arg-type]
        [T, TT],
        config,
        Recorder(),
        name="spin",
        wake=threading.Event(),
        stop=threading.Event(),
        queues={T: "queue-a", TT: "queue-b"},
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: relay.claimed_total == 2, 30, what="queue-b's budget published")
        time.sleep(1.5)  # nothing of queue-b starts: after a second it counts as quiet
        before = sum(counting.calls.values())
        window = 2.0
        time.sleep(window)  # a rate bound over a window: a slow machine only lowers it
        statements = sum(counting.calls.values()) - before
    finally:
        relay.stop.set()
        relay.wake.set()
        thread.join(10)
    # at most a claim and a next-due query per poll (0.2 s), plus the once-a-second checks
    assert statements <= 2 * window / 0.2 + 3 * window + 5, counting.calls
    assert relay.claimed_total == 2
