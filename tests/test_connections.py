"""Connections per host (issue 20 §1): a prefork worker holds one PostgreSQL backend per
pool process and two for its relay (LISTEN + one pooled), counted in ``pg_stat_activity``
by the client ports of the worker's own processes; the pool settings reach every engine;
lease bookkeeping chooses its commit mode per transaction, leaving no session state."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import psutil
import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.pool import NullPool, QueuePool

from ironflow_celery.engine.runtime import WorkflowRuntime
from ironflow_celery.errors import StorageError
from ironflow_celery.storage import sql as sql_
from ironflow_celery.storage.db import create_engine
from ironflow_celery.storage.store import PostgresStore
from tests.e2e import (
    REDIS_URL,
    WF,
    Processes,
    all_processed,
    insert_effects,
    make_env,
    prepare_database,
    redis_queue_cleanup,
    sql,
    wait_until,
)

CONCURRENCY = 3
EFFECTS = 300


def backends_by_process(url: str, root_pid: int) -> dict[int, list[tuple[int, str, str]]]:
    """The backends (pid, state, query) of `root_pid` and its descendants, by client
    process: each client socket's local port matched to ``client_port`` (the effects run
    with ``record=False``: the test app opens no connection of its own)."""
    port_owner: dict[int, int] = {}
    server_port = sa.make_url(url).port or 5432
    try:
        processes = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for proc in processes:
        try:
            for c in proc.net_connections(kind="tcp"):
                if c.raddr and c.raddr.port == server_port and c.status == "ESTABLISHED":
                    port_owner[c.laddr.port] = proc.pid
        except psutil.NoSuchProcess:
            continue
    found: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
    for pid, port, state, query in sql(
        url,
        "SELECT pid, client_port, state, query FROM pg_stat_activity WHERE client_port = ANY(%s)",
        (list(port_owner),),
    ):
        found[port_owner[port]].append((pid, state or "", query or ""))
    return found


@pytest.mark.e2e
def test_prefork_worker_holds_one_backend_per_pool_process_and_two_for_its_relay(
    database_url: str,
    procs: Processes,
    queue: str,
) -> None:
    """``-c 3`` under load: every pool process at most 1 backend, the relay process at most
    2 (one of them its LISTEN), so a host holds at most ``2 + c``; idle, a pool process
    releases its connection after ``ironflow_pool_idle_timeout``. At 6964a2b each pool
    process held 2 (a second engine for relaxed commits) and the relay 3."""
    prepare_database(database_url)
    env = make_env(database_url, REDIS_URL, queue, pool_idle_timeout=3)
    with redis_queue_cleanup(queue):
        worker = procs.worker("worker", env, pool="prefork", concurrency=CONCURRENCY)
        worker.wait_for_output("ironflow relay started (process)", 90)
        worker.wait_for_output("ready.", 90)
        insert_effects(database_url, EFFECTS, "conn-", record=False)
        most: dict[int, int] = defaultdict(int)
        listeners: set[int] = set()

        def sample() -> bool:
            for pid, rows in backends_by_process(database_url, worker.pid).items():
                most[pid] = max(most[pid], len(rows))
                if any(q.startswith("LISTEN") for _, _, q in rows):
                    listeners.add(pid)
            return all_processed(database_url, EFFECTS)

        wait_until(sample, 180, "every effect processed")
        print(f"most backends per process: {dict(most)}; relay: {listeners}")  # with -s
        assert len(listeners) == 1, f"one relay process with a LISTEN connection: {dict(most)}"
        (relay,) = listeners
        assert most[relay] <= 2, f"relay process: {most[relay]} backends"
        pools = {pid: n for pid, n in most.items() if pid != relay}
        assert pools, "the pool processes used the database"
        assert all(n <= 1 for n in pools.values()), f"pool processes' backends: {pools}"
        assert sum(most.values()) <= 2 + CONCURRENCY, dict(most)

        # Idle: the pool processes close their connections; the relay keeps its two.
        def pools_released() -> bool:
            now = backends_by_process(database_url, worker.pid)
            return all(not rows for pid, rows in now.items() if pid != relay)

        wait_until(pools_released, 60, "the pool processes to release their idle connections")


@pytest.mark.e2e
def test_prefork_pool_processes_connect_as_they_start(
    database_url: str,
    procs: Processes,
    queue: str,
) -> None:
    """Each pool process opens its connection when it starts, before any task, so that
    its first row does not wait for the store to be built and connected (90-150 ms beside
    a 1-3 ms start guard on the loaded 2-core machine: benchmark row 4's first samples);
    still one backend each (the test above counts them under load). Fails without the
    ``worker_process_init`` hook: no pool process touches the database until a task
    arrives."""
    prepare_database(database_url)
    env = make_env(database_url, REDIS_URL, queue)
    with redis_queue_cleanup(queue):
        worker = procs.worker("worker", env, concurrency=CONCURRENCY, relay=False)
        worker.wait_for_output("ready.", 90)
        pool_pids = {p.pid for p in psutil.Process(worker.pid).children()}
        assert len(pool_pids) == CONCURRENCY

        def every_pool_process_connected() -> bool:
            found = backends_by_process(database_url, worker.pid)
            return all(len(found.get(pid, [])) == 1 for pid in pool_pids)

        wait_until(every_pool_process_connected, 60, "every pool process to connect")
        assert worker.pid not in backends_by_process(database_url, worker.pid)


def test_pool_process_connects_ahead_only_for_a_worker_of_ironflow_queues(
    database_url: str,
) -> None:
    """The ``worker_process_init`` hook, called as a pool process calls it: it connects
    the store of a worker that consumes a queue ironflow's rows go to, and leaves alone
    one whose ``-Q`` names other queues only (an ironflow app's worker group for other
    tasks holds no backend it never uses)."""
    from ironflow_celery import install
    from ironflow_celery.integration import app as integration
    from tests.e2e_apps.workflows import OrderWorkflow

    for consumes, connected in (("other-tasks", 0), ("celery", 1)):
        app = Celery(f"connect-ahead-{consumes}", set_as_current=False)
        app.conf.ironflow_database_url = database_url
        runtime = install(app, workflows=[OrderWorkflow])
        app.amqp.queues.select([consumes])  # as ``-Q`` does before the pool forks
        before = {t.ident for t in threading.enumerate()}
        with app_as_current(app):
            integration._pool_process_started()
        for thread in threading.enumerate():
            if thread.name == "ironflow-connect" and thread.ident not in before:
                thread.join(30)
        try:
            pool = runtime.store.engine.pool
            assert isinstance(pool, QueuePool)
            assert pool.checkedin() == connected, consumes
        finally:
            runtime.store.dispose()


def test_a_connect_ahead_that_outlasts_its_wait_is_closed(database_url: str) -> None:
    """A pool process waits for its connection `CONNECT_AHEAD_WAIT` at most, then takes
    tasks, whose first opens a connection of its own: the one still being opened is closed
    when it comes, not kept beside it."""
    from ironflow_celery.integration import app as integration

    def ours() -> int:  # this process's backends (the fixtures' too: compared, not counted)
        return len(backends_by_process(database_url, os.getpid()).get(os.getpid(), []))

    before = ours()
    runtime = WorkflowRuntime(database_url=database_url)
    ahead = integration._ConnectAhead(runtime)
    assert ahead.wait(0) is False  # not connected yet: given up
    ahead.run()  # the connect ends after the wait did
    try:
        assert ours() == before, "the late connection was kept"
    finally:
        runtime.store.dispose()
    runtime = WorkflowRuntime(database_url=database_url)
    ahead = integration._ConnectAhead(runtime)
    threading.Thread(target=ahead.run).start()
    assert ahead.wait(30) is True
    try:
        assert ours() == before + 1  # kept in the pool for the first task
    finally:
        runtime.store.dispose()


@contextlib.contextmanager
def app_as_current(app: Celery) -> Iterator[None]:
    from celery import _state

    previous = _state.get_current_app()
    app.set_current()
    try:
        yield
    finally:
        previous.set_current()


def test_pool_settings_reach_the_engine(database_url: str) -> None:
    """``ironflow_pool_*`` on the app's conf reach the runtime's store and the relays'."""
    app = Celery("conn-settings", set_as_current=False)
    app.conf.ironflow_pool_size = 2
    app.conf.ironflow_pool_max_overflow = 3
    app.conf.ironflow_pool_recycle = 120
    runtime = WorkflowRuntime(database_url=database_url, app=app)
    pool = runtime.store.engine.pool
    try:
        assert isinstance(pool, QueuePool)
        assert (pool.size(), pool._max_overflow, pool._recycle) == (2, 3, 120)
    finally:
        runtime.store.dispose()
    app.conf.ironflow_pool_size = 0  # no pool: a connection per use
    runtime = WorkflowRuntime(database_url=database_url, app=app)
    assert isinstance(runtime.store.engine.pool, NullPool)
    runtime.store.dispose()


def test_from_url_takes_a_null_pool(database_url: str) -> None:
    """``PostgresStore.from_url(url, poolclass=NullPool)`` (a TypeError at 6964a2b): every
    statement, relaxed or not, runs and no connection stays open."""
    store = PostgresStore.from_url(database_url, poolclass=NullPool)
    try:
        assert list(store._run(sa.text("SELECT 1"))) == [(1,)]
        assert list(store._run(sa.text("SELECT 2"), relaxed=True)) == [(2,)]
        assert store.engine.pool.status().startswith("NullPool")
    finally:
        store.dispose()


def test_relaxed_commits_are_chosen_per_transaction(database_url: str) -> None:
    """Lease bookkeeping commits with ``synchronous_commit = off`` on the same (only)
    connection as everything else, and leaves the session's setting untouched."""
    store = PostgresStore.from_url(database_url, pool_size=1, max_overflow=0)
    setting = sa.text("SELECT current_setting('synchronous_commit'), pg_backend_pid()")
    try:
        ((relaxed, pid1),) = list(store._run(setting, relaxed=True))
        ((durable, pid2),) = list(store._run(setting))
        with store.transaction() as conn:
            ((in_transaction, pid3),) = conn.execute(setting).all()
        assert (relaxed, durable, in_transaction) == ("off", "on", "on")
        assert pid1 == pid2 == pid3  # one connection, no second engine
        acks = PostgresStore(store.engine, relaxed_acks=True)
        with acks.transaction(ack=True) as conn:
            assert conn.execute(setting).all()[0][0] == "off"
        assert store._run(setting).first()[0] == "on"
    finally:
        store.dispose()


COMMIT_MODES = """
CREATE TABLE IF NOT EXISTS public.bookkeeping_modes (tbl text, mode text);
CREATE OR REPLACE FUNCTION public.record_bookkeeping_mode() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bookkeeping_modes VALUES
        (TG_TABLE_NAME, current_setting('synchronous_commit'));
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER observe_bookkeeping AFTER UPDATE ON ironflow.outbox
    FOR EACH ROW EXECUTE FUNCTION public.record_bookkeeping_mode();
CREATE OR REPLACE TRIGGER observe_bookkeeping AFTER UPDATE ON ironflow.timers
    FOR EACH ROW EXECUTE FUNCTION public.record_bookkeeping_mode();
"""


@pytest.mark.parametrize("relaxed", [True, False], ids=["relaxed", "durable"])
def test_lease_bookkeeping_sets_its_own_commit_mode_and_is_prepared(
    database_url: str, relaxed: bool
) -> None:
    """The claims, start guards (one row and a group), releases and renewals set
    ``synchronous_commit`` themselves (`sql.RELAXES_ITSELF`; the claims in migration 0014's
    functions): each of their writes runs ``off`` in a relaxed store and ``on`` in a
    durable one, and PostgreSQL prepares them (sent behind a ``SET LOCAL`` they were parsed
    and planned on every call, about 250 µs of backend CPU each)."""
    store = PostgresStore.from_url(
        database_url, relaxed_commits=relaxed, pool_size=1, max_overflow=0
    )
    with store.engine.begin() as conn:
        conn.exec_driver_sql(COMMIT_MODES)
    insert_effects(database_url, 40, "bk-")
    for n in range(8):
        sql(
            database_url,
            "INSERT INTO ironflow.timers (workflow_type, workflow_id, key, fire_at, input)"
            " VALUES (%s, %s, 'k', now(), '{\"type\": \"Tick\"}')",
            (WF, f"bk-timer-{n}"),
        )
    expected = "off" if relaxed else "on"
    kinds = ("claim", "start", "start group", "release", "renew", "renew dispatched")
    modes: dict[str, set[str]] = {}

    def recorded(what: str) -> None:
        with store.engine.begin() as conn:
            found = conn.exec_driver_sql("DELETE FROM public.bookkeeping_modes RETURNING mode")
            modes.setdefault(what, set()).update(m for (m,) in found)

    try:
        for n in range(6):  # psycopg prepares a statement on its sixth execution
            token = f"relay-{n}"
            effects = store.claim("effect", token, [WF], lease_seconds=60, max_attempts=5, limit=6)
            timers = store.claim("timer", token, [WF], lease_seconds=60, max_attempts=5, limit=1)
            assert len(effects) == 6 and len(timers) == 1
            recorded("claim")
            lone, *group = effects[:3]
            assert store.start("effect", lone.id, token, f"run-{n}", lease_seconds=60)
            recorded("start")
            started = store.start_effects(
                [(r.id, token, f"run-{n}-{i}") for i, r in enumerate(group)], lease_seconds=60
            )
            assert len(started) == 2
            recorded("start group")
            held = [(r.id, r.token) for r in effects[3:]]
            assert store.renew_dispatched(
                "effect", held, lease_seconds=60, server_started=effects[0].server_started
            ) == {i for i, _ in held}
            recorded("renew dispatched")
            running = [(lone.id, f"run-{n}")]
            assert store.renew_leases("effect", running, lease_seconds=60) == {lone.id}
            recorded("renew")
            assert store.release("effect", [i for i, _ in held], token) == 3
            recorded("release")
        with store.engine.connect() as conn:
            prepared = [
                s for (s,) in conn.exec_driver_sql("SELECT statement FROM pg_prepared_statements")
            ]
    finally:
        store.dispose()
    assert modes == {what: {expected} for what in kinds}, modes
    bookkeeping = [
        sql_.EFFECT_STATEMENTS.claim,
        sql_.TIMER_STATEMENTS.claim,
        sql_.EFFECT_STATEMENTS.start,
        sql_.START_EFFECTS,
        sql_.EFFECT_STATEMENTS.renew_dispatched,
        sql_.EFFECT_STATEMENTS.renew_leases,
        sql_.EFFECT_STATEMENTS.release,
    ]
    words = {" ".join(s.split()) for s in prepared}
    for statement in bookkeeping:
        text = " ".join(getattr(statement, "element", statement).text.split())
        first = text.split(":", 1)[0]  # up to the first bind (psycopg numbers them)
        assert any(w.startswith(first) for w in words), (first, words)


def test_one_statement_autocommits_and_the_pool_gets_back_a_transactional_connection(
    database_url: str,
) -> None:
    """`_run` switches psycopg's autocommit for its statement only (no BEGIN/COMMIT): the
    same pooled connection then gives `transaction` a real transaction again, whether the
    statement succeeded or failed; on an engine made AUTOCOMMIT it stays AUTOCOMMIT."""
    store = PostgresStore.from_url(database_url, pool_size=1, max_overflow=0)
    xact = sa.text("SELECT txid_current(), pg_backend_pid(), now() = statement_timestamp()")
    try:
        for statement in (sa.text("SELECT 1"), sa.text("SELECT 1 / 0")):
            with contextlib.suppress(StorageError):
                store._run(statement)
            ((txid1, pid1, autocommitted),) = list(store._run(xact))
            assert autocommitted  # a statement of its own: now() is the statement's time
            with store.transaction() as conn:
                ((txid2, pid2, _),) = conn.execute(xact).all()
                ((txid3, pid3, _),) = conn.execute(xact).all()
                assert not conn.connection.driver_connection.autocommit
            assert pid1 == pid2 == pid3  # one pooled connection throughout
            assert txid2 == txid3 != txid1  # both statements in one transaction
    finally:
        store.dispose()
    engine = create_engine(database_url, pool_size=1, isolation_level="AUTOCOMMIT")
    try:
        assert list(PostgresStore(engine)._run(sa.text("SELECT 1"))) == [(1,)]
        with engine.connect() as conn:
            assert conn.connection.driver_connection.autocommit
    finally:
        engine.dispose()


def test_prepare_threshold_in_the_url(database_url: str) -> None:
    """``?prepare_threshold=0`` (or ``off``) in the database URL configures psycopg (at
    6964a2b SQLAlchemy passed the string through and psycopg raised TypeError)."""
    for query, expected in (("prepare_threshold=0", 0), ("prepare_threshold=off", None)):
        sep = "&" if "?" in database_url else "?"
        store = PostgresStore.from_url(f"{database_url}{sep}{query}")
        try:
            for _ in range(3):
                assert list(store._run(sa.text("SELECT 1"))) == [(1,)]
            with store.engine.connect() as conn:
                assert conn.connection.driver_connection.prepare_threshold == expected
        finally:
            store.dispose()


def test_idle_connections_are_closed(database_url: str) -> None:
    """A pool unused for ``pool_idle_timeout`` closes its connections (an idle host holds
    no backends); the next statement reconnects."""
    store = PostgresStore.from_url(database_url, idle_timeout=1.0)
    try:
        (pid,) = store._run(sa.text("SELECT pg_backend_pid()")).first()
        count = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"

        wait_until(lambda: sql(database_url, count, (pid,))[0][0] == 0, 60, "idle close")
        started = time.monotonic()
        assert list(store._run(sa.text("SELECT 1"))) == [(1,)]
        assert time.monotonic() - started < 30
    finally:
        store.dispose()


def test_a_spare_connection_is_closed_while_the_other_stays_in_use(database_url: str) -> None:
    """Two connections opened for a moment of concurrency (a lease renewal beside a
    task's statement): while the process keeps working on one, the spare one is closed
    after ``pool_idle_timeout``, so a busy pool process is back to one backend."""
    store = PostgresStore.from_url(database_url, idle_timeout=1.0)
    pid = sa.text("SELECT pg_backend_pid()")
    try:
        with store.engine.connect() as a, store.engine.connect() as b:
            pids = {a.execute(pid).scalar(), b.execute(pid).scalar()}
        assert len(pids) == 2 and store.engine.pool.checkedin() == 2

        def one_left() -> bool:
            store._run(pid)  # keeps working: the engine as a whole is never idle
            return store.engine.pool.checkedin() == 1

        wait_until(one_left, 60, "the spare connection to be closed", interval=0.2)
        alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)"
        assert sql(database_url, alive, (list(pids),))[0][0] == 1
    finally:
        store.dispose()


def _one_row_cycle(store: PostgresStore, url: str, workflow_id: str) -> bool:
    """A new instance with one effect, claimed, started and acknowledged: the hot path's
    statements, each through `PostgresStore`'s own calls. Whether the row ended processed."""
    created = store.create_with_decision(
        "conn_test", workflow_id, None, [{"type": "Begun"}], [{"type": "Work"}]
    )
    assert created
    (claimed,) = store.claim(
        "effect", "claim-1", ["conn_test"], lease_seconds=30, max_attempts=5, limit=10
    )
    started = store.start_effects([(claimed.id, "claim-1", "run-1")], lease_seconds=30)
    assert set(started) == {claimed.id}
    assert store.mark_many_processed([(claimed.id, "run-1")]) == {claimed.id}
    query = "SELECT processed_at IS NOT NULL FROM ironflow.outbox WHERE id = %s"
    return bool(sql(url, query, (claimed.id,))[0][0])


@pytest.fixture
def fast_path() -> Iterator[None]:
    """Detach Sentry's SQLAlchemy listeners for the test. Once a test of this process has
    initialised sentry-sdk (test_failure_reporting.py), its SQLAlchemy integration listens
    on every Engine for the rest of the process (integrations set up once per process), and
    the hot path then goes through SQLAlchemy on purpose (the next test): which tests share
    a process is up to xdist, so a test of the fast path takes them off first."""
    module = sys.modules.get("sentry_sdk.integrations.sqlalchemy")
    listeners = [
        (ident, getattr(module, f"_{ident}"))
        for ident in ("before_cursor_execute", "after_cursor_execute")
        if module is not None
    ]
    attached = [(i, fn) for i, fn in listeners if sa.event.contains(sa.engine.Engine, i, fn)]
    for ident, fn in attached:
        sa.event.remove(sa.engine.Engine, ident, fn)
    try:
        yield
    finally:
        for ident, fn in attached:
            sa.event.listen(sa.engine.Engine, ident, fn)


def test_hot_statements_skip_sqlalchemy_execution(database_url: str, fast_path: None) -> None:
    """A new instance's first decision, the claim, the start guard and the acknowledgement
    run on the pooled connection's psycopg cursor, not through `Connection.execute` (its
    per-call cost was as large as PostgreSQL's own): the cycle completes with
    `Connection.execute` made to fail. (Where nothing else listens to statements: see
    the `fast_path` fixture.)"""
    from unittest import mock

    from ironflow_celery.storage.db import _instrumented

    store = PostgresStore.from_url(database_url)
    try:
        with store.engine.connect() as conn:
            assert not _instrumented(conn), "another library listens to statements"
        refuse = mock.patch.object(
            sa.engine.Connection, "execute", side_effect=AssertionError("Connection.execute")
        )
        with refuse:
            assert _one_row_cycle(store, database_url, "fast-1")
    finally:
        store.dispose()


def test_statement_listeners_still_see_every_hot_statement(database_url: str) -> None:
    """With a ``before_cursor_execute`` listener on the engine (Sentry's or OpenTelemetry's
    SQLAlchemy integration, a statement counter), the hot path's statements go through
    SQLAlchemy, so the listener sees each of them, with its context."""
    store = PostgresStore.from_url(database_url)
    seen: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, params, context, many) -> None:
        seen.append((" ".join(statement.split()), context is not None))

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        assert _one_row_cycle(store, database_url, "seen-1")
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)
        store.dispose()
    texts = [text for text, _ in seen]
    assert any("celery_create_with_decision" in t for t in texts)
    assert any("FROM ironflow.celery_claim_effects(" in t for t in texts)  # claim
    assert any("jsonb_to_recordset" in t and "run_started_at = now()" in t for t in texts)
    assert any(
        t.startswith("UPDATE ironflow.outbox") and "processed_at = now()" in t for t in texts
    )
    assert all(with_context for _, with_context in seen)


def test_a_dead_pooled_connection_is_replaced_on_the_fast_path(
    database_url: str, fast_path: None
) -> None:
    """Both pooled connections' backends terminated (a server restart, a failover): the
    next statement fails on the first, SQLAlchemy's handling invalidates the whole pool,
    and the statement is sent once more on a new connection, as through
    `Connection.execute`; a failing statement leaves its connection usable."""
    store = PostgresStore.from_url(database_url, pool_size=2, max_overflow=0)
    pid = sa.text("SELECT pg_backend_pid() AS pid")
    try:
        with store.engine.connect() as a, store.engine.connect() as b:
            old = {a.execute(pid).scalar(), b.execute(pid).scalar()}
        assert store.engine.pool.checkedin() == 2
        for backend in old:
            sql(database_url, "SELECT pg_terminate_backend(%s)", (backend,))
        alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)"
        wait_until(lambda: sql(database_url, alive, (list(old),))[0][0] == 0, 60, "backends to end")
        new = store._run(pid).first().pid
        assert new not in old
        with pytest.raises(StorageError):
            store._run(sa.text("SELECT 1 / 0"))
        assert store._run(pid).first().pid not in old
    finally:
        store.dispose()


def test_statements_built_per_call_do_not_grow_the_compiled_cache(
    database_url: str, fast_path: None
) -> None:
    """A statement built anew for each call (not the store's constants) is compiled each
    time, and the cache of compiled statements stays bounded."""
    from ironflow_celery.storage import db as storage_db

    store = PostgresStore.from_url(database_url)
    try:
        for i in range(storage_db.DRIVER_SQL_CACHE + 50):
            assert store._run(sa.text(f"SELECT {i} AS n")).first().n == i
            assert len(storage_db._driver_sql) <= storage_db.DRIVER_SQL_CACHE
    finally:
        store.dispose()
