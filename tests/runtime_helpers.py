"""A running ironflow deployment for tests: relays + an in-thread Celery worker on Redis.

`TestApp` is the Celery port of ironflow's runtime test harness: effect poll 50 ms, timer
poll 100 ms, shutdown 5 s, retries ``max_attempts=3`` with a 50 ms base and 200 ms cap,
and waits that poll every 50 ms for up to 60 s (a generous bound for one event: it costs
nothing when things work, and a loaded CI machine is slow, not stuck). Waits for a large
amount of work use `wait_for_progress`, which fails only when the work stops moving.
Each app publishes to its own Redis queue (``t-<uuid>``) so parallel tests sharing one
Redis never see each other's messages; the queue and its binding are deleted when the app
stops.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import redis
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker
from workflows import CALLS, TestWorkflow, TimerTestWorkflow, test_handler, timer_test_handler

from ironflow_celery import RetryPolicy, RuntimeConfig, WorkflowRuntime, install
from ironflow_celery.storage.store import PostgresStore
from tests.brokers import AMQP_URL, require_rabbitmq  # noqa: F401  (re-exported for the tests)
from tests.waiting import wait_for_progress  # noqa: F401  (re-exported for the tests)

BROKER_URL = os.environ.get("IRONFLOW_TEST_BROKER_URL", "redis://127.0.0.1:6379/5")
CLOSED_BROKER_URL = "redis://127.0.0.1:1/0"

T = TypeVar("T")

DEFAULT_WORKFLOWS: tuple[tuple[type, Any], ...] = (
    (TestWorkflow, test_handler),
    (TimerTestWorkflow, timer_test_handler),
)


def test_config(**changes: Any) -> RuntimeConfig:
    """ironflow's harness settings (fast polls, short backoff), with overrides."""
    retry = changes.pop("retry_policy", RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2))
    base = {
        "effect_poll_interval": 0.05,
        "timer_poll_interval": 0.1,
        "shutdown_timeout": 5.0,
        "retry_policy": retry,
    }
    base.update(changes)
    return RuntimeConfig(**base)


test_config.__test__ = False  # type: ignore[attr-defined]


WAIT = 60.0  # seconds: the default bound on waiting for one event


def wait_until(
    predicate: Callable[[], T], timeout: float = WAIT, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def celery_app(queue: str, broker_url: str = BROKER_URL) -> Celery:
    """A Celery app publishing to and consuming from its own queue, relay bootstep off."""
    app = Celery(f"ironflow-test-{queue}", broker=broker_url, set_as_current=False)
    app.conf.update(
        ironflow_relay_enabled=False,
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options={"visibility_timeout": 3600},
    )
    return app


def delete_queue(queue: str, broker_url: str = BROKER_URL) -> None:
    """Drop a test queue and its kombu binding from Redis."""
    client = redis.Redis.from_url(broker_url)
    try:
        keys = [queue, f"_kombu.binding.{queue}"]
        keys += [f"{queue}{sep}{p}" for sep in ("\x06\x16",) for p in range(10)]
        client.delete(*keys)
    finally:
        client.close()


def queue_length(queue: str, broker_url: str = BROKER_URL) -> int:
    """Messages waiting in a Redis queue (LLEN)."""
    client = redis.Redis.from_url(broker_url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def build_runtime(
    store: PostgresStore,
    app: Celery | None,
    config: RuntimeConfig,
    workflows: Iterable[tuple[type, Any]] = DEFAULT_WORKFLOWS,
) -> WorkflowRuntime:
    """ironflow's builder, wired to `app`."""
    builder = WorkflowRuntime.builder(store).config(config)
    for workflow, handler in workflows:
        if handler is None:
            builder.register_without_effects(workflow)
        else:
            builder.register(workflow, handler)
    if app is not None:
        builder.celery_app(app)
    runtime = builder.build_runtime()
    if app is not None:
        install(app, runtime=runtime)
    return runtime


class TestApp:
    """Relays (``runtime.run`` in a thread) + an in-thread Celery worker, both optional."""

    __test__ = False

    # How long stop_worker lets Celery's test worker thread finish before it raises: the
    # yardstick that worker-stop bounds in tests are set against.
    worker_shutdown_timeout = 60.0

    def __init__(
        self,
        store: PostgresStore,
        *,
        workflows: Iterable[tuple[type, Any]] = DEFAULT_WORKFLOWS,
        config: RuntimeConfig | None = None,
        concurrency: int = 4,
        broker_url: str = BROKER_URL,
    ) -> None:
        self.store = store
        self.queue = f"t-{uuid.uuid4().hex}"
        self.broker_url = broker_url
        self.app = celery_app(self.queue, broker_url)
        self.config = config or test_config()
        self.runtime = build_runtime(store, self.app, self.config, workflows)
        self.service = self.runtime.service
        self.concurrency = concurrency
        self._stack = ExitStack()
        self._worker_stack: ExitStack | None = None
        self._relay_stop: threading.Event | None = None
        self._relay_thread: threading.Thread | None = None
        self.relay_result: bool | None = None
        CALLS.reset()

    # -- lifecycle ------------------------------------------------------------------------
    def start_relays(self) -> None:
        """Run ``runtime.run(stop)`` in a thread, as a deployment's relay process does."""
        assert self._relay_thread is None, "relays already running"
        stop = threading.Event()

        def run() -> None:
            self.relay_result = self.runtime.run(stop)

        self._relay_stop = stop
        self._relay_thread = threading.Thread(target=run, name="test-relays", daemon=True)
        self._relay_thread.start()

    def stop_relays(self) -> float:
        """Signal shutdown and wait for ``runtime.run`` to return; the seconds it took."""
        if self._relay_thread is None:
            return 0.0
        assert self._relay_stop is not None
        began = time.monotonic()
        self._relay_stop.set()
        self._relay_thread.join(self.config.shutdown_timeout + 5)
        took = time.monotonic() - began
        assert not self._relay_thread.is_alive(), "runtime.run did not return"
        self._relay_thread = None
        return took

    def start_worker(self, concurrency: int | None = None) -> None:
        """Start an in-thread Celery worker (threads pool) on this app's queue."""
        assert self._worker_stack is None, "worker already running"
        stack = ExitStack()
        stack.enter_context(
            start_worker(
                self.app,
                pool="threads",
                concurrency=concurrency or self.concurrency,
                perform_ping_check=False,
                shutdown_timeout=self.worker_shutdown_timeout,
                loglevel="WARNING",
            )
        )
        self._worker_stack = stack

    def stop_worker(self) -> float:
        """Stop the worker; the seconds it took."""
        if self._worker_stack is None:
            return 0.0
        began = time.monotonic()
        stack, self._worker_stack = self._worker_stack, None
        stack.close()
        return time.monotonic() - began

    def start(self, *, relays: bool = True, worker: bool = True) -> TestApp:
        if worker:
            self.start_worker()
        if relays:
            self.start_relays()
        return self

    def stop(self) -> None:
        try:
            self.stop_relays()
        finally:
            try:
                self.stop_worker()
            finally:
                delete_queue(self.queue, self.broker_url)

    def __enter__(self) -> TestApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries -----------------------------------------------------------------------------
    def wait_until(self, predicate: Callable[[], T], timeout: float = WAIT, what: str = "") -> T:
        return wait_until(predicate, timeout, what=what)

    def events(self, workflow_type: str, workflow_id: str) -> list[str]:
        """The `type` tags of an instance's events, in order."""
        stored = self.service.fetch_workflow_events(workflow_type, workflow_id)
        return [e.payload["type"] for e in stored]

    def wait_for_events(
        self, workflow_type: str, workflow_id: str, expected: Sequence[str], timeout: float = WAIT
    ) -> list[str]:
        """Wait until the instance's events are exactly `expected`."""
        last: list[str] = []

        def done() -> bool:
            nonlocal last
            last = self.events(workflow_type, workflow_id)
            return last == list(expected)

        try:
            wait_until(done, timeout)
        except AssertionError:
            raise AssertionError(
                f"{workflow_type}:{workflow_id} events {last} never became {list(expected)}"
            ) from None
        return last

    def queue_length(self) -> int:
        return queue_length(self.queue, self.broker_url)


@contextmanager
def running_app(store: PostgresStore, **kwargs: Any) -> Iterator[TestApp]:
    """A started `TestApp` (worker then relays), stopped and cleaned up afterwards."""
    relays = kwargs.pop("relays", True)
    worker = kwargs.pop("worker", True)
    app = TestApp(store, **kwargs)
    try:
        app.start(relays=relays, worker=worker)
        yield app
    finally:
        app.stop()


# -- SQL helpers --------------------------------------------------------------------------


def scalar(db: sa.Engine, statement: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


def rows(db: sa.Engine, statement: str, **params: Any) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(sa.text(statement), params))


def execute(db: sa.Engine, statement: str, **params: Any) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(statement), params)


def outbox(db: sa.Engine, workflow_id: str | None = None) -> list[Any]:
    """Outbox rows (of one instance), oldest first."""
    return rows(
        db,
        "SELECT * FROM ironflow.outbox WHERE (CAST(:wid AS text) IS NULL OR workflow_id = :wid)"
        " ORDER BY created_at, id",
        wid=workflow_id,
    )


def timers(db: sa.Engine, workflow_id: str | None = None) -> list[Any]:
    return rows(
        db,
        "SELECT * FROM ironflow.timers WHERE (CAST(:wid AS text) IS NULL OR workflow_id = :wid)"
        " ORDER BY created_at, id",
        wid=workflow_id,
    )


def insert_effect(
    db: sa.Engine,
    workflow_type: str,
    workflow_id: str,
    payload: Any,
    **columns: Any,
) -> uuid.UUID:
    """Insert an outbox row directly (optionally with attempts, locked_by, … set)."""
    import json

    names = ["workflow_type", "workflow_id", "payload", *columns]
    values = [":wt", ":wid", "CAST(:payload AS jsonb)", *(f":{c}" for c in columns)]
    with db.begin() as conn:
        return conn.execute(
            sa.text(
                f"INSERT INTO ironflow.outbox ({', '.join(names)}) VALUES ({', '.join(values)})"
                " RETURNING id"
            ),
            {"wt": workflow_type, "wid": workflow_id, "payload": json.dumps(payload), **columns},
        ).scalar_one()


def insert_timer(
    db: sa.Engine,
    workflow_type: str,
    workflow_id: str,
    input: Any,
    *,
    delay: float = 0.0,
    key: str | None = None,
    notify: bool = True,
) -> uuid.UUID:
    """Insert a timer row directly, due `delay` seconds from the database's now()."""
    import json

    with db.begin() as conn:
        timer_id = conn.execute(
            sa.text(
                "INSERT INTO ironflow.timers (workflow_type, workflow_id, fire_at, input, key)"
                " VALUES (:wt, :wid, now() + make_interval(secs => :delay),"
                " CAST(:input AS jsonb), :key) RETURNING id"
            ),
            {
                "wt": workflow_type,
                "wid": workflow_id,
                "delay": float(delay),
                "input": json.dumps(input),
                "key": key,
            },
        ).scalar_one()
        if notify:
            conn.execute(sa.text("SELECT pg_notify('ironflow_timers', :wt)"), {"wt": workflow_type})
    return timer_id


def corrupt_event(db: sa.Engine, workflow_type: str, workflow_id: str) -> None:
    """Append an event that no workflow can deserialise (replay then fails)."""
    with db.begin() as conn:
        seq = conn.execute(
            sa.text(
                "SELECT coalesce(max(sequence), 0) + 1 FROM ironflow.events"
                " WHERE workflow_type = :wt AND workflow_id = :wid"
            ),
            {"wt": workflow_type, "wid": workflow_id},
        ).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)"
                ' VALUES (:wt, :wid, :seq, \'{"type": "Garbage", "x": 1}\'::jsonb)'
            ),
            {"wt": workflow_type, "wid": workflow_id, "seq": seq},
        )


def effect_dead_letters(
    db: sa.Engine,
    max_attempts: int,
    workflow_type: str | None = None,
    workflow_id: str | None = None,
) -> list[Any]:
    """Dead-lettered effects by ironflow's predicate (attempts >= max, unprocessed)."""
    return rows(
        db,
        "SELECT * FROM ironflow.outbox WHERE processed_at IS NULL AND attempts >= :max"
        " AND (CAST(:wt AS text) IS NULL OR workflow_type = :wt)"
        " AND (CAST(:wid AS text) IS NULL OR workflow_id = :wid)",
        max=max_attempts,
        wt=workflow_type,
        wid=workflow_id,
    )


def timer_dead_letters(db: sa.Engine, max_attempts: int, workflow_id: str | None = None) -> list:
    return rows(
        db,
        "SELECT * FROM ironflow.timers WHERE processed_at IS NULL AND attempts >= :max"
        " AND (CAST(:wid AS text) IS NULL OR workflow_id = :wid)",
        max=max_attempts,
        wid=workflow_id,
    )


def wait_for_listener(db: sa.Engine, timeout: float = WAIT) -> None:
    """Wait until a relay's waker is LISTENing on this database."""
    wait_until(
        lambda: scalar(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query ILIKE 'LISTEN ironflow_timers%'",
        ),
        timeout,
        what="the relay's LISTEN connection",
    )


class RecordingEvent(threading.Event):
    """A relay's wake-up or stop event that records how long each wait would sleep and
    returns at once, as if that time had passed (unset): what a relay would wait for, read
    without waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False
