"""Big tables (issue 20 §3 second bullet, §7): claims that do not step over leased rows, the
queue tables' storage parameters, HOT updates, retention on by default.

Costs are asserted as plan facts (rows removed by filter, shared buffers touched), never as
wall time: they hold on a loaded machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from benchmarks import tables
from ironflow_celery.model.settings import SETTINGS
from ironflow_celery.operations.retention import (
    DEFAULT_AGE,
    retention_settings,
    start_retention_duty,
)
from ironflow_celery.storage import schema, sql
from ironflow_celery.storage.db import create_engine
from ironflow_celery.storage.kinds import EFFECT, TIMER, RowKind
from ironflow_celery.storage.store import PostgresStore
from tests.waiting import wait_for_progress

ROOT = Path(__file__).resolve().parents[1]
LEASED = 10_000
FRESH = 200
WT = "big_tables"


def _scalar(db: sa.Engine, statement: str, **params: object) -> object:
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


@pytest.mark.parametrize("kind", [EFFECT, TIMER], ids=["effects", "timers"])
def test_claim_does_not_step_over_leased_rows(
    kind: RowKind, store: PostgresStore, db: sa.Engine
) -> None:
    """10,000 leased rows ahead of 200 due ones: the claim reads none of them.

    On ironflow's created_at / fire_at index (6964a2b) this claim fetched and filtered out
    every leased row ("Rows Removed by Filter: 10000", over 10,000 buffers)."""
    tables.seed_pending(db, kind, LEASED, WT, prefix="old")
    tables.vacuum(db, analyze=True)
    baseline = tables.claim_plan(store, kind, WT)
    assert baseline.claimed == 10 and baseline.rows_removed_by_filter == 0, baseline.text

    assert tables.lease_rows(store, kind, LEASED, WT) == LEASED
    tables.seed_pending(db, kind, FRESH, WT, prefix="new")
    leased = tables.claim_plan(store, kind, WT)
    assert leased.claimed == 10, leased.text
    assert leased.rows_removed_by_filter == 0, leased.text
    # Before a vacuum the claims' superseded index entries are still there (marked dead by
    # the first scan): a claim walks their index pages, about one buffer per hundred.
    assert leased.buffers <= baseline.buffers + LEASED // 20, (baseline.buffers, leased.text)

    # Once (auto)vacuum has run, the claim costs what it cost with nothing leased.
    tables.vacuum(db)
    vacuumed = tables.claim_plan(store, kind, WT)
    assert vacuumed.claimed == 10 and vacuumed.rows_removed_by_filter == 0, vacuumed.text
    assert vacuumed.buffers <= 1.5 * baseline.buffers, (baseline.buffers, vacuumed.text)


def _scans_of(plan: dict[str, Any], relation: str) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan tree that reads `relation` (the
    UPDATE's own node, which writes it, aside)."""
    reads = plan.get("Relation Name") == relation and plan["Node Type"] != "ModifyTable"
    found = [plan] if reads else []
    for child in plan.get("Plans", []):
        found += _scans_of(child, relation)
    return found


@pytest.mark.parametrize("kind", [EFFECT, TIMER], ids=["effects", "timers"])
def test_the_back_pressure_look_up_probes_each_published_row_by_key(
    kind: RowKind, store: PostgresStore, db: sa.Engine
) -> None:
    """A relay at its in-flight limit asks every 50 ms which of its 1,000 published rows
    have started: the look-up reads those rows by primary key, never the backlog.

    As a NOT EXISTS (8e9ff35) it was planned as a hash anti-join over every unprocessed
    row: 10,000 rows read here for 1,000 asked about; in a 150,000-row drain it cost 208 ms a
    call and slowed the drain threefold."""
    tables.seed_pending(db, kind, LEASED, WT)
    published = store.claim(kind, "relay-a", [WT], lease_seconds=600, max_attempts=5, limit=1000)
    assert len(published) == 1000
    tables.vacuum(db, analyze=True)
    started = [(r.id, "relay-a", f"run-{i}") for i, r in enumerate(published[:10])]
    if kind is EFFECT:
        assert len(store.start_effects(started, lease_seconds=600)) == 10
    else:
        for row_id, token, run in started:
            assert store.start(kind, row_id, token, run, lease_seconds=600) is not None
    params = {"tokens": ["relay-a"], "starts": "0", "ids": b"".join(r.id.bytes for r in published)}
    with db.connect() as conn:
        (plan,) = conn.execute(
            sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + kind.statements.no_longer_dispatched.text),
            params,
        ).scalar_one()
    table = kind.table.split(".")[-1]
    scans = _scans_of(plan["Plan"], table)
    assert scans, json.dumps(plan, indent=1)
    for scan in scans:
        assert scan.get("Index Name") == f"{table}_pkey", json.dumps(plan, indent=1)
        assert scan["Actual Rows"] <= 1, json.dumps(plan, indent=1)  # per probe
    assert sum(s["Actual Loops"] for s in scans) == 1000, json.dumps(plan, indent=1)
    # and the answer is still right: the ten started rows, nothing else
    left = store.no_longer_dispatched(kind, [(r.id, "relay-a") for r in published])
    assert left == {row_id for row_id, _, _ in started}

    # A relay of lone rows holds a claim token per row: the planner must not take 200
    # tokens for 200,000 probes (one generate_series per token did, which passed
    # jit_above_cost: 100 ms of JIT compilation a check).
    tokens = [f"relay-a#{i}" for i in range(200)]
    many = {
        "tokens": tokens,
        "starts": ",".join(str(5 * i) for i in range(200)),
        "ids": b"".join(r.id.bytes for r in published),
    }
    with db.connect() as conn:
        (plan,) = conn.execute(
            sa.text("EXPLAIN (FORMAT JSON) " + kind.statements.no_longer_dispatched.text), many
        ).scalar_one()
        jit_above = float(
            conn.execute(sa.text("SELECT current_setting('jit_above_cost')")).scalar_one()
        )
    assert plan["Plan"]["Total Cost"] < jit_above, json.dumps(plan, indent=1)

    # The renewals of the same rows read them by key too (ironflow's statement joined the
    # pairs to the table, and was planned as a hash join over the backlog), and renew
    # exactly the rows still held by their tokens.
    pairs = {
        "ids": [r.id for r in published],
        "tokens": ["relay-a"] * len(published),
        "lease": 600.0,
        "server_started": published[0].server_started,
        "relaxed": True,
    }
    for statement in (kind.statements.renew_dispatched, kind.statements.renew_leases):
        with db.connect() as conn, conn.begin() as tx:
            (plan,) = conn.execute(
                sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + statement.text), pairs
            ).scalar_one()
            tx.rollback()
        scans = _scans_of(plan["Plan"], table)
        assert scans, json.dumps(plan, indent=1)
        for scan in scans:
            assert scan.get("Index Name") == f"{table}_pkey", json.dumps(plan, indent=1)
        assert plan["Plan"]["Actual Rows"] == 990, json.dumps(plan, indent=1)
    renewed = store.renew_dispatched(
        kind,
        [(r.id, "relay-a") for r in published] + [(started[0][0], started[0][2])],
        lease_seconds=600,
        server_started=published[0].server_started,
    )
    assert renewed == {r.id for r in published[10:]} | {started[0][0]}


STALE = 20_000


def _burst_after_quiet_spell(db: sa.Engine, kind: RowKind) -> None:
    """`STALE` open rows the statistics do not know of: seeded, processed, vacuumed while
    none was open (the partial indexes of open rows look empty), then all reopened, with
    autovacuum off for the table so that no ANALYZE sees the burst."""
    with db.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {kind.table} SET (autovacuum_enabled = false)"))
    tables.seed_pending(db, kind, STALE, WT)
    with db.begin() as conn:
        conn.execute(sa.text(f"UPDATE {kind.table} SET processed_at = now()"))
    tables.vacuum(db, analyze=True)
    with db.begin() as conn:
        conn.execute(sa.text(f"UPDATE {kind.table} SET processed_at = NULL"))


@pytest.mark.parametrize("kind", [EFFECT, TIMER], ids=["effects", "timers"])
def test_statements_that_name_their_rows_probe_the_key_when_statistics_lag(
    kind: RowKind, store: PostgresStore, db: sa.Engine
) -> None:
    """A queue vacuumed while empty, then a burst: until the next ANALYZE the planner sees
    ironflow's partial indexes on ``processed_at IS NULL`` as empty. Every statement that
    names its rows by id still reads them by primary key, not through such an index.

    Written ``processed_at IS NULL`` (8e9ff35), each of them scanned the whole burst
    through ``outbox_immediate_idx`` / ``timers_due_idx`` (20,000 rows for one)."""
    table = kind.table.split(".")[-1]
    _burst_after_quiet_spell(db, kind)
    claimed = store.claim(kind, "relay-a", [WT], lease_seconds=600, max_attempts=5, limit=100)
    assert len(claimed) == 100
    one = claimed[0]
    ids = [r.id for r in claimed]
    items = json.dumps([{"id": str(i), "token": "relay-a", "run_token": "run"} for i in ids])
    common = {
        "id": one.id,
        "ids": ids,
        "token": "relay-a",
        "tokens": ["relay-a"] * len(ids),
        "run_token": "run",
        "lease": 600.0,
        "lost_error": "lost",
        "worker": "w",
        "pid": 1,
        "task_id": "t",
        "reason": "r",
        "server_started": one.server_started,
        "items": items,
        "relaxed": True,
    }
    statements = {
        "start": (kind.statements.start, common),
        "lock_running": (kind.statements.lock_running, common),
        "release": (kind.statements.release, common),
        "renew_leases": (kind.statements.renew_leases, common),
        "renew_dispatched": (kind.statements.renew_dispatched, common),
        "mark_dead_letter_handled": (kind.statements.mark_dead_letter_handled, common),
        "cancel": (kind.statements.cancel, common),
        "no_longer_dispatched": (
            kind.statements.no_longer_dispatched,
            {"tokens": ["relay-a"], "starts": "0", "ids": b"".join(i.bytes for i in ids)},
        ),
    }
    if kind is EFFECT:
        statements["start_effects"] = (sql.START_EFFECTS, common)
    through_other_indexes: dict[str, list[str]] = {}
    for name, (statement, params) in statements.items():
        with db.connect() as conn, conn.begin() as tx:
            (plan,) = conn.execute(
                sa.text(
                    "EXPLAIN (ANALYZE, FORMAT JSON) "
                    + getattr(statement, "element", statement).text
                ),
                params,
            ).scalar_one()
            tx.rollback()
        others = [
            f"{scan['Node Type']} {scan.get('Index Name', '')}: {scan['Actual Rows']} rows"
            for scan in _scans_of(plan["Plan"], table)
            if scan.get("Index Name") != f"{table}_pkey"
        ]
        if others:
            through_other_indexes[name] = others
    assert through_other_indexes == {}


def test_group_statements_read_only_their_rows_after_an_analyze_of_a_nearly_empty_queue(
    store: PostgresStore, db: sa.Engine
) -> None:
    """A new or quiet outbox analyzed with one processed row, then a burst of 3,000: the
    planner takes the open rows for one. A group's start guard and its processed mark
    still read their 100 rows by primary key.

    On da7c8db the start guard joined its items to a scan of every open row in a nested
    loop (3,000 rows by 100 items, 72 ms a group instead of 2: benchmark row 9's first
    phases drained at half speed after a VACUUM), and the mark hashed a scan of the table."""
    n = 3_000
    with db.begin() as conn:
        conn.execute(sa.text("ALTER TABLE ironflow.outbox SET (autovacuum_enabled = false)"))
    tables.seed_pending(db, EFFECT, 1, WT, prefix="quiet")
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE ironflow.outbox SET processed_at = now()"))
    tables.vacuum(db, analyze=True)
    tables.seed_pending(db, EFFECT, n, WT)
    claimed = store.claim(EFFECT, "relay-a", [WT], lease_seconds=600, max_attempts=5, limit=100)
    assert len(claimed) == 100
    items = json.dumps([{"id": str(r.id), "token": "relay-a", "run_token": "run"} for r in claimed])
    params = {"items": items, "lease": 600.0, "lost_error": "lost", "worker": "w", "pid": 1}
    reads: dict[str, list[str]] = {}
    for name, statement in (
        ("start_effects", sql.START_EFFECTS),
        ("mark", sql.MARK_EFFECTS_PROCESSED),
    ):
        with db.connect() as conn, conn.begin() as tx:
            (plan,) = conn.execute(
                sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + statement.element.text),
                {**params, "task_id": "t", "relaxed": True},
            ).scalar_one()
            tx.rollback()
        assert plan["Plan"]["Actual Rows"] == 100, name
        reads[name] = [
            f"{scan['Node Type']} {scan.get('Index Name', '')}: {scan['Actual Rows']} rows"
            for scan in _scans_of(plan["Plan"], "outbox")
            if (scan.get("Index Name") != "outbox_pkey" and "Bitmap Heap" not in scan["Node Type"])
            or scan["Actual Rows"] > 1_000
        ]
    assert reads == {"start_effects": [], "mark": []}


def _index_scans(db: sa.Engine, table: str) -> dict[str, int]:
    """idx_scan of each index of `table`, as the statistics collector has them now."""
    with db.connect() as conn:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            sa.text(
                "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes"
                " WHERE schemaname = 'ironflow' AND relname = :t"
            ),
            {"t": table},
        )
        return {name: int(n) for name, n in rows}


CLAIMS = 8  # PostgreSQL weighs a generic plan from the sixth execution on


@pytest.mark.parametrize("kind", [EFFECT, TIMER], ids=["effects", "timers"])
@pytest.mark.parametrize("path", ["relaxed", "durable", "instrumented"])
def test_the_claim_walks_its_own_index_when_statistics_lag(
    kind: RowKind, path: str, database_url: str, db: sa.Engine
) -> None:
    """The queue vacuumed while empty, then a burst no ANALYZE has seen: ironflow's
    partial index of open rows looks empty to the planner, which then preferred to read it
    and sort the whole burst (89 ms a claim behind 150,000 rows) over walking our due-order
    index. The claim is planned with sorting off (migration 0014's function), on every path
    a statement takes: relaxed (the default), durable commits, and through SQLAlchemy's
    execution when a listener (Sentry's, OpenTelemetry's) watches the engine; and the plan
    PostgreSQL keeps for the session after its first five claims (a generic plan) walks
    our index too."""
    table = kind.table.split(".")[-1]
    _burst_after_quiet_spell(db, kind)

    # One pooled connection: the claim runs on it, and so does the flush of its statistics.
    store = PostgresStore.from_url(
        database_url, relaxed_commits=path != "durable", pool_size=1, max_overflow=0
    )
    seen: list[str] = []
    if path == "instrumented":
        sa.event.listen(store.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    try:
        before = _index_scans(db, table)
        for _ in range(CLAIMS):
            claimed = store.claim(
                kind, "relay-a", [WT], lease_seconds=600, max_attempts=5, limit=10
            )
            assert len(claimed) == 10
        with store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
            conn.commit()
    finally:
        store.dispose()
    if path == "instrumented":
        assert sum("ironflow.celery_claim_" in s for s in seen) == CLAIMS, seen
    due_order = {"effect": "outbox_immediate_idx", "timer": "timers_due_idx"}[kind.name]
    used: dict[str, int] = {}

    def flushed() -> int:
        used.update({i: n - before.get(i, 0) for i, n in _index_scans(db, table).items()})
        return used.get(f"{table}_celery_claim_idx", 0) + used.get(due_order, 0)

    wait_for_progress(flushed, CLAIMS, "the claim's index statistics", stall=60)
    assert used[due_order] == 0 and used[f"{table}_celery_claim_idx"] == CLAIMS, used


@pytest.mark.parametrize("kind", [EFFECT, TIMER], ids=["effects", "timers"])
def test_a_claim_planned_on_an_empty_table_still_reads_by_index(
    kind: RowKind, database_url: str, db: sa.Engine
) -> None:
    """A relay's session keeps its claim's plan (migration 0014's function). Planned while
    the table was empty, the claim's UPDATE read its rows with a sequential scan, and went
    on reading the whole table once per claim as the queue grew, until an ANALYZE (in the
    first run of benchmark row 4 on the function: 3,979 sequential scans and five times the
    buffers of the previous path). With ``enable_seqscan = off`` among the function's
    settings, such a plan is the last resort."""
    table = kind.table.split(".")[-1]
    store = PostgresStore.from_url(database_url, pool_size=1, max_overflow=0)

    def scans() -> tuple[int, int]:
        with db.connect() as conn:
            row = conn.execute(
                sa.text("SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = :t"),
                {"t": table},
            ).one()
        return int(row[0]), int(row[1])

    def flushed(at_least: int) -> tuple[int, int]:
        with store.engine.connect() as conn:  # the claims' own (only) backend
            conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
            conn.commit()
        wait_for_progress(lambda: sum(scans()), at_least, "the claims' statistics", stall=60)
        return scans()

    try:
        for _ in range(CLAIMS):  # an idle relay's claims: the plan is made, then kept
            assert store.claim(kind, "relay-a", [WT], lease_seconds=60, max_attempts=5) == []
        before = flushed(CLAIMS)
        tables.seed_pending(db, kind, 2_000, WT)
        for _ in range(20):
            claimed = store.claim(kind, "relay-a", [WT], lease_seconds=60, max_attempts=5)
            assert len(claimed) == 1
        # each claim: its due-order index, then the primary key (the UPDATE, the due time)
        after = flushed(sum(before) + 40)
    finally:
        store.dispose()
    assert after[0] == before[0], (before, after)  # no sequential scan of the table
    assert after[1] - before[1] >= 40, (before, after)


# What ironflow (the Rust engine) writes on rows it does not hold: its retry_dead_letter and
# a crashed holder whose lease ran out. Our claim hint must never keep such a row waiting.
IRONFLOW_RETRY = (
    "UPDATE {table} SET attempts = 0, locked_until = NULL, locked_by = NULL,"
    " last_error = NULL WHERE id = :id AND processed_at IS NULL"
)
EXPIRE = "UPDATE {table} SET locked_until = now() - interval '1 second' WHERE id = :id"


@pytest.mark.parametrize("kind", [EFFECT, TIMER], ids=["effects", "timers"])
@pytest.mark.parametrize("write", [IRONFLOW_RETRY, EXPIRE], ids=["ironflow-retry", "expired"])
def test_a_row_freed_by_any_writer_is_claimable_at_once(
    kind: RowKind, write: str, store: PostgresStore, db: sa.Engine
) -> None:
    tables.seed_pending(db, kind, 1, WT)
    (row,) = store.claim(kind, "a", [WT], lease_seconds=600, max_attempts=5, limit=1)
    assert store.claim(kind, "b", [WT], lease_seconds=600, max_attempts=5, limit=1) == []
    with db.begin() as conn:
        conn.execute(sa.text(write.format(table=kind.table)), {"id": row.id})
    hint = _scalar(
        db,
        f"SELECT celery_claim_after <= coalesce(locked_until, '-infinity') IS NOT FALSE"
        f" FROM {kind.table} WHERE id = :id",
        id=row.id,
    )
    assert hint is True  # the trigger keeps the hint at most the lease
    again = store.claim(kind, "b", [WT], lease_seconds=600, max_attempts=5, limit=1)
    assert [r.id for r in again] == [row.id]


def test_ironflow_keyed_timer_upsert_on_a_claimed_timer_fires_on_time(
    store: PostgresStore, db: sa.Engine
) -> None:
    """ironflow re-arms a keyed timer (heartbeat) by an upsert that knows nothing of our
    hint: the re-armed timer is claimable at its new fire time, not a lease later."""
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ironflow.timers (workflow_type, workflow_id, fire_at, input, key)"
                " VALUES (:wt, 'i', now() - interval '1 second', '{}', 'k')"
            ),
            {"wt": WT},
        )
    (row,) = store.claim(TIMER, "a", [WT], lease_seconds=600, max_attempts=5, limit=1)
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ironflow.timers (workflow_type, workflow_id, fire_at, input, key)"
                " VALUES (:wt, 'i', now(), '{}', 'k')"
                " ON CONFLICT (workflow_type, workflow_id, key)"
                " WHERE key IS NOT NULL AND processed_at IS NULL"
                " DO UPDATE SET fire_at = EXCLUDED.fire_at, input = EXCLUDED.input,"
                " created_at = now(), attempts = 0, last_error = NULL, locked_until = NULL,"
                " locked_by = NULL"
            ),
            {"wt": WT},
        )
    again = store.claim(TIMER, "b", [WT], lease_seconds=600, max_attempts=5, limit=1)
    assert [r.id for r in again] == [row.id]


def test_a_retry_takes_its_turn_by_when_its_backoff_ended(
    store: PostgresStore, db: sa.Engine
) -> None:
    """Due order: a failed row whose backoff ended comes after rows that were due before
    it ended and before rows due after it, whatever its created_at."""
    tables.seed_pending(db, EFFECT, 1, WT, prefix="first")
    (first,) = store.claim(EFFECT, "a", [WT], lease_seconds=600, max_attempts=5, limit=1)
    tables.seed_pending(db, EFFECT, 1, WT, prefix="before")
    store.start(EFFECT, first.id, "a", "run-a", lease_seconds=600)
    assert store.record_failed_attempt(EFFECT, first.id, "run-a", "boom", backoff_seconds=0)
    tables.seed_pending(db, EFFECT, 1, WT, prefix="after")
    order = []
    for token in ("b", "c", "d"):
        (row,) = store.claim(EFFECT, token, [WT], lease_seconds=600, max_attempts=5, limit=1)
        order.append(
            _scalar(db, "SELECT workflow_id FROM ironflow.outbox WHERE id = :id", id=row.id)
        )
    assert order == ["before1", "first1", "after1"]


# -- §7: storage parameters, HOT updates, retention ------------------------------------------

EXPECTED_RELOPTIONS = {
    "fillfactor=50",
    "autovacuum_vacuum_threshold=1000",
    "autovacuum_vacuum_scale_factor=0.02",
    "autovacuum_vacuum_insert_threshold=1000",
    "autovacuum_vacuum_insert_scale_factor=0.02",
    "autovacuum_analyze_threshold=1000",
    "autovacuum_analyze_scale_factor=0.02",
}


@pytest.mark.parametrize("table", ["outbox", "timers"])
def test_migration_sets_the_queue_tables_storage_parameters(db: sa.Engine, table: str) -> None:
    options = _scalar(
        db,
        "SELECT reloptions FROM pg_class WHERE oid = to_regclass(:t)",
        t=f"ironflow.{table}",
    )
    assert isinstance(options, list)
    assert set(options) >= EXPECTED_RELOPTIONS


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[str]:
    """A PostgreSQL cluster of this test's own, migrated: HOT pruning waits for the oldest
    transaction of the whole cluster's snapshots, so a shared server busy with other
    databases' transactions would make the HOT share depend on the machine's load."""
    from tests.e2e import DisposablePostgres

    pg = DisposablePostgres()
    try:
        pg.init()
        engine = create_engine(pg.url, pool_size=1)
        try:
            schema.upgrade(engine)
        finally:
            engine.dispose()
        yield pg.url
    finally:
        pg.destroy()


def test_every_start_guard_of_a_drain_is_a_hot_update(own_cluster: str) -> None:
    """Of an effect's three updates the start guard is the one that can be HOT: the claim
    moves the row in the claim index (so later claims skip it) and the processed mark
    changes processed_at, in the predicate of ironflow's partial indexes. With the tables'
    fillfactor every start guard finds room on its page: a third of all updates are HOT."""
    n = 600
    engine = create_engine(own_cluster, pool_size=1)
    try:
        tables.seed_pending(engine, EFFECT, n, WT)
    finally:
        engine.dispose()
    result = tables.drain(own_cluster, WT, n)
    assert result.effects == n
    assert result.updates == 3 * n
    assert result.hot_updates >= 0.9 * n, f"{result.hot_updates} HOT of {result.updates}"


def test_retention_is_on_by_default() -> None:
    options = retention_settings({})
    assert options["interval"] == SETTINGS["retention_interval"].default == 3600.0
    assert options["older_than"] == DEFAULT_AGE
    assert options["include_observations"] is False
    assert retention_settings({"ironflow_retention_interval": "0"})["interval"] is None


def test_every_relay_process_runs_the_retention_duty_by_default() -> None:
    """The duty a relay process starts (celery_app's runtime.duties) with no retention
    setting at all; with the interval set to 0 it starts none."""
    stop = threading.Event()
    runtime = object()  # first used after the interval; the stop below comes first
    thread = start_retention_duty(runtime, {}, stop)
    try:
        assert thread is not None and thread.is_alive()
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
    assert thread is not None and not thread.is_alive()
    assert start_retention_duty(runtime, {"ironflow_retention_interval": 0}, stop) is None


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_benchmark_row_12_smoke(tmp_path: Path) -> None:
    """`python -m benchmarks --smoke --rows 12` runs and reports its fields (no timing
    assertion; the figures in docs/scaling.md come from the full size)."""
    output = tmp_path / "results.json"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--rows", "12", "--output", str(output)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (row,) = json.loads(output.read_text())["rows"]
    assert row["id"] == 12 and "error" not in row, row
    assert {"value", "p50_ms", "p99_ms", "hot_pct", "ratio", "vacuumed_ratio"} <= set(row)
    assert row["updates"] == 3 * 200
    # At these sizes the planner may scan ironflow's index and sort (cheaper for 700 rows):
    # rows removed by filter are asserted at 10,000 leased rows, above.
