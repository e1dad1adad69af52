"""Dead letters as functions, runtime methods and Celery tasks, on a real database."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import psycopg
import pytest
from celery import Celery
from ops_helpers import MAX_ATTEMPTS, insert_row, row

from ironflow_celery import IronflowError, RetryPolicy, RuntimeConfig, WorkflowRuntime
from ironflow_celery import dead_letters as dl
from ironflow_celery.dead_letters import DeadLetterQuery, InvalidDeadLetterRequest

M = {"max_attempts": MAX_ATTEMPTS}


def test_empty_database_has_no_dead_letters(store):
    assert dl.fetch_dead_letters(store, kind="effect", **M) == []
    assert dl.count_dead_letters(store, kind="timer", **M) == 0
    assert dl.next_cursor([], None) is None


def test_fetch_finds_explicit_and_implicit_dead_letters_newest_first(store, db):
    explicit = insert_row(db, attempts=1, dead=True, age_seconds=30)
    implicit = insert_row(db, attempts=MAX_ATTEMPTS, dead=False, age_seconds=20)
    insert_row(db, attempts=1, dead=False)  # healthy
    insert_row(db, dead=True, processed_seconds_ago=1)  # processed
    letters = dl.fetch_dead_letters(store, **M)
    assert [d.id for d in letters] == [implicit, explicit]
    assert letters[0].workflow_type == "orders" and letters[0].payload["type"] == "Charge"
    assert letters[1].dead_lettered_at is not None and letters[0].dead_lettered_at is None
    assert dl.count_dead_letters(store, **M) == 2
    # a raised max_attempts un-dead-letters implicit rows only (ironflow's safe operation)
    assert [d.id for d in dl.fetch_dead_letters(store, max_attempts=10)] == [explicit]
    json.dumps([d.to_json() for d in letters])  # JSON-serialisable


def test_filters(store, db):
    a = insert_row(db, workflow_type="orders", workflow_id="o-1", error="Timeout: gateway")
    b = insert_row(
        db, workflow_type="orders", workflow_id="o-2", error="KeyError: sku", age_seconds=3 * 86400
    )
    c = insert_row(
        db, workflow_type="billing", workflow_id="o-1", error="TIMEOUT again", age_seconds=3600
    )

    def ids(query):
        return {d.id for d in dl.fetch_dead_letters(store, query, **M)}

    q = DeadLetterQuery.new()
    assert ids(q.workflow_type("orders")) == {a, b}
    assert ids(q.workflow_id("o-1")) == {a, c}
    assert ids(q.workflow_type("orders").workflow_id("o-1")) == {a}
    assert ids(q.error_contains("timeout")) == {a, c}
    assert ids(q.older_than("2d")) == {b}
    assert ids(q.older_than(timedelta(minutes=30))) == {b, c}
    assert ids(q.newer_than("10m")) == {a}
    assert ids(q.workflow_type("nope")) == set()
    assert dl.count_dead_letters(store, q.error_contains("TIMEOUT").limit(1), **M) == 2
    assert ids(DeadLetterQuery.of(workflow_type="billing", older_than=60)) == {c}


def test_keyset_pagination_across_pages_with_equal_timestamps(store, db):
    with db.connect() as conn:
        stamp = conn.exec_driver_sql("SELECT now() - interval '1 minute'").scalar()
    same = {insert_row(db, created_at=stamp) for _ in range(5)}
    others = {insert_row(db, age_seconds=i) for i in (1, 2, 300)}
    query = DeadLetterQuery.new().limit(3)
    seen, pages, cursor = [], 0, None
    while True:
        page_query = query if cursor is None else query.after(cursor)
        page = dl.fetch_dead_letters(store, page_query, **M)
        pages += 1
        seen.extend(d.id for d in page)
        cursor = dl.next_cursor(page, page_query)
        if cursor is None:
            break
        assert len(page) == 3
    assert pages == 3 and len(seen) == len(set(seen)) == 8
    assert set(seen) == same | others
    # the same pages through a (created_at, id) tuple and through a DeadLetter
    first = dl.fetch_dead_letters(store, query, **M)
    by_tuple = dl.fetch_dead_letters(store, query.after((first[-1].created_at, first[-1].id)), **M)
    by_letter = dl.fetch_dead_letters(store, query.after(first[-1]), **M)
    assert [d.id for d in by_tuple] == [d.id for d in by_letter] == seen[3:6]


def test_bad_input_is_a_clear_usage_error(store, db):
    for call in (
        lambda: dl.get_dead_letter(store, "not-a-uuid", **M),
        lambda: dl.retry_dead_letter(store, "1234", **M),
        lambda: dl.discard_dead_letter(store, "xyz", "why", **M),
        lambda: dl.fetch_dead_letters(store, DeadLetterQuery.of(after="garbage!"), **M),
        lambda: dl.fetch_dead_letters(store, DeadLetterQuery.of(older_than="soon"), **M),
        lambda: dl.fetch_dead_letters(store, kind="effects-and-more", **M),
        lambda: DeadLetterQuery.new().limit(0),
    ):
        with pytest.raises(InvalidDeadLetterRequest) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, IronflowError)
    with pytest.raises(InvalidDeadLetterRequest, match="not a valid row id"):
        dl.retry_dead_letter(store, "not-a-uuid", **M)
    assert dl.fetch_dead_letters(store, kind="timers", **M) == []  # plural is tolerated


def test_get_dead_letter(store, db):
    dead = insert_row(db)
    healthy = insert_row(db, attempts=0, dead=False)
    letter = dl.get_dead_letter(store, str(dead), **M)
    assert letter is not None and letter.id == dead and letter.attempts == MAX_ATTEMPTS
    assert dl.get_dead_letter(store, healthy, **M) is None
    assert dl.get_dead_letter(store, uuid.uuid4(), **M) is None
    assert dl.explain_row(store, healthy, **M).reason == "not_dead_letter"
    assert dl.explain_row(store, dead, **M).reason == "dead_letter"


def test_retry_resets_a_dead_letter(store, db):
    dead = insert_row(db, error="boom")
    result = dl.try_retry_dead_letter(store, dead, **M)
    assert result.ok and result.reason == "retried" and str(result.workflow) == "orders:o-1"
    r = row(db, dead)
    assert (r.attempts, r.last_error, r.dead_lettered_at, r.locked_by, r.locked_until) == (
        0,
        None,
        None,
        None,
        None,
    )
    assert r.processed_at is None
    # now a healthy pending row: a second retry is refused
    again = dl.try_retry_dead_letter(store, dead, **M)
    assert not again and again.reason == "not_dead_letter"


def test_retry_refusals_say_why_and_change_nothing(store, db):
    in_flight = insert_row(db, locked_by="relay-1#4>w", lease_seconds=60)
    processed = insert_row(db, processed_seconds_ago=5)
    healthy = insert_row(db, attempts=1, dead=False)
    before = row(db, in_flight)
    cases = {
        uuid.uuid4(): "not_found",
        in_flight: "in_flight",
        processed: "already_processed",
        healthy: "not_dead_letter",
    }
    for row_id, reason in cases.items():
        result = dl.try_retry_dead_letter(store, row_id, **M)
        assert not result.ok and result.reason == reason, result
        assert str(row_id) in result.message
        assert dl.retry_dead_letter(store, row_id, **M) is False
    assert "leased by relay-1#4>w" in dl.try_retry_dead_letter(store, in_flight, **M).message
    assert row(db, in_flight) == before  # the live lease is untouched (ironflow clobbers it)
    # an expired lease is not in flight any more: the row can be retried
    expired = insert_row(db, locked_by="relay-1#5", lease_seconds=-1)
    assert dl.retry_dead_letter(store, expired, **M) is True


@pytest.mark.parametrize(
    ("kind", "channel"), [("effect", "ironflow_effects"), ("timer", "ironflow_timers")]
)
def test_retry_wakes_the_relay(store, db, database_url, kind, channel):
    dead = insert_row(db, kind, workflow_type="shipping")
    bulk = insert_row(db, kind, workflow_type="billing")
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {channel}")
        assert dl.retry_dead_letter(store, dead, kind=kind, **M)
        assert dl.retry_dead_letters(store, None, kind=kind, **M) == 1
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=30, stop_after=2)]
    assert got == [(channel, "shipping"), (channel, "billing")]
    assert row(db, bulk, kind).attempts == 0


def test_retry_all_in_batches_with_filters(store, db):
    orders = [insert_row(db, workflow_type="orders", age_seconds=i) for i in range(7)]
    billing = insert_row(db, workflow_type="billing")
    in_flight = insert_row(db, workflow_type="orders", locked_by="r#1", lease_seconds=60)
    query = DeadLetterQuery.new().workflow_type("orders").limit(1)  # limit is ignored
    assert dl.retry_dead_letters(store, query, batch_size=3, max_rows=2, **M) == 2
    assert dl.retry_dead_letters(store, query, batch_size=3, **M) == 5
    assert all(row(db, i).attempts == 0 for i in orders)
    assert row(db, billing).attempts == MAX_ATTEMPTS
    assert row(db, in_flight).locked_by == "r#1"  # never touched
    assert dl.retry_dead_letters(store, query, **M) == 0
    with pytest.raises(InvalidDeadLetterRequest):
        dl.retry_dead_letters(store, query, batch_size=0, **M)


def test_discard_keeps_the_row_for_audit(store, db):
    dead = insert_row(db)
    result = dl.try_discard_dead_letter(store, dead, "customer cancelled", **M)
    assert result.ok and result.reason == "discarded"
    r = row(db, dead)
    assert r.processed_at is not None and r.discarded_at is not None
    assert r.discard_reason == "customer cancelled" and r.last_error == "RuntimeError: boom"
    assert dl.count_dead_letters(store, **M) == 0
    assert dl.try_retry_dead_letter(store, dead, **M).reason == "already_discarded"
    again = dl.try_discard_dead_letter(store, dead, "twice", **M)
    assert again.reason == "already_discarded"
    assert "already discarded at" in again.message and "(customer cancelled)" in again.message
    in_flight = insert_row(db, locked_by="r#1", lease_seconds=60)
    assert dl.try_discard_dead_letter(store, in_flight, "no", **M).reason == "in_flight"
    assert dl.discard_dead_letter(store, uuid.uuid4(), "gone", **M) is False
    with pytest.raises(InvalidDeadLetterRequest, match="reason"):
        dl.discard_dead_letter(store, in_flight, "  ", **M)


def test_timer_dead_letters(store, db):
    timer = insert_row(db, "timer", payload={"type": "Timeout", "id": "o-1"})
    insert_row(db, "effect")
    letters = dl.fetch_dead_letters(store, kind="timer", **M)
    assert [d.id for d in letters] == [timer]
    assert letters[0].payload == {"type": "Timeout", "id": "o-1"} and letters[0].fire_at
    assert dl.get_dead_letter(store, timer, kind="effect", **M) is None
    assert dl.try_retry_dead_letter(store, timer, kind="effect", **M).reason == "not_found"
    assert dl.discard_dead_letter(store, timer, "obsolete", kind="timer", **M)
    assert row(db, timer, "timer").discard_reason == "obsolete"


def _runtime(store) -> tuple[WorkflowRuntime, Celery]:
    app = Celery("dl-tasks", broker="memory://", set_as_current=False)
    config = RuntimeConfig(retry_policy=RetryPolicy(max_attempts=MAX_ATTEMPTS))
    runtime = WorkflowRuntime.builder(store).config(config).celery_app(app).build_runtime()
    dl.register_dead_letter_tasks(app, runtime)
    return runtime, app


def test_runtime_methods(store, db):
    runtime, _ = _runtime(store)
    effects = [insert_row(db, age_seconds=i) for i in range(3)]
    timer = insert_row(db, "timer")
    assert runtime.count_dead_letters() == 3
    assert [d.id for d in runtime.fetch_dead_letters(DeadLetterQuery.new().limit(2))] == effects[:2]
    assert runtime.retry_dead_letter(effects[0]) is True
    assert runtime.discard_dead_letter(effects[1], "dup") is True
    assert runtime.retry_dead_letters() == 1
    assert runtime.count_timer_dead_letters() == 1
    assert runtime.fetch_timer_dead_letters()[0].id == timer
    assert runtime.discard_timer_dead_letter(timer, "obsolete") is True
    assert runtime.retry_timer_dead_letters() == 0
    assert runtime.retry_timer_dead_letter(timer) is False


def test_celery_tasks_return_json(store, db):
    _, app = _runtime(store)
    names = {n for n in app.tasks if n.startswith("ironflow.dead_letters.")}
    assert names == {
        f"ironflow.dead_letters.{n}" for n in ("fetch", "count", "retry", "retry_all", "discard")
    }
    ids = [insert_row(db, workflow_type="orders", age_seconds=i) for i in range(3)]
    timer = insert_row(db, "timer")

    def call(name, *args, **kwargs):
        result = app.tasks[f"ironflow.dead_letters.{name}"].apply(args=args, kwargs=kwargs)
        value = result.get(propagate=True)
        assert json.loads(json.dumps(value)) == value
        return value

    page = call("fetch", limit=2)
    assert [i["id"] for i in page["items"]] == [str(i) for i in ids[:2]]
    assert page["next_cursor"] and page["kind"] == "effect"
    rest = call("fetch", limit=2, after=page["next_cursor"])
    assert [i["id"] for i in rest["items"]] == [str(ids[2])] and rest["next_cursor"] is None
    assert call("count", workflow_type="orders") == {"kind": "effect", "count": 3}
    assert call("count", kind="timer")["count"] == 1
    retried = call("retry", str(ids[0]))
    assert retried["ok"] and retried["reason"] == "retried"
    refused = call("retry", str(uuid.uuid4()))
    assert not refused["ok"] and refused["reason"] == "not_found"
    assert call("discard", str(ids[1]), "manual fix")["reason"] == "discarded"
    assert call("retry_all") == {"kind": "effect", "retried": 1}
    assert call("retry", str(timer), kind="timer")["ok"]
    with pytest.raises(InvalidDeadLetterRequest):
        call("retry", "not-a-uuid")
    # Bad arguments are Celery "expected" errors: one log line in the worker, no traceback.
    for name in ("fetch", "count", "retry", "retry_all", "discard"):
        assert InvalidDeadLetterRequest in app.tasks[f"ironflow.dead_letters.{name}"].throws
