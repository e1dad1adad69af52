"""PostgreSQL storage: the unit of work per input, and the outbox/timer/query operations.

SQLAlchemy Core over psycopg 3 on a pooled engine; statements live in
`ironflow_celery.storage.sql`. The store is the one door to the database: every other
module reads and writes through its methods, or inside its `transaction` / `connection`.
A `UnitOfWork` holds the instance's row lock (``SELECT … FOR UPDATE``) for one input,
buffers what the decision writes and flushes it in as few round trips as possible at
`commit`.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ironflow_celery.errors import (
    DatabaseUnavailable,
    InvalidText,
    StorageError,
    UniqueKeyConflict,
    UnitOfWorkFinished,
)
from ironflow_celery.model.config import AttemptLimits
from ironflow_celery.storage import schema, sql
from ironflow_celery.storage.db import create_engine, relaxed_commits, run_statement
from ironflow_celery.storage.inspection import RowInfo
from ironflow_celery.storage.kinds import Kind, RowKind, kind_of

__all__ = [
    "LOST_RUN_ERROR",
    "ClaimedRow",
    "DecisionWrite",
    "KitRow",
    "LockedInstance",
    "PostgresStore",
    "ProjectionEventRow",
    "ProjectionPositionRow",
    "QueueDepthRow",
    "RowOutcome",
    "StaleRow",
    "StartedRow",
    "StoredEvent",
    "TimerSpec",
    "UnitOfWork",
    "WorkflowInstanceSummary",
    "dumps",
    "set_schema_hint",
    "storage_errors",
]


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value: Any) -> str:
    """Compact JSON for jsonb parameters. One shared encoder: `json.dumps` with options
    builds a new one per call (about 1 µs, on every event and effect written)."""
    return _COMPACT_JSON.encode(value)


def _unavailable(exc: sa.exc.DBAPIError) -> bool:
    """Whether the server could not be reached or dropped the connection.

    psycopg's OperationalError also covers errors of a live server (deadlock, lock or
    statement timeout): those keep their SQLSTATE and are plain `StorageError`s.
    """
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:  # no answer from a server at all (refused, unreachable, closed)
        return isinstance(exc, sa.exc.OperationalError)
    # 08: connection exception; 57P01-57P03: shutdown / cannot connect now.
    return sqlstate.startswith("08") or sqlstate in {"57P01", "57P02", "57P03"}


_UNSTORABLE = (
    "contains a NUL character or a lone surrogate, which PostgreSQL cannot store; "
    "the statement wrote nothing"
)


def _unstorable(exc: sa.exc.DBAPIError) -> bool:
    """Whether a statement failed on text PostgreSQL cannot store (a last line of defence:
    the service and the operations functions check their inputs by name first)."""
    sqlstate: str | None = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:  # psycopg refuses NUL in text client-side, as a DataError
        return isinstance(exc, sa.exc.DataError) and "NUL" in str(exc.orig)
    return sqlstate == "22P05"  # untranslatable character: "\u0000" in jsonb


# undefined table, column, function; invalid schema name
_SCHEMA_MISSING = {"42P01", "42703", "42883", "3F000"}


def _plain_schema_hint() -> str:
    return (
        "the ironflow schema is missing or older than this version of ironflow_celery: "
        "run `ironflow-celery -A <your Celery app> db upgrade`"
    )


_schema_hint: Callable[[], str] = _plain_schema_hint


def set_schema_hint(hint: Callable[[], str]) -> None:
    """What a schema-missing `StorageError` tells the user to run. Storage knows nothing of
    the process; integration sets a hint that names this process's app
    (`ironflow_celery.integration.hints`)."""
    global _schema_hint
    _schema_hint = hint


@contextmanager
def storage_errors() -> Iterator[None]:
    """Translate driver errors into `StorageError` / `DatabaseUnavailable`, and text that
    PostgreSQL cannot store into `InvalidText` (bad input, not a database failure)."""
    try:
        yield
    except UnicodeEncodeError as exc:  # psycopg, client-side: a lone surrogate in a parameter
        text = exc.object if isinstance(exc.object, str) else ""
        raise InvalidText(
            "parameter", text[max(0, exc.start - 20) : exc.end + 20], _UNSTORABLE
        ) from None
    except sa.exc.DBAPIError as exc:
        if _unstorable(exc):
            raise InvalidText("parameter", "", _UNSTORABLE) from None
        if _unavailable(exc):
            raise DatabaseUnavailable(f"PostgreSQL is unavailable: {exc.orig}") from exc
        if getattr(exc.orig, "sqlstate", None) in _SCHEMA_MISSING:
            # the hint names the command as this process can run it
            raise StorageError(f"postgres error: {exc.orig}; {_schema_hint()}") from exc
        raise StorageError(f"postgres error: {exc.orig}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise StorageError(f"postgres error: {exc}") from exc


# -- rows ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored: global and per-instance sequence, raw JSON payload."""

    global_sequence: int
    workflow_type: str
    workflow_id: str
    sequence: int
    payload: Any
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WorkflowInstanceSummary:
    """One row of ``list_workflows``."""

    workflow_type: str
    workflow_id: str
    created_at: datetime
    event_count: int
    last_event_at: datetime | None
    completed_at: datetime | None


@dataclass(frozen=True, slots=True)
class TimerSpec:
    """A timer ready to persist: delay in seconds, JSON input, optional key."""

    delay_seconds: float
    input: Any
    key: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """An outbox or timer row claimed by a relay under `token`."""

    id: uuid.UUID
    workflow_type: str
    workflow_id: str
    attempts: int
    created_at: datetime
    token: str
    fire_at: datetime | None = None
    server_started: datetime | None = None
    """``pg_postmaster_start_time()`` of the server that granted the claim: a restart in
    between may have lost lease writes made without a WAL flush (`_commit_mode`)."""
    effect_type: str | None = None
    """The tag of the payload (the effect's type; a timer's input type)."""
    due_at: datetime | None = None
    """When the row became claimable: created (or ``fire_at``), or its last backoff or
    lease ended; what ``ironflow_dispatch_to_start_seconds`` measures from."""
    trace_context: str | None = None
    """The OpenTelemetry context stored by the input that wrote the row (see tracing)."""


@dataclass(frozen=True, slots=True)
class StartedRow:
    """A claimed row that passed its start guard: payload loaded, lease renewed."""

    id: uuid.UUID
    workflow_type: str
    workflow_id: str
    payload: Any
    attempts: int
    created_at: datetime
    token: str
    key: str | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class StaleRow:
    """A row's state as a refused start guard reads it after the fact (`describe_stale`)."""

    workflow_type: str
    processed: bool
    discarded: bool
    dead_lettered: bool
    attempts: int
    locked_by: str | None
    lease_live: bool


@dataclass(frozen=True, slots=True)
class ProjectionEventRow:
    """One stored event as a projection's fetch reads it (`fetch_events_for_projection`)."""

    global_sequence: int
    workflow_type: str
    workflow_id: str
    sequence: int
    payload: Any
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ProjectionPositionRow:
    """A stored projection's position and health (`projection_status_rows`)."""

    projection_name: str
    last_sequence: int
    updated_at: datetime | None
    last_error: str | None
    failed_sequence: int | None
    failed_at: datetime | None
    head: int


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What a worker round left on one row (`row_outcomes`, the testing kit)."""

    id: uuid.UUID
    attempts: int
    last_error: str | None
    processed: bool
    dead: bool


@dataclass(frozen=True, slots=True)
class KitRow:
    """A pending or dead-lettered row as the testing kit lists it (`test_rows`)."""

    id: uuid.UUID
    workflow_type: str
    workflow_id: str
    body: Any
    attempts: int
    last_error: str | None
    due_at: datetime | None
    key: str | None
    handled: bool


@dataclass(frozen=True, slots=True)
class LockedInstance:
    """An instance row locked for a cancel (`lock_instance_for_cancel`)."""

    completed_at: datetime | None


@dataclass(frozen=True, slots=True)
class QueueDepthRow:
    """One workflow type's unprocessed rows by state (`sql.QUEUE_STATUS`): effects
    (``e_*``) and timers (``t_*``); ``*_oldest`` in seconds, None when none waits."""

    workflow_type: str
    e_pending: int
    e_in_flight: int
    e_backing_off: int
    e_dead: int
    e_oldest: float | None
    t_due: int
    t_pending: int
    t_in_flight: int
    t_backing_off: int
    t_dead: int
    t_oldest: float | None


def _seconds(value: Any) -> float | None:
    """A numeric column (``EXTRACT(EPOCH …)``, a Decimal) as float seconds."""
    return None if value is None else float(value)


def _many_params(items: Sequence[tuple[uuid.UUID, str]]) -> dict[str, str]:
    """Bind parameters of `sql.MARK_EFFECTS_PROCESSED`: one JSON array of {id, token}."""
    return {"items": json.dumps([{"id": str(i), "token": t} for i, t in items])}


def _lock_and_load_or_create(
    conn: Connection, key: dict[str, str], unique_key: str | None
) -> tuple[bool, bool, list[Any]] | None:
    """(created, completed, events): row-lock the instance and load its events, or create
    it, one round trip; None when `unique_key` is held by another active instance."""
    rows = _exec(conn, sql.LOCK_AND_LOAD_OR_CREATE, {**key, "unique_key": unique_key}).all()
    if not rows:
        return None
    first = rows[0]
    if first.created or first.completed:
        return first.created, first.completed, []
    # The "no events" row has no sequence; an event's payload may be JSON null (None here)
    # and must reach decoding, which names its sequence.
    return False, False, [r.payload for r in rows if r.sequence is not None]


# What a start guard records when the previous run of a row never recorded an outcome.
LOST_RUN_ERROR = (
    "WorkerLost: the previous attempt never recorded an outcome (its worker process died, "
    "lost the lease, or lost the database)"
)


def _write_timers(
    conn: Connection,
    key: dict[str, str],
    cancel_keys: Sequence[str],
    timers: Sequence[TimerSpec],
    trace: str | None,
) -> None:
    """A decision's timer writes on one instance: cancellations first, then new timers."""
    if cancel_keys:
        _exec(conn, sql.CANCEL_TIMERS, {**key, "keys": list(cancel_keys)})
    if timers:
        # Within one decision the last timer with a key wins (one pending row per key).
        last_by_key: dict[str | None, int] = {}
        for i, t in enumerate(timers):
            if t.key is not None:
                last_by_key[t.key] = i
        kept = [t for i, t in enumerate(timers) if t.key is None or last_by_key[t.key] == i]
        _exec(
            conn,
            sql.SCHEDULE_TIMERS,
            {
                **key,
                "delays": [t.delay_seconds for t in kept],
                "inputs": [dumps(t.input) for t in kept],
                "keys": [t.key for t in kept],
                "trace": trace,
            },
        )


@dataclass(slots=True)
class DecisionWrite:
    """One accepted decision of a group (`PostgresStore.write_decisions`): what
    `UnitOfWork.flush` writes for one instance, with the trace its effects and timers carry."""

    workflow_type: str
    workflow_id: str
    first_sequence: int
    events: list[Any]
    effects: list[Any]
    trace: str | None = None
    completed: bool = False
    cancel_keys: list[str] = field(default_factory=list)
    timers: list[TimerSpec] = field(default_factory=list)


def _json_array(texts: Sequence[str]) -> str:
    """One JSON array of values already encoded as JSON texts (`dumps`)."""
    return f"[{','.join(texts)}]"


def _exec(
    conn: Connection,
    statement: Any,
    params: dict[str, Any] | None = None,
    *,
    relaxed: bool = False,
) -> _Buffered:
    """`statement` on `conn`, in the caller's transaction if one is open (`run_statement`:
    the hot path's statements skip SQLAlchemy's execution overhead)."""
    return _Buffered(*run_statement(conn, statement, params or {}, relaxed=relaxed))


def _end_autocommit(conn: Connection, raw: psycopg.Connection[Any]) -> None:
    """Put `raw` back out of autocommit before `conn` returns it to the pool, where the
    transactional paths expect a connection that begins a transaction; one that cannot be
    (lost mid-statement) is invalidated rather than pooled in an unknown mode."""
    if raw.closed:
        return  # invalidated already (a dead connection): the pool replaces it
    try:
        raw.autocommit = False
    except psycopg.Error:
        conn.invalidate()


def _runner_params(worker: str | None, task_id: str | None) -> dict[str, Any]:
    """Bind parameters of a start guard's attempt-history entry: who runs the row. The pid
    is read per call: a prefork pool's children share the parent's worker name."""
    return {"worker": worker or _HOST, "pid": os.getpid(), "task_id": task_id}


_HOST = socket.gethostname()


# -- unit of work -------------------------------------------------------------------


@dataclass
class UnitOfWork:
    """One input's transaction on one instance: lock held, events loaded, writes buffered.

    Leaving it without `commit` rolls everything back (a brand-new instance row and its
    unique-key reservation included). When it runs inside a caller's transaction
    (``connection=`` given to `PostgresStore.begin`), `commit` flushes the writes and
    leaves committing to the caller.
    """

    conn: Connection
    workflow_type: str
    workflow_id: str
    completed: bool
    events: list[Any]
    created_instance: bool
    owns_transaction: bool
    _transaction: Any = None
    _events: list[str] = field(default_factory=list)
    _effects: list[str] = field(default_factory=list)
    _cancel_keys: list[str] = field(default_factory=list)
    _timers: list[TimerSpec] = field(default_factory=list)
    _mark_completed: bool = False
    _finished: bool = False
    trace_context: str | None = None
    """The input's trace context (a W3C carrier as JSON, set by the service), stored
    opaquely with this unit's effects and timers."""

    @property
    def next_sequence(self) -> int:
        return len(self.events) + len(self._events) + 1

    def append_events(self, payloads: Sequence[Any]) -> int:
        """Buffer events (JSON); sequences continue from the stored ones."""
        self._events.extend(dumps(p) for p in payloads)
        return len(payloads)

    def enqueue_effects(self, payloads: Sequence[Any]) -> None:
        """Buffer effects (JSON) for the outbox, in decision order."""
        self._effects.extend(dumps(p) for p in payloads)

    def cancel_timers(self, keys: Sequence[str]) -> None:
        """Cancel this instance's pending timers with these keys (before scheduling)."""
        self._cancel_keys.extend(keys)

    def schedule_timers(self, timers: Sequence[TimerSpec]) -> None:
        """Buffer timers; a keyed one replaces the pending timer with the same key."""
        self._timers.extend(timers)

    def mark_completed(self) -> None:
        """Mark the instance terminal when the unit of work commits."""
        self._mark_completed = True

    def record_input_observation(
        self, input_type: str, payload: Any, outcome: str = "accepted", rejection: Any = None
    ) -> None:
        """Write an input observation inside this transaction."""
        with storage_errors():
            _exec(
                self.conn,
                sql.INSERT_OBSERVATION,
                {
                    "wt": self.workflow_type,
                    "wid": self.workflow_id,
                    "input_type": input_type,
                    "payload": dumps(payload),
                    "outcome": outcome,
                    "rejection": None if rejection is None else dumps(rejection),
                },
            )

    def flush(self) -> int:
        """Write everything buffered; returns the number of events appended."""
        if self._finished:
            state = "the instance is completed" if self.completed else "committed or rolled back"
            raise UnitOfWorkFinished(
                f"unit of work on {self.workflow_type}:{self.workflow_id} is finished "
                f"({state}); begin a new one"
            )
        key = {"wt": self.workflow_type, "wid": self.workflow_id}
        trace = self.trace_context if self._effects or self._timers else None
        n_events = len(self._events)
        first = len(self.events) + 1
        with storage_errors():
            if n_events or self._effects or self._mark_completed:
                _exec(
                    self.conn,
                    sql.WRITE_DECISION,
                    {
                        **key,
                        "first": first,
                        "events": _json_array(self._events),
                        "effects": _json_array(self._effects),
                        "trace": trace,
                        "n_events": n_events,
                        "completed": self._mark_completed,
                    },
                )
            _write_timers(self.conn, key, self._cancel_keys, self._timers, trace)
        self.events.extend(self._events)
        self._events, self._effects, self._cancel_keys, self._timers = [], [], [], []
        return n_events

    def commit(self) -> int:
        """Flush and commit (or only flush inside a caller's transaction)."""
        n = self.flush()
        if self.owns_transaction:
            with storage_errors():
                self._transaction.commit()
                self.conn.close()
        self._finished = True
        return n

    def rollback(self) -> None:
        """Drop everything this unit of work did (a new instance row included)."""
        if self._finished:
            return
        self._finished = True
        if self.owns_transaction:
            try:
                self._transaction.rollback()
            finally:
                self.conn.close()
        elif self.created_instance:
            with storage_errors():
                _exec(
                    self.conn,
                    sql.DELETE_NEW_INSTANCE,
                    {"wt": self.workflow_type, "wid": self.workflow_id},
                )

    def __enter__(self) -> UnitOfWork:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self.rollback()


# -- the store ------------------------------------------------------------------------


class PostgresStore:
    """PostgreSQL persistence for workflows, the outbox, timers and projections."""

    def __init__(
        self, engine: Engine, *, relaxed_commits: bool = True, relaxed_acks: bool = False
    ) -> None:
        self.engine = engine
        self.relaxed_commits = relaxed_commits
        self.relaxed_acks = relaxed_acks

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        relaxed_commits: bool = True,
        relaxed_acks: bool = False,
        **engine_kwargs: Any,
    ) -> PostgresStore:
        """A store on a new engine for `url`; `engine_kwargs` go to `create_engine`
        (``pool_size``, ``max_overflow``, ``poolclass=NullPool``, ...; unset ones come from
        the ``IRONFLOW_POOL_*`` environment)."""
        return cls(
            create_engine(url, **engine_kwargs),
            relaxed_commits=relaxed_commits,
            relaxed_acks=relaxed_acks,
        )

    def with_pool(self, **engine_kwargs: Any) -> PostgresStore:
        """A store like this one on a new engine for the same URL (e.g. the relays' own,
        ``pool_size=1, max_overflow=0``); the caller disposes it."""
        url = self.engine.url.render_as_string(hide_password=False)
        return type(self).from_url(
            url,
            relaxed_commits=self.relaxed_commits,
            relaxed_acks=self.relaxed_acks,
            **engine_kwargs,
        )

    @contextmanager
    def _commit_mode(self, conn: Connection, relaxed: bool) -> Iterator[Connection]:
        """`conn`, committing lease bookkeeping with ``synchronous_commit = off``.

        Only writes whose loss merely makes a row claimable again are relaxed (DESIGN
        invariant 9): claims, releases, start guards, lease renewals. Other sessions may
        act on them before they reach disk, but all they can do is deliver a row: should
        PostgreSQL crash and lose such a write, the row goes back to an earlier lease state
        and is claimed again, under the same id (so the same idempotency key), and a
        handler may run once more -- delivery is at-least-once in any case. Every later
        durable commit flushes the WAL before it, so an acknowledgement that survives a
        crash never outlives the start guard it followed. What others can observe as
        *results* -- events, new outbox rows and timers, processed, failure and dead-letter
        marks -- is never relaxed unless `relaxed_acks` opts in. The mode is chosen per
        transaction (``SET LOCAL``, `relaxed_commits`): no second engine, no session state.

        ``relaxed_acks=True`` (the ``ironflow_relaxed_acknowledgements`` setting) trades
        durability for commit latency, and its risk is real: a PostgreSQL crash can lose an
        acknowledgement that others already acted on -- a follow-up's new effect already
        claimed and run, an event a projection already read. After recovery the effect runs
        again and its follow-up decides a *new* effect row, so an external system sees the
        same step under a second idempotency key. Use it only where that is acceptable.
        """
        if relaxed:
            with relaxed_commits(conn) as relaxed_conn:
                yield relaxed_conn
        else:
            yield conn

    def dispose(self) -> None:
        """Close the pool's connections."""
        self.engine.dispose()

    def upgrade_schema(self) -> list[int]:
        """Create or upgrade the ``ironflow`` schema; returns the versions applied."""
        return schema.upgrade(self.engine)

    @contextmanager
    def transaction(self, *, ack: bool = False) -> Iterator[Connection]:
        """A connection in a transaction that commits on success, rolls back on error.

        ``ack=True``: an acknowledgement (and the follow-up input it
        carries), durable unless the store opted into relaxed acknowledgements."""
        with (
            storage_errors(),
            self.engine.begin() as conn,
            self._commit_mode(conn, ack and self.relaxed_acks) as conn,
        ):
            yield conn

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A pooled connection (no transaction begun; the caller begins and ends its own),
        with driver errors translated as everywhere in the store."""
        with storage_errors(), self.engine.connect() as conn:
            yield conn

    def _run(
        self,
        statement: Any,
        params: dict[str, Any] | None = None,
        *,
        relaxed: bool = False,
        ack: bool = False,
        once: bool = False,
    ) -> _Buffered:
        # One statement is atomic on its own: autocommit spares the BEGIN and COMMIT round
        # trips (the hot path: claim, start guard, ack are one statement each). A connection
        # that turns out dead (server restarted) is replaced and the statement sent once more:
        # every statement run here is guarded or idempotent -- but for `once`, whose outcome
        # a second sending would misreport (a creation that did commit would find itself).
        # relaxed: lease bookkeeping only; ack: relaxed only if opted in (`_commit_mode`).
        relaxed = (relaxed and self.relaxed_commits) or (ack and self.relaxed_acks)
        for attempt in (1,) if once else (1, 2):
            try:
                with storage_errors(), self.engine.connect() as plain:
                    # psycopg's own autocommit flag, switched for this statement and back:
                    # SQLAlchemy's isolation_level option costs ~40 us a call on its way in
                    # and out (characteristics, a reset on checkin); psycopg sends nothing.
                    raw = plain.connection.driver_connection
                    assert isinstance(raw, psycopg.Connection)
                    if raw.autocommit:  # an engine made with isolation_level="AUTOCOMMIT"
                        return _exec(plain, statement, params, relaxed=relaxed)
                    raw.autocommit = True
                    try:
                        return _exec(plain, statement, params, relaxed=relaxed)
                    finally:
                        _end_autocommit(plain, raw)
            except DatabaseUnavailable as error:
                cause = error.__cause__
                if once or attempt == 2 or not getattr(cause, "connection_invalidated", False):
                    raise
        raise AssertionError("unreachable")

    # -- unit of work ---------------------------------------------------------------
    def create_with_decision(
        self,
        workflow_type: str,
        workflow_id: str,
        unique_key: str | None,
        events: Sequence[Any],
        effects: Sequence[Any],
        *,
        trace: str | None = None,
        completed: bool = False,
    ) -> bool:
        """Create the instance and write its first decision (events, effects, completion),
        one durable statement; False, having written nothing, when the instance exists, a
        racing creator won, or `unique_key` is held: then `begin` is the way (migration
        0013). Sent once: after a lost connection, whether it committed is unknown, as for
        a lost COMMIT, and the error says so."""
        params = {
            "wt": workflow_type,
            "wid": workflow_id,
            "unique_key": unique_key,
            "events": _json_array([dumps(p) for p in events]),
            "effects": _json_array([dumps(p) for p in effects]),
            "trace": trace,
            "completed": completed,
        }
        return bool(self._run(sql.CREATE_WITH_DECISION, params, once=True).first().created)

    def begin(
        self,
        workflow_type: str,
        workflow_id: str,
        unique_key: str | None = None,
        *,
        connection: Connection | None = None,
    ) -> UnitOfWork:
        """Open a unit of work: ensure the instance row, lock it, load its events.

        Raises `UniqueKeyConflict` when a new instance's key is held by another active
        instance of the same type.
        """
        owns = connection is None
        if connection is None:
            with storage_errors():  # a server that is down raises DatabaseUnavailable here
                conn = self.engine.connect()
        else:
            conn = connection
        transaction = None
        key = {"wt": workflow_type, "wid": workflow_id}
        try:
            with storage_errors():
                if owns:
                    transaction = conn.begin()
                loaded = _lock_and_load_or_create(conn, key, unique_key)
                if loaded is None:
                    assert unique_key is not None  # without a key, a creator always wins
                    raise UniqueKeyConflict(workflow_type, unique_key)
                created, completed, events = loaded
        except BaseException:
            if owns:
                if transaction is not None:
                    transaction.rollback()
                conn.close()
            raise
        uow = UnitOfWork(
            conn=conn,
            workflow_type=workflow_type,
            workflow_id=workflow_id,
            completed=completed,
            events=events,
            created_instance=created,
            owns_transaction=owns,
            _transaction=transaction,
        )
        if completed:
            uow.rollback()
        return uow

    # -- groups of inputs (a group's follow-ups, in its acknowledgement) ------------------
    def lock_and_load_many(
        self, connection: Connection, keys: Sequence[tuple[str, str]]
    ) -> list[tuple[bool, bool, list[Any]]]:
        """`begin`'s lock and load for several existing instances in the caller's
        transaction, one round trip: (found, completed, events) per key, in order. Locks are
        taken in the order given (callers sort the keys). Creates no instance."""
        loaded: list[tuple[bool, bool, list[Any]]] = [(False, False, []) for _ in keys]
        if not keys:
            return loaded
        with storage_errors():
            rows = _exec(
                connection,
                sql.LOCK_AND_LOAD_MANY,
                {"keys": json.dumps([[wt, wid] for wt, wid in keys])},
            ).all()
        for r in rows:
            i = r.n - 1
            events = loaded[i][2]
            if r.completed:
                loaded[i] = (True, True, [])
            else:
                # A NULL sequence is the "no events" row (as in `_lock_and_load_or_create`).
                if r.sequence is not None:
                    events.append(r.payload)
                loaded[i] = (True, False, events)
        return loaded

    def write_decisions(self, connection: Connection, writes: Sequence[DecisionWrite]) -> None:
        """Write several instances' accepted decisions in the caller's transaction: every
        event, effect and instance counter in one statement (`sql.WRITE_DECISIONS`), then
        each decision's timer writes, if any. Each instance appears once."""
        decisions = [
            f'{{"wt":{dumps(w.workflow_type)},"wid":{dumps(w.workflow_id)},'
            f'"first":{int(w.first_sequence)},'
            f'"events":{_json_array([dumps(p) for p in w.events])},'
            f'"effects":{_json_array([dumps(p) for p in w.effects])},'
            f'"trace":{"null" if w.trace is None else dumps(w.trace)},'
            f'"completed":{"true" if w.completed else "false"}}}'
            for w in writes
        ]
        with storage_errors():
            if any(w.events or w.effects or w.completed for w in writes):
                _exec(connection, sql.WRITE_DECISIONS, {"decisions": _json_array(decisions)})
            for w in writes:
                key = {"wt": w.workflow_type, "wid": w.workflow_id}
                _write_timers(connection, key, w.cancel_keys, w.timers, w.trace)

    def record_observation(
        self,
        workflow_type: str,
        workflow_id: str,
        input_type: str,
        payload: Any,
        outcome: str,
        rejection: Any = None,
        *,
        connection: Connection | None = None,
    ) -> None:
        """Write one input observation (own statement, or in the caller's transaction)."""
        params = {
            "wt": workflow_type,
            "wid": workflow_id,
            "input_type": input_type,
            "payload": dumps(payload),
            "outcome": outcome,
            "rejection": None if rejection is None else dumps(rejection),
        }
        if connection is not None:
            with storage_errors():
                _exec(connection, sql.INSERT_OBSERVATION, params)
        else:
            self._run(sql.INSERT_OBSERVATION, params)

    # -- queries ----------------------------------------------------------------------
    def list_workflows(
        self, workflow_type: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[WorkflowInstanceSummary]:
        """Instances, most recently active first."""
        rows = self._run(
            sql.LIST_WORKFLOWS, {"wt": workflow_type, "limit": limit, "offset": offset}
        )
        return [WorkflowInstanceSummary(*row) for row in rows]

    def fetch_workflow_events(self, workflow_type: str, workflow_id: str) -> list[StoredEvent]:
        """An instance's events in sequence order."""
        rows = self._run(sql.FETCH_WORKFLOW_EVENTS, {"wt": workflow_type, "wid": workflow_id})
        return [StoredEvent(*row) for row in rows]

    # -- claimable rows: effects and timers ----------------------------------------------
    # One set of transitions for both kinds; `kind` is a `RowKind` or its name, and its
    # statements are the only thing that differs (see `storage.kinds`).
    def claim(
        self,
        kind: Kind | RowKind,
        token: str,
        workflow_types: Sequence[str],
        *,
        lease_seconds: float,
        max_attempts: int | AttemptLimits,
        limit: int = 1,
        concurrency_limits: Mapping[str, int] | None = None,
    ) -> list[ClaimedRow]:
        """Claim up to `limit` due rows of registered types (SKIP LOCKED), earliest first.

        Types in `concurrency_limits` never have more than their limit of effects leased at
        once across all claimers (see `sql.CLAIM_LIMITED_EFFECTS`); they are claimed first,
        in their own transaction, so a backlog of unlimited types cannot starve them. A kind
        without a limited claim (timers) ignores the limits."""
        row_kind = kind_of(kind)
        if not workflow_types or limit <= 0:
            return []
        statements = row_kind.statements
        attempts = AttemptLimits.of(max_attempts).params()
        limits = (concurrency_limits or {}) if statements.claim_limited is not None else {}
        limited = sorted(t for t in set(workflow_types) if t in limits)
        free = [t for t in workflow_types if t not in limits]
        found: list[Any] = []
        if limited:
            found += self._claim_limited(
                row_kind, token, limited, limits, lease_seconds, attempts, limit
            )
        if free and len(found) < limit:
            found += self._run(
                statements.claim,
                {
                    "token": token,
                    "types": free,
                    "lease": float(lease_seconds),
                    **attempts,
                    "limit": limit - len(found),
                },
                relaxed=True,
            )
        claimed = [
            ClaimedRow(
                r.id,
                r.workflow_type,
                r.workflow_id,
                r.attempts,
                r.created_at,
                token,
                r.fire_at,
                r.server_started,
                effect_type=r.effect_type,
                due_at=r.due_at,
                trace_context=r.celery_trace_context,
            )
            for r in found
        ]
        # Due order: an effect by creation, a timer by fire time (`fire_at` is None for
        # effects).
        claimed.sort(key=lambda c: (c.fire_at or c.created_at, c.id))
        return claimed

    def _claim_limited(
        self,
        kind: RowKind,
        token: str,
        types: list[str],
        limits: Mapping[str, int],
        lease_seconds: float,
        attempts: dict[str, Any],
        limit: int,
    ) -> list[Any]:
        """Claim rows of concurrency-limited types under their advisory locks."""
        statement = kind.statements.claim_limited
        assert statement is not None  # claim() passes limits only for kinds that have one
        found: list[Any] = []
        with (
            storage_errors(),
            self.engine.begin() as plain,
            self._commit_mode(plain, self.relaxed_commits) as conn,
        ):
            conn.execute(sql.LOCK_LIMITED_TYPES, {"types": types})
            for wt in types:
                if len(found) >= limit:
                    break
                found += conn.execute(
                    statement,
                    {
                        "token": token,
                        "wt": wt,
                        "cap": int(limits[wt]),
                        "lease": float(lease_seconds),
                        **attempts,
                        "limit": limit - len(found),
                    },
                ).fetchall()
        return found

    def release(self, kind: Kind | RowKind, ids: Sequence[uuid.UUID], token: str) -> int:
        """Give claimed rows back at once (a publish failed)."""
        if not ids:
            return 0
        statement = kind_of(kind).statements.release
        return self._run(statement, {"ids": list(ids), "token": token}, relaxed=True).rowcount

    def seconds_until_due(
        self,
        kind: Kind | RowKind,
        workflow_types: Sequence[str],
        *,
        max_attempts: int | AttemptLimits,
    ) -> float | None:
        """Seconds until a row can next be claimed (negative when one is claimable now), or
        None: nothing pending."""
        statement = kind_of(kind).statements.next_due
        if not workflow_types:
            return None
        # A read: nothing to commit, so nothing to relax (a SET LOCAL in front would only
        # keep it from being prepared).
        value = self._run(
            statement, {"types": list(workflow_types), **AttemptLimits.of(max_attempts).params()}
        ).scalar()
        return None if value is None else float(value)

    def start(
        self,
        kind: Kind | RowKind,
        row_id: uuid.UUID,
        token: str,
        run_token: str,
        *,
        lease_seconds: float,
        worker: str | None = None,
        task_id: str | None = None,
    ) -> StartedRow | None:
        """Start guard: None when the row is no longer held by `token` (stale). The row's
        attempt history records this run: `worker` (default: this host's name), this
        process's pid and the Celery `task_id`."""
        row = self._run(
            kind_of(kind).statements.start,
            {
                "id": row_id,
                "token": token,
                "run_token": run_token,
                "lease": float(lease_seconds),
                "lost_error": LOST_RUN_ERROR,
                **_runner_params(worker, task_id),
            },
            relaxed=True,
        ).first()
        if row is None:
            return None
        return StartedRow(
            row_id,
            row.workflow_type,
            row.workflow_id,
            row.payload,
            row.attempts,
            row.created_at,
            run_token,
            row.key,
            last_error=row.last_error,
        )

    def lock_running(
        self, kind: Kind | RowKind, connection: Connection, row_id: uuid.UUID, token: str
    ) -> bool:
        """Row-lock a started row still held by `token` inside the caller's transaction."""
        statement = kind_of(kind).statements.lock_running
        with storage_errors():
            return _exec(connection, statement, {"id": row_id, "token": token}).first() is not None

    def record_processed(
        self,
        kind: Kind | RowKind,
        row_id: uuid.UUID,
        token: str,
        *,
        connection: Connection | None = None,
    ) -> bool:
        """Mark a row processed if `token` still holds it (a timer re-armed by key: no-op)."""
        statement = kind_of(kind).statements.mark_processed
        params = {"id": row_id, "token": token}
        if connection is not None:
            with storage_errors():
                return _exec(connection, statement, params).rowcount == 1
        return self._run(statement, params, ack=True).rowcount == 1

    def start_effects(
        self,
        items: Sequence[tuple[uuid.UUID, str, str]],
        *,
        lease_seconds: float,
        worker: str | None = None,
        task_id: str | None = None,
    ) -> dict[uuid.UUID, StartedRow]:
        """Start guard of a batch, one statement: (id, claim token, run token) each; the
        rows still held by their claim tokens, started (the others are stale). The
        attempt histories record the run as `start` does."""
        if not items:
            return {}
        rows = self._run(
            sql.START_EFFECTS,
            {
                "items": json.dumps(
                    [{"id": str(i), "token": t, "run_token": r} for i, t, r in items]
                ),
                "lease": float(lease_seconds),
                "lost_error": LOST_RUN_ERROR,
                **_runner_params(worker, task_id),
            },
            relaxed=True,
        )
        run_tokens = {i: r for i, _, r in items}
        return {
            row.id: StartedRow(
                row.id,
                row.workflow_type,
                row.workflow_id,
                row.payload,
                row.attempts,
                row.created_at,
                run_tokens[row.id],
                last_error=row.last_error,
            )
            for row in rows
        }

    def mark_many_processed(self, items: Sequence[tuple[uuid.UUID, str]]) -> set[uuid.UUID]:
        """Mark a batch's effects processed, (id, run token) each, in one durable statement
        (autocommit: no BEGIN/COMMIT round trips); returns the ids still held."""
        if not items:
            return set()
        rows = self._run(sql.MARK_EFFECTS_PROCESSED, _many_params(items), ack=True)
        return {r.id for r in rows}

    def mark_many_processed_in(
        self, connection: Connection, items: Sequence[tuple[uuid.UUID, str]]
    ) -> set[uuid.UUID]:
        """`mark_many_processed` inside the caller's acknowledgement transaction (when the
        batch carries follow-up inputs that must commit with it)."""
        if not items:
            return set()
        with storage_errors():
            rows = _exec(connection, sql.MARK_EFFECTS_PROCESSED, _many_params(items))
            return {r.id for r in rows}

    def record_failed_attempt(
        self,
        kind: Kind | RowKind,
        row_id: uuid.UUID,
        token: str,
        error: str,
        *,
        backoff_seconds: float,
        connection: Connection | None = None,
    ) -> int | None:
        """attempts+1, last_error, backoff in locked_until; None when stale."""
        params = {"id": row_id, "token": token, "error": error, "backoff": float(backoff_seconds)}
        statement = kind_of(kind).statements.record_failure
        return self._attempts_or_none(statement, params, connection, ack=True)

    def record_dead_letter(
        self,
        kind: Kind | RowKind,
        row_id: uuid.UUID,
        token: str,
        error: str,
        *,
        max_attempts: int,
        connection: Connection | None = None,
    ) -> int | None:
        """Dead-letter a row now; None when stale."""
        params = {"id": row_id, "token": token, "error": error, "max_attempts": max_attempts}
        statement = kind_of(kind).statements.dead_letter
        return self._attempts_or_none(statement, params, connection, ack=True)

    def mark_dead_letter_handled(
        self, kind: Kind | RowKind, row_id: uuid.UUID, reason: str, *, connection: Connection
    ) -> bool:
        """Close a dead letter that its workflow handled (kept for audit, with `reason`)."""
        statement = kind_of(kind).statements.mark_dead_letter_handled
        with storage_errors():
            return connection.execute(statement, {"id": row_id, "reason": reason}).rowcount == 1

    def renew_leases(
        self,
        kind: Kind | RowKind,
        items: Sequence[tuple[uuid.UUID, str]],
        *,
        lease_seconds: float,
    ) -> set[uuid.UUID]:
        """Extend the leases of running rows still held by their tokens."""
        if not items:
            return set()
        rows = self._run(
            kind_of(kind).statements.renew_leases,
            {
                "ids": [i for i, _ in items],
                "tokens": [t for _, t in items],
                "lease": float(lease_seconds),
            },
            relaxed=True,
        )
        return {r.id for r in rows}

    def renew_dispatched(
        self,
        kind: Kind | RowKind,
        items: Sequence[tuple[uuid.UUID, str]],
        *,
        lease_seconds: float,
        server_started: datetime | None,
    ) -> set[uuid.UUID]:
        """Extend the leases of published rows still waiting under their claim tokens --
        only while the server that granted the claims still runs (none renewed otherwise)."""
        if not items:
            return set()
        statement = kind_of(kind).statements.renew_dispatched
        params = {
            "ids": [i for i, _ in items],
            "tokens": [t for _, t in items],
            "lease": float(lease_seconds),
            "server_started": server_started,
        }
        return {r.id for r in self._run(statement, params, relaxed=True)}

    def no_longer_dispatched(
        self, kind: Kind | RowKind, items: Sequence[tuple[uuid.UUID, str]]
    ) -> set[uuid.UUID]:
        """Which of these published rows no longer wait to start under their claim tokens
        (started, finished, released, or re-claimed by another relay)."""
        if not items:
            return set()
        by_token: dict[str, list[bytes]] = {}
        for row_id, token in items:
            by_token.setdefault(token, []).append(row_id.bytes)
        starts, at = [], 0
        for ids in by_token.values():
            starts.append(str(at))
            at += len(ids)
        params = {
            "tokens": list(by_token),
            "starts": ",".join(starts),
            "ids": b"".join(b"".join(ids) for ids in by_token.values()),
        }
        # A read: nothing to relax. Bound on the server (and prepared), not inlined as the
        # relaxed statements are: inlining a few hundred ids cost PostgreSQL a parse and
        # plan of that literal each time.
        statement = kind_of(kind).statements.no_longer_dispatched
        return {r.id for r in self._run(statement, params)}

    def describe_stale(self, kind: Kind | RowKind, row_id: uuid.UUID) -> StaleRow | None:
        """A row's state as a stale delivery sees it (None: the row is gone)."""
        row = self._run(kind_of(kind).statements.describe_stale, {"id": row_id}).first()
        return None if row is None else StaleRow(*row)

    # -- dead letters (service.dead_letters) ---------------------------------------------
    def fetch_dead_letter_rows(self, kind: Kind | RowKind, params: dict[str, Any]) -> list[RowInfo]:
        """Dead-letter rows matching a `DeadLetterQuery`'s bind parameters, newest first."""
        row_kind = kind_of(kind)
        rows = self._run(row_kind.statements.fetch_dead_letters, params)
        return [RowInfo.of(row_kind.name, r) for r in rows]

    def count_dead_letter_rows(self, kind: Kind | RowKind, params: dict[str, Any]) -> int:
        """How many dead-letter rows match a `DeadLetterQuery`'s bind parameters."""
        value = self._run(kind_of(kind).statements.count_dead_letters, params).scalar()
        return int(value or 0)

    def get_dead_letter_row(
        self,
        kind: Kind | RowKind,
        row_id: uuid.UUID,
        params: dict[str, Any],
        *,
        connection: Connection | None = None,
    ) -> RowInfo | None:
        """A row with what decides whether it may be retried or discarded (``is_dead``,
        ``in_flight``); inside the caller's transaction it is row-locked. None: no row."""
        row_kind = kind_of(kind)
        statements = row_kind.statements
        if connection is None:
            row = self._run(statements.get_dead_letter, {"id": row_id, **params}).first()
        else:
            with storage_errors():
                row = connection.execute(
                    statements.lock_dead_letter, {"id": row_id, **params}
                ).first()
        return None if row is None else RowInfo.of(row_kind.name, row)

    def retry_dead_letter_row(
        self, kind: Kind | RowKind, row_id: uuid.UUID, *, connection: Connection
    ) -> None:
        """Make a (locked, checked) dead letter claimable again and wake the relays."""
        row_kind = kind_of(kind)
        with storage_errors():
            connection.execute(
                row_kind.statements.retry_dead_letter, {"id": row_id, "channel": row_kind.channel}
            )

    def retry_dead_letter_batch(self, kind: Kind | RowKind, params: dict[str, Any]) -> int:
        """One transaction of a bulk retry (see `sql._RETRY_DEAD_LETTERS`); wakes the relays
        of the retried rows' types. Returns how many rows it retried."""
        row_kind = kind_of(kind)
        with self.transaction() as conn:
            rows = conn.execute(row_kind.statements.retry_dead_letters, params).all()
            if rows:
                types = sorted({r.workflow_type for r in rows})
                conn.execute(sql.NOTIFY_TYPES, {"channel": row_kind.channel, "types": types})
        return len(rows)

    def discard_dead_letter_row(
        self, kind: Kind | RowKind, row_id: uuid.UUID, reason: str, *, connection: Connection
    ) -> None:
        """Close a (locked, checked) dead letter without running it, kept for audit."""
        with storage_errors():
            connection.execute(
                kind_of(kind).statements.discard_dead_letter, {"id": row_id, "reason": reason}
            )

    def database_now(self) -> datetime:
        """PostgreSQL's ``now()`` (a test clock's, in the testing kit)."""
        now: datetime = self._run(sql.DATABASE_NOW).scalar()
        return now

    # -- cancel (operations.cancel) ---------------------------------------------------------
    def lock_row_for_cancel(
        self,
        kind: Kind | RowKind,
        row_id: uuid.UUID,
        limits: AttemptLimits,
        *,
        connection: Connection,
    ) -> RowInfo | None:
        """The row, locked, with whether a handler is running it; None: no such row."""
        row_kind = kind_of(kind)
        params = {"id": row_id, **limits.params()}
        with storage_errors():
            row = connection.execute(row_kind.statements.lock_for_cancel, params).first()
        return None if row is None else RowInfo.of(row_kind.name, row)

    def cancel_row(
        self, kind: Kind | RowKind, row_id: uuid.UUID, reason: str, *, connection: Connection
    ) -> None:
        """Close an open row as cancelled (kept for audit, with `reason`)."""
        statement = kind_of(kind).statements.cancel
        with storage_errors():
            connection.execute(statement, {"id": row_id, "reason": reason})

    def lock_instance_for_cancel(
        self, workflow_type: str, workflow_id: str, *, connection: Connection
    ) -> LockedInstance | None:
        """The instance row (``completed_at``), locked; None: no such instance."""
        params = {"wt": workflow_type, "wid": workflow_id}
        with storage_errors():
            row = connection.execute(sql.LOCK_INSTANCE_FOR_CANCEL, params).first()
        return None if row is None else LockedInstance(row.completed_at)

    def running_rows_of_instance(
        self, kind: Kind | RowKind, workflow_type: str, workflow_id: str, *, connection: Connection
    ) -> list[uuid.UUID]:
        """Ids of an instance's rows whose handlers are running (plain reads, no locks)."""
        params = {"wt": workflow_type, "wid": workflow_id}
        with storage_errors():
            rows = connection.execute(kind_of(kind).statements.running_of_instance, params)
            return [r.id for r in rows]

    def cancel_rows_of_instance(
        self,
        kind: Kind | RowKind,
        workflow_type: str,
        workflow_id: str,
        reason: str,
        *,
        connection: Connection,
    ) -> tuple[uuid.UUID, ...]:
        """Close every open, not running row of an instance; their ids."""
        params = {"wt": workflow_type, "wid": workflow_id, "reason": reason}
        with storage_errors():
            rows = connection.execute(kind_of(kind).statements.cancel_of_instance, params)
            return tuple(r.id for r in rows)

    # -- retention and status (operations.retention, operations.status) ---------------------
    def purge_processed(
        self, kind: Kind | RowKind, *, age_seconds: float, batch_size: int, include_discarded: bool
    ) -> int:
        """Delete one batch of rows processed more than `age_seconds` ago; how many."""
        params = {"age": age_seconds, "batch": batch_size, "include_discarded": include_discarded}
        return self._run(kind_of(kind).statements.purge_processed, params).rowcount

    def purge_observations(self, *, age_seconds: float, batch_size: int) -> int:
        """Delete one batch of input observations of instances completed `age_seconds` ago."""
        params = {"age": age_seconds, "batch": batch_size}
        return self._run(sql.PURGE_OBSERVATIONS, params).rowcount

    def queue_status_rows(self, *, max_attempts: int | AttemptLimits) -> list[QueueDepthRow]:
        """Unprocessed rows per workflow type and state (`sql.QUEUE_STATUS`)."""
        rows = self._run(sql.QUEUE_STATUS, AttemptLimits.of(max_attempts).params())
        return [
            QueueDepthRow(
                r.workflow_type,
                r.e_pending,
                r.e_in_flight,
                r.e_backing_off,
                r.e_dead,
                _seconds(r.e_oldest),
                r.t_due,
                r.t_pending,
                r.t_in_flight,
                r.t_backing_off,
                r.t_dead,
                _seconds(r.t_oldest),
            )
            for r in rows
        ]

    # -- execute tasks' idempotency keys (engine.inputs) ----------------------------------
    def lock_idempotency_key(self, lock: str, *, connection: Connection) -> None:
        """Queue on a transaction advisory lock named `lock` (released at commit)."""
        with storage_errors():
            _exec(connection, sql.LOCK_IDEMPOTENCY_KEY, {"lock": lock})

    def record_execute(
        self,
        workflow_type: str,
        workflow_id: str,
        record_type: str,
        record: Any,
        outcome: str,
        *,
        rejection: Any,
        rejected: bool,
        connection: Connection,
    ) -> None:
        """Write an execute task's record (an input observation of type `record_type`); a
        rejection's reason is stored as JSON even when it is null."""
        params = {
            "wt": workflow_type,
            "wid": workflow_id,
            "input_type": record_type,
            "payload": dumps(record),
            "outcome": outcome,
            "rejection": dumps(rejection) if rejected else None,
        }
        with storage_errors():
            _exec(connection, sql.INSERT_OBSERVATION, params)

    def find_execute_record(
        self,
        workflow_type: str,
        workflow_id: str,
        record_type: str,
        idempotency_key: str,
        *,
        connection: Connection,
    ) -> Any:
        """The outcome recorded for an idempotency key (an observation's payload), or None."""
        params = {
            "wt": workflow_type,
            "wid": workflow_id,
            "record": record_type,
            "key": idempotency_key,
        }
        with storage_errors():
            return _exec(connection, sql.FIND_EXECUTE_RECORD, params).scalar()

    # -- projections -------------------------------------------------------------------------
    def fetch_events_since(self, after: int, limit: int = 100) -> list[StoredEvent]:
        """Events with ``global_sequence > after`` in global order (ironflow's reader)."""
        rows = self._run(sql.FETCH_EVENTS_SINCE, {"after": after, "limit": limit})
        return [StoredEvent(*row) for row in rows]

    def load_projection_position(self, name: str) -> int:
        """A projection's stored position (0 for a new one)."""
        with storage_errors(), self.engine.begin() as conn:
            conn.execute(sql.ENSURE_PROJECTION_POSITION, {"name": name})
            return int(conn.execute(sql.LOAD_PROJECTION_POSITION, {"name": name}).scalar_one())

    def store_projection_position(
        self, name: str, sequence: int, *, connection: Connection | None = None
    ) -> None:
        """Move a projection's position forward (never backwards)."""
        params = {"name": name, "seq": sequence}
        if connection is not None:
            with storage_errors():
                connection.execute(sql.STORE_PROJECTION_POSITION, params)
        else:
            self._run(sql.STORE_PROJECTION_POSITION, params)

    # The projection runner's statements (operations.projections). It keeps one connection
    # through a batch, since a transactional projection's handler writes on it too.
    def projection_fence(self, name: str) -> tuple[int, Any] | None:
        """The events' high-water mark and an xid drawn after it, or None when the
        projection's position is already at the mark (nothing new to read)."""
        with self.transaction() as conn:
            high_water = int(conn.execute(sql.PROJECTION_FENCE_MARK).scalar_one())
            position = conn.execute(sql.LOAD_PROJECTION_POSITION, {"name": name}).scalar()
            if high_water <= int(position or 0):
                return None
            return high_water, conn.execute(sql.PROJECTION_FENCE_XID).scalar_one()

    def try_lock_projection(self, name: str, *, connection: Connection) -> bool:
        """The projection's transaction lock; False when another runner holds it."""
        with storage_errors():
            return bool(connection.execute(sql.TRY_LOCK_PROJECTION, {"name": name}).scalar())

    def lock_projection(self, name: str, *, connection: Connection) -> None:
        """The projection's transaction lock, waiting for it."""
        with storage_errors():
            connection.execute(sql.LOCK_PROJECTION, {"name": name})

    def projection_position(self, name: str, *, connection: Connection) -> int:
        """A projection's stored position inside the caller's transaction (0: none)."""
        with storage_errors():
            return int(
                connection.execute(sql.LOAD_PROJECTION_POSITION, {"name": name}).scalar() or 0
            )

    def fetch_events_for_projection(
        self,
        *,
        fence_xid: Any,
        after: int,
        high_water: int,
        types: list[str] | None,
        limit: int,
        connection: Connection,
    ) -> tuple[bool, list[ProjectionEventRow]]:
        """Whether every transaction before the fence has ended, and if so the events after
        `after` up to the fence (see sql.FETCH_EVENTS_FOR_PROJECTION)."""
        params = {
            "fence_xid": fence_xid,
            "after": after,
            "high_water": high_water,
            "types": types,
            "limit": limit,
        }
        with storage_errors():
            rows = connection.execute(sql.FETCH_EVENTS_FOR_PROJECTION, params).all()
        # One row at least: the fence's verdict, with the event's columns NULL when it has
        # not passed or no event follows.
        events = [ProjectionEventRow(*r[1:]) for r in rows if r.global_sequence is not None]
        return bool(rows[0].passed), events

    def advance_projection(self, name: str, sequence: int, *, connection: Connection) -> None:
        """Move a projection to `sequence` and clear its error."""
        with storage_errors():
            connection.execute(sql.ADVANCE_PROJECTION, {"name": name, "seq": sequence})

    def record_projection_error(
        self,
        name: str,
        position: int,
        error: str,
        failed_sequence: int,
        *,
        connection: Connection,
    ) -> None:
        """Store a projection's position and the error that stopped it."""
        params = {"name": name, "seq": position, "error": error, "failed_sequence": failed_sequence}
        with storage_errors():
            connection.execute(sql.RECORD_PROJECTION_ERROR, params)

    def reset_projection_position(self, name: str, *, connection: Connection) -> None:
        """Position 0 and the error cleared (a rebuild from zero)."""
        with storage_errors():
            connection.execute(sql.RESET_PROJECTION_POSITION, {"name": name})

    def projection_status_rows(
        self, types_by_name: Mapping[str, Sequence[str]], *, with_global_head: bool
    ) -> tuple[list[ProjectionPositionRow], dict[str, int], int]:
        """Every stored projection's row, the newest event of each named projection's
        workflow types, and the newest event of all (0 unless `with_global_head`)."""
        with storage_errors(), self.engine.connect() as conn:
            rows = [ProjectionPositionRow(*r) for r in conn.execute(sql.PROJECTION_STATUS)]
            heads = {
                name: int(
                    conn.execute(sql.EVENTS_HEAD_FOR_TYPES, {"types": list(types)}).scalar_one()
                )
                for name, types in types_by_name.items()
            }
            head = (
                int(conn.execute(sql.PROJECTION_HEAD_ALL).scalar_one()) if with_global_head else 0
            )
        return rows, heads, head

    # -- inspection (operations.inspection; read-only) ---------------------------------------
    def inspect_rows(
        self, kind: Kind | RowKind, params: dict[str, Any], *, newest_first: bool = True
    ) -> list[RowInfo]:
        """A page of effects or timers matching an `InspectQuery`'s bind parameters."""
        row_kind = kind_of(kind)
        statements = sql.INSPECT_STATEMENTS[row_kind.table]
        statement = statements.list_newest if newest_first else statements.list_oldest
        return [RowInfo.of(row_kind.name, r) for r in self._run(statement, params)]

    def inspect_row(
        self, kind: Kind | RowKind, row_id: uuid.UUID, limits: AttemptLimits
    ) -> RowInfo | None:
        """One effect or timer with its payload and the database's clock; None: no row."""
        row_kind = kind_of(kind)
        statement = sql.INSPECT_STATEMENTS[row_kind.table].get
        row = self._run(statement, {"id": row_id, **limits.params()}).first()
        return None if row is None else RowInfo.of(row_kind.name, row)

    def get_instance(self, workflow_type: str, workflow_id: str) -> WorkflowInstanceSummary | None:
        """One instance row; None when it does not exist."""
        row = self._run(sql.GET_INSTANCE, {"wt": workflow_type, "wid": workflow_id}).first()
        return None if row is None else WorkflowInstanceSummary(*row)

    def list_instances(
        self, workflow_type: str, *, completed: bool | None, limit: int, offset: int
    ) -> list[WorkflowInstanceSummary]:
        """One type's instances (all, active or completed), most recently active first."""
        params = {"wt": workflow_type, "completed": completed, "limit": limit, "offset": offset}
        return [WorkflowInstanceSummary(*row) for row in self._run(sql.LIST_INSTANCES, params)]

    def count_instances(self, workflow_type: str) -> tuple[int, int]:
        """(active, completed) instances of one type."""
        row = self._run(sql.COUNT_INSTANCES, {"wt": workflow_type}).first()
        return int(row.active), int(row.completed)

    # -- the testing kit (ironflow_celery.testing; read-only) ---------------------------------
    def stored_body(self, kind: Kind | RowKind, row_id: uuid.UUID) -> Any:
        """A row's stored JSON: the effect, or the timer's input (None: no row)."""
        statement = sql.TEST_ROW_BODY[kind_of(kind).table]
        return self._run(statement, {"id": row_id}).scalar()

    def next_due(self, types: Sequence[str], limits: AttemptLimits) -> datetime | None:
        """When the next live row of these workflow types becomes claimable (None: none)."""
        due: datetime | None = self._run(
            sql.TEST_NEXT_DUE, {"types": list(types), **limits.params()}
        ).scalar()
        return due

    def any_unfinished(self, kind: Kind | RowKind, ids: Sequence[uuid.UUID]) -> bool:
        """Whether any of these rows is still held (leased, not finished)."""
        statement = sql.TEST_UNFINISHED[kind_of(kind).table]
        return self._run(statement, {"ids": list(ids)}).first() is not None

    def row_outcomes(
        self, kind: Kind | RowKind, ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, RowOutcome]:
        """Attempts, last error, processed and dead of these rows, by id."""
        statement = sql.TEST_AFTER_WORKER[kind_of(kind).table]
        return {r.id: RowOutcome(*r) for r in self._run(statement, {"ids": list(ids)})}

    def test_rows(
        self,
        kind: Kind | RowKind,
        which: Literal["pending", "dead"],
        workflow_type: str | None,
        workflow_id: str | None,
    ) -> list[KitRow]:
        """Pending or dead-lettered rows, oldest first, optionally of one type or instance."""
        statement = sql.TEST_ROWS[(kind_of(kind).table, which)]
        return [KitRow(*r) for r in self._run(statement, {"wt": workflow_type, "wid": workflow_id})]

    # -- helpers -------------------------------------------------------------------------------
    def _attempts_or_none(
        self,
        statement: Any,
        params: dict[str, Any],
        connection: Connection | None,
        *,
        relaxed: bool = False,
        ack: bool = False,
    ) -> int | None:
        """The ``attempts`` an outcome statement returns; None when it matched no row."""
        if connection is not None:
            with storage_errors():
                row = connection.execute(statement, params).first()
        else:
            row = self._run(statement, params, relaxed=relaxed, ack=ack).first()
        return None if row is None else int(row[0])


class _Buffered:
    """Rows fetched inside a finished transaction, with the statement's rowcount."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def all(self) -> list[Any]:
        return self._rows
