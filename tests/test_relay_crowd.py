"""Crowded relays (issue 20 §3): four relays sharing one database cost about what one costs.

Every NOTIFY wakes every relay; before, all of them claimed on each one and all but one
found nothing (3.5x the statements of a single relay on a stream of inputs). Now a relay
whose claims keep coming back empty lets the one taking the work answer first. The
figures on real processes are benchmark row 11; this test checks the mechanism in one
process (four relay groups, each with its own LISTEN connection, like four hosts).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from runtime_helpers import execute, scalar, wait_for_progress, wait_until
from test_relay_idle import FIRE_AND_FORGET, StatementCounter, T, store_engines

from ironflow_celery.engine.relay import Kind, RelayGroup
from ironflow_celery.model.config import RuntimeConfig
from ironflow_celery.storage.kinds import EFFECT
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

N = 600  # effects streamed to each set of relays (the first dozen NOTIFYs all four answer)
PACE = 0.01  # seconds between two decisions: a steady stream, each commit a NOTIFY


def stream(db: sa.Engine, prefix: str) -> None:
    """N effects, each inserted and notified in its own transaction (as decisions do), on
    a connection of its own (the engines counted are the relays')."""
    writer = sa.create_engine(db.url, poolclass=sa.pool.NullPool)
    try:
        with writer.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            for i in range(N):
                conn.execute(
                    sa.text(
                        "WITH e AS (INSERT INTO ironflow.outbox"
                        " (workflow_type, workflow_id, payload)"
                        " VALUES (:wt, :wid, CAST(:payload AS jsonb)) RETURNING 1)"
                        " SELECT pg_notify('ironflow_effects', :wt) FROM e"
                    ),
                    {"wt": T, "wid": f"{prefix}{i}", "payload": json.dumps(FIRE_AND_FORGET)},
                )
                time.sleep(PACE)
    finally:
        writer.dispose()


def listeners(db: sa.Engine) -> int:
    return scalar(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query ILIKE 'LISTEN ironflow_timers%'",
    )


def relay_statements(store: PostgresStore, db: sa.Engine, relays: int) -> tuple[float, float]:
    """Statements per effect that `relays` relay groups send while N effects stream in, and
    the NOTIFYs their LISTEN connections receive per effect."""
    published: list[uuid.UUID] = []
    lock = threading.Lock()

    def publish(kind: Kind, messages: Sequence[Sequence[ClaimedRow]]) -> list[uuid.UUID]:
        ids = [r.id for m in messages for r in m]
        with lock:
            published.extend(ids)
        return ids

    config = RuntimeConfig(max_in_flight=10 * N)
    groups = [
        RelayGroup(store, [T], config, publish, worker_id=f"crowd-{relays}-{i}", timers=False)
        for i in range(relays)
    ]
    with StatementCounter(store_engines(store)) as counter:
        for group in groups:
            group.start()
        try:
            wait_until(lambda: listeners(db) >= relays, what=f"{relays} LISTEN connections")
            time.sleep(1.0)  # every relay past its first round
            before = counter.total()
            heard_before = heard(groups)
            stream(db, f"crowd{relays}-")
            wait_for_progress(lambda: len(published), N, f"{relays} relays to publish")
            sent = counter.total() - before
            received = heard(groups) - heard_before
        finally:
            for group in groups:
                assert group.stop(10)
    assert len(published) == N and len(set(published)) == N  # each row claimed once
    # These rows are done with: the next set of relays starts from an empty outbox.
    execute(db, "UPDATE ironflow.outbox SET processed_at = now(), locked_by = NULL")
    return sent / N, received / N


def heard(groups: Sequence[RelayGroup]) -> int:
    """The effect NOTIFYs the groups' LISTEN connections received so far."""
    return sum(g.waker.event(EFFECT).count([T]) for g in groups)


@pytest.mark.scale  # several relays or worker groups at once: its own CI step
@pytest.mark.timeout(600)
def test_four_relays_cost_about_what_one_costs(store: PostgresStore, db: sa.Engine) -> None:
    """The same stream of effects, to one relay and then to four: the four together send
    at most 1.6 times the statements of the one (they sent 4 times as many), and their
    LISTEN connections receive at most 2 NOTIFYs per effect, not 4: the relays that let
    the others answer stop listening meanwhile (each listener costs PostgreSQL a wake-up
    per NOTIFY)."""
    one, one_heard = relay_statements(store, db, 1)
    four, four_heard = relay_statements(store, db, 4)
    assert scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE processed_at IS NULL") == 0
    assert four <= 1.6 * one, f"1 relay: {one:.2f}, 4 relays: {four:.2f} statements per effect"
    assert one_heard >= 0.95, f"a lone relay heard {one_heard:.2f} NOTIFYs per effect"
    assert four_heard <= 2.0, f"4 relays heard {four_heard:.2f} NOTIFYs per effect"


@pytest.mark.scale  # several relays or worker groups at once: its own CI step
def test_a_relay_at_its_limit_asks_for_room_at_the_pace_its_rows_start(
    store: PostgresStore, db: sa.Engine
) -> None:
    """A relay whose published rows do not start (no worker) stops at max_in_flight and
    then asks which rows started about once a second, not 20 times (it polled every 50 ms
    however little work there was: four relays asked four times as often). Once rows
    start it claims again."""
    execute(
        db,
        "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload)"
        " SELECT :wt, 'limit-' || g, CAST(:payload AS jsonb) FROM generate_series(1, 200) g",
        wt=T,
        payload=json.dumps(FIRE_AND_FORGET),
    )
    published: list[uuid.UUID] = []

    def publish(kind: Kind, messages: Sequence[Sequence[ClaimedRow]]) -> list[uuid.UUID]:
        ids = [r.id for m in messages for r in m]
        published.extend(ids)
        return ids

    config = RuntimeConfig(max_in_flight=50, claim_batch_size=50)
    group = RelayGroup(store, [T], config, publish, worker_id="at-limit", timers=False)
    with StatementCounter(store_engines(store)) as counter:
        group.start()
        try:
            wait_until(lambda: len(published) >= 50, what="the first 50 rows")
            time.sleep(1.0)
            before, began = counter.total(), time.monotonic()
            time.sleep(10.0)  # at the limit: nothing starts
            sent, window = counter.total() - before, time.monotonic() - began
            assert len(published) == 50
            # A worker starts 25 of them (the start guard moves each to a run token).
            execute(
                db,
                "UPDATE ironflow.outbox SET locked_by = 'run-' || id"
                " WHERE id = ANY(CAST(:ids AS uuid[]))",
                ids=[str(i) for i in published[:25]],
            )
            wait_until(lambda: len(published) >= 75, timeout=45, what="room for 25 more")
        finally:
            assert group.stop(10)
    assert sent <= 3 * window, f"{sent} statements in {window:.1f}s at the in-flight limit"
