"""A testing kit for your own workflows: a test database, a test clock, ``drain()``, asserts.

- `create_database` / `drop_database` / `TestDatabases`: throwaway PostgreSQL databases with
  the ironflow schema applied (cloned from a migrated template, so each costs milliseconds).
- `TestClock`: the time that ``decide(now, …)`` sees *and* that the database's ``now()``
  returns, so timers fire, backoffs end and leases expire only when the test advances it
  (``clock.advance(minutes=2)``), as in Temporal's time-skipping test environment.
- `WorkflowTestEnv` / `drain`: run inputs through the real service, then run the due
  effects and timers in-process through the real handlers and the real ack path
  (`ironflow_celery.engine.tasks.run_effect` / ``run_timer``), or through a real Celery worker,
  and get back a `Ran` record per row.
- `events`, `assert_events`, `pending_effects`, `pending_timers`, `dead_letters`: what
  a test asserts on.

The pytest fixtures (``ironflow_env``, ``ironflow_clock``, ``ironflow_database_url``, …)
live in the ``ironflow_celery_pytest`` plugin, registered for pytest by this package.
How the clock reaches the database: the kit gives each test database a schema
``ironflow_test_clock`` holding one row (the time) and a function ``now()`` reading it,
and puts that schema before ``pg_catalog`` in the database's ``search_path``. Every
``now()`` of ironflow's SQL — ``fire_at``, backoff, leases, claims — then reads the test
clock; production code and SQL are unchanged. Column defaults keep the real time (the
schema is migrated before the clock is installed), so ``created_at`` still orders rows.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from ironflow_celery.celery_app import install
from ironflow_celery.engine import tasks
from ironflow_celery.engine.relay import celery_publisher
from ironflow_celery.engine.runtime import (
    WorkflowRuntime,
    WorkflowSpec,
    handler_of,
    resolve_workflow_specs,
)
from ironflow_celery.errors import (
    DrainLimitExceeded,
    DrainTimedOut,
    InvalidArgument,
    InvalidArgumentType,
    InvalidPayload,
)
from ironflow_celery.model.config import RuntimeConfig
from ironflow_celery.model.messages import Message
from ironflow_celery.model.tasknames import Kind
from ironflow_celery.model.workflow import EffectContext, ExecuteOutcome, Workflow, WorkflowRef
from ironflow_celery.service.aio import call_handler
from ironflow_celery.service.workflow_service import Registry, WorkflowService, decode_events
from ironflow_celery.storage import schema, sql
from ironflow_celery.storage.db import normalize_url
from ironflow_celery.storage.kinds import KINDS, kind_of
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

__all__ = [
    "CLOCK_SCHEMA",
    "DEFAULT_DATABASE_PREFIX",
    "DEFAULT_SERVER_URL",
    "DrainLimitExceeded",
    "Ran",
    "Row",
    "TestClock",
    "TestDatabases",
    "WorkflowTestEnv",
    "assert_events",
    "check_database_prefix",
    "create_database",
    "dead_letters",
    "drain",
    "drop_database",
    "events",
    "install_clock",
    "pending_effects",
    "pending_timers",
    "server_unreachable",
    "server_url",
]

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Test databases are named ``<prefix><hint>_<random>``; projects sharing a server give
#: theirs a prefix of their own (``--ironflow-database-prefix``) to tell them apart.
DEFAULT_DATABASE_PREFIX = "ironflow_test_"
_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,29}")
CLOCK_SCHEMA = sql.TEST_CLOCK_SCHEMA
SEARCH_PATH = sql.TEST_SEARCH_PATH


# -- databases ----------------------------------------------------------------------------


def server_url(explicit: str | None = None) -> str:
    """The PostgreSQL server for test databases: `explicit`, ``IRONFLOW_TEST_DATABASE_URL``,
    ``IRONFLOW_DATABASE_URL`` (only its server is used), else the local server."""
    return (
        explicit
        or os.environ.get("IRONFLOW_TEST_DATABASE_URL")
        or os.environ.get("IRONFLOW_DATABASE_URL")
        or DEFAULT_SERVER_URL
    )


def server_unreachable(server: str | None = None) -> str | None:
    """None when PostgreSQL answers at `server` (see `server_url`), else why not, in a line."""
    try:
        with _admin(server_url(server)) as conn:
            conn.exec_driver_sql(sql.SERVER_PING)
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()
        return reason[0] if reason else type(exc).__name__
    return None


def _with_database(url: str, name: str) -> str:
    return make_url(normalize_url(url)).set(database=name).render_as_string(hide_password=False)


def check_database_prefix(prefix: str) -> str:
    """`prefix` if it makes valid, unquoted-safe database names, else `InvalidArgument`."""
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise InvalidArgument(
            f"test database prefix {prefix!r}: use lower-case letters, digits and _ "
            "(not starting with a digit, at most 30 characters), e.g. 'billing_test_'"
        )
    return prefix


def _plain_url(url: str) -> str:
    """The URL as users write it (``postgresql://``), whatever driver it named."""
    return (
        make_url(normalize_url(url))
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )


@contextmanager
def _admin(url: str) -> Iterator[sa.Connection]:
    """An autocommit connection to the server's maintenance database (CREATE/DROP DATABASE)."""
    engine = sa.create_engine(
        _with_database(url, "postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def _database_name(hint: str, prefix: str = DEFAULT_DATABASE_PREFIX) -> str:
    base = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")[:20] or "db"
    return f"{check_database_prefix(prefix)}{base}_{uuid.uuid4().hex[:10]}"


def install_clock(url: str) -> None:
    """Give the database at `url` the test clock's schema and function, and make its
    ``search_path`` resolve ``now()`` to it (for connections opened from now on)."""
    engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in sql.TEST_CLOCK_DDL:
                conn.exec_driver_sql(statement)
            name = conn.execute(sql.CURRENT_DATABASE).scalar_one()
            conn.exec_driver_sql(sql.set_test_search_path(name))
    finally:
        engine.dispose()


def create_database(
    server: str | None = None,
    *,
    hint: str = "db",
    template: str | None = None,
    prefix: str = DEFAULT_DATABASE_PREFIX,
) -> str:
    """Create a database with the ironflow schema and the test clock; returns its URL.

    With `template` (a database made by this function) it is a clone: much faster than
    migrating. The clock starts absent (real time) until a `TestClock` is attached. The
    name is ``<prefix><hint>_<random>``.
    """
    server = server_url(server)
    name = _database_name(hint, prefix)
    with _admin(server) as conn:
        conn.exec_driver_sql(sql.create_database(name, template))
        if template:  # per-database settings are not copied from a template
            conn.exec_driver_sql(sql.set_test_search_path(name))
    url = _with_database(server, name)
    if not template:
        try:
            engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
            try:
                schema.upgrade(engine)  # before the clock: column defaults keep real time
            finally:
                engine.dispose()
            install_clock(url)
        except BaseException:
            drop_database(url, prefix=prefix)
            raise
    return _plain_url(url)


def drop_database(url: str, *, prefix: str = DEFAULT_DATABASE_PREFIX) -> None:
    """Drop a test database (its name starts with `prefix`), closing its connections."""
    name = make_url(normalize_url(url)).database
    if not name or not name.startswith(check_database_prefix(prefix)):
        raise InvalidArgument(f"refusing to drop {name!r}: not a database made by the testing kit")
    with _admin(url) as conn:
        conn.exec_driver_sql(sql.drop_database(name))


class TestDatabases:
    """Makes test databases on one server, cloned from a template migrated once."""

    __test__ = False  # not a pytest test class

    def __init__(self, server: str | None = None, *, prefix: str = DEFAULT_DATABASE_PREFIX) -> None:
        self.server = server_url(server)
        self.prefix = check_database_prefix(prefix)
        self._template: str | None = None
        self._lock = threading.Lock()

    def create(self, hint: str = "db") -> str:
        """A fresh database (schema and clock installed); returns its URL."""
        with self._lock:
            if self._template is None:
                template_url = create_database(self.server, hint="template", prefix=self.prefix)
                self._template = make_url(template_url).database
        return create_database(self.server, hint=hint, template=self._template, prefix=self.prefix)

    def drop(self, url: str) -> None:
        drop_database(url, prefix=self.prefix)

    def close(self) -> None:
        """Drop the template."""
        with self._lock:
            if self._template is not None:
                drop_database(_with_database(self.server, self._template), prefix=self.prefix)
                self._template = None


# -- the test clock -----------------------------------------------------------------------


class TestClock:
    """A UTC time that moves only when the test moves it; callable, so it can be a service's
    ``clock``. Attached databases see it as ``now()`` (see the module docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime.now(UTC).replace(microsecond=0)
        if start.tzinfo is None:
            raise InvalidArgument("a TestClock's start must be timezone-aware (e.g. tzinfo=UTC)")
        self._now = start.astimezone(UTC)
        self._engines: list[Engine] = []
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """The test's current time."""
        return self._now

    def __call__(self) -> datetime:
        return self._now

    def advance(
        self,
        delta: timedelta | None = None,
        /,
        *,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
        milliseconds: float = 0,
    ) -> datetime:
        """Move time forward (``advance(minutes=5)`` or ``advance(timedelta(...))``)."""
        step = (delta or timedelta()) + timedelta(
            days=days, hours=hours, minutes=minutes, seconds=seconds, milliseconds=milliseconds
        )
        if step < timedelta(0):
            raise InvalidArgument("a TestClock does not go backwards")
        return self.set(self._now + step)

    def set(self, when: datetime) -> datetime:
        """Move time to `when` (not earlier than now: leases and backoffs assume so)."""
        if when.tzinfo is None:
            raise InvalidArgument("TestClock.set needs a timezone-aware datetime")
        when = when.astimezone(UTC)
        with self._lock:
            if when < self._now:
                raise InvalidArgument(f"a TestClock does not go backwards ({when} < {self._now})")
            self._now = when
            for engine in self._engines:
                self._publish(engine)
        return when

    def attach(self, engine: Engine) -> None:
        """Make a database made by `create_database` follow this clock."""
        with self._lock:
            self._publish(engine)
            self._engines.append(engine)

    def detach(self, engine: Engine) -> None:
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)

    def _publish(self, engine: Engine) -> None:
        with engine.begin() as conn:
            conn.execute(sql.SET_TEST_CLOCK, {"t": self._now})
            conn.execute(sql.WAKE_RELAYS)

    def __repr__(self) -> str:
        return f"TestClock({self._now.isoformat()})"


# -- what drain() returns -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ran:
    """One effect or timer that `drain` ran: what it was and what came of it."""

    kind: Kind
    row_id: uuid.UUID
    workflow: WorkflowRef
    type: str
    """The effect's type tag, or the timer input's."""
    payload: Any
    """The decoded effect or timer input (the stored JSON when it does not decode)."""
    attempt: int
    status: str
    """``processed``, ``failed-will-retry``, ``dead-lettered`` or ``stale-skipped``."""
    returned: Any = None
    """What the effect handler returned (a follow-up input, or None)."""
    follow_up: str | None = None
    outcome: str | None = None
    """What the follow-up (or the timer's input) did: accepted, rejected, already_completed."""
    error: str | None = None
    at: datetime | None = None
    """The test clock's time when it ran."""

    def __str__(self) -> str:
        text = f"{self.kind} {self.type} {self.workflow} #{self.attempt} -> {self.status}"
        if self.follow_up:
            text += f" ({self.follow_up} {self.outcome or ''})".rstrip()
        if self.error:
            text += f" [{self.error}]"
        return text


# Effect handlers built by the kit record their return values here, keyed by effect id
# (unique), so `drain` can report them; `drain` pops what it reports.
_RETURNED: dict[uuid.UUID, Any] = {}


def _recording(handler: Callable[[Any, EffectContext], Any]) -> Callable[[Any, EffectContext], Any]:
    def record(effect: Any, ctx: EffectContext) -> Any:
        value = call_handler(handler, effect, ctx)  # an async handler's value, not a coroutine
        _RETURNED[ctx.effect_id] = value
        return value

    record.__name__ = getattr(handler, "__name__", "handler")
    record.__doc__ = handler.__doc__
    return record


class _NoLeaseKeeper:
    """Drains need no lease renewal: leases run on the test clock, which does not move
    while `drain` waits for a handler. (The real keeper starts a thread per runtime that
    outlives the test.)"""

    @contextmanager
    def keep_rows(self, kind: Kind, rows: Sequence[tuple[uuid.UUID, str]]) -> Iterator[None]:
        yield

    def done_rows(self, kind: Kind, row_ids: Iterable[uuid.UUID]) -> None:
        pass


# -- drain ------------------------------------------------------------------------------------


def drain(
    runtime: WorkflowRuntime,
    *,
    clock: TestClock | None = None,
    skip_time: bool | timedelta = False,
    worker: bool = False,
    max_steps: int = 1000,
    timeout: float = 60.0,
) -> list[Ran]:
    """Run due effects and timers until none is due; returns what ran, in order.

    In-process (the default), one row at a time — the oldest due effect first, else the
    earliest due timer — through the real claim, the registered handler and the real ack
    path, so follow-ups, failures with backoff, dead letters and ``on_dead_letter`` behave
    as in production. With `worker`, each round claims the due rows like a relay, publishes
    them on ``runtime.app`` and waits (up to `timeout` s) until a real Celery worker has
    finished them. With `skip_time` (needs `clock`), when nothing is due the clock jumps to
    the next due timer or backoff — without limit, or at most that far for a timedelta.
    """
    if skip_time is not False and clock is None:
        raise InvalidArgument("drain(skip_time=...) needs the test clock (clock=...)")
    if worker and runtime.app is None:
        raise InvalidArgument("drain(worker=True) needs a runtime installed on a Celery app")
    horizon = None
    if clock is not None and isinstance(skip_time, timedelta):
        horizon = clock.now() + skip_time
    ran: list[Ran] = []
    while True:
        step: list[Ran] = []
        for kind in KINDS:  # effects first, then timers (`KIND_NAMES` order)
            if worker:
                step = _worker_round(runtime, kind.name, clock, timeout)
            else:
                one = _run_one(runtime, kind.name, clock)
                step = [one] if one is not None else []
            if step:
                break
        if step:
            ran.extend(step)
            if len(ran) > max_steps:
                raise DrainLimitExceeded(
                    f"drain ran {len(ran)} rows and more are due; last: {ran[-1]}"
                )
            continue
        if clock is None or skip_time is False:
            return ran
        due = _next_due(runtime)
        if due is None or due <= clock.now() or (horizon is not None and due > horizon):
            # Nothing pending, beyond the horizon, or due yet not claimable (held by
            # something else): moving time would not help.
            if horizon is not None and horizon > clock.now():
                clock.set(horizon)
            return ran
        clock.set(due)


def _next_due(runtime: WorkflowRuntime) -> datetime | None:
    return runtime.store.next_due(list(runtime.registry.types), runtime.attempt_limits)


def _unfinished(runtime: WorkflowRuntime, kind: Kind, ids: list[uuid.UUID]) -> bool:
    return runtime.store.any_unfinished(kind, ids)


def _claim(runtime: WorkflowRuntime, kind: Kind, token: str, limit: int) -> list[ClaimedRow]:
    return runtime.store.claim(
        kind,
        token,
        runtime.registry.types,
        lease_seconds=kind_of(kind).lock_duration(runtime.config),
        max_attempts=runtime.attempt_limits,
        limit=limit,
    )


def _decode(runtime: WorkflowRuntime, kind: Kind, row: ClaimedRow) -> tuple[str, Any]:
    payload = runtime.store.stored_body(kind, row.id)
    tag = payload.get("type", "?") if isinstance(payload, dict) else type(payload).__name__
    workflow = runtime.registry.get(row.workflow_type).workflow
    union = kind_of(kind).union_of(workflow)
    try:
        return tag, union.decode(payload)
    except InvalidPayload:
        return tag, payload


def _run_one(runtime: WorkflowRuntime, kind: Kind, clock: TestClock | None) -> Ran | None:
    token = f"ironflow-testing:{uuid.uuid4().hex[:12]}"
    rows = _claim(runtime, kind, token, 1)
    if not rows:
        return None
    row = rows[0]
    tag, payload = _decode(runtime, kind, row)
    ref = f"{row.workflow_type}:{row.workflow_id}"
    delivery = tasks.Delivery(str(row.id), ref, row.attempts + 1, token)
    result = tasks.run_rows(runtime, kind_of(kind), [delivery])[0]
    returned = _RETURNED.pop(row.id, None)
    return Ran(
        kind=kind,
        row_id=row.id,
        workflow=WorkflowRef(row.workflow_type, row.workflow_id),
        type=tag,
        payload=payload,
        attempt=int(result.get("attempt", row.attempts + 1)),
        status=result["status"],
        returned=returned,
        follow_up=result.get("follow_up"),
        outcome=result.get("outcome"),
        error=result.get("error"),
        at=clock.now() if clock is not None else None,
    )


def _worker_round(
    runtime: WorkflowRuntime, kind: Kind, clock: TestClock | None, timeout: float
) -> list[Ran]:
    """Claim every due row of `kind` like a relay, publish, wait for a worker to finish."""
    token = f"ironflow-testing:{uuid.uuid4().hex[:12]}"
    rows = _claim(runtime, kind, token, runtime.config.claim_batch_size)
    if not rows:
        return []
    decoded = {row.id: _decode(runtime, kind, row) for row in rows}
    try:
        celery_publisher(runtime.app, forward_traces=runtime.config.tracing)(
            kind, [[row] for row in rows]
        )
    except Exception:
        runtime.store.release(kind, [r.id for r in rows], token)
        raise
    ids = [row.id for row in rows]
    deadline = time.monotonic() + timeout
    pause = 0.01
    while _unfinished(runtime, kind, ids):
        if time.monotonic() > deadline:
            raise DrainTimedOut(
                f"no Celery worker finished {len(ids)} {kind}(s) within {timeout:.0f}s: "
                "is a worker consuming runtime.app's queue?"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.2)
    after = runtime.store.row_outcomes(kind, ids)
    ran = []
    for row in rows:
        state = after[row.id]
        if state.dead:
            status = "dead-lettered"
        elif state.processed:
            status = "processed"
        elif state.attempts > row.attempts:
            status = "failed-will-retry"
        else:
            status = "stale-skipped"
        returned = _RETURNED.pop(row.id, None)
        tag, payload = decoded[row.id]
        ran.append(
            Ran(
                kind=kind,
                row_id=row.id,
                workflow=WorkflowRef(row.workflow_type, row.workflow_id),
                type=tag,
                payload=payload,
                attempt=row.attempts + 1,
                status=status,
                returned=returned,
                follow_up=returned.type_tag if isinstance(returned, Message) else None,
                error=None if status == "processed" else state.last_error,
                at=clock.now() if clock is not None else None,
            )
        )
    return ran


# -- assertions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """An outbox or timer row as a test sees it."""

    kind: Kind
    id: uuid.UUID
    workflow: WorkflowRef
    type: str
    payload: Any
    """The stored JSON (the effect, or the timer's input)."""
    attempts: int
    last_error: str | None
    due_at: datetime | None
    """Timers: ``fire_at``; rows backing off: when the backoff ends."""
    key: str | None = None
    handled: bool = False
    """Dead letters: closed by the workflow's ``on_dead_letter`` (or discarded)."""


def _store_of(target: Any) -> PostgresStore:
    if isinstance(target, PostgresStore):
        return target
    store = getattr(target, "store", None)
    if isinstance(store, PostgresStore):
        return store
    raise InvalidArgumentType(
        f"expected a store, service, runtime or WorkflowTestEnv, got {target!r}"
    )


def _service_of(target: Any) -> WorkflowService:
    if isinstance(target, WorkflowService):
        return target
    service = getattr(target, "service", None)
    if isinstance(service, WorkflowService):
        return service
    raise InvalidArgumentType(f"expected a service, runtime or WorkflowTestEnv, got {target!r}")


def _type_name(workflow: type[Workflow] | str | None) -> str | None:
    return workflow if workflow is None or isinstance(workflow, str) else workflow.type


def _rows(
    target: Any,
    kind: Kind,
    which: Literal["pending", "dead"],
    workflow: type[Workflow] | str | None,
    workflow_id: str | None,
) -> list[Row]:
    found = _store_of(target).test_rows(kind, which, _type_name(workflow), workflow_id)
    return [
        Row(
            kind=kind,
            id=r.id,
            workflow=WorkflowRef(r.workflow_type, r.workflow_id),
            type=r.body.get("type", "?") if isinstance(r.body, dict) else "?",
            payload=r.body,
            attempts=r.attempts,
            last_error=r.last_error,
            due_at=r.due_at,
            key=r.key,
            handled=r.handled,
        )
        for r in found
    ]


def pending_effects(
    target: Any, workflow: type[Workflow] | str | None = None, workflow_id: str | None = None
) -> list[Row]:
    """Effects not yet processed nor dead-lettered (due, backing off or in flight), oldest first."""
    return _rows(target, "effect", "pending", workflow, workflow_id)


def pending_timers(
    target: Any, workflow: type[Workflow] | str | None = None, workflow_id: str | None = None
) -> list[Row]:
    """Timers that have neither fired nor been cancelled nor dead-lettered."""
    return _rows(target, "timer", "pending", workflow, workflow_id)


def dead_letters(
    target: Any,
    workflow: type[Workflow] | str | None = None,
    workflow_id: str | None = None,
    *,
    kind: Kind = "effect",
) -> list[Row]:
    """Dead-lettered effects (or timers), including those ``on_dead_letter`` handled."""
    return _rows(target, kind, "dead", workflow, workflow_id)


def events(target: Any, workflow: type[Workflow], workflow_id: str) -> list[Message]:
    """An instance's events, decoded, in order."""
    stored = _service_of(target).fetch_workflow_events(workflow.type, workflow_id)
    return decode_events(workflow, workflow_id, (e.payload for e in stored))


def assert_events(
    target: Any, workflow: type[Workflow], workflow_id: str, expected: Sequence[type | Message]
) -> list[Message]:
    """Assert an instance's events, in order: a class matches any event of that class, an
    instance must be equal. Returns the events."""
    actual = events(target, workflow, workflow_id)
    matches = len(actual) == len(expected) and all(
        isinstance(got, want) if isinstance(want, type) else got == want
        for got, want in zip(actual, expected, strict=False)
    )
    if not matches:

        def name(x: Any) -> str:
            return x.__name__ if isinstance(x, type) else repr(x)

        raise AssertionError(
            f"events of {workflow.type}:{workflow_id}:\n"
            f"  expected {[name(x) for x in expected]}\n"
            f"  actual   {[type(x).__name__ for x in actual]}\n"
            f"  ({actual!r})"
        )
    return actual


# -- the environment ------------------------------------------------------------------------------


class WorkflowTestEnv:
    """A service, runtime and test clock on one test database: what a workflow test needs."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        database_url: str,
        workflows: Iterable[WorkflowSpec],
        *,
        clock: TestClock | None = None,
        config: RuntimeConfig | None = None,
    ) -> None:
        self.database_url = database_url
        self.clock = clock or TestClock()
        self.store = PostgresStore.from_url(database_url, pool_size=2, max_overflow=4)
        registry = Registry()
        for workflow, handler in resolve_workflow_specs(workflows):
            resolved = handler_of(workflow, handler)
            registry.register(workflow, None if resolved is None else _recording(resolved))
        self.registry = registry
        self.runtime = WorkflowRuntime(
            registry, config or RuntimeConfig(), store=self.store, clock=self.clock
        )
        self.runtime.__dict__["lease_keeper"] = _NoLeaseKeeper()  # see its docstring
        self.service = self.runtime.service
        self.clock.attach(self.store.engine)

    # -- running -------------------------------------------------------------------------
    def execute(self, input: Message, **kwargs: Any) -> ExecuteOutcome[Any]:
        """Run an input through the service (``decide`` sees the test clock)."""
        return self.service.execute(input, **kwargs)

    def drain(self, **kwargs: Any) -> list[Ran]:
        """`drain` on this env's runtime and clock."""
        kwargs.setdefault("clock", self.clock)
        return drain(self.runtime, **kwargs)

    def install(self, app: Any) -> WorkflowRuntime:
        """Install this env's runtime on a Celery `app` for ``drain(worker=True)``: a worker
        of `app` (e.g. ``celery.contrib.testing.worker.start_worker``) then runs the
        handlers; its relays are switched off, as the kit claims and publishes itself."""
        # The kit claims and publishes itself; relays in the worker would race it (and
        # `start_worker` would leave their threads running after the test).
        app.conf.ironflow_relay_enabled = False
        return install(app, runtime=self.runtime)

    # -- reading ---------------------------------------------------------------------------
    def state(self, workflow: type[Workflow], workflow_id: str) -> Any:
        """An instance's current state."""
        return self.service.fetch_latest_state(workflow, workflow_id)

    def events(self, workflow: type[Workflow], workflow_id: str) -> list[Message]:
        return events(self, workflow, workflow_id)

    def assert_events(
        self, workflow: type[Workflow], workflow_id: str, expected: Sequence[type | Message]
    ) -> list[Message]:
        return assert_events(self, workflow, workflow_id, expected)

    def pending_effects(self, *args: Any) -> list[Row]:
        return pending_effects(self, *args)

    def pending_timers(self, *args: Any) -> list[Row]:
        return pending_timers(self, *args)

    def dead_letters(self, *args: Any, kind: Kind = "effect") -> list[Row]:
        return dead_letters(self, *args, kind=kind)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Detach the clock and close the connections (the database is the caller's)."""
        self.clock.detach(self.store.engine)
        self.store.dispose()

    def __enter__(self) -> WorkflowTestEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
