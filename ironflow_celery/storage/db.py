"""Engines: `create_engine` makes the pooled SQLAlchemy engine over psycopg 3 that a
`PostgresStore` owns, with the pool, prepared-statement and dead-connection settings.

URLs may be given as ``postgresql://``, ``postgres://`` or ``postgresql+psycopg://``;
they are normalised to the psycopg 3 driver. Every engine made here is disposed after a
fork (Celery's prefork pool) so no child reuses its parent's sockets, and its idle
connections are closed after ``ironflow_pool_idle_timeout`` (an idle host holds no
backends). Nothing here leaves session state on a connection: the commit mode of lease
bookkeeping is chosen per transaction (`relaxed_commits`), so a transaction pooler
(PgBouncer ``pool_mode = transaction``) may hand each transaction another backend.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, cast

import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import NullPool, QueuePool
from sqlalchemy.util.queue import Empty, Full

from ironflow_celery.errors import ConfigurationError
from ironflow_celery.model.settings import SETTINGS, Settings, read_settings
from ironflow_celery.storage.sql import RELAXES_ITSELF

__all__ = [
    "DATABASE_URL_ENV",
    "IDLE_PING_AFTER",
    "RELAXED_PREFIX",
    "behind_transaction_pooler",
    "create_engine",
    "dead_connection_params",
    "dispose_after_fork",
    "engine_options",
    "normalize_url",
    "relaxed_commits",
    "run_statement",
]

DATABASE_URL_ENV = SETTINGS["database_url"].env  # IRONFLOW_DATABASE_URL

IDLE_PING_AFTER = 5.0
"""Seconds a pooled connection may sit unused before it is pinged on checkout."""

RELAXED_PREFIX = "SET LOCAL synchronous_commit = off; "
"""Sent in the same simple query as a relaxed statement: one transaction, one round trip."""

KEEPALIVES_IDLE = 5
"""Seconds a connection may be silent before TCP keepalive probes start."""
KEEPALIVES_INTERVAL = 2
KEEPALIVES_COUNT = 3
"""Unanswered probes after which the kernel drops the connection (5 + 3·2 = 11 s)."""

log = logging.getLogger("ironflow_celery.storage")

_all_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def normalize_url(url: str) -> str:
    """The same URL with the psycopg 3 driver named (``postgresql+psycopg://``)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"not a valid database URL ({exc}); expected postgresql://USER@HOST:PORT/DATABASE"
        ) from None
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(f"not a PostgreSQL URL: {parsed.render_as_string()}")
    if parsed.drivername != "postgresql+psycopg":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def engine_options(settings: Settings | None = None) -> dict[str, Any]:
    """`create_engine` keyword arguments from the ``ironflow_pool_*``,
    ``ironflow_prepare_threshold`` and ``ironflow_tcp_user_timeout`` settings (`settings`,
    else the ``IRONFLOW_*`` environment)."""
    s = settings if settings is not None else read_settings(None)
    return {
        "pool_size": s["pool_size"],
        "max_overflow": s["pool_max_overflow"],
        "pool_recycle": s["pool_recycle"],
        "idle_timeout": s["pool_idle_timeout"],
        "prepare_threshold": s["prepare_threshold"],
        "tcp_user_timeout": s["tcp_user_timeout"],
    }


def _prepare_threshold(value: Any) -> int | str | None:
    """``auto`` (off behind a transaction pooler), None (off), or an int."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("", "off", "none", "false", "no"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(
            f"prepare_threshold: expected auto, off or a number, got {value!r}"
        ) from None


def create_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine for `url`: pooled per the ``ironflow_pool_*`` settings (``pool_size=0``
    or ``poolclass=NullPool``: no pool), short connect timeout, TCP keepalives and
    ``tcp_user_timeout`` so a dead network path fails within seconds, app name set.

    Keyword arguments override the settings read from the environment (`engine_options`);
    the rest go to `sqlalchemy.create_engine`. libpq parameters in the URL's query
    (``?keepalives_idle=…``) win over the defaults here; ``prepare_threshold`` may be
    given there too (``?prepare_threshold=0`` or ``off``).
    """
    options = engine_options()
    for key in list(options):
        if key in kwargs:
            options[key] = kwargs.pop(key)
    parsed = make_url(normalize_url(url))
    query = dict(parsed.query)
    threshold = _prepare_threshold(query.pop("prepare_threshold", options["prepare_threshold"]))
    parsed = parsed.set(query=query)
    connect_args: dict[str, Any] = {"connect_timeout": 5, "application_name": "ironflow_celery"}
    connect_args.update(dead_connection_params(options["tcp_user_timeout"]))
    for key in query:  # the URL's own libpq parameters win
        connect_args.pop(key, None)
    connect_args.update(kwargs.pop("connect_args", {}))
    if threshold != "auto":
        connect_args["prepare_threshold"] = threshold
    poolclass = kwargs.pop("poolclass", None)
    if poolclass is None:
        poolclass = NullPool if int(options["pool_size"]) == 0 else QueuePool
    if issubclass(poolclass, QueuePool):
        kwargs.setdefault("pool_size", int(options["pool_size"]))
        kwargs.setdefault("max_overflow", int(options["max_overflow"]))
        kwargs.setdefault("pool_use_lifo", True)  # spare connections go idle (`close_idle`)
    if poolclass is not NullPool:
        kwargs.setdefault("pool_recycle", float(options["pool_recycle"]))
    engine = sa.create_engine(
        parsed.render_as_string(hide_password=False),
        poolclass=poolclass,
        connect_args=connect_args,
        **kwargs,
    )
    _ping_idle_connections(engine)
    _relaxed_statements(engine)
    _warn_on_disconnect(engine)
    if threshold == "auto":
        _auto_prepare(engine)
    if issubclass(poolclass, QueuePool) and float(options["idle_timeout"] or 0) > 0:
        _IDLE.watch(engine, float(options["idle_timeout"]))
    _all_engines.add(engine)
    return engine


def dead_connection_params(tcp_user_timeout: float | None) -> dict[str, Any]:
    """libpq parameters that make a connection whose packets vanish fail within about
    `tcp_user_timeout` seconds (unacknowledged data) or ``5 + 3·2`` s (a silent idle
    connection, TCP keepalives) instead of the kernel's ~15 minutes; ``0``/None: none."""
    seconds = float(tcp_user_timeout or 0)
    if seconds <= 0:
        return {}
    return {
        "keepalives": 1,
        "keepalives_idle": KEEPALIVES_IDLE,
        "keepalives_interval": KEEPALIVES_INTERVAL,
        "keepalives_count": KEEPALIVES_COUNT,
        "tcp_user_timeout": int(seconds * 1000),
    }


# -- per-transaction commit mode ------------------------------------------------------------


@contextmanager
def relaxed_commits(conn: Connection) -> Iterator[Connection]:
    """`conn` with every statement's transaction committing ``synchronous_commit = off``.

    The ``SET LOCAL`` goes in the same simple query as the statement (psycopg's client-side
    binding cursor sends both at once), so it costs no round trip and leaves no session
    state behind: the setting ends with the transaction, on whatever backend ran it.
    """
    with _client_side(conn):
        yield conn.execution_options(ironflow_relaxed=True)


@contextmanager
def _client_side(conn: Connection) -> Iterator[Connection]:
    """`conn` with client-side binding cursors: a statement and the ``SET LOCAL``s before
    it can then travel as one simple query."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    previous = raw.cursor_factory
    raw.cursor_factory = psycopg.ClientCursor
    try:
        yield conn
    finally:
        raw.cursor_factory = previous


def _prefix_of(options: Any, client_side: bool) -> str:
    """The ``SET LOCAL`` to send before a statement run with these execution options: a
    relaxed commit's, unless the statement relaxes itself (`sql.RELAXES_ITSELF`). Only a
    client-side binding cursor can send it in one simple query with the statement."""
    if not client_side or options.get(RELAXES_ITSELF):
        return ""
    return RELAXED_PREFIX if options.get("ironflow_relaxed") else ""


def _prefix_relaxed(
    conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
) -> tuple[str, Any]:
    if not many and context is not None:
        client_side = isinstance(cursor, psycopg.ClientCursor)
        statement = _prefix_of(context.execution_options, client_side) + statement
    return statement, params


def _skip_set(
    conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
) -> None:
    if many or context is None:
        return
    prefix = _prefix_of(context.execution_options, isinstance(cursor, psycopg.ClientCursor))
    for _ in range(_sets_before(prefix)):
        cursor.nextset()  # the statement's own result, not the SETs' (`_prefix_relaxed`)


def _sets_before(prefix: str) -> int:
    """How many ``SET LOCAL …;`` commands a prefix of `_prefix_of` holds."""
    return prefix.count("SET LOCAL ")


def _relaxed_statements(engine: Engine) -> None:
    event.listen(engine, "before_cursor_execute", _prefix_relaxed, retval=True)
    event.listen(engine, "after_cursor_execute", _skip_set)


# -- one statement on its own ----------------------------------------------------------------

# A text statement's SQL as psycopg receives it, compiled once per statement and dialect.
# Keyed by id(): the statement is kept in the value, so its id cannot be reused meanwhile.
# The store's statements are module constants (a few dozen); the bound only keeps a caller
# that builds a statement per call from growing the cache without end.
_driver_sql: dict[tuple[int, str], tuple[Any, str]] = {}
DRIVER_SQL_CACHE = 500


def _compiled(statement: Any, dialect: sa.Dialect) -> str | None:
    """`statement`'s driver SQL when it is a plain text statement (no typed binds or result
    processing to apply), else None."""
    key = (id(statement), dialect.name)
    found = _driver_sql.get(key)
    if found is not None:
        return found[1]
    if not isinstance(statement, sa.TextClause | sa.TextualSelect):
        return None
    compiled = statement.compile(dialect=dialect)
    if compiled.positional or any(
        not isinstance(b.type, sa.types.NullType) for b in compiled.binds.values()
    ):
        return None
    if len(_driver_sql) >= DRIVER_SQL_CACHE:
        _driver_sql.clear()
    _driver_sql[key] = (statement, compiled.string)
    return compiled.string


def run_statement(
    conn: Connection, statement: Any, params: dict[str, Any], *, relaxed: bool = False
) -> tuple[list[Any], int]:
    """Run one statement on `conn`: its rows (all fetched) and its row count.

    The hot path's statements (claims, start guards, acknowledgements, a new instance's
    first decision) are constant text, and SQLAlchemy's execution around psycopg -- a cache
    key computed per call, an execution context, a result object -- costs about 200 µs of
    CPU a statement on a busy two-core host, as much as PostgreSQL spends running it. Such a
    statement is compiled once and sent on the connection's psycopg cursor; an error still
    goes through SQLAlchemy's own handling (``handle_error`` events, disconnect detection,
    pool invalidation, `sqlalchemy.exc.DBAPIError`). Where anything else listens to the
    engine's statements (Sentry's or OpenTelemetry's SQLAlchemy integration, a statement
    counter), and for any other statement or driver, `Connection.execute` runs it, so those
    listeners see every statement as before.

    ``relaxed`` (or a connection in `relaxed_commits`): the statement commits with
    ``synchronous_commit = off``. A statement that sets it itself (`sql.RELAXES_ITSELF`:
    the claims, start guards, releases and renewals) gets ``:relaxed`` and stays a
    statement PostgreSQL can prepare; any other is sent in one simple query after a ``SET
    LOCAL`` (`RELAXED_PREFIX`), parsed and planned on every call.
    """
    relaxed = relaxed or bool(conn.get_execution_options().get("ironflow_relaxed"))
    options = statement.get_execution_options() if isinstance(statement, sa.Executable) else {}
    if options.get(RELAXES_ITSELF):
        params = {**params, "relaxed": relaxed}
        relaxed = False
    query = _compiled(statement, conn.dialect)
    raw = conn.connection.driver_connection
    if query is None or not isinstance(raw, psycopg.Connection) or _instrumented(conn):
        context: AbstractContextManager[Connection] = nullcontext(conn)
        if relaxed:
            context = relaxed_commits(conn)
        with context as run_on:
            result = run_on.execute(statement, params)
            return (list(result.fetchall()) if result.returns_rows else []), result.rowcount
    cursor: psycopg.Cursor[Any]
    prefix = RELAXED_PREFIX if relaxed else ""
    if prefix:
        query = prefix + query  # client-side binding: one simple query
        cursor = psycopg.ClientCursor(raw, row_factory=namedtuple_row)
    else:
        cursor = raw.cursor(row_factory=namedtuple_row)
    with cursor:
        try:
            cursor.execute(query, params)
            for _ in range(_sets_before(prefix)):
                cursor.nextset()  # the statement's own result, not the SETs'
            rows = cursor.fetchall() if cursor.description is not None else []
            return rows, cursor.rowcount
        except psycopg.Error as error:
            # SQLAlchemy's handler, as Connection.execute runs it: events, disconnect
            # detection and pool invalidation, the wrapped error. It raises.
            conn._handle_dbapi_exception(error, query, params, cast(Any, cursor), None)
            raise


_OWN_LISTENERS = frozenset({_prefix_relaxed, _skip_set})


def _instrumented(conn: Connection) -> bool:
    """Whether a listener other than ours watches `conn`'s statements (engine or class)."""
    dispatch = conn.dispatch
    return any(fn not in _OWN_LISTENERS for fn in dispatch.before_cursor_execute) or any(
        fn not in _OWN_LISTENERS for fn in dispatch.after_cursor_execute
    )


# -- transaction poolers -------------------------------------------------------------------


def behind_transaction_pooler(conn: psycopg.Connection[Any]) -> bool:
    """Whether `conn` reaches PostgreSQL through a transaction pooler (PgBouncer's
    ``pool_mode = transaction``), where one client connection's transactions may each run
    on another backend.

    A connection whose backend sees our own socket's port is direct (one query). Else a
    second client connection holds a transaction (pinning its backend) while `conn` runs
    one, then releases it and `conn` runs another: through a transaction pooler `conn`
    reports two backend pids (PgBouncer hands out the backend released last); directly or
    through a session pooler, always the same one. A few rounds settle it under load.
    """
    if _direct(conn):
        return False
    seen: set[int] = set()
    with psycopg.connect(
        conn.info.dsn, password=conn.info.password, autocommit=True, prepare_threshold=None
    ) as other:
        for _ in range(5):
            with other.transaction():
                _backend_pid(other)
                seen.add(_backend_pid(conn))
            seen.add(_backend_pid(conn))
            if len(seen) > 1:
                return True
    return False


def _direct(conn: psycopg.Connection[Any]) -> bool:
    """Whether `conn`'s backend sees our socket's own address (no proxy in between)."""
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            local = sock.getsockname()
    except OSError:
        return False
    with conn.cursor() as cur:
        cur.execute("SELECT inet_client_port()", prepare=False)
        row = cur.fetchone()
    if not conn.autocommit:
        conn.rollback()
    return isinstance(local, tuple) and row is not None and row[0] == local[1]


def _backend_pid(conn: psycopg.Connection[Any]) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()", prepare=False)
        row = cur.fetchone()
    if not conn.autocommit:
        conn.rollback()
    return int(row[0]) if row else 0


def _auto_prepare(engine: Engine) -> None:
    """``prepare_threshold = auto``: psycopg's default, except behind a transaction pooler
    (checked on the engine's first connection), where a statement prepared on one backend
    is unknown on the next and is never prepared."""
    pooled: list[bool] = []

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        if not pooled:
            try:
                pooled.append(behind_transaction_pooler(dbapi_connection))
            except psycopg.Error as error:
                log.warning("ironflow: could not check for a transaction pooler (%s)", error)
                return
            if pooled[0]:
                log.info(
                    "ironflow: %s is a transaction pooler; prepared statements are off",
                    _where(engine),
                )
        if pooled[0]:
            dbapi_connection.prepare_threshold = None


# -- dead connections ------------------------------------------------------------------------


def _where(engine: Engine) -> str:
    return f"{engine.url.host or 'localhost'}:{engine.url.port or 5432}"


def _warn_on_disconnect(engine: Engine) -> None:
    """Say so, naming the server, when a connection turns out dead (keepalives or
    ``tcp_user_timeout`` ran out, the server went away): a host cut off from PostgreSQL
    must not fail silently."""

    @event.listens_for(engine, "handle_error")
    def _handle_error(context: Any) -> None:
        error = context.original_exception
        connecting = context.connection is None and isinstance(error, psycopg.OperationalError)
        if context.is_disconnect or connecting:
            log.warning(
                "ironflow: %s PostgreSQL at %s (%s)",
                "cannot connect to" if connecting else "lost the connection to",
                _where(engine),
                _first_line(error),
            )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _ping_idle_connections(engine: Engine) -> None:
    """Ping a pooled connection on checkout only when it sat idle for a while.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: a round trip per statement in
    the relay and task hot paths (a third of a busy worker's time). A connection reused
    within seconds is alive; one that idled (perhaps across a server restart) is checked,
    and a dead one is replaced transparently.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        record.info["ironflow_checkin"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        last = record.info.get("ironflow_checkin")
        if last is None or time.monotonic() - last < IDLE_PING_AFTER:
            return
        try:
            with dbapi_connection.cursor() as cur:
                cur.execute("SELECT 1", prepare=False)
            if not dbapi_connection.autocommit:
                dbapi_connection.rollback()
        except Exception as error:  # the pool replaces the connection and retries
            log.warning(
                "ironflow: a pooled connection to PostgreSQL at %s is dead (%s); reconnecting",
                _where(engine),
                _first_line(error),
            )
            raise exc.DisconnectionError(str(error)) from error


# -- idle connections ------------------------------------------------------------------------


class _IdleCloser:
    """Closes pooled connections left unused for their engine's idle timeout, one by one
    (one daemon thread per process, started when first needed, again in a forked child).

    Pools hand out the connection returned last (LIFO), so a connection opened for a
    moment of concurrency sinks to the bottom, goes idle and is closed here while the
    process keeps using the other one."""

    def __init__(self) -> None:
        self._timeouts: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._pid = 0

    def watch(self, engine: Engine, timeout: float) -> None:
        self._timeouts[engine] = timeout
        event.listen(engine, "checkin", lambda *args: self._ensure_thread())

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="ironflow-idle-closer", daemon=True).start()

    def _run(self) -> None:
        while True:
            timeouts = dict(self._timeouts.items())
            time.sleep(max(0.25, min(timeouts.values(), default=60.0) / 4))
            for engine, timeout in timeouts.items():
                pool = engine.pool
                if isinstance(pool, QueuePool) and close_idle(pool, timeout):
                    log.debug("ironflow: closed idle connections to %s", _where(engine))


def close_idle(pool: QueuePool, timeout: float) -> int:
    """Close `pool`'s connections that sat returned for `timeout` seconds or more; the
    others go back in their order. Returns how many were closed."""
    now = time.monotonic()
    queue = pool._pool
    held: list[Any] = []
    while True:  # newest first under LIFO
        try:
            held.append(queue.get(False))
        except Empty:
            break
    closed = 0
    for record in reversed(held):  # oldest first: put back in the same order
        if now - record.info.get("ironflow_checkin", now) < timeout:
            try:
                queue.put(record, False)
                continue
            except Full:  # a connection opened meanwhile took its place
                pass
        try:
            record.close()
        finally:
            pool._dec_overflow()  # as QueuePool does with a connection it does not keep
        closed += 1
    return closed


_IDLE = _IdleCloser()


def dispose_after_fork() -> None:
    """Drop pooled connections inherited from the parent without closing its sockets."""
    _IDLE._lock = threading.Lock()  # a thread may have held it across the fork
    for engine in list(_all_engines):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=dispose_after_fork)
