"""Versioned, idempotent migrations of the ``ironflow`` schema, safe to run concurrently.

The SQL files beside this module are applied in order inside one transaction that holds
a transaction-level advisory lock, so any number of processes may call `upgrade` at once:
one applies, the others wait and then find nothing to do. Applied versions are recorded in
``ironflow.celery_schema_migrations``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ironflow_celery.errors import MigrationError

__all__ = [
    "LOCK_MIGRATIONS",
    "LOCK_NAMESPACE",
    "Migration",
    "current_version",
    "migrations",
    "upgrade",
]

# pg_advisory_xact_lock(classid, objid): 0x69726F6E is "iron"; 1 = migrations.
LOCK_NAMESPACE = 0x69726F6E
LOCK_MIGRATIONS = 1

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def _applied(conn: Connection) -> set[int]:
    exists = conn.execute(
        sa.text("SELECT to_regclass('ironflow.celery_schema_migrations') IS NOT NULL")
    ).scalar_one()
    if not exists:
        return set()
    rows = conn.execute(sa.text("SELECT version FROM ironflow.celery_schema_migrations"))
    return {row[0] for row in rows}


def upgrade(engine: Engine) -> list[int]:
    """Bring the schema up to date; returns the versions this call applied."""
    try:
        # Always a real transaction, even on an AUTOCOMMIT engine: the advisory lock, SET
        # LOCAL and all-or-nothing migrations depend on it.
        with (
            engine.connect().execution_options(isolation_level="READ COMMITTED") as conn,
            conn.begin(),
        ):
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:ns, :obj)"),
                {"ns": LOCK_NAMESPACE, "obj": LOCK_MIGRATIONS},
            )
            # Resolve uuidv7() to ironflow.uuidv7() on servers without the built-in one.
            conn.execute(sa.text("SET LOCAL search_path TO ironflow, public"))
            done = _applied(conn)
            applied: list[int] = []
            for migration in migrations():
                if migration.version in done:
                    continue
                conn.exec_driver_sql(migration.sql)
                if not applied and not done:
                    conn.execute(
                        sa.text(
                            "CREATE TABLE IF NOT EXISTS ironflow.celery_schema_migrations ("
                            " version integer PRIMARY KEY, name text NOT NULL,"
                            " applied_at timestamptz NOT NULL DEFAULT now())"
                        )
                    )
                conn.execute(
                    sa.text(
                        "INSERT INTO ironflow.celery_schema_migrations (version, name) "
                        "VALUES (:v, :n)"
                    ),
                    {"v": migration.version, "n": migration.name},
                )
                applied.append(migration.version)
            return applied
    except sa.exc.SQLAlchemyError as exc:
        raise MigrationError(f"schema upgrade failed: {exc}") from exc


def current_version(engine: Engine) -> int | None:
    """The newest applied migration version, or None on a database without the schema."""
    try:
        with engine.connect() as conn:
            done = _applied(conn)
    except sa.exc.SQLAlchemyError as exc:
        raise MigrationError(f"could not read the schema version: {exc}") from exc
    return max(done) if done else None
