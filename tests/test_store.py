"""PostgresStore against ironflow's store.rs checklist (reference §7.1, 42 behaviours).

One test per ironflow test, named after it, plus the latest (0.4+) semantics: keyed timer
reset, stale-claim guards, and real races (threads on separate connections) for the
per-instance lock and unique keys. Dead-letter *queries* are not a store API here: the
dead-letter assertions below use SQL on the tables (a dead letter is a pending row with
``attempts >= max_attempts`` or ``dead_lettered_at`` set); the API is tested in
tests/test_dead_letters.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from workflows import Ping, TestWorkflow, test_handler

from ironflow_celery import Registry, WorkflowService
from ironflow_celery.errors import (
    DatabaseUnavailable,
    EventDeserializationError,
    StorageError,
    UniqueKeyConflict,
    UnitOfWorkFinished,
)
from ironflow_celery.storage.store import DecisionWrite, PostgresStore, TimerSpec

T = "test_workflow"
OTHER = "other_workflow"
MAX = 3
LEASE = 30.0


# -- helpers -------------------------------------------------------------------------------


def q(db: sa.Engine, statement: str, **params: Any) -> Any:
    """The single value of a query."""
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


def row(db: sa.Engine, statement: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).one()


def execute(db: sa.Engine, statement: str, **params: Any) -> int:
    with db.begin() as conn:
        return conn.execute(sa.text(statement), params).rowcount


def commit_events(store: PostgresStore, wid: str, *events: Any, wt: str = T, **kw: Any) -> None:
    with store.begin(wt, wid, **kw) as uow:
        assert not uow.completed
        uow.append_events(list(events))
        uow.commit()


def add_effects(store: PostgresStore, wid: str, *effects: Any, wt: str = T) -> None:
    with store.begin(wt, wid) as uow:
        uow.append_events([{"type": "Started"}])
        uow.enqueue_effects(list(effects))
        uow.commit()


def add_timers(store: PostgresStore, wid: str, *timers: TimerSpec, wt: str = T) -> None:
    with store.begin(wt, wid) as uow:
        uow.append_events([{"type": "Started"}])
        uow.schedule_timers(list(timers))
        uow.commit()


def expire_lease(db: sa.Engine, table: str, row_id: Any) -> None:
    """Let time pass for one row: its lease or backoff ended a second ago."""
    assert (
        execute(
            db,
            f"UPDATE ironflow.{table} SET locked_until = now() - interval '1 second'"
            " WHERE id = :id",
            id=row_id,
        )
        == 1
    )


def dead_letter_count(db: sa.Engine, table: str, wt: str | None = None, max_attempts: int = MAX):
    return q(
        db,
        f"SELECT count(*) FROM ironflow.{table} WHERE processed_at IS NULL"
        " AND (attempts >= :max OR dead_lettered_at IS NOT NULL)"
        " AND (CAST(:wt AS text) IS NULL OR workflow_type = :wt)",
        max=max_attempts,
        wt=wt,
    )


def retry_dead_letter(db: sa.Engine, table: str, row_id: Any) -> bool:
    """ironflow's retry_dead_letter (§3.8), in SQL."""
    return (
        execute(
            db,
            f"UPDATE ironflow.{table} SET attempts = 0, locked_until = NULL, locked_by = NULL,"
            " last_error = NULL, dead_lettered_at = NULL WHERE id = :id AND processed_at IS NULL",
            id=row_id,
        )
        == 1
    )


def wait_for_lock_waiters(db: sa.Engine, n: int = 1, timeout: float = 60.0) -> None:
    """Block until `n` backends of this database wait on a heavyweight lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = q(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'",
        )
        if waiting >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} backend(s) waiting on a lock within {timeout} s")


class Background:
    """Run a function in a thread; remember its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.entered = threading.Event()
        self.done = threading.Event()
        self._fn = fn
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.entered.set()
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def join(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert self.done.is_set(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def impatient_store(database_url: str) -> Iterator[PostgresStore]:
    """A second store whose statements give up after 200 ms waiting for a lock."""
    s = PostgresStore.from_url(
        database_url, pool_size=2, connect_args={"options": "-c lock_timeout=200"}
    )
    yield s
    s.dispose()


# -- 1-8: unit of work and events ----------------------------------------------------------


def test_begin_acquires_lock_and_returns_empty_events(
    store: PostgresStore, impatient_store: PostgresStore
) -> None:
    uow = store.begin(T, "wf-1")
    try:
        assert not uow.completed
        assert uow.events == []
        assert uow.created_instance
        # The instance is locked: another begin on it cannot proceed.
        with pytest.raises(StorageError, match="lock timeout") as info:
            impatient_store.begin(T, "wf-1")
        assert not isinstance(info.value, DatabaseUnavailable)  # the server is fine
        # Another instance is not.
        with impatient_store.begin(T, "wf-2") as other:
            assert other.events == []
    finally:
        uow.rollback()
    with impatient_store.begin(T, "wf-1") as again:
        assert again.events == []


def test_append_events_and_commit_persists(store: PostgresStore, db: sa.Engine) -> None:
    with store.begin(T, "wf-1") as uow:
        assert uow.append_events([{"type": "Pinged"}]) == 1
        assert uow.commit() == 1

    assert q(db, "SELECT count(*) FROM ironflow.events") == 1
    r = row(
        db,
        "SELECT e.payload, e.sequence, i.event_count, i.last_event_at IS NOT NULL AS touched,"
        " i.completed_at FROM ironflow.events e JOIN ironflow.workflow_instances i"
        " USING (workflow_type, workflow_id)",
    )
    assert r.payload == {"type": "Pinged"}
    assert r.sequence == 1
    assert r.event_count == 1
    assert r.touched
    assert r.completed_at is None


def test_begin_returns_previously_committed_events(store: PostgresStore) -> None:
    commit_events(store, "wf-1", {"type": "A"})
    commit_events(store, "wf-1", {"type": "B", "value": 42})

    with store.begin(T, "wf-1") as uow:
        assert not uow.created_instance
        assert uow.events == [{"type": "A"}, {"type": "B", "value": 42}]


def test_uncommitted_changes_are_rolled_back(store: PostgresStore, db: sa.Engine) -> None:
    with store.begin(T, "wf-1") as uow:
        uow.append_events([{"type": "A"}])
        uow.enqueue_effects([{"type": "Notify", "message": "m"}])
        uow.schedule_timers([TimerSpec(60, {"type": "Ping", "id": "wf-1"}, "k")])
        uow.record_input_observation("Ping", {"type": "Ping", "id": "wf-1"})
        # leaving the block without commit

    for table in ("events", "outbox", "timers", "input_observations", "workflow_instances"):
        assert q(db, f"SELECT count(*) FROM ironflow.{table}") == 0, table

    # An existing instance is untouched by an abandoned unit of work.
    commit_events(store, "wf-1", {"type": "A"})
    uow = store.begin(T, "wf-1")
    uow.append_events([{"type": "B"}])
    uow.mark_completed()
    uow.rollback()
    r = row(db, "SELECT event_count, completed_at FROM ironflow.workflow_instances")
    assert (r.event_count, r.completed_at) == (1, None)
    assert q(db, "SELECT count(*) FROM ironflow.events") == 1


def test_enqueue_effects_persists_to_outbox(store: PostgresStore, db: sa.Engine) -> None:
    effects = [{"type": "Notify", "message": "one"}, {"type": "Notify", "message": "two"}]
    with store.begin(T, "wf-1") as uow:
        uow.append_events([{"type": "Pinged"}])
        uow.enqueue_effects(effects)
        uow.commit()

    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT workflow_type, workflow_id, payload, attempts, locked_until, locked_by,"
                " last_error, processed_at FROM ironflow.outbox ORDER BY created_at, id"
            )
        ).all()
    assert [r.payload for r in rows] == effects
    for r in rows:
        assert (r.workflow_type, r.workflow_id) == (T, "wf-1")
        assert r.attempts == 0
        assert r.locked_until is r.locked_by is r.last_error is r.processed_at is None


def test_decision_values_are_stored_exactly_and_in_order(store: PostgresStore) -> None:
    """A decision's events and effects reach PostgreSQL as one JSON array each: every kind
    of JSON value comes back as written, in decision order, events numbered on."""
    values: list[Any] = [
        {"type": "Quoted", "text": 'say "hi" \\ back\\slash, comma [x] {y}', "u": "é 🎉"},
        None,
        [1, [2, "three"], {"four": 4.5}],
        "a string",
        -7,
        True,
        {"type": "Big", "n": 2**62, "f": 1e-300},
    ]
    commit_events(store, "wf-1", {"type": "First"})
    with store.begin(T, "wf-1") as uow:
        uow.append_events(values)
        uow.enqueue_effects(values)
        uow.commit()

    events = store.fetch_workflow_events(T, "wf-1")
    assert [e.payload for e in events] == [{"type": "First"}, *values]
    assert [e.sequence for e in events] == list(range(1, len(values) + 2))
    assert store.get_instance(T, "wf-1").event_count == len(values) + 1  # type: ignore[union-attr]
    claimed = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX, limit=20)
    started = [
        store.start("effect", c.id, "w", f"run-{i}", lease_seconds=LEASE)
        for i, c in enumerate(claimed)
    ]
    assert [r.payload for r in started] == values  # type: ignore[union-attr]


def test_a_group_stores_what_its_decisions_store_one_by_one(
    store: PostgresStore, db: sa.Engine
) -> None:
    """A group's statements take their keys, decisions and row tokens as JSON arrays: ids
    and tokens of any text, and every kind of JSON value, come out as the single-instance
    path writes them (events, effects with their trace, counters, completion), and the
    group's start guard and processed marks find their rows by those tokens."""
    values: list[Any] = [
        {"type": "Quoted", "text": 'say "hi" \\ back\\slash, comma [x] {y}', "u": "é 🎉"},
        None,
        [1, [2, "three"], {"four": 4.5}],
        "a string",
        {"type": "Big", "n": 2**62, "f": 1e-300},
    ]
    ids = ['a "quoted" id', "back\\slash,comma{x}", "é 🎉", "NULL"]
    for wid in ids:
        commit_events(store, f"one-{wid}", {"type": "First"})
        commit_events(store, f"group-{wid}", {"type": "First"})
    for i, wid in enumerate(ids):
        with store.begin(T, f"one-{wid}") as uow:
            uow.trace_context = f'trace "{i}"'
            uow.append_events(values)
            uow.enqueue_effects(values)
            if i % 2 == 0:
                uow.mark_completed()
            uow.commit()
    keys = sorted((T, f"group-{wid}") for wid in ids)
    with store.transaction() as conn:
        loaded = store.lock_and_load_many(conn, keys)
        assert loaded == [(True, False, [{"type": "First"}])] * len(ids)
        store.write_decisions(
            conn,
            [
                DecisionWrite(T, f"group-{wid}", 2, values, values, f'trace "{i}"', i % 2 == 0)
                for i, wid in enumerate(ids)
            ],
        )
    with store.transaction() as conn:
        assert [c for _, c, _ in store.lock_and_load_many(conn, keys)] == [
            key[1] in {f"group-{w}" for w in ids[::2]} for key in keys
        ]

    def stored(wid: str) -> tuple[Any, ...]:
        with db.connect() as conn:
            key = {"wt": T, "wid": wid}
            events = conn.execute(
                sa.text(
                    "SELECT sequence, payload FROM ironflow.events"
                    " WHERE workflow_type = :wt AND workflow_id = :wid ORDER BY global_sequence"
                ),
                key,
            ).all()
            effects = conn.execute(
                sa.text(
                    "SELECT payload, celery_trace_context FROM ironflow.outbox"
                    " WHERE workflow_type = :wt AND workflow_id = :wid ORDER BY id"
                ),
                key,
            ).all()
            instance = conn.execute(
                sa.text(
                    "SELECT event_count, last_event_at IS NOT NULL, completed_at IS NOT NULL"
                    " FROM ironflow.workflow_instances"
                    " WHERE workflow_type = :wt AND workflow_id = :wid"
                ),
                key,
            ).one()
        return [tuple(e) for e in events], [tuple(e) for e in effects], tuple(instance)

    for i, wid in enumerate(ids):
        assert stored(f"group-{wid}") == stored(f"one-{wid}")
        events, effects, instance = stored(f"group-{wid}")
        assert events == [(1, {"type": "First"}), *((n + 2, v) for n, v in enumerate(values))]
        assert effects == [(v, f'trace "{i}"') for v in values]
        assert instance == (len(values) + 1, True, i % 2 == 0)

    token = 'relay "a" \\b,{c}'
    claimed = store.claim("effect", token, [T], lease_seconds=LEASE, max_attempts=MAX, limit=100)
    assert len(claimed) == 2 * len(ids) * len(values)
    runs = [(c.id, c.token, f'run "{n}",{{}}\\') for n, c in enumerate(claimed)]
    started = store.start_effects(runs, lease_seconds=LEASE)
    assert set(started) == {c.id for c in claimed}
    assert [started[i].token for i, _, _ in runs] == [r for _, _, r in runs]
    assert not store.start_effects(runs, lease_seconds=LEASE)  # claim tokens gone
    marks = [(i, r) for i, _, r in runs]
    assert store.mark_many_processed(marks[:3]) == {i for i, _ in marks[:3]}
    with store.transaction() as conn:
        assert store.mark_many_processed_in(conn, marks) == {i for i, _ in marks[3:]}


def test_sequence_increments_per_stream(store: PostgresStore, db: sa.Engine) -> None:
    with store.begin(T, "wf-1") as uow:
        uow.append_events([{"type": "A"}, {"type": "B"}])
        assert uow.next_sequence == 3
        uow.commit()
    commit_events(store, "wf-1", {"type": "C"})
    commit_events(store, "wf-2", {"type": "X"})

    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT workflow_id, sequence, payload->>'type' FROM ironflow.events"
                " ORDER BY workflow_id, sequence"
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("wf-1", 1, "A"),
        ("wf-1", 2, "B"),
        ("wf-1", 3, "C"),
        ("wf-2", 1, "X"),
    ]
    assert (
        q(db, "SELECT event_count FROM ironflow.workflow_instances WHERE workflow_id='wf-1'") == 3
    )


def test_global_sequence_is_monotonic_across_streams(store: PostgresStore) -> None:
    commit_events(store, "a", {"type": "One"})
    commit_events(store, "b", {"type": "Two"})
    commit_events(store, "a", {"type": "Three"})

    events = store.fetch_events_since(0)
    assert [(e.workflow_id, e.payload["type"]) for e in events] == [
        ("a", "One"),
        ("b", "Two"),
        ("a", "Three"),
    ]
    seqs = [e.global_sequence for e in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 3


def test_different_workflow_types_are_isolated(store: PostgresStore, db: sa.Engine) -> None:
    commit_events(store, "same-id", {"type": "A"}, wt=T)
    commit_events(store, "same-id", {"type": "B"}, wt=OTHER)
    commit_events(store, "same-id", {"type": "C"}, wt=OTHER)

    with store.begin(T, "same-id") as uow:
        assert uow.events == [{"type": "A"}]
    with store.begin(OTHER, "same-id") as uow:
        assert uow.events == [{"type": "B"}, {"type": "C"}]
    assert [e.sequence for e in store.fetch_workflow_events(OTHER, "same-id")] == [1, 2]
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 2


# -- 9-14: timers and observations ---------------------------------------------------------


def test_schedule_timers_persists_to_timers_table(store: PostgresStore, db: sa.Engine) -> None:
    before = datetime.now(UTC)
    add_timers(store, "wf-1", TimerSpec(3600, {"type": "Timeout", "id": "wf-1"}))

    r = row(db, "SELECT * FROM ironflow.timers")
    assert (r.workflow_type, r.workflow_id) == (T, "wf-1")
    assert r.input == {"type": "Timeout", "id": "wf-1"}
    assert r.key is None
    assert r.fire_at >= before + timedelta(seconds=3599)
    assert r.fire_at <= datetime.now(UTC) + timedelta(seconds=3601)
    assert r.attempts == 0
    assert r.processed_at is r.locked_by is r.locked_until is r.last_error is None
    assert r.id.version == 7


def test_schedule_timer_with_key_replaces_existing(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(60, {"type": "Timeout", "n": 1}, "timeout"))
    first_id = q(db, "SELECT id FROM ironflow.timers")
    add_timers(store, "wf-1", TimerSpec(120, {"type": "Timeout", "n": 2}, "timeout"))

    r = row(db, "SELECT id, input, processed_at FROM ironflow.timers")  # exactly one row
    assert r.id == first_id
    assert r.input == {"type": "Timeout", "n": 2}
    assert r.processed_at is None


def test_schedule_timer_with_key_resets_retry_state(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(0, {"type": "Timeout", "n": 1}, "hb"))
    (claimed,) = store.claim("timer", "w1", [T], lease_seconds=LEASE, max_attempts=MAX)
    assert store.record_failed_attempt("timer", claimed.id, "w1", "boom", backoff_seconds=0) == 1
    expire_lease(db, "timers", claimed.id)
    (again,) = store.claim("timer", "w2", [T], lease_seconds=LEASE, max_attempts=MAX)
    r = row(db, "SELECT attempts, last_error, locked_by, locked_until FROM ironflow.timers")
    assert (r.attempts, r.last_error, r.locked_by) == (1, "boom", "w2")
    assert r.locked_until is not None

    add_timers(store, "wf-1", TimerSpec(600, {"type": "Timeout", "n": 2}, "hb"))

    r = row(db, "SELECT * FROM ironflow.timers")
    assert r.id == claimed.id == again.id
    assert r.input == {"type": "Timeout", "n": 2}
    assert r.attempts == 0
    assert r.last_error is r.locked_until is r.locked_by is r.dead_lettered_at is None
    assert r.processed_at is None


def test_mark_timer_processed_skips_rescheduled_timer(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(0, {"type": "Heartbeat"}, "hb"))
    (claimed,) = store.claim("timer", "worker", [T], lease_seconds=LEASE, max_attempts=MAX)

    # The fired timer's decision re-arms the same key (heartbeat pattern).
    add_timers(store, "wf-1", TimerSpec(3600, {"type": "Heartbeat"}, "hb"))
    assert store.record_processed("timer", claimed.id, "worker") is False

    r = row(
        db,
        "SELECT id, processed_at, attempts, locked_by,"
        " fire_at > now() + interval '3500 seconds' AS future FROM ironflow.timers",
    )
    assert r.id == claimed.id
    assert r.processed_at is None
    assert r.future
    assert r.attempts == 0
    assert r.locked_by is None


def test_cancel_timers_by_key(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(
        store,
        "wf-1",
        TimerSpec(60, {"type": "Timeout"}, "timeout"),
        TimerSpec(60, {"type": "Reminder"}, "reminder"),
        TimerSpec(60, {"type": "Unkeyed"}),
    )
    add_timers(store, "wf-2", TimerSpec(60, {"type": "Timeout"}, "timeout"))

    with store.begin(T, "wf-1") as uow:
        uow.append_events([{"type": "Completed"}])
        uow.cancel_timers(["timeout", "reminder", "not-there"])
        uow.commit()

    pending = "SELECT count(*) FROM ironflow.timers WHERE processed_at IS NULL"
    assert q(db, pending + " AND workflow_id = 'wf-1' AND key IS NOT NULL") == 0
    assert q(db, pending + " AND workflow_id = 'wf-1' AND key IS NULL") == 1  # un-keyed stays
    assert q(db, pending + " AND workflow_id = 'wf-2'") == 1  # other instance untouched
    cancelled = row(
        db,
        "SELECT count(*) AS n, bool_and(locked_by IS NULL AND locked_until IS NULL) AS free"
        " FROM ironflow.timers WHERE processed_at IS NOT NULL",
    )
    assert (cancelled.n, cancelled.free) == (2, True)


def test_record_input_observation_persists(store: PostgresStore, db: sa.Engine) -> None:
    payload = {"type": "Ping", "id": "wf-1"}
    with store.begin(T, "wf-1") as uow:
        uow.record_input_observation("Ping", payload)
        uow.append_events([{"type": "Pinged"}])
        uow.commit()

    r = row(db, "SELECT * FROM ironflow.input_observations")
    assert (r.workflow_type, r.workflow_id, r.input_type) == (T, "wf-1", "Ping")
    assert r.payload == payload
    assert r.outcome == "accepted"
    assert r.rejection_payload is None
    assert r.observed_at is not None


# -- 15-16: dead letters (SQL assertions; the API lives in test_dead_letters.py) -----------


def test_effect_permanent_failure_dead_letters_immediately(
    store: PostgresStore, db: sa.Engine
) -> None:
    add_effects(store, "wf-1", {"type": "Process"})
    (claimed,) = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX)

    attempts = store.record_dead_letter("effect", claimed.id, "w", "fatal", max_attempts=MAX)

    assert attempts == MAX
    assert dead_letter_count(db, "outbox") == 1
    r = row(db, "SELECT * FROM ironflow.outbox")
    assert (r.attempts, r.last_error, r.locked_by, r.locked_until) == (MAX, "fatal", None, None)
    assert r.processed_at is None
    assert r.dead_lettered_at is not None
    assert store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []
    # Explicitly dead-lettered: a reader configured with more attempts does not revive it.
    assert store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX + 10) == []


def test_timer_dead_letter_queries_and_retry(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(0, {"type": "Timeout"}))
    timer_id = None
    for attempt in range(1, MAX + 1):
        (claimed,) = store.claim("timer", "w", [T], lease_seconds=LEASE, max_attempts=MAX)
        timer_id = claimed.id
        assert claimed.attempts == attempt - 1
        assert store.record_failed_attempt(
            "timer", claimed.id, "w", f"e{attempt}", backoff_seconds=0
        ) == (attempt)
        expire_lease(db, "timers", claimed.id)

    assert dead_letter_count(db, "timers") == 1
    assert dead_letter_count(db, "timers", wt=T) == 1
    assert dead_letter_count(db, "timers", wt=OTHER) == 0
    assert store.claim("timer", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []

    assert retry_dead_letter(db, "timers", timer_id) is True
    assert q(db, "SELECT attempts FROM ironflow.timers") == 0
    assert dead_letter_count(db, "timers") == 0
    (claimed,) = store.claim("timer", "w", [T], lease_seconds=LEASE, max_attempts=MAX)
    assert claimed.id == timer_id
    assert claimed.attempts == 0


# -- 17-19: the per-instance lock ----------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new-instance", "existing-instance"])
def test_advisory_lock_blocks_concurrent_access_to_same_stream(
    store: PostgresStore, db: sa.Engine, existing: bool
) -> None:
    if existing:
        commit_events(store, "wf-1", {"type": "Zero"})
    before = [{"type": "Zero"}] if existing else []
    proceeded = threading.Event()
    log: list[str] = []

    first = store.begin(T, "wf-1")
    first.append_events([{"type": "First"}])

    def second() -> list[Any]:
        with store.begin(T, "wf-1") as uow:
            proceeded.set()
            log.append("second-begun")
            seen = list(uow.events)
            uow.append_events([{"type": "Second"}])
            uow.commit()
            return seen

    job = Background(second)
    assert job.entered.wait(5)
    wait_for_lock_waiters(db, 1)  # the second begin is blocked on the instance lock
    assert not proceeded.wait(0.2)
    log.append("first-commit")
    first.commit()

    seen = job.join()
    assert seen == [*before, {"type": "First"}]
    assert log == ["first-commit", "second-begun"]
    events = store.fetch_workflow_events(T, "wf-1")
    assert [e.payload["type"] for e in events] == [*(e["type"] for e in before), "First", "Second"]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


def test_different_workflow_instances_can_execute_concurrently(
    store: PostgresStore, db: sa.Engine
) -> None:
    n = 3
    # All three hold their own instance lock at the same time: if instances serialised,
    # the barrier would time out.
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        with store.begin(T, f"wf-{i}") as uow:
            barrier.wait(timeout=30)
            uow.append_events([{"type": "Pinged", "n": i}])
            uow.commit()

    jobs = [Background(lambda i=i: run(i)) for i in range(n)]
    for job in jobs:
        job.join()

    assert q(db, "SELECT count(*) FROM ironflow.events") == n
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances WHERE event_count = 1") == n


def test_begin_returns_completed_for_completed_workflow(
    store: PostgresStore, impatient_store: PostgresStore, db: sa.Engine
) -> None:
    commit_events(store, "wf-1", {"type": "Pinged"})
    with store.begin(T, "wf-1") as uow:
        uow.append_events([{"type": "Stopped"}])
        uow.mark_completed()
        uow.commit()
    r = row(db, "SELECT event_count, completed_at, last_event_at FROM ironflow.workflow_instances")
    assert r.event_count == 2
    assert r.completed_at is not None
    assert r.completed_at == r.last_event_at

    uow = store.begin(T, "wf-1")
    assert uow.completed
    assert uow.events == []
    # Nothing is held: a completed begin released its lock at once.
    assert impatient_store.begin(T, "wf-1").completed
    # Writing through a completed unit of work is refused, inside a caller's transaction too.
    uow.append_events([{"type": "Late"}])
    with pytest.raises(UnitOfWorkFinished, match="test_workflow:wf-1 is finished"):
        uow.commit()
    with store.transaction() as conn:
        inner = store.begin(T, "wf-1", connection=conn)
        assert inner.completed
        inner.append_events([{"type": "Late"}])
        with pytest.raises(UnitOfWorkFinished, match="instance is completed"):
            inner.commit()
    assert q(db, "SELECT count(*) FROM ironflow.events") == 2


# -- 20-27: effects ------------------------------------------------------------------------


def test_claim_effect_returns_pending_effect(store: PostgresStore, db: sa.Engine) -> None:
    add_effects(store, "wf-1", {"type": "Notify", "message": "hello"})

    (claimed,) = store.claim("effect", "worker-1", [T], lease_seconds=LEASE, max_attempts=MAX)

    assert (claimed.workflow_type, claimed.workflow_id) == (T, "wf-1")
    assert claimed.attempts == 0
    assert claimed.token == "worker-1"
    r = row(
        db,
        "SELECT locked_by, locked_until > now() + interval '25 seconds' AS leased"
        " FROM ironflow.outbox",
    )
    assert (r.locked_by, r.leased) == ("worker-1", True)
    started = store.start("effect", claimed.id, "worker-1", "run-1", lease_seconds=LEASE)
    assert started is not None
    assert started.payload == {"type": "Notify", "message": "hello"}
    assert started.attempts == 0
    assert started.created_at == claimed.created_at


def test_the_relay_learns_which_published_rows_no_longer_wait(
    store: PostgresStore, db: sa.Engine
) -> None:
    """Back-pressure's question, over two claims' tokens: of the rows a relay published,
    those started, finished, released or re-claimed by another relay no longer wait under
    its claim; the rest (and nothing else) still do."""
    for i in range(8):
        add_effects(store, f"wf-{i}", {"type": "Notify", "message": str(i)})
    a = store.claim("effect", "relay-a", [T], lease_seconds=LEASE, max_attempts=MAX, limit=4)
    b = store.claim("effect", "relay-b", [T], lease_seconds=LEASE, max_attempts=MAX, limit=4)
    items = [(r.id, "relay-a") for r in a] + [(r.id, "relay-b") for r in b]
    assert store.no_longer_dispatched("effect", items) == set()

    started = store.start_effects([(a[0].id, "relay-a", "run-1")], lease_seconds=LEASE)
    store.start_effects([(b[0].id, "relay-b", "run-2")], lease_seconds=LEASE)
    assert store.mark_many_processed([(b[0].id, "run-2")]) == {b[0].id}
    store.release("effect", [a[1].id], "relay-a")
    expire_lease(db, "outbox", b[1].id)
    c = store.claim("effect", "relay-c", [T], lease_seconds=LEASE, max_attempts=MAX, limit=8)
    assert b[1].id in {r.id for r in c}
    assert set(started) == {a[0].id}

    left = store.no_longer_dispatched("effect", items)
    assert left == {a[0].id, a[1].id, b[0].id, b[1].id}
    assert store.no_longer_dispatched("effect", [(a[2].id, "relay-x")]) == {a[2].id}
    assert store.no_longer_dispatched("effect", []) == set()


def test_claim_effect_returns_none_when_empty(store: PostgresStore) -> None:
    assert store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []
    add_effects(store, "wf-1", {"type": "Notify", "message": "m"})
    assert store.claim("effect", "w", [], lease_seconds=LEASE, max_attempts=MAX) == []
    assert store.claim("effect", "w", [OTHER], lease_seconds=LEASE, max_attempts=MAX) == []


def test_claim_effect_respects_lock_duration(store: PostgresStore, db: sa.Engine) -> None:
    add_effects(store, "wf-1", {"type": "Notify", "message": "m"})
    (claimed,) = store.claim("effect", "worker-a", [T], lease_seconds=LEASE, max_attempts=MAX)

    assert store.claim("effect", "worker-b", [T], lease_seconds=LEASE, max_attempts=MAX) == []

    expire_lease(db, "outbox", claimed.id)  # the lease ran out (worker-a crashed)
    (reclaimed,) = store.claim("effect", "worker-b", [T], lease_seconds=LEASE, max_attempts=MAX)
    assert reclaimed.id == claimed.id
    assert q(db, "SELECT locked_by FROM ironflow.outbox") == "worker-b"


def test_mark_processed_removes_effect_from_queue(store: PostgresStore, db: sa.Engine) -> None:
    add_effects(store, "wf-1", {"type": "Notify", "message": "m"})
    (claimed,) = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX)

    assert store.record_processed("effect", claimed.id, "w") is True

    r = row(db, "SELECT processed_at, locked_by, locked_until FROM ironflow.outbox")
    assert r.processed_at is not None
    assert r.locked_by is r.locked_until is None
    expire_lease(db, "outbox", claimed.id)
    assert store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []


def test_record_failure_increments_attempts_and_schedules_retry(
    store: PostgresStore, db: sa.Engine
) -> None:
    add_effects(store, "wf-1", {"type": "Notify", "message": "m"})
    (claimed,) = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX)

    backoff = 5.0
    t0 = q(db, "SELECT clock_timestamp()")
    assert (
        store.record_failed_attempt("effect", claimed.id, "w", "smtp down", backoff_seconds=backoff)
        == 1
    )
    t1 = q(db, "SELECT clock_timestamp()")

    r = row(
        db,
        "SELECT attempts, last_error, locked_by, locked_until, processed_at FROM ironflow.outbox",
    )
    assert (r.attempts, r.last_error, r.locked_by, r.processed_at) == (1, "smtp down", None, None)
    # The backoff lives in locked_until: the failure's now() + backoff.
    assert t0 + timedelta(seconds=backoff) <= r.locked_until <= t1 + timedelta(seconds=backoff)
    assert store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []

    expire_lease(db, "outbox", claimed.id)  # the backoff elapsed
    (again,) = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX)
    assert (again.id, again.attempts) == (claimed.id, 1)


def test_record_failure_skips_stale_claim(store: PostgresStore, db: sa.Engine) -> None:
    add_effects(store, "wf-1", {"type": "Notify", "message": "m"})
    (stale,) = store.claim("effect", "worker-a", [T], lease_seconds=LEASE, max_attempts=MAX)
    expire_lease(db, "outbox", stale.id)
    (fresh,) = store.claim("effect", "worker-b", [T], lease_seconds=LEASE, max_attempts=MAX)
    assert fresh.id == stale.id

    assert (
        store.record_failed_attempt("effect", stale.id, "worker-a", "late", backoff_seconds=5)
        is None
    )
    assert store.record_processed("effect", stale.id, "worker-a") is False
    assert (
        store.record_dead_letter("effect", stale.id, "worker-a", "late", max_attempts=MAX) is None
    )
    assert store.start("effect", stale.id, "worker-a", "run-a", lease_seconds=LEASE) is None

    r = row(db, "SELECT * FROM ironflow.outbox")
    assert r.attempts == 0
    assert r.locked_by == "worker-b"
    assert r.last_error is r.processed_at is r.dead_lettered_at is None
    # The current holder is unaffected.
    assert store.record_processed("effect", fresh.id, "worker-b") is True


def test_retry_dead_letter_resets_attempts(store: PostgresStore, db: sa.Engine) -> None:
    add_effects(store, "wf-1", {"type": "Process"})
    effect_id = None
    for attempt in range(1, MAX + 1):
        (claimed,) = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX)
        effect_id = claimed.id
        assert (
            store.record_failed_attempt("effect", claimed.id, "w", "boom", backoff_seconds=0)
            == attempt
        )
        expire_lease(db, "outbox", claimed.id)
    assert dead_letter_count(db, "outbox") == 1
    assert store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []

    assert retry_dead_letter(db, "outbox", effect_id) is True

    assert q(db, "SELECT attempts FROM ironflow.outbox") == 0
    assert dead_letter_count(db, "outbox") == 0
    (claimed,) = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX)
    assert (claimed.id, claimed.attempts) == (effect_id, 0)


def test_count_dead_letters_returns_correct_count(store: PostgresStore, db: sa.Engine) -> None:
    add_effects(store, "wf-1", *({"type": "Notify", "message": str(i)} for i in range(3)))
    add_effects(store, "wf-2", {"type": "Notify", "message": "healthy"})
    claimed = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX, limit=3)
    assert [c.workflow_id for c in claimed] == ["wf-1"] * 3
    for c in claimed:
        assert store.record_dead_letter("effect", c.id, "w", "fatal", max_attempts=MAX) == MAX

    assert dead_letter_count(db, "outbox") == 3
    assert dead_letter_count(db, "outbox", wt=T) == 3
    assert dead_letter_count(db, "outbox", wt=OTHER) == 0
    assert q(db, "SELECT count(*) FROM ironflow.outbox WHERE processed_at IS NULL") == 4


# -- 28-32: timers -------------------------------------------------------------------------


def test_claim_timer_returns_due_timer(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(0, {"type": "Timeout", "id": "wf-1"}, "timeout"))

    (claimed,) = store.claim("timer", "worker", [T], lease_seconds=LEASE, max_attempts=MAX)

    assert (claimed.workflow_type, claimed.workflow_id, claimed.attempts) == (T, "wf-1", 0)
    assert claimed.fire_at is not None
    assert q(db, "SELECT locked_by FROM ironflow.timers") == "worker"
    started = store.start("timer", claimed.id, "worker", "run-1", lease_seconds=LEASE)
    assert started is not None
    assert started.payload == {"type": "Timeout", "id": "wf-1"}
    assert started.key == "timeout"
    assert store.claim("timer", "other", [T], lease_seconds=LEASE, max_attempts=MAX) == []


def test_claim_timer_returns_none_for_future_timer(store: PostgresStore) -> None:
    add_timers(store, "wf-1", TimerSpec(3600, {"type": "Timeout"}))
    assert store.claim("timer", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []


def test_mark_timer_processed_removes_from_queue(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(0, {"type": "Timeout"}))
    (claimed,) = store.claim("timer", "w", [T], lease_seconds=LEASE, max_attempts=MAX)

    assert store.record_processed("timer", claimed.id, "w") is True

    r = row(db, "SELECT processed_at, locked_by, locked_until FROM ironflow.timers")
    assert r.processed_at is not None
    assert r.locked_by is r.locked_until is None
    assert store.claim("timer", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []


def test_record_timer_failure_increments_attempts(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(0, {"type": "Timeout"}))
    (claimed,) = store.claim("timer", "w", [T], lease_seconds=LEASE, max_attempts=MAX)

    assert (
        store.record_failed_attempt("timer", claimed.id, "w", "replay failed", backoff_seconds=60)
        == 1
    )

    r = row(
        db,
        "SELECT attempts, last_error, locked_by, processed_at,"
        " locked_until > now() + interval '50 seconds' AS backing_off FROM ironflow.timers",
    )
    assert (r.attempts, r.last_error, r.locked_by, r.processed_at) == (
        1,
        "replay failed",
        None,
        None,
    )
    assert r.backing_off
    assert store.claim("timer", "w", [T], lease_seconds=LEASE, max_attempts=MAX) == []


def test_record_timer_failure_skips_stale_claim(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(0, {"type": "Timeout"}))
    (stale,) = store.claim("timer", "worker-a", [T], lease_seconds=LEASE, max_attempts=MAX)
    expire_lease(db, "timers", stale.id)
    (fresh,) = store.claim("timer", "worker-b", [T], lease_seconds=LEASE, max_attempts=MAX)
    assert fresh.id == stale.id

    assert (
        store.record_failed_attempt("timer", stale.id, "worker-a", "late", backoff_seconds=5)
        is None
    )
    assert store.record_processed("timer", stale.id, "worker-a") is False
    assert store.record_dead_letter("timer", stale.id, "worker-a", "late", max_attempts=MAX) is None
    assert store.start("timer", stale.id, "worker-a", "run-a", lease_seconds=LEASE) is None

    r = row(db, "SELECT * FROM ironflow.timers")
    assert r.attempts == 0
    assert r.locked_by == "worker-b"
    assert r.last_error is r.processed_at is r.dead_lettered_at is None
    assert store.record_processed("timer", fresh.id, "worker-b") is True


# -- 33-36: projections --------------------------------------------------------------------


def test_fetch_events_since_returns_events_after_sequence(store: PostgresStore) -> None:
    commit_events(store, "a", {"type": "One"})
    commit_events(store, "b", {"type": "Two"}, {"type": "Three"})

    everything = store.fetch_events_since(0)
    assert [e.payload["type"] for e in everything] == ["One", "Two", "Three"]
    after_first = store.fetch_events_since(everything[0].global_sequence)
    assert [e.payload["type"] for e in after_first] == ["Two", "Three"]
    seqs = [e.global_sequence for e in after_first]
    assert seqs == sorted(seqs) and all(s > everything[0].global_sequence for s in seqs)
    first = everything[0]
    assert (first.workflow_type, first.workflow_id, first.sequence) == (T, "a", 1)
    assert first.created_at is not None
    assert store.fetch_events_since(everything[-1].global_sequence) == []


def test_fetch_events_since_respects_limit(store: PostgresStore) -> None:
    commit_events(store, "a", {"type": "One"}, {"type": "Two"}, {"type": "Three"})

    events = store.fetch_events_since(0, limit=2)

    assert [e.payload["type"] for e in events] == ["One", "Two"]


def test_load_projection_position_returns_zero_for_new(store: PostgresStore, db: sa.Engine) -> None:
    assert store.load_projection_position("fresh") == 0
    assert q(db, "SELECT count(*) FROM ironflow.projection_positions") == 1  # row created


def test_store_and_load_projection_position(store: PostgresStore) -> None:
    assert store.load_projection_position("p") == 0
    store.store_projection_position("p", 42)
    assert store.load_projection_position("p") == 42
    store.store_projection_position("p", 100)
    assert store.load_projection_position("p") == 100
    assert store.load_projection_position("other") == 0
    # ironflow_celery: positions never move backwards (ironflow's plain UPDATE can).
    store.store_projection_position("p", 50)
    assert store.load_projection_position("p") == 100


# -- 37: corrupt events --------------------------------------------------------------------


def test_event_deserialization_failure_includes_context(
    store: PostgresStore, db: sa.Engine
) -> None:
    service = WorkflowService(store, Registry([(TestWorkflow, test_handler)]))
    service.execute(Ping(id="wf-1"))
    execute(
        db,
        "INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)"
        " VALUES (:t, 'wf-1', 2, '{\"type\": \"NoSuchEvent\"}')",
        t=T,
    )

    with pytest.raises(EventDeserializationError) as info:
        service.execute(Ping(id="wf-1"))

    err = info.value
    assert (err.workflow_type, err.workflow_id, err.sequence) == (T, "wf-1", 2)
    assert "test_workflow:wf-1" in str(err)
    assert "sequence 2" in str(err)
    assert "NoSuchEvent" in str(err)
    assert q(db, "SELECT count(*) FROM ironflow.events") == 2


# -- 38-42: unique keys --------------------------------------------------------------------


def test_unique_key_conflict_rejects_second_active_workflow(
    store: PostgresStore, db: sa.Engine
) -> None:
    commit_events(store, "order-1", {"type": "Started"}, unique_key="customer-7")

    with pytest.raises(UniqueKeyConflict) as info:
        store.begin(T, "order-2", "customer-7")

    assert (info.value.workflow_type, info.value.unique_key) == (T, "customer-7")
    assert str(info.value) == (
        "unique key conflict: workflow type 'test_workflow' already has an active instance"
        " with key 'customer-7'"
    )
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 1
    # The failed begin released its connection and nothing stays locked.
    commit_events(store, "order-1", {"type": "More"}, unique_key="customer-7")


def test_unique_key_different_workflow_types_are_isolated(
    store: PostgresStore, db: sa.Engine
) -> None:
    commit_events(store, "a", {"type": "Started"}, wt=T, unique_key="k")
    commit_events(store, "b", {"type": "Started"}, wt=OTHER, unique_key="k")
    commit_events(store, "c", {"type": "Started"}, wt=T)  # no key: never conflicts
    commit_events(store, "d", {"type": "Started"}, wt=T)

    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances WHERE unique_key = 'k'") == 2


def test_unique_key_released_after_workflow_completes(store: PostgresStore, db: sa.Engine) -> None:
    commit_events(store, "first", {"type": "Started"}, unique_key="k")
    with pytest.raises(UniqueKeyConflict):
        store.begin(T, "second", "k")
    with store.begin(T, "first", "k") as uow:
        uow.append_events([{"type": "Stopped"}])
        uow.mark_completed()
        uow.commit()

    commit_events(store, "second", {"type": "Started"}, unique_key="k")

    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances WHERE unique_key = 'k'") == 2
    with pytest.raises(UniqueKeyConflict):
        store.begin(T, "third", "k")


def test_unique_key_idempotent_reexecution_succeeds(store: PostgresStore, db: sa.Engine) -> None:
    commit_events(store, "a", {"type": "Started"}, unique_key="k")

    with store.begin(T, "a", "k") as uow:
        assert not uow.completed and not uow.created_instance
        assert uow.events == [{"type": "Started"}]
        uow.append_events([{"type": "Again"}])
        uow.commit()
    # The key is written on insert only: a later input with another key changes nothing.
    commit_events(store, "a", {"type": "Third"}, unique_key="other")
    assert q(db, "SELECT unique_key FROM ironflow.workflow_instances") == "k"
    assert len(store.fetch_workflow_events(T, "a")) == 3


def test_unique_key_concurrent_conflict_one_wins_one_loses(
    store: PostgresStore, db: sa.Engine
) -> None:
    holder = store.begin(T, "first", "k")
    holder.append_events([{"type": "Started"}])

    job = Background(lambda: store.begin(T, "second", "k"))
    wait_for_lock_waiters(db, 1)  # blocked on the uncommitted key of "first"
    assert not job.done.is_set()
    holder.commit()

    with pytest.raises(UniqueKeyConflict) as info:
        job.join()
    assert info.value.unique_key == "k"
    rows = q(db, "SELECT string_agg(workflow_id, ',') FROM ironflow.workflow_instances")
    assert rows == "first"


def test_unique_key_waiting_instance_wins_when_holder_rolls_back(
    store: PostgresStore, db: sa.Engine
) -> None:
    holder = store.begin(T, "first", "k")
    holder.append_events([{"type": "Started"}])

    def second() -> None:
        commit_events(store, "second", {"type": "Started"}, unique_key="k")

    job = Background(second)
    wait_for_lock_waiters(db, 1)
    holder.rollback()
    job.join()

    assert q(db, "SELECT string_agg(workflow_id, ',') FROM ironflow.workflow_instances") == (
        "second"
    )


@pytest.mark.parametrize("same_instance", [False, True], ids=["two-instances", "same-instance"])
def test_unique_key_race_started_together(
    store: PostgresStore, db: sa.Engine, same_instance: bool
) -> None:
    """Two threads start new instances with the same key at the same moment, many times.

    Same instance: both succeed, one after the other (this used to deadlock now and then
    inside PostgreSQL's speculative insert, hence the repetitions). Two instances: exactly
    one wins, the other gets UniqueKeyConflict.
    """
    rounds = 100
    for n in range(rounds):
        barrier = threading.Barrier(2)
        key = f"k-{n}"

        def run(wid: str, barrier: threading.Barrier = barrier, key: str = key) -> str:
            barrier.wait(timeout=30)
            with store.begin(T, wid, key) as uow:
                uow.append_events([{"type": "Started", "by": wid}])
                uow.commit()
            return wid

        ids = [f"same-{n}"] * 2 if same_instance else [f"a-{n}", f"b-{n}"]
        jobs = [Background(lambda wid=wid: run(wid)) for wid in ids]
        outcomes: list[Any] = []
        for job in jobs:
            try:
                outcomes.append(job.join())
            except UniqueKeyConflict as exc:
                outcomes.append(exc)

        if same_instance:
            assert outcomes == ids
            events = store.fetch_workflow_events(T, ids[0])
            assert [e.sequence for e in events] == [1, 2]
        else:
            conflicts = [o for o in outcomes if isinstance(o, UniqueKeyConflict)]
            winners = [o for o in outcomes if isinstance(o, str)]
            assert len(conflicts) == 1 and len(winners) == 1, outcomes
            assert conflicts[0].unique_key == key
            holders = q(
                db,
                "SELECT workflow_id FROM ironflow.workflow_instances WHERE unique_key = :k",
                k=key,
            )
            assert holders == winners[0]

    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == rounds
    assert q(db, "SELECT count(*) FROM ironflow.events") == rounds * (2 if same_instance else 1)


def test_new_instance_creator_queued_behind_one_that_rolls_back_creates_it(
    store: PostgresStore, db: sa.Engine
) -> None:
    """The second creator of one new instance queues on the creators' advisory lock; when
    the first rolls back, the second creates the instance itself."""
    first = store.begin(T, "wf-1", "k")
    assert first.created_instance
    first.append_events([{"type": "First"}])

    def second() -> tuple[bool, list[Any]]:
        with store.begin(T, "wf-1", "k") as uow:
            created, seen = uow.created_instance, list(uow.events)
            uow.append_events([{"type": "Second"}])
            uow.commit()
            return created, seen

    job = Background(second)
    wait_for_lock_waiters(db, 1)
    first.rollback()

    assert job.join(60) == (True, [])
    assert [e.payload for e in store.fetch_workflow_events(T, "wf-1")] == [{"type": "Second"}]
    assert q(db, "SELECT unique_key FROM ironflow.workflow_instances") == "k"


def test_new_instance_created_meanwhile_by_ironflow_is_loaded(
    store: PostgresStore, db: sa.Engine
) -> None:
    """ironflow creates instances without our advisory lock: a begin whose insert clashes
    with its uncommitted row waits for it, then locks and loads what it committed."""
    with db.connect() as other:
        other.execute(
            sa.text(
                "INSERT INTO ironflow.workflow_instances"
                " (workflow_type, workflow_id, event_count, last_event_at)"
                " VALUES (:wt, 'wf-1', 1, now())"
            ),
            {"wt": T},
        )
        other.execute(
            sa.text(
                "INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)"
                " VALUES (:wt, 'wf-1', 1, '{\"type\": \"ByIronflow\"}')"
            ),
            {"wt": T},
        )

        def begin() -> tuple[bool, list[Any]]:
            with store.begin(T, "wf-1") as uow:
                created, seen = uow.created_instance, list(uow.events)
                uow.append_events([{"type": "Ours"}])
                uow.commit()
                return created, seen

        job = Background(begin)
        wait_for_lock_waiters(db, 1)  # the insert waits on ironflow's uncommitted row
        other.commit()

        assert job.join(60) == (False, [{"type": "ByIronflow"}])
    events = store.fetch_workflow_events(T, "wf-1")
    assert [(e.sequence, e.payload["type"]) for e in events] == [(1, "ByIronflow"), (2, "Ours")]


# -- beyond the checklist: more of the latest semantics ------------------------------------


def test_timer_keys_are_scoped_to_the_instance(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(60, {"type": "Timeout"}, "timeout"))
    add_timers(store, "wf-2", TimerSpec(60, {"type": "Timeout"}, "timeout"))
    assert q(db, "SELECT count(*) FROM ironflow.timers WHERE processed_at IS NULL") == 2


def test_unkeyed_timers_coexist(store: PostgresStore, db: sa.Engine) -> None:
    add_timers(store, "wf-1", TimerSpec(60, {"type": "A"}), TimerSpec(60, {"type": "A"}))
    add_timers(store, "wf-1", TimerSpec(60, {"type": "A"}))
    assert q(db, "SELECT count(*) FROM ironflow.timers WHERE processed_at IS NULL") == 3


def test_cancel_then_schedule_same_key_in_one_decision_creates_new_row(
    store: PostgresStore, db: sa.Engine
) -> None:
    add_timers(store, "wf-1", TimerSpec(60, {"type": "Old"}, "k"))
    old_id = q(db, "SELECT id FROM ironflow.timers")
    with store.begin(T, "wf-1") as uow:
        uow.append_events([{"type": "Reset"}])
        uow.cancel_timers(["k"])
        uow.schedule_timers([TimerSpec(60, {"type": "New"}, "k")])
        uow.commit()

    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, input, processed_at FROM ironflow.timers ORDER BY created_at")
        ).all()
    assert len(rows) == 2
    cancelled = next(r for r in rows if r.id == old_id)
    fresh = next(r for r in rows if r.id != old_id)
    assert cancelled.processed_at is not None
    assert (fresh.input, fresh.processed_at) == ({"type": "New"}, None)


def test_claims_follow_creation_order_and_registered_types(store: PostgresStore) -> None:
    add_effects(store, "wf-1", {"type": "E", "n": 1}, {"type": "E", "n": 2})
    add_effects(store, "wf-x", {"type": "E", "n": 0}, wt=OTHER)
    add_effects(store, "wf-2", {"type": "E", "n": 3})

    claimed = store.claim("effect", "w", [T], lease_seconds=LEASE, max_attempts=MAX, limit=10)

    assert [c.workflow_id for c in claimed] == ["wf-1", "wf-1", "wf-2"]
    payloads = [
        store.start("effect", c.id, "w", f"run-{i}", lease_seconds=LEASE).payload["n"]  # type: ignore[union-attr]
        for i, c in enumerate(claimed)
    ]
    assert payloads == [1, 2, 3]
    # The unregistered type's row was never touched.
    (other,) = store.claim("effect", "w", [OTHER], lease_seconds=LEASE, max_attempts=MAX)
    assert other.attempts == 0 and other.workflow_id == "wf-x"


def test_unit_of_work_inside_a_caller_transaction(store: PostgresStore, db: sa.Engine) -> None:
    # Rolled back by the caller: nothing stays, not even the new instance.
    with store.transaction() as conn:
        uow = store.begin(T, "wf-1", connection=conn)
        uow.append_events([{"type": "A"}])
        uow.rollback()
    assert q(db, "SELECT count(*) FROM ironflow.workflow_instances") == 0

    # Committed by the caller together with its own write.
    with store.transaction() as conn:
        uow = store.begin(T, "wf-1", connection=conn)
        uow.append_events([{"type": "A"}])
        uow.commit()
        assert q(db, "SELECT count(*) FROM ironflow.events") == 0  # not visible yet
        store.store_projection_position("alongside", 7, connection=conn)
    assert q(db, "SELECT count(*) FROM ironflow.events") == 1
    assert store.load_projection_position("alongside") == 7
