"""End-to-end: a worker host that dies or loses a service (DESIGN invariant 13).

Real ``celery worker`` processes (``procs`` and ``queue``: tests/conftest.py), each test on its
own queue and database; the services a test stops, pauses or cuts off are disposable
instances of its own (a PostgreSQL cluster, a redis-server, a TCP proxy per host).
"""

from __future__ import annotations

import base64
import contextlib
import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis
from celery import Celery

from ironflow_celery import install
from ironflow_celery.engine.deliveries import LostDeliveries
from tests.e2e import (
    PG_BIN,
    REDIS_URL,
    DisposablePostgres,
    DisposableRedis,
    Processes,
    all_processed,
    charged_per_instance,
    descendants,
    disposable_database,
    make_env,
    outbox_counts,
    prepare_database,
    redis_queue_cleanup,
    scalar,
    service_for,
    sql,
    wait_until,
)
from tests.e2e_apps.workflows import OrderWorkflow, Place
from tests.waiting import wait_for_progress

pytestmark = pytest.mark.e2e


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DisposableRedis]:
    """A redis-server of our own: the tests read kombu's ``unacked`` hash on it."""
    server = DisposableRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class BlackHoleProxy:
    """A TCP proxy to one server (a host's own link to the broker) that can silently drop
    everything, as a cut link or a black-holed route does: connections stay open, bytes
    in either direction vanish, nothing is reset."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropping = threading.Event()
        self.closed = threading.Event()
        self._sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is gone (teardown)
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self.closed.is_set():
            try:
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    if not self.dropping.is_set():
                        peers[sock].sendall(data)
            except OSError:
                break
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.closed.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


BROKER_TROUBLE = ("Connection to broker lost", "Couldn't ack", "missed 2 health check")
"""What a worker logs when a command on its broker connection times out or fails."""


def first_logged(output: str, marks: tuple[str, ...]) -> datetime | None:
    """When a worker first logged a line holding one of `marks` (its log's local time)."""
    for line in output.splitlines():
        if line.startswith("[") and any(mark in line for mark in marks):
            return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    return None


def handler_pids(url: str) -> set[int]:
    return {r[0] for r in sql(url, "SELECT DISTINCT pid FROM e2e_calls")}


def stop_postgres(pg: DisposablePostgres) -> None:
    pg._run(str(PG_BIN / "pg_ctl"), "stop", "-D", str(pg.data), "-m", "fast", "-w", "-t", "30")


# -- 1. a host that reaches the broker but not PostgreSQL --------------------------------------


@pytest.mark.timeout(600)  # waits for progress (90 s stall), not for a wall time
def test_host_without_postgres_pauses_its_queues_and_drops_nothing(
    procs: Processes, queue: str
) -> None:
    """Invariant 13: a worker whose start guards cannot reach PostgreSQL sends every message
    back (none ends in ``raised unexpected``: Celery's default of 3 retries no longer
    applies), stops consuming ironflow's queue and says so, and resumes by itself once the
    database answers; every effect then completes, its follow-up once."""
    n = 60
    with disposable_database() as (pg, url), redis_queue_cleanup(queue) as client:
        env = make_env(
            url, REDIS_URL, queue,
            effect_lock_duration=5, max_attempts=50, backoff_base=0.2, backoff_max=1,
        )  # fmt: skip
        worker = procs.worker("worker", env, pool="prefork", concurrency=2)
        worker.wait_for_output("ironflow relay started (process)", 60)
        service = service_for(url)
        for i in range(n):
            service.execute(Place(id=f"nodb-{i}", sleep=0.3))
        service.store.dispose()
        wait_until(
            lambda: scalar(url, "SELECT count(*) FROM e2e_calls") >= 4,
            60,
            "handlers to be under way",
            interval=0.05,
        )
        assert outbox_counts(url)[0] < n, "finished before the outage; slow the handler"
        stop_postgres(pg)

        worker.wait_for_output("paused consuming", 120)
        # Down long enough for Celery's default (3 retries, 0.5 + 1 + 2 + 4 s) to run out.
        started = time.monotonic()
        bounced = worker.output().count("start guard failed")
        wait_until(lambda: time.monotonic() - started > 20, 60, "20 s of outage", interval=1)
        # Paused: the messages wait in the broker instead of bouncing through the worker.
        assert client.llen(queue) > 0
        assert worker.output().count("start guard failed") - bounced < 40

        pg.start()
        worker.wait_for_output("resumed consuming", 120)
        wait_for_progress(
            lambda: outbox_counts(url)[0],
            n,
            f"{n} effects after the outage",
            diagnose=lambda: f"(processed, total): {outbox_counts(url)}",
        )
        time.sleep(0.5)  # room for a duplicate follow-up to show
        assert all_processed(url, n)
        assert charged_per_instance(url) == {1: n}
        log = worker.output()
        # A handler whose acknowledgement failed mid-outage may end "raised unexpected:
        # DatabaseUnavailable" (its row comes back after its lease); a message that never
        # started must never end that way.
        assert "raised unexpected: StartGuardUnavailable" not in log, log[-3000:]
        assert "start guard failed" in log  # the outage did reach start guards
        print(
            f"FIGURE no database: {log.count('start guard failed')} messages sent back, "
            f"{log.count('raised unexpected: StartGuardUnavailable')} dropped"
        )


# -- 2. a worker host killed with prefetched messages (Redis) ----------------------------------


@pytest.mark.timeout(600)
def test_killed_host_prefetched_rows_return_within_leases(
    database_url: str, procs: Processes, queue: str, broker: DisposableRedis
) -> None:
    """Invariant 13: a worker killed with messages in its prefetch (kombu's ``unacked`` hash,
    restored only after the 1 h visibility timeout) costs its rows a few leases, not
    ``ironflow_dispatch_timeout`` (30 min): the surviving relay finds that no live worker
    holds them and releases them. Rows whose messages wait in a live worker's prefetch are
    left alone (invariant 10): the survivor skips nothing as stale."""
    n = 24
    prepare_database(database_url)
    # One message per row: the victim must hold prefetched messages it has not started when
    # it is killed. With groups (the default) the 24 rows may travel in two messages, and the
    # victim may hold only the one it runs (acknowledged to Redis when it started).
    env = make_env(database_url, broker.url, queue, effect_lock_duration=3, effect_batch_size=1)
    survivor = procs.worker("survivor", env, pool="prefork", concurrency=1)
    victim = procs.worker("victim", env, pool="prefork", concurrency=1, relay=False)
    survivor.wait_for_output("ironflow relay started (process)", 60)
    victim.wait_for_output("ready.", 60)
    service = service_for(database_url)
    for i in range(n):
        service.execute(Place(id=f"dead-{i}", sleep=0.5, sleep_once=True))
    service.store.dispose()
    client = redis.Redis.from_url(broker.url)
    wait_until(
        lambda: {p.pid for p in descendants(victim.pid)} & handler_pids(database_url),
        60,
        "the victim to run a handler",
        interval=0.05,
    )
    assert client.hlen("unacked") > 0
    victim.kill()  # kill -9, the whole host
    killed_at = time.monotonic()

    wait_until(lambda: all_processed(database_url, n), 240, "every row after the kill")
    elapsed = time.monotonic() - killed_at
    print(f"FIGURE killed host: all {n} rows done {elapsed:.1f}s after the kill")
    time.sleep(0.5)  # room for a duplicate follow-up to show
    assert charged_per_instance(database_url) == {1: n}
    log = survivor.output()
    assert "taken off the queue by a worker that is gone" in log, log[-3000:]
    assert "stale-skipped" not in log  # no message of a live worker was given up
    assert elapsed < 240  # dispatch_timeout is 1800 s: found, not waited out


# -- 2b. a message popped by a consumer that vanished -------------------------------------------


@pytest.mark.timeout(600)
def test_message_popped_by_a_vanished_consumer_is_published_again(
    database_url: str, procs: Processes, queue: str, broker: DisposableRedis
) -> None:
    """Invariant 13, issue 20 §6 (a): Redis hands a pushed message to whichever consumer's
    ``BRPOP`` waits; a host cut off the network a moment before still has one waiting, and
    the message goes down the dead link: in no queue, in no ``unacked`` entry. The relay
    that published it releases its row within a few looks (it used to renew it until
    ``ironflow_dispatch_timeout``, 30 min), and a live worker runs it once."""
    prepare_database(database_url)
    env = make_env(database_url, broker.url, queue, effect_lock_duration=3)
    relay = procs.relay("relay", env)
    client = redis.Redis.from_url(broker.url)
    try:
        service = service_for(database_url)
        service.execute(Place(id="vanished-0"))
        service.store.dispose()
        # the cut host's consumer: it pops the message, which then never arrives
        popped = client.brpop([queue], timeout=60)
        assert popped is not None, "the relay published nothing"
        assert json.loads(popped[1])["headers"]["task"].startswith("ironflow.")
        popped_at = time.monotonic()
        assert not all_processed(database_url, 1)
        worker = procs.worker("survivor", env, concurrency=1, relay=False)
        worker.wait_for_output("ready.", 60)
        wait_until(lambda: all_processed(database_url, 1), 240, "the row whose message vanished")
        elapsed = time.monotonic() - popped_at
        print(f"FIGURE vanished message: its row done {elapsed:.1f}s after the pop")
        time.sleep(0.5)  # room for a duplicate follow-up to show
        assert charged_per_instance(database_url) == {1: 1}
        assert "in no queue" in relay.output(), relay.output()[-3000:]
    finally:
        client.close()


# -- 3. a worker host cut off from the broker ---------------------------------------------------


@pytest.mark.timeout(600)
def test_host_cut_off_from_broker_gives_its_reserved_rows_back(
    database_url: str, procs: Processes, queue: str, broker: DisposableRedis
) -> None:
    """Invariant 13: a worker whose link to Redis silently drops everything holds no rows
    hostage. It notices the dead connection within seconds (the socket timeout and health
    check ironflow's install sets where the app did not) and says so, and the rows it had
    reserved are released by the surviving relay and run elsewhere, each follow-up once,
    while the link is still cut."""
    n = 24
    prepare_database(database_url)
    proxy = BlackHoleProxy(broker.port)
    try:
        # One message per row: the cut host must hold messages it reserved but never started
        # when its link drops. With groups (the default) the 24 rows may travel in two
        # messages; the cut host may be running its only one when the link drops and finish
        # it (the database is still reachable), and then nothing is left to release.
        env = make_env(database_url, broker.url, queue, effect_lock_duration=3, effect_batch_size=1)
        survivor = procs.worker("survivor", env, pool="prefork", concurrency=1)
        cut = procs.worker(
            "cut", {**env, "CELERY_BROKER_URL": proxy.url}, concurrency=1, relay=False
        )
        survivor.wait_for_output("ironflow relay started (process)", 60)
        cut.wait_for_output("ready.", 60)
        service = service_for(database_url)
        for i in range(n):
            service.execute(Place(id=f"cut-{i}", sleep=0.5, sleep_once=True))
        service.store.dispose()
        wait_until(
            lambda: {p.pid for p in descendants(cut.pid)} & handler_pids(database_url),
            60,
            "the cut-off worker to run a handler",
            interval=0.05,
        )
        proxy.dropping.set()
        cut_at = datetime.now()  # the workers log local time

        wait_until(lambda: all_processed(database_url, n), 240, "every row while cut off")
        done_at = datetime.now()
        assert proxy.dropping.is_set()
        time.sleep(0.5)  # room for a duplicate follow-up to show
        assert charged_per_instance(database_url) == {1: n}
        assert "taken off the queue by a worker that is gone" in survivor.output()
        # The cut-off host says so by itself: its first command on the dead link times out
        # (without a socket timeout the acknowledgement blocked its event loop for good).
        logged = wait_until(
            lambda: first_logged(cut.output(), BROKER_TROUBLE),
            120,
            "the cut-off worker to log its broker trouble",
        )
        assert (logged - cut_at).total_seconds() < 60, (logged, cut_at)
        noticed = (logged - cut_at).total_seconds()
        done = (done_at - cut_at).total_seconds()
        print(
            f"FIGURE cut-off host: all {n} rows done {done:.1f}s after the cut; "
            f"it noticed after {noticed:.1f}s"
        )
    finally:
        proxy.close()


# -- the parts on their own ---------------------------------------------------------------------


def _app(broker_url: str, **conf: object) -> Celery:
    app = Celery("hosts-unit", broker=broker_url)
    app.conf.update(conf)
    install(app, workflows=[OrderWorkflow], database_url="postgresql://postgres@127.0.0.1/x")
    return app


def test_ironflow_tasks_send_their_messages_back_without_a_retry_limit() -> None:
    """Celery's ``retry(max_retries=None)`` means the task's default (3): ironflow's tasks
    carry None (unlimited) themselves, so a message sent back is never dropped."""
    app = _app(REDIS_URL)
    names = [name for name in app.tasks if name.startswith("ironflow.e2e_order.")]
    assert {name.rsplit(".", 1)[1] for name in names} >= {"effect", "timer", "execute"}
    assert all(app.tasks[name].max_retries is None for name in names)


def test_broker_defaults_fill_only_what_the_app_left_unset() -> None:
    app = _app(REDIS_URL, broker_transport_options={"socket_timeout": 3, "visibility_timeout": 60})
    assert app.conf.broker_transport_options == {
        "socket_timeout": 3,
        "visibility_timeout": 60,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 5,
    }
    assert _app("amqp://guest:guest@127.0.0.1:5672//").conf.broker_heartbeat == 20.0
    assert _app("amqp://guest@127.0.0.1//", broker_heartbeat=120).conf.broker_heartbeat == 20.0
    assert _app("amqp://guest@127.0.0.1//", broker_heartbeat=0).conf.broker_heartbeat == 0
    assert _app("amqp://guest@127.0.0.1//").conf.broker_transport_options == {}


def test_lost_deliveries_take_two_looks_and_spare_young_messages(
    broker: DisposableRedis,
) -> None:
    """A row counts as lost only when its message has been unacknowledged for a while and
    no live worker held it at two looks in a row; its stale ``unacked`` entry goes."""
    app = Celery("hosts-lost", broker=broker.url)
    client = redis.Redis.from_url(broker.url)
    old, young, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def unacked(task_id: uuid.UUID, age: float) -> None:
        tag = f"tag-{task_id}"
        message = {"headers": {"id": str(task_id)}, "properties": {}, "body": ""}
        client.zadd("unacked_index", {tag: time.time() - age})
        client.hset("unacked", tag, json.dumps([message, "q", "q"]))

    unacked(old, 60)
    unacked(young, 0)
    unacked(other, 60)  # not one of the relay's rows
    # a grouped message (rows=[...] in the type's effect task) carrying two rows, one of
    # them the relay's
    grouped, mine, theirs = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    items = [[str(row), "w", 1, "token", None, None, None] for row in (mine, theirs)]
    body = json.dumps([[], {"rows": items}, {}]).encode()
    message = {
        "headers": {"id": str(grouped), "task": "ironflow.e2e_order.effect"},
        "properties": {"body_encoding": "base64"},
        "content-type": "application/json",
        "body": base64.b64encode(body).decode(),
    }
    client.zadd("unacked_index", {"tag-grouped": time.time() - 60})
    client.hset("unacked", "tag-grouped", json.dumps([message, "q", "q"]))
    finder = LostDeliveries(app, reply_timeout=0.5)  # no worker runs: nobody holds anything
    try:
        assert finder([old, young, mine], 10) == set()  # the first look only suspects
        assert finder([old, young, mine], 10) == {old, mine}
        assert client.hexists("unacked", f"tag-{old}") is False
        assert client.hexists("unacked", "tag-grouped") is False
        assert client.hexists("unacked", f"tag-{young}") and client.hexists(
            "unacked", f"tag-{other}"
        )
        assert finder([young], 10) == set()
    finally:
        app.pool.force_close_all()
        client.close()


def test_lost_deliveries_find_a_message_that_vanished_but_spare_a_queued_one(
    broker: DisposableRedis,
) -> None:
    """Issue 20 §6 (a): a message Redis handed to the dead ``BRPOP`` of a host cut off the
    network is in no queue and in no ``unacked`` entry; its row counts as lost after two
    looks. A row whose message waits in its queue (any priority list) never does
    (invariant 10), nor one whose queue the relay was not told."""
    app = Celery("hosts-vanished", broker=broker.url)
    client = redis.Redis.from_url(broker.url)
    gone, waiting, urgent, delivered = (uuid.uuid4() for _ in range(4))

    def message(task_id: uuid.UUID) -> str:
        return json.dumps({"headers": {"id": str(task_id)}, "properties": {}, "body": ""})

    client.lpush("q", message(waiting))
    client.lpush("q\x06\x166", message(urgent))  # kombu's list for priority 6
    client.zadd("unacked_index", {"tag-d": time.time()})  # taken just now by a live worker
    client.hset("unacked", "tag-d", json.dumps([json.loads(message(delivered)), "", "q"]))
    rows = [gone, waiting, urgent, delivered]
    finder = LostDeliveries(app, reply_timeout=0.5)  # no worker runs: nobody holds anything
    try:
        assert finder(rows, 10, ["q"]) == set()  # the first look only suspects
        assert finder(rows, 10, ["q"]) == {gone}
        assert finder(rows, 10) == set()  # no queue named: absence proves nothing
        assert finder(rows, 10) == set()
        assert client.llen("q") == 1 and client.hexists("unacked", "tag-d")
    finally:
        app.pool.force_close_all()
        client.close()
