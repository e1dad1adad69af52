"""pytest plugin of `ironflow_celery.testing`, registered as ``ironflow`` (pytest11).

Opt-in: it only defines fixtures (all named ``ironflow_*``) and one option, and imports
ironflow_celery (about a second) only when a test asks for one of its fixtures; disable
it with ``-p no:ironflow``. It lives outside the ``ironflow_celery`` package because
importing anything inside that package imports the whole of it.

- ``ironflow_database_url``: a fresh database per test (schema and test clock installed),
  cloned from a template made once per session, dropped after the test;
- ``ironflow_session_database_url``: one such database for the whole session;
- ``ironflow_clock``: a `TestClock` (starts at the real time, moves when you advance it);
- ``ironflow_workflows``: override it to name your workflows (classes, (class, handler)
  pairs or module names); ``ironflow_config``: override for a `RuntimeConfig`;
- ``ironflow_env``: a `WorkflowTestEnv` (service, runtime, clock, drain, asserts).

The server comes from ``--ironflow-database-url``, else ``IRONFLOW_TEST_DATABASE_URL``,
else ``IRONFLOW_DATABASE_URL``'s server, else postgresql://postgres@127.0.0.1:5432; when it
does not answer, the session stops with one line naming the URL tried and the option.
Database names start with ``--ironflow-database-prefix`` (else
``IRONFLOW_TEST_DATABASE_PREFIX``, else ``ironflow_test_``): projects sharing a server
each give their own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ironflow_celery.model.config import RuntimeConfig
    from ironflow_celery.testing import TestClock, TestDatabases, WorkflowTestEnv


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--ironflow-database-url``: the PostgreSQL server test databases are made on."""
    group = parser.getgroup("ironflow", "ironflow_celery testing kit")
    group.addoption(
        "--ironflow-database-url",
        default=None,
        help="PostgreSQL server for ironflow test databases "
        "(default: IRONFLOW_TEST_DATABASE_URL, then the local server)",
    )
    group.addoption(
        "--ironflow-database-prefix",
        default=None,
        help="start of the test databases' names, so projects sharing a server tell theirs "
        "apart (default: IRONFLOW_TEST_DATABASE_PREFIX, then ironflow_test_)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """A bad ``--ironflow-database-prefix`` is a usage error before any test runs."""
    if config.getoption("--ironflow-database-prefix", None) or os.environ.get(
        "IRONFLOW_TEST_DATABASE_PREFIX"
    ):
        _prefix(config)


def _prefix(config: pytest.Config) -> str:
    """This session's database name prefix, checked (a `pytest.UsageError` if unusable)."""
    from ironflow_celery.errors import InvalidArgument
    from ironflow_celery.testing import DEFAULT_DATABASE_PREFIX, check_database_prefix

    given = config.getoption("--ironflow-database-prefix", None)
    prefix = given or os.environ.get("IRONFLOW_TEST_DATABASE_PREFIX") or DEFAULT_DATABASE_PREFIX
    try:
        return check_database_prefix(prefix)
    except InvalidArgument as exc:
        source = "--ironflow-database-prefix" if given else "IRONFLOW_TEST_DATABASE_PREFIX"
        raise pytest.UsageError(f"{source}: {exc}") from None


def _where(config: pytest.Config) -> tuple[str, str]:
    """(server URL, where it came from) for this session's test databases."""
    from ironflow_celery.testing import server_url

    explicit = config.getoption("--ironflow-database-url")
    for source, value in (
        ("--ironflow-database-url", explicit),
        ("IRONFLOW_TEST_DATABASE_URL", os.environ.get("IRONFLOW_TEST_DATABASE_URL")),
        ("IRONFLOW_DATABASE_URL", os.environ.get("IRONFLOW_DATABASE_URL")),
    ):
        if value:
            return server_url(value), source
    return server_url(None), "the default"


def _redacted(url: str) -> str:
    """`url` without its password (safe to print)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


@pytest.fixture(scope="session")
def ironflow_databases(request: pytest.FixtureRequest) -> Iterator[TestDatabases]:
    """Makes this session's test databases (and drops their template at the end)."""
    from ironflow_celery.testing import TestDatabases, server_unreachable

    server, source = _where(request.config)
    databases = TestDatabases(server, prefix=_prefix(request.config))
    # One line instead of a driver traceback per test: which URL, from where, what to pass.
    why = server_unreachable(server)
    if why is not None:
        message = (
            f"ironflow testing kit: no PostgreSQL answers at {_redacted(server)} ({source}): "
            f"{why}. Start it, or pass --ironflow-database-url=postgresql://USER@HOST:PORT "
            "(or set IRONFLOW_TEST_DATABASE_URL)"
        )
        if hasattr(request.config, "workerinput"):
            # pytest-xdist turns a worker's pytest.exit into an INTERNALERROR: fail instead
            # (each test using the databases then reports this one line, no traceback).
            pytest.fail(message, pytrace=False)
        pytest.exit(message, returncode=pytest.ExitCode.USAGE_ERROR)
    yield databases
    databases.close()


@pytest.fixture
def ironflow_database_url(
    ironflow_databases: TestDatabases, request: pytest.FixtureRequest
) -> Iterator[str]:
    """URL of a fresh database for this test only."""
    url = ironflow_databases.create(request.node.name)
    yield url
    ironflow_databases.drop(url)


@pytest.fixture(scope="session")
def ironflow_session_database_url(ironflow_databases: TestDatabases) -> Iterator[str]:
    """URL of one database shared by the session's tests (they see each other's rows)."""
    url = ironflow_databases.create("session")
    yield url
    ironflow_databases.drop(url)


@pytest.fixture
def ironflow_clock() -> TestClock:
    """A test clock: decide's ``now`` and the database's ``now()`` in an ironflow_env."""
    from ironflow_celery.testing import TestClock

    return TestClock()


@pytest.fixture
def ironflow_workflows() -> list[Any]:
    """The workflows ``ironflow_env`` registers: override this fixture in your conftest."""
    raise pytest.UsageError(
        "ironflow_env needs your workflows: define a fixture `ironflow_workflows` returning "
        "a list of Workflow classes, (class, handler) pairs or module names"
    )


@pytest.fixture
def ironflow_config() -> RuntimeConfig | None:
    """The `RuntimeConfig` (retries, backoff) of ``ironflow_env``; None means the defaults."""
    return None


@pytest.fixture
def ironflow_env(
    ironflow_database_url: str,
    ironflow_workflows: list[Any],
    ironflow_clock: TestClock,
    ironflow_config: RuntimeConfig | None,
) -> Iterator[WorkflowTestEnv]:
    """A `WorkflowTestEnv` on this test's database, following ``ironflow_clock``."""
    from ironflow_celery.testing import WorkflowTestEnv

    env = WorkflowTestEnv(
        ironflow_database_url, ironflow_workflows, clock=ironflow_clock, config=ironflow_config
    )
    yield env
    env.close()
