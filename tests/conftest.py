"""Shared fixtures: a fresh migrated PostgreSQL database per test (the testing kit's),
Celery's in-thread workers, the end-to-end tests' process registry and queue.

Each test gets its own database from the shipped testing kit (`ironflow_celery.testing`
through its pytest plugin, ``ironflow_database_url``): cloned from a template that this
session (or xdist worker) migrated once, and dropped afterwards; tests therefore run in
parallel safely.
Celery's in-process fixtures (``celery_app``, ``celery_worker``, …) come from
``celery.contrib.pytest``, loaded below (Celery no longer registers it as a plugin).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ironflow_celery.storage.db import create_engine, normalize_url
from ironflow_celery.storage.store import PostgresStore
from ironflow_celery.testing import server_url

if TYPE_CHECKING:
    from tests.e2e import Processes

pytest_plugins = ("celery.contrib.pytest",)


def _adopt_broker_from_environment() -> None:
    """Use ``CELERY_BROKER_URL`` (set by ``dev.py``) as the tests' Redis, then unset it.

    Celery reads that variable *before* an app's own ``broker_url``, so leaving it set
    would send every in-process test app (each with its own queue or a deliberately dead
    broker) to the same broker. Subprocess workers get their broker passed explicitly.
    """
    url = os.environ.pop("CELERY_BROKER_URL", None)
    if not url or not url.startswith("redis://"):
        return
    os.environ.setdefault("IRONFLOW_TEST_REDIS_URL", url)
    base = make_url(url)
    # Each role its own Redis database, on that same server: test apps' broker (5) and
    # result backend (6), so a machine without a local Redis runs every test.
    for name, number in (("IRONFLOW_TEST_BROKER_URL", "5"), ("IRONFLOW_TEST_RESULT_BACKEND", "6")):
        os.environ.setdefault(name, base.set(database=number).render_as_string(hide_password=False))


_adopt_broker_from_environment()

# -- databases: the testing kit's (ironflow_celery.testing, its pytest plugin) ---------------
# The plugin (``ironflow_celery_pytest``, registered by the package's pytest11 entry point)
# gives ``ironflow_databases``: a per-session `TestDatabases` whose template is migrated
# once per session (per xdist worker) and cloned per test. The suite's tests therefore run
# on the databases a user's tests get, test clock schema included (no clock row: the
# database's now() is the real time).


def _with_database(url: str, name: str) -> str:
    return make_url(normalize_url(url)).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_admin_engine() -> Iterator[sa.Engine]:
    """An autocommit engine on the server's maintenance database (CREATE/DROP DATABASE)."""
    engine = create_engine(
        _with_database(server_url(), "postgres"), isolation_level="AUTOCOMMIT", pool_size=1
    )
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def worker_id(request: pytest.FixtureRequest) -> str:
    """xdist's worker id ("master" without xdist)."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@pytest.fixture
def database_url(ironflow_database_url: str) -> str:
    """URL of a fresh, migrated database for this test only (the kit's, dropped after it)."""
    return ironflow_database_url


@pytest.fixture
def empty_database_url(request: pytest.FixtureRequest, pg_admin_engine: sa.Engine) -> Iterator[str]:
    """URL of a fresh database without the ironflow schema (the kit makes only migrated
    ones): for the tests of migrating itself."""
    base = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:30]
    name = f"test_{base}_{uuid.uuid4().hex[:10]}"
    with pg_admin_engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield _with_database(server_url(), name)
    with pg_admin_engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def store(database_url: str) -> Iterator[PostgresStore]:
    """A store on this test's database."""
    s = PostgresStore.from_url(database_url)
    yield s
    s.dispose()


@pytest.fixture
def db(store: PostgresStore) -> sa.Engine:
    """The test database's engine, for direct SQL in assertions."""
    return store.engine


# -- end-to-end: real worker and relay processes (helpers in tests/e2e.py) ------------------


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Workers, relays and servers one test starts, killed (with their process groups) at
    teardown; their logs are printed, which pytest shows when the test failed."""
    from tests.e2e import Processes

    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.kill_all()
        print(processes.report())


@pytest.fixture
def queue() -> str:
    """A broker queue of this test's own."""
    return f"e2e-{uuid.uuid4().hex[:12]}"


# -- what the suite does to the machine, said once and undone at the end ------------------

_ACCOUNT_LINES = pytest.StashKey[list[str]]()


def service_account_note() -> list[str]:
    """As root, create the embedded PostgreSQL's OS account now, if missing; what was done.

    Several tests run PostgreSQL as that account, each creating it when it is missing, but
    the line that says so is captured with the test's output: creating an OS account is
    something the user must see, so the controller does it up front and the header says it.
    Empty when not root, or when the account exists already.
    """
    if os.name != "posix" or os.geteuid() != 0:
        return []
    from devtools import local_services

    lines: list[str] = []
    with contextlib.suppress(local_services.EmbeddedServiceError):
        local_services._service_account(lines.append)
    return [line for line in lines if "created the OS account" in line]


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        config.stash[_ACCOUNT_LINES] = service_account_note()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"ironflow tests: {line}" for line in config.stash.get(_ACCOUNT_LINES, [])]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Delete the embedded clusters this session's tests relocated to the system temp dir."""
    if hasattr(session.config, "workerinput"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    from devtools.local_services import prune_relocated_data

    with contextlib.suppress(OSError):
        prune_relocated_data(under=factory.getbasetemp())
