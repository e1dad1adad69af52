"""Relay behaviour against real PostgreSQL and Redis: batch claims, LISTEN/NOTIFY wake-ups,
timer sleeps until ``fire_at``, back-pressure, failed publishes, concurrent relay groups.

Timings here are functional bounds (seconds), never performance targets: those live in
benchmarks/.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from runtime_helpers import (
    AMQP_URL,
    BROKER_URL,
    CLOSED_BROKER_URL,
    TestApp,
    celery_app,
    delete_queue,
    execute,
    insert_effect,
    outbox,
    require_rabbitmq,
    rows,
    running_app,
    scalar,
    test_config,
    wait_for_listener,
    wait_for_progress,
    wait_until,
)
from workflows import CALLS, Mode, Ping, Start, TestWorkflow, TimerStart, TimerTestWorkflow

from ironflow_celery.engine.relay import (
    Kind,
    PublishError,
    Relay,
    RelayGroup,
    celery_publisher,
    celery_queue_depth,
    task_name,
)
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

T = TestWorkflow.type
TT = TimerTestWorkflow.type
TYPES = [T, TT]
FIRE_AND_FORGET = {"type": "Process", "mode": {"mode": "FireAndForget"}}


def make_relay(
    store: PostgresStore, publish: Any, config: Any = None, *, name: str = "relay-under-test"
) -> Relay:
    return Relay(
        "effect",
        store,
        TYPES,
        config or test_config(),
        publish,
        name=name,
        wake=threading.Event(),
        stop=threading.Event(),
    )


def queued_task_ids(queue: str) -> list[str]:
    """Task ids waiting in a Redis queue, in consumption order (kombu LPUSHes, BRPOPs)."""
    client = redis.Redis.from_url(BROKER_URL)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    return [json.loads(m)["headers"]["id"] for m in reversed(raw)]


def test_batch_claim_takes_due_rows_in_order_under_one_lease_token(
    store: PostgresStore, db: sa.Engine
) -> None:
    """One claim statement takes N rows: oldest first (created_at, id), registered types
    only, attempts < max, lease free; every row carries the batch's lease token."""
    created = "timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => :n)"

    def add(n: int, workflow_type: str = T, **columns: Any) -> uuid.UUID:
        sets = ", ".join(f"{c} = :{c}" for c in columns)
        row_id = insert_effect(db, workflow_type, f"w{n}", FIRE_AND_FORGET)
        execute(
            db,
            f"UPDATE ironflow.outbox SET created_at = {created}"
            + (f", {sets}" if sets else "")
            + " WHERE id = :id",
            n=n,
            id=row_id,
            **columns,
        )
        return row_id

    due = [add(n) for n in (5, 1, 3, 2, 4)]
    tie = [add(6), add(6)]  # same created_at: id breaks the tie
    add(0, "unregistered_type")
    add(0, attempts=3)  # a dead letter under max_attempts=3
    execute(
        db,
        "UPDATE ironflow.outbox SET locked_by = 'other', locked_until = now() + "
        "interval '1 hour' WHERE id = :id",
        id=add(0),
    )  # leased by another relay
    execute(
        db,
        "UPDATE ironflow.outbox SET attempts = 1, locked_until = now() + "
        "interval '1 hour' WHERE id = :id",
        id=add(0),
    )  # in backoff
    execute(db, "UPDATE ironflow.outbox SET processed_at = now() WHERE id = :id", id=add(0))
    execute(db, "UPDATE ironflow.outbox SET dead_lettered_at = now() WHERE id = :id", id=add(0))
    expected = [due[1], due[3], due[2], due[4], due[0], *sorted(tie)]

    # the claim statement orders and limits in SQL: the 3 oldest
    first = store.claim("effect", "tok-1", TYPES, lease_seconds=60, max_attempts=3, limit=3)
    assert [r.id for r in first] == expected[:3]
    assert {r.token for r in first} == {"tok-1"}

    # a relay step: the remaining due rows in ONE batch, published in claim order
    queue = f"t-{uuid.uuid4().hex}"
    app = celery_app(queue)
    try:
        relay = make_relay(store, celery_publisher(app), name="batch")
        assert relay.step() is True
        assert relay.claimed_total == len(expected) - 3
        assert queued_task_ids(queue) == [str(i) for i in expected[3:]]
        assert relay.step() is False  # nothing else is claimable
    finally:
        delete_queue(queue)
    claimed = rows(
        db,
        "SELECT id, locked_by, locked_until - now() AS lease FROM ironflow.outbox"
        " WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=[str(i) for i in expected[3:]],
    )
    assert {r.locked_by for r in claimed} == {"batch#1"}
    lease = relay.config.effect_lock_duration
    assert all(lease - 5 < r.lease.total_seconds() <= lease for r in claimed)
    untouched = scalar(
        db,
        "SELECT count(*) FROM ironflow.outbox WHERE id <> ALL(CAST(:ids AS uuid[]))"
        " AND locked_by LIKE 'batch%'",
        ids=[str(i) for i in expected],
    )
    assert untouched == 0


def test_listen_notify_wakes_an_idle_relay(store: PostgresStore) -> None:
    """An effect committed while the relay idles on a 60 s poll is published at once."""
    config = test_config(effect_poll_interval=60.0, timer_poll_interval=60.0)
    with running_app(store, config=config) as app:
        wait_for_listener(store.engine)
        time.sleep(1.0)  # let the relay finish its first (empty) round and go idle
        began = time.monotonic()
        app.service.execute(Start(id="wake", mode=Mode(mode="RouteResult")))
        app.wait_for_events(T, "wake", ["Started", "Completed"], timeout=45)
        took = time.monotonic() - began
    # A quarter of the poll: only a NOTIFY can have woken it (tolerant of a loaded machine).
    assert took < 15.0, f"took {took:.2f}s: the 60 s poll, not a NOTIFY, woke the relay"


def test_timer_relay_sleeps_until_fire_at(store: PostgresStore, db: sa.Engine) -> None:
    """A timer 300 ms out fires long before the 60 s timer poll would have found it, and
    never before its fire_at."""
    config = test_config(effect_poll_interval=60.0, timer_poll_interval=60.0)
    with running_app(store, config=config) as app:
        wait_for_listener(db)
        time.sleep(1.0)
        began = time.monotonic()
        app.service.execute(TimerStart(id="soon", timeout_secs=0.3, timer_key="soon"))
        wait_until(lambda: "TimedOut" in app.events(TT, "soon"), timeout=45)
        took = time.monotonic() - began
    [timer] = rows(db, "SELECT * FROM ironflow.timers WHERE workflow_id = 'soon'")
    assert timer.processed_at is not None and timer.processed_at >= timer.fire_at
    # A quarter of the poll: the relay slept until fire_at, it was not the poll that fired it.
    assert (timer.processed_at - timer.fire_at).total_seconds() < 15.0
    assert 0.25 <= took < 15.0, f"took {took:.2f}s"


@pytest.mark.timeout(600)  # the drain waits for progress, not for a wall time
@pytest.mark.parametrize("group", [1, 20], ids=["single-row", "grouped"])
def test_back_pressure_bounds_the_broker_queue(
    store: PostgresStore, db: sa.Engine, group: int
) -> None:
    """With max_in_flight=100 and a backlog of 20 times that (IRONFLOW_RELAY_BACKLOG=10000
    for the full size) nobody consumes, at most 100 rows are claimed and published (100
    messages one row each, or 5 groups of 20); once a worker starts, all of them complete,
    each once."""
    # 2,000 shows the bound as 10,000 does; draining 10,000 in-process took 181-323 s on
    # two busy cores, a third of the whole suite.
    n = int(os.environ.get("IRONFLOW_RELAY_BACKLOG", "2000"))
    # This test's own database only: skip the WAL flush per commit (20,000 ack commits
    # follow). Visibility and locking are unchanged; only crash durability is.
    name = scalar(db, "SELECT current_database()")
    execute(db, f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    store.dispose()
    execute(
        db,
        "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload)"
        " SELECT :wt, 'bp-' || g, CAST(:payload AS jsonb) FROM generate_series(1, :n) g",
        wt=T,
        payload=json.dumps(FIRE_AND_FORGET),
        n=n,
    )
    config = test_config(max_in_flight=100, claim_batch_size=100, effect_batch_size=group)
    app = TestApp(store, config=config, concurrency=8)
    messages = 100 // group
    with app:
        app.start(worker=False)
        wait_until(lambda: app.queue_length() >= messages, what=f"the first {messages} messages")
        deadline = time.monotonic() + 2.0
        samples = 0
        while time.monotonic() < deadline or samples < 10:  # 2 s and 10 samples at least
            assert app.queue_length() <= messages
            claimed = scalar(
                db,
                "SELECT count(*) FROM ironflow.outbox"
                " WHERE processed_at IS NULL AND locked_by IS NOT NULL",
            )
            assert claimed <= 100
            samples += 1
            time.sleep(0.05)
        assert samples >= 10
        assert app.queue_length() == messages  # it did fill up to the limit, and no further
        assert scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE locked_by IS NOT NULL") == 100
        app.start_worker()
        _wait_drained(db)
        assert app.queue_length() == 0
    assert len(CALLS.calls) == n
    assert set(CALLS.counter.values()) == {1}


def _wait_drained(db: sa.Engine) -> None:
    """Wait until every outbox row is processed; fail only if processing stalls (90 s)."""
    total = scalar(db, "SELECT count(*) FROM ironflow.outbox")
    wait_for_progress(
        lambda: scalar(db, "SELECT count(processed_at) FROM ironflow.outbox"),
        total,
        "the backlog to drain",
    )


def test_failed_publish_releases_claims_at_once(store: PostgresStore, db: sa.Engine) -> None:
    """A publish to an unreachable broker gives its claims back right away (no waiting
    for the lease), the relay keeps running, and nothing is lost."""
    ids = [insert_effect(db, T, f"pf{i}", FIRE_AND_FORGET) for i in range(3)]
    dead_app = celery_app(f"t-{uuid.uuid4().hex}", CLOSED_BROKER_URL)
    config = test_config(publish_retry_delay=0.1)

    def locked() -> int:
        return scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE locked_by IS NOT NULL")

    relay = make_relay(store, celery_publisher(dead_app), config)
    try:
        relay.step()
    except PublishError as exc:
        assert exc.published == []
    else:
        raise AssertionError("the publish should have failed")
    assert relay.claimed_total == 3
    assert locked() == 0
    assert scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE locked_until IS NOT NULL") == 0

    # the relay loop survives failed publishes and keeps retrying
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: relay.claimed_total >= 9, what="three more claim rounds")
        assert thread.is_alive()
    finally:
        relay.stop.set()
        relay.wake.set()
        thread.join(10)
    assert not thread.is_alive()
    assert locked() == 0
    assert all(r.attempts == 0 and r.processed_at is None for r in outbox(db))

    # nothing was lost: a relay with a working broker delivers every row
    with running_app(store):
        wait_until(
            lambda: (
                scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE processed_at IS NOT NULL")
                == 3
            )
        )
    assert sorted(CALLS.counter) == sorted(str(i) for i in ids)


@pytest.mark.timeout(600)  # waits for progress (90 s stall), not for a wall time
def test_two_relay_groups_never_claim_the_same_row(store: PostgresStore, db: sa.Engine) -> None:
    """Two relay groups (two relay threads each) on one database: every row is claimed
    by exactly one of them, both take part, and each handler runs once."""
    n = 500
    execute(
        db,
        "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload)"
        " SELECT :wt, 'rg-' || g, CAST(:payload AS jsonb) FROM generate_series(1, :n) g",
        wt=T,
        payload=json.dumps(FIRE_AND_FORGET),
        n=n,
    )
    config = test_config(effect_workers=2, max_in_flight=40, claim_batch_size=10)
    claims: list[tuple[str, uuid.UUID, str]] = []
    lock = threading.Lock()
    app = TestApp(store, config=config, concurrency=8)
    publish = celery_publisher(app.app)

    def recording(group: str):
        def publisher(kind: Kind, batch: Sequence[Sequence[ClaimedRow]]) -> list[uuid.UUID]:
            with lock:
                claims.extend((group, r.id, r.token) for m in batch for r in m)
            return publish(kind, batch)

        return publisher

    groups = [
        RelayGroup(store, TYPES, config, recording(name), worker_id=name, timers=False)
        for name in ("group-a", "group-b")
    ]
    with app:
        app.start(relays=False)
        for group in groups:
            group.start()
        try:
            _wait_drained(db)
        finally:
            for group in groups:
                assert group.stop(5)
    per_row = Counter(row_id for _, row_id, _ in claims)
    assert len(per_row) == n and set(per_row.values()) == {1}
    assert {g for g, _, _ in claims} == {"group-a", "group-b"}
    assert len(CALLS.calls) == n and set(CALLS.counter.values()) == {1}


def test_unregistered_type_is_never_claimed(store: PostgresStore, db: sa.Engine) -> None:
    """Rows of a type this deployment does not register are invisible to its claims."""
    ghosts = [insert_effect(db, "ghost_type", f"g{i}", {"type": "Boo"}) for i in range(3)]
    assert store.claim("effect", "t", TYPES, lease_seconds=60, max_attempts=3, limit=10) == []
    assert store.claim("effect", "t", [], lease_seconds=60, max_attempts=3, limit=10) == []
    with running_app(store) as app:
        app.service.execute(Ping(id="p"))  # keeps the relay busy with something real
        app.service.execute(Start(id="s", mode=Mode(mode="RouteResult")))
        app.wait_for_events(T, "s", ["Started", "Completed"])
    untouched = rows(
        db,
        "SELECT * FROM ironflow.outbox WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=[str(g) for g in ghosts],
    )
    assert len(untouched) == 3
    for row in untouched:
        assert row.locked_by is None and row.locked_until is None
        assert row.attempts == 0 and row.processed_at is None and row.last_error is None


def test_task_names_follow_the_workflow_type(store: PostgresStore) -> None:
    """Relays publish ``ironflow.<type>.effect|timer``; install registers exactly those."""
    assert task_name(T, "effect") == "ironflow.test_workflow.effect"
    assert task_name(TT, "timer") == "ironflow.timer_test.timer"
    app = TestApp(store)
    try:
        for wt in TYPES:
            for kind in ("effect", "timer"):
                assert f"ironflow.{wt}.{kind}" in app.app.tasks
    finally:
        app.stop()


def test_routed_queue_is_declared_before_any_worker_consumes_it(
    store: PostgresStore, db: sa.Engine
) -> None:
    """The relay declares each destination queue once per batch (not per message); a queue
    that only a route names, and no worker has declared yet, still receives every message."""
    default_queue = f"ironflow-test-default-{uuid.uuid4().hex[:8]}"
    routed = f"ironflow-test-routed-{uuid.uuid4().hex[:8]}"
    app = celery_app(default_queue)
    app.conf.task_routes = {task_name(T, "effect"): {"queue": routed}}
    ids = [insert_effect(db, T, f"routed-{i}", FIRE_AND_FORGET) for i in range(5)]
    try:
        relay = make_relay(store, celery_publisher(app))
        assert relay.step()
        assert sorted(queued_task_ids(routed)) == sorted(str(i) for i in ids)
        assert queued_task_ids(default_queue) == []
        client = redis.Redis.from_url(BROKER_URL)
        try:  # declared: kombu's Redis binding (exchange → queue) exists
            members = client.smembers(f"_kombu.binding.{routed}")
        finally:
            client.close()
        assert any(m.decode().endswith(routed) for m in members)
    finally:
        delete_queue(routed)
        delete_queue(default_queue)


def reconnect(app: Any) -> None:
    """Close the broker connection the app's producers publish on: the next publish
    connects again (what a broker restart or a dropped connection leads to)."""
    with app.producer_or_acquire() as producer:
        producer.connection.close()


def drop_queue(app: Any, queue: str) -> None:
    """Delete a queue, its messages and (Redis) its binding, as a broker restart without
    persistence would."""
    with app.connection_for_write() as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(queue)
    delete_queue(queue)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_new_broker_connection_declares_the_queue_again(
    store: PostgresStore, db: sa.Engine, broker: str
) -> None:
    """The publisher skips a declaration only while the connection that made it lives: a
    lone row published on a new connection, after its queue was deleted (a broker that
    restarted empty), still reaches the queue, and so does a message of several rows. On
    RabbitMQ a message for a queue that does not exist is dropped."""
    url = BROKER_URL if broker == "redis" else AMQP_URL
    if broker == "amqp":
        require_rabbitmq()
    default_queue = f"ironflow-test-default-{uuid.uuid4().hex[:8]}"
    routed = f"ironflow-test-redeclared-{uuid.uuid4().hex[:8]}"
    app = celery_app(default_queue, url)
    app.conf.task_routes = {task_name(T, "effect"): {"queue": routed}}
    depth = celery_queue_depth(app)
    relay = make_relay(store, celery_publisher(app))
    relay.group_sizes = {T: 10}
    try:
        insert_effect(db, T, "lone-1", FIRE_AND_FORGET)
        assert relay.step()
        wait_until(lambda: depth(routed) == 1, 30, what="the first lone message queued")
        drop_queue(app, routed)
        reconnect(app)
        insert_effect(db, T, "lone-2", FIRE_AND_FORGET)
        assert relay.step()
        wait_until(lambda: depth(routed) == 1, 30, what="the lone message after a reconnect")
        drop_queue(app, routed)
        reconnect(app)
        for i in range(3):
            insert_effect(db, T, f"group-{i}", FIRE_AND_FORGET)
        assert relay.step() and relay.published_total == 5
        wait_until(lambda: depth(routed) == 1, 30, what="one message of three rows")
    finally:
        drop_queue(app, routed)
        drop_queue(app, default_queue)
