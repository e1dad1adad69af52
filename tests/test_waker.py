"""The relays' LISTEN connection (`Waker`) listens on nothing while every effect relay of
its process lets other relays answer NOTIFYs (issue 21, row 11).

PostgreSQL signals every listening backend on every notifying commit, whatever the
channel: four relay processes cost four wake-ups per effect although one of them takes
the work. A relay that yields (`Relay._yield_delay`) tells its waker; once every effect
relay of the process does, the waker sends ``UNLISTEN *``, and it LISTENs again before the
first of them claims. These tests run a real waker against the test database.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from runtime_helpers import execute, insert_effect, scalar, test_config, wait_until
from workflows import TestWorkflow

from ironflow_celery.engine.relay import YIELD_MAX, Kind, Relay, Waker
from ironflow_celery.storage.kinds import EFFECT, TIMER
from ironflow_celery.storage.store import ClaimedRow, PostgresStore


@pytest.fixture
def waker(db: sa.Engine) -> Iterator[tuple[Waker, str]]:
    """A started waker on the test database, and its connection's application_name."""
    name = f"waker-{uuid.uuid4().hex[:8]}"
    stop = threading.Event()
    w = Waker(
        db.url.set(drivername="postgresql").render_as_string(hide_password=False),
        stop,
        connect_params={"application_name": name},
    )
    w.start()
    yield w, name
    stop.set()
    w.join(10)


def last_statement(db: sa.Engine, name: str) -> str | None:
    return scalar(
        db,
        "SELECT query FROM pg_stat_activity WHERE application_name = :n AND state = 'idle'",
        n=name,
    )


def notify(db: sa.Engine, channel: str, payload: str) -> None:
    execute(db, "SELECT pg_notify(:c, :p)", c=channel, p=payload)


def test_a_waker_listens_on_nothing_while_its_effect_relays_yield(
    db: sa.Engine, waker: tuple[Waker, str]
) -> None:
    w, name = waker
    effects, timers = w.event(EFFECT), w.event(TIMER)
    relays = [effects.join(), effects.join()]  # two effect relays share the waker
    wait_until(effects.listening.is_set, what="the first LISTEN")
    notify(db, EFFECT.channel, "heard")
    wait_until(lambda: effects.count(["heard"]) == 1, what="a NOTIFY while listening")

    # One relay yielding is not enough: the other still answers.
    effects.deafen(relays[0], 30.0)
    notify(db, EFFECT.channel, "heard")
    wait_until(lambda: effects.count(["heard"]) == 2, what="a NOTIFY with one relay deaf")
    assert effects.listening.is_set()

    # Both yield: nothing is listened to, on either channel.
    effects.deafen(relays[1], 30.0)
    wait_until(lambda: last_statement(db, name) == "UNLISTEN *", what="UNLISTEN *")
    assert not effects.listening.is_set() and not timers.listening.is_set()
    notify(db, EFFECT.channel, "unheard")
    notify(db, TIMER.channel, "unheard")
    timers.clear()

    # One comes back: `hear` returns once the LISTEN is in effect, so a NOTIFY committed
    # right after it (what a claim made next would miss) is delivered.
    assert effects.hear(relays[1], timeout=30.0)
    notify(db, EFFECT.channel, "after")
    wait_until(lambda: effects.count(["after"]) == 1, what="the NOTIFY after hear()")
    # The timer relays are woken to look for a timer scheduled during the spell.
    wait_until(timers.is_set, what="the timer relays woken after the spell")
    # What was sent during the spell never arrives (the waker's LISTENs came after it).
    assert effects.count(["unheard"]) == 0 and timers.count(["unheard"]) == 0
    assert effects.count(["heard"]) == 2


def test_a_deaf_spell_ends_with_the_listen_already_back(
    db: sa.Engine, waker: tuple[Waker, str]
) -> None:
    """The waker LISTENs again a little before the spell ends: the relay back from it finds
    the LISTEN in effect and claims without waiting for it."""
    w, name = waker
    effects = w.event(EFFECT)
    relay = effects.join()
    wait_until(effects.listening.is_set, what="the first LISTEN")
    effects.deafen(relay, 3.0)
    wait_until(lambda: not effects.listening.is_set(), what="the spell's UNLISTEN")
    wait_until(effects.listening.is_set, what="the LISTEN before the spell ends")
    assert last_statement(db, name) == f"LISTEN {TIMER.channel}"
    assert effects.hear(relay, timeout=0.0)


def test_a_waker_without_effect_relays_keeps_listening(
    db: sa.Engine, waker: tuple[Waker, str]
) -> None:
    """A process that runs timer relays only has no effect relay to yield: it listens."""
    w, _ = waker
    timers = w.event(TIMER)
    timers.join()
    wait_until(timers.listening.is_set, what="the first LISTEN")
    notify(db, TIMER.channel, "t")
    wait_until(lambda: timers.count(["t"]) == 1, what="a timer NOTIFY")


def test_a_yielding_relay_claims_only_once_its_waker_listens_again(
    store: PostgresStore, db: sa.Engine, waker: tuple[Waker, str]
) -> None:
    """A relay that lets others answer a NOTIFY (its claims keep finding nothing) makes its
    waker listen on nothing meanwhile, and claims the notified row after its wait with the
    LISTEN back in effect: a row committed after that claim would wake it."""
    w, name = waker
    effects = w.event(EFFECT)
    listening_at_claim: list[bool] = []

    def publish(kind: Kind, messages: list[list[ClaimedRow]]) -> list[uuid.UUID]:
        listening_at_claim.append(effects.listening.is_set())
        return [r.id for m in messages for r in m]

    stop = threading.Event()
    relay = Relay(
        "effect",
        store,
        [TestWorkflow.type],
        test_config(),
        publish,
        name="yielding",
        wake=effects,
        stop=stop,
    )
    relay._rows_avg = 0.0  # its claims found nothing for a while: another relay takes the rows
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        wait_until(effects.listening.is_set, what="the first LISTEN")
        wait_until(lambda: relay._due_checked_at > 0, what="the relay's first empty claim")
        assert relay._yield_delay() == YIELD_MAX
        insert_effect(db, TestWorkflow.type, "yield-1", {"type": "Noop"})
        notify(db, EFFECT.channel, TestWorkflow.type)
        wait_until(lambda: last_statement(db, name) == "UNLISTEN *", what="the spell's UNLISTEN")
        wait_until(lambda: listening_at_claim, what="the claim after the spell")
        assert listening_at_claim == [True]
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_a_waker_that_lost_its_connection_in_a_spell_listens_again(
    db: sa.Engine, waker: tuple[Waker, str]
) -> None:
    """The LISTEN connection cut while its relays do not listen: it reconnects, and the
    relay back from its spell still finds the LISTEN in effect before it claims."""
    w, name = waker
    effects = w.event(EFFECT)
    relay = effects.join()
    wait_until(effects.listening.is_set, what="the first LISTEN")
    effects.deafen(relay, 30.0)
    wait_until(lambda: last_statement(db, name) == "UNLISTEN *", what="the spell's UNLISTEN")
    old = scalar(db, "SELECT pid FROM pg_stat_activity WHERE application_name = :n", n=name)
    execute(db, "SELECT pg_terminate_backend(:pid)", pid=old)
    # Reconnected (a new backend), still listening on nothing: the relay is still deaf.
    wait_until(
        lambda: scalar(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :n AND pid <> :old",
            n=name,
            old=old,
        ),
        what="the waker's new connection",
    )
    assert not effects.listening.is_set()
    assert effects.hear(relay, timeout=30.0)
    notify(db, EFFECT.channel, "after")
    wait_until(lambda: effects.count(["after"]) == 1, what="the NOTIFY after hear()")
