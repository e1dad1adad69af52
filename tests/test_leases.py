"""Waiting is not failing (DESIGN invariant 10): the leases of published, unstarted rows.

A relay keeps the lease of each row it published alive until a worker's start guard takes
the row over, so a message that waits in the broker longer than one lease is never claimed
and published a second time; a relay that dies stops renewing, so its rows come back after
one lease; and a row that does not start within ``dispatch_timeout`` is given up. Its
back-pressure counts exactly those waiting rows (``max_in_flight``).

These tests let real time pass beyond short leases (1 s): that passing time *is* the
condition under test. They wait for outcomes with generous bounds.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import (
    RecordingEvent,
    insert_effect,
    insert_timer,
    rows,
    scalar,
    test_config,
    wait_until,
)
from workflows import TestWorkflow, TimerTestWorkflow

import ironflow_celery.engine.relay as relay_module
from ironflow_celery.engine.relay import DISPATCH_HOLD_MIN, Kind, Relay
from ironflow_celery.model.config import RuntimeConfig
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

T = TestWorkflow.type
TT = TimerTestWorkflow.type
FIRE_AND_FORGET = {"type": "Process", "mode": {"mode": "FireAndForget"}}
LEASE = 1.0


class Recorder:
    """A publisher that keeps what it was asked to publish (the broker holds it forever)."""

    def __init__(self) -> None:
        self.published: list[uuid.UUID] = []
        self.lock = threading.Lock()

    def __call__(self, kind: Kind, messages: Sequence[Sequence[ClaimedRow]]) -> list[uuid.UUID]:
        ids = [r.id for m in messages for r in m]
        with self.lock:
            self.published.extend(ids)
        return ids


def relay_of(
    kind: Kind, store: PostgresStore, config: RuntimeConfig, name: str, publish: Any = None
) -> Relay:
    return Relay(
        kind,
        store,
        [T, TT],
        config,
        publish or Recorder(),
        name=name,
        wake=threading.Event(),
        stop=threading.Event(),
    )


@contextmanager
def running(relay: Relay) -> Iterator[Relay]:
    thread = threading.Thread(target=relay.run, name=f"test-{relay.name}", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop.set()
        relay.wake.set()
        thread.join(10)
        assert not thread.is_alive()


def insert_rows(db: sa.Engine, kind: Kind, n: int) -> list[uuid.UUID]:
    if kind == "effect":
        return [insert_effect(db, T, f"w{i}", FIRE_AND_FORGET) for i in range(n)]
    return [
        insert_timer(db, TT, f"w{i}", {"type": "TimeoutFired", "id": f"w{i}"}) for i in range(n)
    ]


def table(kind: Kind) -> str:
    return "ironflow.outbox" if kind == "effect" else "ironflow.timers"


def lease_config(**changes: Any) -> RuntimeConfig:
    return test_config(effect_lock_duration=LEASE, timer_lock_duration=LEASE, **changes)


@pytest.mark.parametrize("kind", ["effect", "timer"])
def test_waiting_rows_keep_their_lease_while_their_relay_lives(
    kind: Kind, store: PostgresStore, db: sa.Engine
) -> None:
    """Rows published but not started stay held by their claim for many leases: a rival
    relay claims none of them and each is published exactly once."""
    ids = insert_rows(db, kind, 5)
    config = lease_config()
    owner = relay_of(kind, store, config, "owner")
    rival = relay_of(kind, store, config, "rival")
    with running(owner):
        wait_until(lambda: len(owner.publish.published) == 5, 30, what="the first claim")
        began = time.monotonic()
        while time.monotonic() - began < 4 * LEASE:  # four leases pass without a worker
            assert rival.step() is False, "a rival re-claimed a row whose message waits"
            time.sleep(0.1)
        assert sorted(owner.publish.published) == sorted(ids)
        assert owner.renewed_total >= 5
        held = rows(
            db,
            f"SELECT locked_by, locked_until > now() AS live FROM {table(kind)}"
            " WHERE id = ANY(CAST(:ids AS uuid[]))",
            ids=[str(i) for i in ids],
        )
        assert {(r.locked_by.split("#")[0], r.live) for r in held} == {("owner", True)}
    assert rival.claimed_total == 0


def test_rows_claimed_behind_a_backlog_take_the_renewal_hold_at_once(
    store: PostgresStore, db: sa.Engine
) -> None:
    """A claim made while the relay's earlier rows still wait a third of a lease after
    they were published holds its rows for the renewal hold (30 s at least) at once: they
    would wait as long, and renewing each one would be a second write per row. A claim
    with nothing waiting takes one lease."""
    first, second = insert_rows(db, "effect", 2)
    relay = relay_of("effect", store, lease_config(claim_batch_size=1), "backlog")

    def held_for(row_id: uuid.UUID) -> float:
        return float(
            scalar(
                db,
                "SELECT EXTRACT(EPOCH FROM locked_until - now()) FROM ironflow.outbox"
                " WHERE id = :id",
                id=str(row_id),
            )
        )

    assert relay.step() is True  # nothing waits yet: one lease
    assert list(relay.in_flight) == [first]
    assert held_for(first) <= LEASE
    time.sleep(LEASE / 2)  # the first row still waits, past a third of its lease
    assert relay.step() is True  # renews the first row, then claims the second behind it
    assert set(relay.in_flight) == {first, second}
    assert held_for(second) > DISPATCH_HOLD_MIN - 10
    assert relay.renewed_total == 1  # the first row only
    time.sleep(LEASE / 2)
    relay.keep_alive()  # the second row is not due for renewal for a third of its hold
    assert relay.renewed_total == 1


def test_the_look_for_lost_messages_skips_rows_a_worker_started(
    store: PostgresStore, db: sa.Engine
) -> None:
    """Before it looks in the broker (and asks every worker by broadcast), the relay drops
    the rows a worker already started: their messages are in no queue and unacknowledged
    nowhere, yet they are not lost. Only the rows still waiting under its claim are looked
    for, and the started ones are no longer tracked."""
    ids = insert_rows(db, "effect", 3)
    looked_for: list[set[uuid.UUID]] = []

    def find_lost(rows: Sequence[uuid.UUID], older_than: float, queues: Any) -> set[uuid.UUID]:
        looked_for.append(set(rows))
        return set()

    relay = Relay(
        "effect",
        store,
        [T, TT],
        lease_config(),
        Recorder(),
        name="looker",
        wake=threading.Event(),
        stop=threading.Event(),
        find_lost=find_lost,
    )
    assert relay.step() is True
    started = ids[0]
    assert store.start("effect", started, relay.in_flight[started].token, "run", lease_seconds=60)
    time.sleep(1.2)  # past the look's age bound (a third of the lease, one second at least)
    relay.release_lost()
    wait_until(lambda: bool(looked_for), 30, what="the look")
    assert looked_for == [set(ids[1:])]
    assert started not in relay.in_flight


@pytest.mark.parametrize("kind", ["effect", "timer"])
def test_a_dead_relays_rows_come_back_after_one_lease(
    kind: Kind, store: PostgresStore, db: sa.Engine
) -> None:
    """A relay that stops renewing (it died) gives its rows back when their lease ends."""
    ids = insert_rows(db, kind, 3)
    config = lease_config()
    dead = relay_of(kind, store, config, "dead")
    assert dead.step() is True  # claims and publishes, then never runs again
    rival = relay_of(kind, store, config, "rival")
    assert rival.step() is False
    wait_until(rival.step, 30, what="the dead relay's rows to come back")
    assert sorted(rival.publish.published) == sorted(ids)


def test_rows_not_started_within_dispatch_timeout_are_given_up(
    store: PostgresStore,
    db: sa.Engine,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message the broker lost leaves its row waiting forever: after dispatch_timeout the
    relay stops renewing it (and says so), so it is claimed and published again once its
    last renewal's hold ends (shortened here from 30 s: the test waits for it)."""
    monkeypatch.setattr(relay_module, "DISPATCH_HOLD_MIN", 2.0)
    ids = insert_rows(db, "effect", 2)
    config = lease_config(dispatch_timeout=1.5)
    owner = relay_of("effect", store, config, "owner")
    caplog.set_level(logging.WARNING, logger="ironflow_celery.relay")
    with running(owner):
        wait_until(lambda: owner.given_up_total == 2, 30, what="the rows to be given up")
        # Given up: no longer renewed, so their leases run out and they are published again
        # (by this relay here, the only one running).
        wait_until(lambda: len(owner.publish.published) >= 4, 30, what="a second publish")
    assert sorted(set(owner.publish.published)) == sorted(ids)
    assert "did not start within" in caplog.text


def test_back_pressure_counts_the_rows_that_wait_to_start(
    store: PostgresStore, db: sa.Engine
) -> None:
    """max_in_flight bounds the published rows not yet started: a started row frees its
    place at once, whatever its handler takes; an unstarted one keeps it for many leases."""
    ids = insert_rows(db, "effect", 6)
    config = lease_config(max_in_flight=3, claim_batch_size=3)
    relay = relay_of("effect", store, config, "bp")
    assert relay.step() is True
    assert len(relay.in_flight) == 3
    first = relay.publish.published[0]
    token = relay.in_flight[first].token
    started = store.start("effect", first, token, "run-token", lease_seconds=60)
    assert started is not None
    assert relay.capacity() == 1
    time.sleep(2 * LEASE)  # two leases: the waiting two keep their places
    relay.keep_alive()
    assert relay.capacity() == 1
    assert relay.step() is True
    assert len(relay.publish.published) == 4
    assert scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE locked_by IS NOT NULL") == 4
    assert set(relay.publish.published) <= set(ids)


@pytest.mark.parametrize("case", ["backlog", "started", "ungrouped"])
def test_a_claim_behind_a_backlog_waits_for_rows_to_gather(
    case: str, store: PostgresStore, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows arriving while rows the relay published earlier still wait (no worker here;
    more than the quarter of a claim batch that counts as a backlog) are claimed a moment
    later than they could be, so that more travel together: at most as long after the
    last claim as the oldest waiting row has waited. No wait when the rows ahead started
    (a trickle the workers keep up with), nor for types that travel one row per message
    (grouping off)."""
    # A long window, and a look at every claim: the test's steps may be slow to come.
    monkeypatch.setattr(relay_module, "CLAIM_DEFER", 60.0)
    monkeypatch.setattr(relay_module, "BACKLOG_CHECK_EVERY", 0.0)
    stop = RecordingEvent()
    relay = Relay(
        "effect",
        store,
        [T],
        RuntimeConfig(),
        Recorder(),
        name="gather",
        wake=threading.Event(),
        stop=stop,
        group_sizes={} if case == "ungrouped" else {T: 100},
    )
    waiting = RuntimeConfig().claim_batch_size // 4 + 5  # `Relay._min_claim` and more
    backlog = [insert_effect(db, T, f"backlog-{i}", FIRE_AND_FORGET) for i in range(waiting)]
    assert relay.step() is True  # the backlog: every due row, fewer than a batch
    time.sleep(2.0)  # it waits in the broker: nobody consumes
    for i in range(2):
        insert_effect(db, T, f"more-{i}", FIRE_AND_FORGET)
    assert relay.step() is True  # 2 more rows
    if case == "started":  # a worker's start guard took the backlog over (a run token)
        with db.begin() as conn:
            conn.execute(
                sa.text("UPDATE ironflow.outbox SET locked_by = 'run' WHERE id = ANY(:ids)"),
                {"ids": backlog},
            )
    stop.waits.clear()
    last = insert_effect(db, T, "last", FIRE_AND_FORGET)
    assert relay.step() is True
    assert last in relay.in_flight
    gathered = [w for w in stop.waits if w]
    if case == "backlog":
        # the oldest row has waited 2 s: the claim comes up to 2 s after the last one
        assert len(gathered) == 1 and 0.5 < gathered[0] <= 2.5, stop.waits
    else:
        assert gathered == [], stop.waits
