"""Big tables (issue 20 §3, §7): claim cost under many leased rows and over a long processed
history, and the HOT share of the updates each effect makes.

The drain here runs the statements a worker runs for one effect, through the store: a claim
of `batch` rows, then per row the start guard and the processed mark (three updates per
effect). No broker and no Celery: what is measured is the tables, not the transport. Row 12
of ``python -m benchmarks`` and tests/test_big_tables.py both use it.
"""

from __future__ import annotations

import re
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ironflow_celery.storage import sql
from ironflow_celery.storage.kinds import EFFECT, RowKind
from ironflow_celery.storage.store import PostgresStore

__all__ = [
    "DrainResult",
    "TableStats",
    "claim_latency",
    "claim_plan",
    "drain",
    "lease_rows",
    "seed_history",
    "seed_pending",
    "table_stats",
    "vacuum",
]

TABLES = {"effect": "outbox", "timer": "timers"}


def seed_history(engine: sa.Engine, n: int, workflow_type: str = "bench_history") -> None:
    """`n` processed effects and `n // 10` processed timers, as a long-running deployment
    without retention keeps them (processed over the last 30 days), then ANALYZE."""
    with engine.begin() as conn:
        conn.execute(
            sa.text("""
            INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload, created_at,
                                         processed_at)
            SELECT :wt, 'h' || g, '{"type": "Noop"}'::jsonb,
                   now() - interval '30 days' + g * (interval '30 days' / :n),
                   now() - interval '30 days' + g * (interval '30 days' / :n)
                     + interval '10 ms'
            FROM generate_series(1, :n) g"""),
            {"wt": workflow_type, "n": n},
        )
        conn.execute(
            sa.text("""
            INSERT INTO ironflow.timers (workflow_type, workflow_id, input, fire_at,
                                         processed_at)
            SELECT :wt, 'h' || g, '{"type": "Tick"}'::jsonb,
                   now() - interval '30 days' + g * (interval '30 days' / :n),
                   now() - interval '30 days' + g * (interval '30 days' / :n)
                     + interval '10 ms'
            FROM generate_series(1, :n) g"""),
            {"wt": workflow_type, "n": max(1, n // 10)},
        )
    vacuum(engine, analyze=True)


def vacuum(engine: sa.Engine, *, analyze: bool = False) -> None:
    """VACUUM (ANALYZE) both claimable tables, as autovacuum would between drains."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in TABLES.values():
            verb = "VACUUM (ANALYZE)" if analyze else "VACUUM"
            conn.exec_driver_sql(f"{verb} ironflow.{table}")


def seed_pending(
    engine: sa.Engine, kind: RowKind | str, n: int, workflow_type: str, prefix: str = "p"
) -> None:
    """`n` due rows of `workflow_type` in one INSERT, due one microsecond apart and the
    last one now: rows seeded later are due later, as rows written later are."""
    name = kind if isinstance(kind, str) else kind.name
    with engine.begin() as conn:
        if name == "effect":
            statement = """
                INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload, created_at)
                SELECT :wt, :prefix || g, '{"type": "Noop"}'::jsonb,
                       now() - (:n - g) * interval '1 microsecond'
                FROM generate_series(1, :n) g"""
        else:
            statement = """
                INSERT INTO ironflow.timers (workflow_type, workflow_id, input, fire_at)
                SELECT :wt, :prefix || g, '{"type": "Tick"}'::jsonb,
                       now() - (:n - g) * interval '1 microsecond'
                FROM generate_series(1, :n) g"""
        conn.execute(sa.text(statement), {"wt": workflow_type, "prefix": prefix, "n": n})


def lease_rows(
    store: PostgresStore, kind: RowKind, n: int, workflow_type: str, lease: float = 3600
) -> int:
    """Claim `n` rows and keep them leased (as relays holding them in the broker do)."""
    leased = 0
    while leased < n:
        got = store.claim(
            kind,
            f"holder-{uuid.uuid4().hex[:6]}",
            [workflow_type],
            lease_seconds=lease,
            max_attempts=5,
            limit=min(1000, n - leased),
        )
        if not got:
            break
        leased += len(got)
    return leased


@dataclass(frozen=True)
class ClaimPlan:
    """EXPLAIN (ANALYZE, BUFFERS) of one claim, rolled back."""

    text: str
    rows_removed_by_filter: int
    buffers: int
    """Shared buffers (hit + read) of the whole statement."""
    claimed: int


def claim_plan(
    store: PostgresStore, kind: RowKind, workflow_type: str, limit: int = 10
) -> ClaimPlan:
    """The claim the relay runs (the query of its function, migration 0014, with the
    function's planner settings), under EXPLAIN (ANALYZE, BUFFERS), rolled back."""
    statement = kind.statements.claim_query
    params: dict[str, Any] = {
        "token": "probe",
        "types": [workflow_type],
        "lease": 60.0,
        "max_attempts": 5,
        "max_types": [],
        "max_values": [],
        "limit": limit,
    }
    with store.engine.connect() as conn, conn.begin() as tx:
        for name, value in sql.CLAIM_PLANNER_SETTINGS.items():
            conn.exec_driver_sql(f"SET LOCAL {name} = {value}")
        lines = conn.execute(
            sa.text("EXPLAIN (ANALYZE, BUFFERS) " + statement.text), params
        ).fetchall()
        tx.rollback()
    text = "\n".join(line[0] for line in lines)
    removed = sum(int(x) for x in re.findall(r"Rows Removed by Filter: (\d+)", text))
    top = re.search(r"Buffers: shared((?: \w+=\d+)+)", text)
    buffers = 0
    if top:
        for key, value in re.findall(r"(\w+)=(\d+)", top.group(1)):
            if key in ("hit", "read"):
                buffers += int(value)
    claimed = re.search(r"Update on \S+ r .*?actual time=\S+ rows=(\d+)", text)
    return ClaimPlan(text, removed, buffers, int(claimed.group(1)) if claimed else -1)


def claim_latency(
    store: PostgresStore, kind: RowKind, workflow_type: str, rounds: int = 30, limit: int = 10
) -> float:
    """Median wall time (ms) of the claim statement, each run rolled back."""
    statement = kind.statements.claim
    params: dict[str, Any] = {
        "token": "probe",
        "types": [workflow_type],
        "lease": 60.0,
        "max_attempts": 5,
        "max_types": [],
        "max_values": [],
        "limit": limit,
        "relaxed": False,
    }
    times = []
    with store.engine.connect() as conn:
        for _ in range(rounds):
            with conn.begin() as tx:
                t0 = time.perf_counter()
                conn.execute(statement, params).fetchall()
                times.append((time.perf_counter() - t0) * 1000)
                tx.rollback()
    return statistics.median(times)


@dataclass(frozen=True)
class TableStats:
    updates: int
    hot_updates: int
    dead_tuples: int


def table_stats(engine: sa.Engine, kind: RowKind | str) -> TableStats:
    """Cumulative update counters of the kind's table (pg_stat_user_tables)."""
    name = kind if isinstance(kind, str) else kind.name
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            sa.text(
                "SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup FROM pg_stat_user_tables"
                " WHERE schemaname = 'ironflow' AND relname = :t"
            ),
            {"t": TABLES[name]},
        ).one()
    return TableStats(int(row[0]), int(row[1]), int(row[2]))


@dataclass(frozen=True)
class DrainResult:
    effects: int
    claim_ms: list[float]
    updates: int
    hot_updates: int

    @property
    def hot_share(self) -> float:
        return self.hot_updates / self.updates if self.updates else 0.0

    @property
    def claim_p50_ms(self) -> float:
        return statistics.median(self.claim_ms) if self.claim_ms else 0.0

    @property
    def claim_p99_ms(self) -> float:
        ordered = sorted(self.claim_ms)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


def drain(
    url: str,
    workflow_type: str,
    n: int,
    *,
    batch: int = 100,
    stats_timeout: float = 120.0,
) -> DrainResult:
    """Drain `n` pending effects of `workflow_type` with the worker's statements (claim
    `batch`, start guard and processed mark per row) on a store of its own, and count the
    outbox updates it made and how many were HOT.

    The counters come from pg_stat_user_tables, which a backend reports when it exits: the
    store is disposed before they are read, and the read waits (up to `stats_timeout`) until
    all ``3 * n`` updates are counted.
    """
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        before = table_stats(admin, EFFECT)
        store = PostgresStore.from_url(url, pool_size=1)
        claim_ms: list[float] = []
        done = 0
        try:
            while done < n:
                t0 = time.perf_counter()
                rows = store.claim(
                    EFFECT,
                    "drain",
                    [workflow_type],
                    lease_seconds=60,
                    max_attempts=5,
                    limit=batch,
                )
                claim_ms.append((time.perf_counter() - t0) * 1000)
                if not rows:
                    break
                for row in rows:
                    run = f"run-{row.id}"
                    started = store.start(EFFECT, row.id, row.token, run, lease_seconds=60)
                    if started is not None and store.record_processed(EFFECT, row.id, run):
                        done += 1
        finally:
            store.dispose()
        expected = before.updates + 3 * done
        deadline = time.monotonic() + stats_timeout
        after = table_stats(admin, EFFECT)
        while after.updates < expected and time.monotonic() < deadline:
            time.sleep(0.2)
            after = table_stats(admin, EFFECT)
    finally:
        admin.dispose()
    return DrainResult(
        done, claim_ms, after.updates - before.updates, after.hot_updates - before.hot_updates
    )
