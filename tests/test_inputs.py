"""Inputs through Celery (issue 14 §4): ``ironflow.<type>.execute`` run by a real in-thread
worker with a Redis result backend returns the outcome as JSON, refuses bad payloads as
an expected failure that writes nothing, and applies a redelivered message at most once.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from kombu.serialization import dumps as kombu_dumps
from runtime_helpers import TestApp, rows, scalar, wait_until

from ironflow_celery import Accepted, AlreadyCompleted, ExecuteOutcome, Rejected
from ironflow_celery.engine.inputs import RECORD_TYPE, InputRefused, recorded_outcome
from ironflow_celery.storage.store import PostgresStore

RESULT_BACKEND = os.environ.get("IRONFLOW_TEST_RESULT_BACKEND", "redis://127.0.0.1:6379/6")
EXECUTE = "ironflow.test_workflow.execute"
TIMEOUT = 120  # a loaded machine: generous bounds, never a fixed sleep


@pytest.fixture
def app(store: PostgresStore):
    """Worker (threads pool, 4 threads) on its own queue, results in Redis, no relays."""
    test_app = TestApp(store)
    test_app.app.conf.result_backend = RESULT_BACKEND
    test_app.start(relays=False, worker=True)
    try:
        yield test_app
    finally:
        test_app.stop()


def call(app: TestApp, *args: Any, task_id: str | None = None, **kwargs: Any) -> Any:
    return app.app.send_task(EXECUTE, args=list(args), kwargs=kwargs, task_id=task_id)


def counter(app: TestApp, workflow_id: str) -> int:
    state = app.service.fetch_latest_state_dynamic("test_workflow", workflow_id)
    return state["counter"]


def snapshot(db: sa.Engine) -> list[Any]:
    return rows(
        db,
        "SELECT (SELECT count(*) FROM ironflow.workflow_instances),"
        " (SELECT count(*) FROM ironflow.events), (SELECT count(*) FROM ironflow.outbox),"
        " (SELECT count(*) FROM ironflow.input_observations)",
    )


def test_execute_outcomes_are_json_and_round_trip() -> None:
    for outcome in (Accepted(2), Rejected({"why": "no"}), AlreadyCompleted()):
        assert ExecuteOutcome.from_json(outcome.to_json()) == outcome
    assert Accepted(2).to_json() == {"outcome": "accepted", "events_appended": 2}
    with pytest.raises(ValueError, match="not an execute outcome"):
        ExecuteOutcome.from_json({"outcome": "maybe"})
    # What Celery's json result serializer does with a task that returns an outcome.
    _, _, body = kombu_dumps({"result": Rejected("no")}, serializer="json")
    assert json.loads(body) == {"result": {"outcome": "rejected", "reason": "no"}}


def test_execute_task_returns_the_outcome_as_json_and_writes_the_events(
    app: TestApp, db: sa.Engine
) -> None:
    assert app.app.tasks[EXECUTE].acks_late is True
    accepted = call(app, {"type": "Start", "id": "o1", "mode": {"mode": "FireAndForget"}})
    assert accepted.get(timeout=TIMEOUT) == {
        "outcome": "accepted",
        "events_appended": 1,
        "workflow": "test_workflow:o1",
        "idempotency_key": accepted.id,
        "duplicate": False,
    }
    assert app.events("test_workflow", "o1") == ["Started"]
    assert scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE workflow_id = 'o1'") == 1

    rejected = call(app, {"type": "ForceReject", "id": "o1", "reason": "not today"})
    assert rejected.get(timeout=TIMEOUT)["outcome"] == "rejected"
    assert rejected.get(timeout=TIMEOUT)["reason"] == "not today"
    call(app, {"type": "Stop", "id": "o1"}).get(timeout=TIMEOUT)
    done = call(app, {"type": "Ping", "id": "o1"}).get(timeout=TIMEOUT)
    assert done["outcome"] == "already_completed"
    assert app.events("test_workflow", "o1") == ["Started", "Stopped"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"type": "Launch", "id": "b"}, "Launch"),
        ({"type": "Increment"}, "id"),
        (["Increment", "b"], "expected a JSON object"),
        ("Increment", "expected a JSON object"),
    ],
    ids=["unknown-tag", "missing-field", "list", "string"],
)
def test_a_bad_payload_is_a_clear_expected_failure_that_writes_nothing(
    app: TestApp, db: sa.Engine, caplog: pytest.LogCaptureFixture, payload: Any, message: str
) -> None:
    before = snapshot(db)
    with caplog.at_level(logging.INFO):
        result = call(app, payload)
        with pytest.raises(InputRefused, match=message):
            result.get(timeout=TIMEOUT)
        assert result.state == "FAILURE"
        wait_until(lambda: "raised expected" in caplog.text, TIMEOUT, what="the log line")
    assert "Traceback" not in caplog.text
    assert snapshot(db) == before


def test_a_redelivered_message_applies_once_and_answers_the_first_outcome(
    app: TestApp, db: sa.Engine
) -> None:
    task_id = str(uuid.uuid4())
    first = call(app, {"type": "Increment", "id": "d1"}, task_id=task_id)
    assert first.get(timeout=TIMEOUT)["duplicate"] is False
    first.forget()
    again = call(app, {"type": "Increment", "id": "d1"}, task_id=task_id)
    answer = again.get(timeout=TIMEOUT)
    assert answer == {
        "outcome": "accepted",
        "events_appended": 1,
        "workflow": "test_workflow:d1",
        "idempotency_key": task_id,
        "duplicate": True,
    }
    assert counter(app, "d1") == 1
    assert recorded_outcome(app.runtime, "test_workflow", "d1", task_id) == Accepted(1)
    [record] = rows(
        db,
        "SELECT input_type, outcome, payload FROM ironflow.input_observations"
        " WHERE workflow_id = 'd1'",
    )
    assert (record.input_type, record.outcome) == (RECORD_TYPE, "accepted")
    assert record.payload["input"] == {"type": "Increment", "id": "d1"}


def test_concurrent_deliveries_of_one_key_apply_once(app: TestApp, db: sa.Engine) -> None:
    # Eight copies at once, on four worker threads: the advisory lock queues them, and
    # every copy after the first finds the record. A new instance makes the race hardest.
    task_id = str(uuid.uuid4())
    for _ in range(8):
        call(app, {"type": "Increment", "id": "c1", "with_effect": True}, task_id=task_id)
    # A second key (explicit idempotency_key, two task ids) applies once too.
    for _ in range(2):
        call(app, {"type": "Increment", "id": "c1"}, idempotency_key="order-42")
    wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM ironflow.input_observations WHERE workflow_id = 'c1'")
            == 2
            and app.queue_length() == 0
        ),
        TIMEOUT,
        what="both keys recorded and the queue drained",
    )
    app.stop_worker()  # a warm shutdown: every delivery that started has finished
    assert counter(app, "c1") == 2
    assert app.events("test_workflow", "c1") == ["Incremented", "Incremented"]
    assert scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE workflow_id = 'c1'") == 1
    assert scalar(db, "SELECT count(*) FROM ironflow.input_observations") == 2


def test_execute_task_refuses_a_bad_idempotency_key(app: TestApp, db: sa.Engine) -> None:
    before = snapshot(db)
    result = call(app, {"type": "Ping", "id": "k"}, idempotency_key=7)
    with pytest.raises(InputRefused, match="idempotency_key must be a string"):
        result.get(timeout=TIMEOUT)
    assert snapshot(db) == before


def test_an_unreachable_database_retries_the_message_instead_of_dropping_it(
    app: TestApp, store: PostgresStore, db: sa.Engine
) -> None:
    # The message is the input's only copy: while PostgreSQL is unreachable the task goes
    # back through the broker under its task id, and applies once when the database returns.
    dead = PostgresStore.from_url("postgresql://postgres@127.0.0.1:1/unreachable")
    runtime = app.runtime
    runtime._store, runtime.service.store = dead, dead
    try:
        result = call(app, {"type": "Increment", "id": "u1"})
        wait_until(lambda: result.state == "RETRY", TIMEOUT, what="a RETRY state")
    finally:
        runtime._store, runtime.service.store = store, store
        dead.dispose()
    answer = result.get(timeout=TIMEOUT)
    assert (answer["outcome"], answer["duplicate"]) == ("accepted", False)
    assert counter(app, "u1") == 1
