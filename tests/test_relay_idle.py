"""Idle relays (issue 20 §3): an idle relay costs the database at most one statement a
second, and still starts new work at once -- woken by NOTIFY, and at the next due time of
a backoff or of a lease that runs out, never only by its (slow) safety poll.

Statements are counted on the client, from SQLAlchemy's events on the store's engines (a
statement, a BEGIN, a COMMIT/ROLLBACK, and the ping of a connection that idled). The
relays' LISTEN connection sends nothing while it waits. Timing bounds are functional
(seconds against a 600 s safety poll), never performance targets.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from runtime_helpers import (
    RecordingEvent,
    insert_effect,
    insert_timer,
    running_app,
    scalar,
    test_config,
    wait_for_listener,
    wait_until,
)
from workflows import CALLS, Mode, Start, TestWorkflow, TimerTestWorkflow

from ironflow_celery.engine.relay import BLOCKED_POLL, Kind, Relay, RelayGroup
from ironflow_celery.model.config import RetryPolicy, RuntimeConfig
from ironflow_celery.storage.db import IDLE_PING_AFTER
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

T = TestWorkflow.type
TT = TimerTestWorkflow.type
SLOW_POLL = 600.0  # a safety poll this slow cannot be what starts the work below
FIRE_AND_FORGET = {"type": "Process", "mode": {"mode": "FireAndForget"}}


class StatementCounter:
    """Round trips the store's engines send to PostgreSQL, counted as they are sent."""

    def __init__(self, engines: Sequence[sa.Engine]) -> None:
        self.engines = list(engines)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._listeners: list[tuple[Any, str, Any]] = []

    def _bump(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def _listen(self, target: Any, name: str, fn: Any) -> None:
        sa.event.listen(target, name, fn)
        self._listeners.append((target, name, fn))

    def __enter__(self) -> StatementCounter:
        def on_begin(conn: Any) -> None:
            if not conn.connection.dbapi_connection.autocommit:
                self._bump("begin")

        def on_end(conn: Any, kind: str) -> None:
            status = conn.connection.dbapi_connection.info.transaction_status
            if status != psycopg.pq.TransactionStatus.IDLE:
                self._bump(kind)

        def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            # The engine pings a connection that sat idle this long (storage.db).
            last = record.info.get("ironflow_checkin")
            if last is not None and time.monotonic() - last >= IDLE_PING_AFTER:
                self._bump("ping")

        for engine in self.engines:
            self._listen(engine, "before_cursor_execute", lambda *a, **k: self._bump("statement"))
            self._listen(engine, "begin", on_begin)
            self._listen(engine, "commit", lambda conn: on_end(conn, "commit"))
            self._listen(engine, "rollback", lambda conn: on_end(conn, "rollback"))
            self._listen(engine.pool, "checkout", on_checkout)
        return self

    def __exit__(self, *exc: object) -> None:
        for target, name, fn in self._listeners:
            sa.event.remove(target, name, fn)


def store_engines(store: PostgresStore) -> list[sa.Engine]:
    """Every engine the store may run a relay's statements on."""
    engines = {id(e): e for e in (store.engine, getattr(store, "ack_engine", store.engine))}
    return list(engines.values())


@contextmanager
def relay_group(
    store: PostgresStore, config: RuntimeConfig, published: list[uuid.UUID]
) -> Iterator[RelayGroup]:
    """An effect and a timer relay (one process's group), publishing into `published`."""

    def publish(kind: Kind, messages: Sequence[Sequence[ClaimedRow]]) -> list[uuid.UUID]:
        ids = [r.id for m in messages for r in m]
        published.extend(ids)
        return ids

    group = RelayGroup(store, [T], config, publish, worker_id="idle-test")
    group.start()
    try:
        yield group
    finally:
        assert group.stop(10)


def test_idle_relay_runs_at_most_one_statement_a_second(
    store: PostgresStore, db: sa.Engine
) -> None:
    """With the default settings, an effect relay and a timer relay with nothing to do
    send at most one statement a second between them (it was ~12/s: a claim every
    0.1 s, and a timer claim plus its next-due look every second)."""
    published: list[uuid.UUID] = []
    with (
        StatementCounter(store_engines(store)) as counter,
        relay_group(store, RuntimeConfig(), published),
    ):
        wait_for_listener(db)
        # Both relays' first (empty) rounds are done once the count stops moving briefly.
        wait_until(lambda: counter.total() >= 2, what="the relays' first rounds")
        time.sleep(1.0)
        before, began = counter.total(), time.monotonic()
        # The window measured: long enough that a probe more or less at its two ends (two
        # relays, each a statement and a ping per 5 s safety poll) cannot decide it.
        time.sleep(25.0)
        sent, window = counter.total() - before, time.monotonic() - began
    assert published == []
    assert sent <= window, (
        f"{sent} statements in {window:.1f}s ({sent / window:.1f}/s; {dict(counter.counts)})"
    )


def test_new_work_starts_promptly_on_an_idle_relay(store: PostgresStore) -> None:
    """An effect submitted to a relay that has idled for a while starts at once: NOTIFY
    wakes it, not the safety poll (set to 600 s here so the two cannot be confused)."""
    config = RuntimeConfig(effect_poll_interval=SLOW_POLL, timer_poll_interval=SLOW_POLL)
    with running_app(store, config=config) as app:
        wait_for_listener(store.engine)
        time.sleep(3.0)  # idle: past its first rounds, asleep on the safety poll
        began = time.monotonic()
        app.service.execute(Start(id="idle-wake", mode=Mode(mode="RouteResult")))
        app.wait_for_events(T, "idle-wake", ["Started", "Completed"], timeout=45)
        took = time.monotonic() - began
    assert took < 15.0, f"took {took:.2f}s: the safety poll, not a NOTIFY, woke the relay"


def test_a_backoff_wakes_an_idle_relay_when_it_ends(store: PostgresStore) -> None:
    """An effect whose first attempt fails is retried when its backoff ends: the failure
    NOTIFYs the relays, which then sleep until the backoff's end, not the safety poll."""
    config = test_config(
        effect_poll_interval=SLOW_POLL,
        timer_poll_interval=SLOW_POLL,
        retry_policy=RetryPolicy(max_attempts=3, base_delay=0.5),
    )
    with running_app(store, config=config) as app:
        wait_for_listener(store.engine)
        time.sleep(1.0)
        began = time.monotonic()
        app.service.execute(Start(id="retry", mode=Mode(mode="TransientFailure")))
        app.wait_for_events(T, "retry", ["Started", "Completed"], timeout=45)
        took = time.monotonic() - began
    assert [attempt for _, attempt in CALLS.calls] == [1, 2]
    assert took < 15.0, f"took {took:.2f}s: the retry waited for the safety poll"


def test_a_dead_relays_lease_is_reclaimed_when_it_runs_out(
    store: PostgresStore, db: sa.Engine
) -> None:
    """A row claimed by a relay that died comes back when its lease ends: the idle relay
    learnt that time (its next-due look) and sleeps until then, not the safety poll."""
    row = insert_effect(db, T, "orphan", FIRE_AND_FORGET)
    [claimed] = store.claim("effect", "dead-relay#1", [T], lease_seconds=2.0, max_attempts=5)
    assert claimed.id == row
    config = RuntimeConfig(effect_poll_interval=SLOW_POLL, timer_poll_interval=SLOW_POLL)
    published: list[uuid.UUID] = []
    began = time.monotonic()
    with relay_group(store, config, published):
        wait_until(lambda: published, timeout=45, what="the orphaned row to be re-claimed")
    took = time.monotonic() - began
    assert published == [row]
    assert took < 15.0, f"took {took:.2f}s (lease 2 s, safety poll {SLOW_POLL:g} s)"


def timer_relay(store: PostgresStore, published: list[uuid.UUID]) -> Relay:
    def publish(kind: Kind, messages: Sequence[Sequence[ClaimedRow]]) -> list[uuid.UUID]:
        ids = [r.id for m in messages for r in m]
        published.extend(ids)
        return ids

    return Relay(
        "timer",
        store,
        [TT],
        RuntimeConfig(),
        publish,
        name="due-test",
        wake=RecordingEvent(),
        stop=threading.Event(),
    )


def test_a_timer_that_became_due_while_the_claim_ran_is_not_taken_for_blocked(
    store: PostgresStore, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay woken for a timer can claim a moment before it is due (its claim comes
    back empty), then find it due in its next-due look. That row became due while the
    claim ran: the relay claims it at once. It used to take it for a row blocked by a
    concurrent claim, poll every `BLOCKED_POLL` (0.1 s) from then on, and fire timers up
    to that late (benchmark row 5: p99 113 ms in about one run in three)."""
    timer = insert_timer(db, TT, "due-soon", {"type": "TimeoutFired", "id": "due-soon"}, delay=2.0)
    published: list[uuid.UUID] = []
    relay = timer_relay(store, published)
    real_claim = store.claim

    def claim_that_ends_after_the_timer_is_due(*args: Any, **kwargs: Any) -> list[ClaimedRow]:
        claimed = real_claim(*args, **kwargs)
        wait_until(
            lambda: scalar(
                db,
                "SELECT fire_at < now() - interval '50 milliseconds' FROM ironflow.timers"
                " WHERE id = :id",
                id=timer,
            ),
            what="the timer to become due",
        )
        return claimed

    monkeypatch.setattr(store, "claim", claim_that_ends_after_the_timer_is_due)
    assert relay.step() is False, "claimed before it was due (the machine stalled 2 s?)"
    monkeypatch.setattr(store, "claim", real_claim)
    assert published == []
    relay.idle_wait()
    wake = relay.wake
    assert isinstance(wake, RecordingEvent)
    [timeout] = wake.waits
    assert timeout is not None and timeout < BLOCKED_POLL, (
        f"waits {timeout} s for a timer that is due now"
    )
    assert relay.step() is True
    assert published == [timer]


def test_claims_that_find_rows_lift_a_block(store: PostgresStore, db: sa.Engine) -> None:
    """A relay that found a due row it could not claim (held, or its type at its
    concurrency limit) polls every `BLOCKED_POLL`. Once its claims find rows again it
    looks at the next due time again, and sleeps until then. It used to keep polling
    every 0.1 s for as long as claims found rows: a steady stream of timers then fired
    up to 0.1 s late, indefinitely."""
    published: list[uuid.UUID] = []
    relay = timer_relay(store, published)
    relay._blocked = True  # what a look that found a due row held elsewhere leaves
    relay._due = time.monotonic() - 1.0
    now = insert_timer(db, TT, "now", {"type": "TimeoutFired", "id": "now"})
    insert_timer(db, TT, "later", {"type": "TimeoutFired", "id": "later"}, delay=60.0)
    assert relay.step() is True
    assert published == [now]
    relay.idle_wait()
    wake = relay.wake
    assert isinstance(wake, RecordingEvent)
    [timeout] = wake.waits
    assert timeout is not None and timeout > 1.0, (
        f"polls every {timeout} s though the next timer is due in 60 s"
    )
