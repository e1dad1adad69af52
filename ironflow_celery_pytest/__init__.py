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
else ``IRONFLOW_DATABASE_URL``'s server, else postgresql://postgres@127.0.0.1:5432.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def ironflow_databases(request: pytest.FixtureRequest) -> Iterator[TestDatabases]:
    """Makes this session's test databases (and drops their template at the end)."""
    from ironflow_celery.testing import TestDatabases

    databases = TestDatabases(request.config.getoption("--ironflow-database-url"))
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
