"""The testing kit itself: the clock seam, skipping time, a real worker, the plugin, the docs.

The order saga's own kit tests are in test_example_orders_kit.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from ironflow_celery import (
    Decision,
    EffectContext,
    Message,
    PermanentEffectError,
    RetryPolicy,
    RuntimeConfig,
    Workflow,
)
from ironflow_celery.errors import InvalidArgument
from ironflow_celery.testing import (
    TestClock,
    TestDatabases,
    WorkflowTestEnv,
    assert_events,
    create_database,
    drop_database,
    pending_timers,
)

REPO = Path(__file__).resolve().parent.parent
BROKER_URL = os.environ.get("IRONFLOW_TEST_BROKER_URL", "redis://127.0.0.1:6379/5")


class Ping(Message):
    id: str
    after_seconds: float = 60


class Fire(Message):
    id: str


class Pinged(Message):
    at: datetime


class Fired(Message):
    at: datetime


class Nothing(BaseModel):
    pass


class Pinger(Workflow):
    """Records the `now` decide saw; a Ping arms a timer that comes back as Fire."""

    type = "kit_pinger"
    State, Input, Event = Nothing, Ping | Fire, Pinged | Fired

    def evolve(state, event):
        return state

    def decide(now, state, input):
        if isinstance(input, Ping):
            return Decision.accept(Pinged(at=now)).with_timer_after(
                input.after_seconds, Fire(id=input.id)
            )
        return Decision.accept(Fired(at=now))


class Send(Message):
    id: str


class Sent(Message):
    pass


class Deliver(Message):
    pass


class Mailer(Workflow):
    """One effect, whose handler always fails for good: a dead letter to retry."""

    type = "kit_mailer"
    State, Input, Event, Effect = Nothing, Send, Sent, Deliver

    def evolve(state, event):
        return state

    def decide(now, state, input):
        return Decision.accept(Sent()).with_effect(Deliver())


def unreachable(effect: Deliver, ctx: EffectContext) -> None:
    raise PermanentEffectError("recipient unreachable")


@pytest.fixture
def ironflow_workflows() -> list:
    return [Pinger, (Mailer, unreachable)]


def test_decide_timers_and_the_database_all_follow_the_test_clock(ironflow_env: WorkflowTestEnv):
    clock = ironflow_env.clock
    start = clock.now()
    ironflow_env.execute(Ping(id="p"))

    with ironflow_env.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT now()")).scalar() == start
    [timer] = pending_timers(ironflow_env, Pinger, "p")
    assert timer.due_at == start + timedelta(seconds=60)

    # skip_time with a horizon: the clock moves to it, the timer is not yet due.
    assert ironflow_env.drain(skip_time=timedelta(seconds=30)) == []
    assert clock.now() == start + timedelta(seconds=30)

    [fired] = ironflow_env.drain(skip_time=True)
    assert (fired.kind, fired.type, fired.status, fired.outcome) == (
        "timer",
        "Fire",
        "processed",
        "accepted",
    )
    assert clock.now() == fired.at == start + timedelta(seconds=60)
    assert_events(
        ironflow_env,
        Pinger,
        "p",
        [Pinged(at=start), Fired(at=start + timedelta(seconds=60))],
    )
    with pytest.raises(ValueError, match="backwards"):
        clock.set(start)


def test_retry_all_dead_letters_works_on_a_clock_ahead_of_real_time(
    ironflow_env: WorkflowTestEnv,
):
    ironflow_env.clock.advance(hours=1)  # test time is now an hour ahead of real time
    ironflow_env.execute(Send(id="m"))
    assert [r.status for r in ironflow_env.drain()] == ["dead-lettered"]

    assert ironflow_env.runtime.retry_dead_letters() == 1
    [again] = ironflow_env.drain()
    assert (again.type, again.attempt, again.status) == ("Deliver", 1, "dead-lettered")


def test_a_session_database_and_a_config_of_ones_own(ironflow_session_database_url: str):
    def down(effect: Deliver, ctx: EffectContext) -> None:
        raise ConnectionError("mail server down")

    config = RuntimeConfig(retry_policy=RetryPolicy(max_attempts=2, base_delay=30))
    with WorkflowTestEnv(ironflow_session_database_url, [(Mailer, down)], config=config) as env:
        start = env.clock.now()
        env.execute(Send(id=f"session-{uuid.uuid4().hex[:6]}"))
        ran = env.drain(skip_time=True)
        assert [(r.attempt, r.status) for r in ran] == [
            (1, "failed-will-retry"),
            (2, "dead-lettered"),
        ]
        assert ran[1].at - start > timedelta(seconds=30)  # the configured backoff, skipped
        assert ran[1].error == "ConnectionError: mail server down"


def test_a_database_without_a_clock_attached_keeps_real_time():
    url = create_database(hint="kit_real_time")
    try:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            skew = conn.execute(
                sa.text("SELECT abs(extract(epoch FROM now() - clock_timestamp()))")
            )
            assert skew.scalar() < 60
            clock = TestClock(datetime(2031, 1, 1, tzinfo=UTC))
        clock.attach(engine)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT now()")).scalar() == clock.now()
        engine.dispose()
    finally:
        drop_database(url)
    with pytest.raises(ValueError, match="refusing"):
        drop_database("postgresql://postgres@127.0.0.1:5432/postgres")


def test_drain_through_a_real_celery_worker(ironflow_env: WorkflowTestEnv):
    queue = f"kit-{uuid.uuid4().hex[:8]}"
    app = Celery(f"kit-{queue}", broker=BROKER_URL, set_as_current=False)
    app.conf.update(task_default_queue=queue, worker_hijack_root_logger=False)
    ironflow_env.install(app)
    before = {t.name for t in threading.enumerate()}
    with start_worker(
        app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"
    ):
        ironflow_env.execute(Ping(id="w", after_seconds=5))
        ironflow_env.clock.advance(seconds=5)
        [fired] = ironflow_env.drain(worker=True, timeout=120)
    assert (fired.kind, fired.type, fired.status) == ("timer", "Fire", "processed")
    assert_events(ironflow_env, Pinger, "w", [Pinged, Fired])
    # The worker ran no relays (the kit publishes), so none outlives it.
    leaked = {t.name for t in threading.enumerate()} - before
    assert not [name for name in leaked if name.startswith("ironflow-")], leaked


def _pytest(tmp_path: Path, *args: str, checkout: bool = True) -> subprocess.CompletedProcess[str]:
    """Run pytest on `tmp_path` as a user's project would: its own (empty) configuration.

    With ``checkout=False`` the repository is not on the path, as after `pip install`: only
    the installed package (the venv's editable install maps just its packages) is importable.
    """
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "IRONFLOW_WORKFLOWS"}
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if checkout:
        path.insert(0, str(REPO))
    else:
        path = [p for p in path if Path(p).resolve() != REPO.resolve()]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:celery", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_plugin_is_registered_and_costs_nothing_until_used(tmp_path: Path):
    (tmp_path / "test_plain.py").write_text(
        "import sys\n"
        "\n"
        "def test_a_suite_without_ironflow_fixtures_does_not_import_it():\n"
        "    assert 'ironflow_celery' not in sys.modules\n"
    )
    plain = _pytest(tmp_path, "test_plain.py")
    assert plain.returncode == 0, plain.stdout + plain.stderr

    # Imported into a test module, the kit's Test* classes are not collected as tests.
    (tmp_path / "test_user.py").write_text(
        "from ironflow_celery.testing import TestClock, TestDatabases, WorkflowTestEnv\n"
        "\n"
        "def test_fixtures_come_from_the_entry_point(ironflow_clock):\n"
        "    assert isinstance(ironflow_clock, TestClock)\n"
    )
    server = os.environ.get("IRONFLOW_TEST_DATABASE_URL") or os.environ.get(
        "IRONFLOW_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    user = _pytest(
        tmp_path,
        "test_user.py",
        "-W",
        "error::pytest.PytestCollectionWarning",
        f"--ironflow-database-url={server}",  # the plugin's option is known
    )
    assert user.returncode == 0, user.stdout + user.stderr
    assert "1 passed" in user.stdout


def test_docs_testing_example_runs_as_a_users_test_suite(tmp_path: Path):
    """Both of docs/testing.md's examples pass where only the installed package is importable
    (issue 24 §4: a doc example must not need the repository's `examples/`)."""
    docs = (REPO / "docs" / "testing.md").read_text()
    section = docs.split("## A complete example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "no python block in docs/testing.md's complete example"
    (tmp_path / "test_orders.py").write_text(code.group(1))
    # The short example before it ("In short"), with the imports it leaves out.
    short = docs.split("## In short", 1)[1].split("## A complete example", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", short, re.S)
    assert snippet, "no python block in docs/testing.md's short example"
    imports = "import pytest\nfrom ironflow_celery.examples.orders import OrderSaga, PlaceOrder\n\n"
    (tmp_path / "test_readme.py").write_text(imports + snippet.group(1))
    # Proof that this run is outside the checkout: the repository's `examples` is not there.
    (tmp_path / "test_no_checkout.py").write_text(
        "import importlib.util\n"
        "\n"
        "def test_the_repository_is_not_importable():\n"
        "    assert importlib.util.find_spec('examples') is None\n"
    )
    result = _pytest(
        tmp_path, "test_orders.py", "test_readme.py", "test_no_checkout.py", checkout=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(re.findall(r"^def test_", code.group(1) + snippet.group(1), re.M))
    assert f"{count + 1} passed" in result.stdout


# -- issue 24 §5: an unreachable server, and a prefix per project -----------------------------

USES_A_DATABASE = (
    "def test_one(ironflow_database_url):\n"
    "    print('DATABASE', ironflow_database_url.rsplit('/', 1)[1])\n"
    "\n"
    "def test_two(ironflow_database_url):\n"
    "    pass\n"
)


@pytest.mark.parametrize("workers", [[], ["-p", "xdist", "-n", "2"]], ids=["plain", "xdist"])
def test_an_unreachable_server_is_one_line_naming_the_url_and_the_option(
    tmp_path: Path, workers: list[str]
):
    """No driver traceback: the URL tried, where it came from, and the option to pass."""
    (tmp_path / "test_user.py").write_text(USES_A_DATABASE)
    url = "postgresql://someone:secret@127.0.0.1:1/postgres"
    result = _pytest(tmp_path, *workers, f"--ironflow-database-url={url}")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "INTERNALERROR" not in output and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "no PostgreSQL answers at" in line]
    assert lines, output
    assert "postgresql://someone:***@127.0.0.1:1/postgres" in lines[0]  # no password shown
    assert "--ironflow-database-url" in lines[0]
    assert "secret" not in output
    assert len(output.splitlines()) < 40, output  # not 253 lines of psycopg and SQLAlchemy


def test_test_databases_take_the_projects_prefix(tmp_path: Path):
    """Two projects sharing a server name their databases apart; a bad prefix is refused."""
    (tmp_path / "test_user.py").write_text(USES_A_DATABASE)
    server = os.environ.get("IRONFLOW_TEST_DATABASE_URL") or os.environ.get(
        "IRONFLOW_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    result = _pytest(
        tmp_path,
        "-s",
        f"--ironflow-database-url={server}",
        "--ironflow-database-prefix=billing_test_",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (name,) = re.findall(r"^DATABASE (\S+)", result.stdout, re.M)
    assert name.startswith("billing_test_test_one_"), name
    databases = TestDatabases(server, prefix="shipping_")
    try:
        url = databases.create("x")
        assert make_url(url).database.startswith("shipping_x_")
        with pytest.raises(InvalidArgument, match="refusing to drop"):
            drop_database(url)  # not a name of the default prefix
        databases.drop(url)
    finally:
        databases.close()

    refused = _pytest(tmp_path, f"--ironflow-database-url={server}",
                      "--ironflow-database-prefix=Billing-Test")  # fmt: skip
    assert refused.returncode == pytest.ExitCode.USAGE_ERROR, refused.stdout + refused.stderr
    assert "--ironflow-database-prefix: test database prefix 'Billing-Test'" in refused.stderr
    with pytest.raises(InvalidArgument, match="lower-case letters"):
        TestDatabases(server, prefix="x" * 31)
