"""Failures where Celery teams look (issue 14 §1): WARNING/ERROR logs, the
``dead_lettered`` signal, Celery's RETRY/FAILURE states and ``task_retry``/``task_failure``
signals, and Sentry's CeleryIntegration through a real in-thread worker.

The outbox stays the only owner of attempts and backoff: the tests check that no
broker message is sent again and the handler runs exactly ``max_attempts`` times.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from celery import signals as celery_signals
from runtime_helpers import TestApp, insert_timer, running_app, test_config, wait_until
from workflows import CALLS, Mode, Start, TestWorkflow

from ironflow_celery.engine.signals import dead_lettered
from ironflow_celery.engine.tasks import run_effect, run_timer
from ironflow_celery.errors import DeadLettered
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

T = TestWorkflow.type
MAX = 3


def claim(app: TestApp, kind: str, token: str) -> list[ClaimedRow]:
    return app.store.claim(kind, token, [T], lease_seconds=30, max_attempts=MAX, limit=10)


def run_until_final(app: TestApp, kind: str = "effect", timeout: float = 60) -> list[dict]:
    """Claim and run the one row of `kind` again and again (waiting out its backoff)."""
    run = run_effect if kind == "effect" else run_timer
    results: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for row in claim(app, kind, f"relay#{uuid.uuid4().hex[:6]}"):
            ref = f"{row.workflow_type}:{row.workflow_id}"
            results.append(run(app.runtime, ref, str(row.id), row.attempts + 1, row.token))
            if results[-1]["status"] != "failed-will-retry":
                return results
        time.sleep(0.02)
    raise AssertionError(f"still retrying after {timeout}s: {results}")


class Received:
    """Collects the keyword arguments of every `dead_lettered` signal, thread-safely."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, sender: Any = None, **kwargs: Any) -> None:
        with self._lock:
            self.calls.append({"sender": sender, **kwargs})


@pytest.fixture
def on_dead_letter():
    received = Received()
    dead_lettered.connect(received, weak=False)
    try:
        yield received
    finally:
        dead_lettered.disconnect(received)


def test_failed_attempts_log_warning_and_the_dead_letter_logs_error_with_traceback(
    store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    app = TestApp(store)
    app.service.execute(Start(id="loud", mode=Mode(mode="PermanentFailure")))
    with caplog.at_level(logging.DEBUG, logger="ironflow_celery.tasks"):
        results = run_until_final(app)
    assert [r["status"] for r in results] == ["failed-will-retry"] * (MAX - 1) + ["dead-lettered"]
    row_id = results[0]["row_id"]
    # the dead-letter line has its own child logger (Sentry's logging integration skips it)
    mine = [r for r in caplog.records if r.name.startswith("ironflow_celery.tasks")]
    warnings = [r for r in mine if r.levelno == logging.WARNING]
    errors = [r for r in mine if r.levelno == logging.ERROR]
    assert len(warnings) == MAX - 1 and len(errors) == 1
    for number, record in enumerate(warnings, 1):
        text = record.getMessage()
        assert row_id in text and f"{T}:loud" in text and "(Process)" in text
        assert f"attempt {number} failed" in text and "RuntimeError" in text
    [error] = errors
    text = error.getMessage()
    assert row_id in text and f"{T}:loud" in text and "(Process)" in text
    assert "dead-lettered after 3 attempt(s)" in text
    # the handler's traceback, in the message (escaped like last_error, see _traceback_text)
    assert "Traceback (most recent call last)" in text and "RuntimeError" in text
    assert "test_handler" in text  # the traceback names the failing handler
    # tracebacks of retried attempts stay at DEBUG
    assert [r for r in mine if r.levelno == logging.DEBUG and "traceback" in r.getMessage()]
    app.stop()


def test_dead_lettered_signal_fires_once_per_dead_letter_effect_and_timer(
    store: PostgresStore, db: sa.Engine, on_dead_letter: Received
) -> None:
    app = TestApp(store)
    app.service.execute(Start(id="sig", mode=Mode(mode="PermanentFailure")))
    effect_results = run_until_final(app)
    assert [r["status"] for r in effect_results][-1] == "dead-lettered"
    # only the dead letter, not the failed attempts before it
    [effect_call] = on_dead_letter.calls
    assert effect_call["sender"] is TestWorkflow
    assert effect_call["kind"] == "effect"
    assert str(effect_call["row_id"]) == effect_results[0]["row_id"]
    assert effect_call["workflow"].workflow_type == T
    assert effect_call["workflow"].workflow_id == "sig"
    assert effect_call["effect_type"] == "Process"
    assert effect_call["attempts"] == MAX
    assert effect_call["error"].startswith("RuntimeError: ")
    assert isinstance(effect_call["exception"], RuntimeError)

    timer_id = insert_timer(db, T, "tsig", {"type": "Nope", "id": "tsig"})
    timer_results = run_until_final(app, "timer")
    assert [r["status"] for r in timer_results][-1] == "dead-lettered"
    assert len(on_dead_letter.calls) == 2
    timer_call = on_dead_letter.calls[1]
    assert timer_call["kind"] == "timer" and timer_call["row_id"] == timer_id
    assert timer_call["workflow"].workflow_id == "tsig"
    assert timer_call["effect_type"] == "Nope"  # the timer input's tag
    assert "unknown variant 'Nope'" in timer_call["error"]
    app.stop()


class MemoryTransport:
    """A sentry-sdk transport that keeps every envelope in memory instead of sending it."""

    def __new__(cls, options: Any = None) -> Any:
        from sentry_sdk.transport import Transport

        class _Transport(Transport):
            def __init__(self, options: Any = None) -> None:
                super().__init__(options)
                self.envelopes: list[Any] = []
                self.lock = threading.Lock()

            def capture_envelope(self, envelope: Any) -> None:
                with self.lock:
                    self.envelopes.append(envelope)

            def events(self) -> list[dict]:
                with self.lock:
                    return [
                        item.payload.json
                        for envelope in self.envelopes
                        for item in envelope.items
                        if item.type == "event"
                    ]

        return _Transport(options)


def exception_types(event: dict) -> list[str]:
    return [value["type"] for value in event.get("exception", {}).get("values", [])]


def test_a_real_worker_reports_retries_and_the_dead_letter_to_celery_and_sentry(
    store: PostgresStore,
    db: sa.Engine,
    on_dead_letter: Received,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import celery.app.trace
    import celery.worker.consumer.consumer
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    transport = MemoryTransport()
    retried: list[Any] = []
    failed: list[Any] = []

    def on_retry(sender: Any = None, request: Any = None, reason: Any = None, **kw: Any) -> None:
        retried.append((request.id, reason))

    def on_failure(sender: Any = None, task_id: Any = None, exception: Any = None, **kw: Any):
        failed.append((task_id, exception))

    celery_signals.task_retry.connect(on_retry, weak=False)
    celery_signals.task_failure.connect(on_failure, weak=False)
    sentry_sdk.init(
        transport=transport,
        integrations=[CeleryIntegration()],
        default_integrations=False,
        traces_sample_rate=0,
    )
    # CeleryIntegration patches `celery.app.trace.build_tracer`; the worker's consumer
    # imported that name before this test initialised Sentry (other tests in this process
    # started workers), so hand it the patched one, as a worker that initialises Sentry
    # before it starts consuming has.
    monkeypatch.setattr(
        celery.worker.consumer.consumer, "build_tracer", celery.app.trace.build_tracer
    )
    try:
        # a backoff the relay waits out quickly, so the whole life fits a loaded machine
        with running_app(store, config=test_config()) as app:
            app.service.execute(Start(id="sentry", mode=Mode(mode="PermanentFailure")))
            wait_until(lambda: on_dead_letter.calls, 120, what="the dead letter")
            wait_until(lambda: failed, 60, what="task_failure")
            wait_until(lambda: len(transport.events()) >= MAX, 60, what="Sentry events")
            with db.connect() as conn:
                [row] = conn.execute(
                    sa.text("SELECT * FROM ironflow.outbox WHERE workflow_id = 'sentry'")
                ).all()
            time.sleep(1.0)  # a redelivered message would run the handler again by now
            assert app.queue_length() == 0
    finally:
        sentry_sdk.flush()
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)  # later tests run without Sentry
        celery_signals.task_retry.disconnect(on_retry)
        celery_signals.task_failure.disconnect(on_failure)

    # attempts are counted in the outbox only: MAX handler runs, never a broker redelivery
    assert row.attempts == MAX and row.dead_lettered_at is not None
    assert len(CALLS.calls) == MAX
    assert [task_id for task_id, _ in retried] == [str(row.id)] * (MAX - 1)
    assert all(isinstance(reason.exc, RuntimeError) for _, reason in retried)
    [(task_id, exception)] = failed
    assert task_id == str(row.id) and isinstance(exception, DeadLettered)
    assert exception.effect_type == "Process" and exception.workflow == f"{T}:sentry"
    assert isinstance(exception.__cause__, RuntimeError)

    events = transport.events()
    assert len(events) == MAX, [exception_types(e) for e in events]
    attempts = [e for e in events if "DeadLettered" not in exception_types(e)]
    [dead] = [e for e in events if "DeadLettered" in exception_types(e)]
    assert len(attempts) == MAX - 1
    for event in attempts:
        assert exception_types(event) == ["RuntimeError"] and event["level"] == "warning"
        assert event["tags"]["celery_task_id"] == str(row.id)
    assert exception_types(dead) == ["RuntimeError", "DeadLettered"]  # the handler's as cause
    assert dead["level"] == "error" and dead["tags"]["celery_task_id"] == str(row.id)


def test_one_sentry_event_per_dead_letter_with_default_integrations(
    store: PostgresStore,
    db: sa.Engine,
    on_dead_letter: Received,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 23 §2: with sentry-sdk's default integrations (Celery's is auto-enabled) and
    its logging integration sending ERROR lines as events (a default in sentry-sdk 2, to be
    asked for in 3), each dead letter is one error event, not two (the ERROR log line was a
    second one, titled by its format string, grouping every type into one issue); grouped
    by workflow type and effect type, with the row id as a tag. A real in-thread worker;
    the transport keeps envelopes in memory instead of sending them."""
    import celery.app.trace
    import celery.worker.consumer.consumer
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    transport = MemoryTransport()
    failed: list[Any] = []

    def on_failure(sender: Any = None, task_id: Any = None, **kw: Any) -> None:
        failed.append(task_id)

    celery_signals.task_failure.connect(on_failure, weak=False)
    sentry_sdk.init(
        transport=transport,
        traces_sample_rate=0,
        integrations=[LoggingIntegration(event_level=logging.ERROR)],  # 2.x: the default
    )
    client = sentry_sdk.get_client()
    assert client.get_integration(LoggingIntegration) is not None
    assert client.get_integration(CeleryIntegration) is not None
    monkeypatch.setattr(
        celery.worker.consumer.consumer, "build_tracer", celery.app.trace.build_tracer
    )
    try:
        with running_app(store, config=test_config()) as app:
            for wid in ("s-1", "s-2"):
                app.service.execute(Start(id=wid, mode=Mode(mode="PermanentFailure")))
            timer_id = insert_timer(db, T, "s-3", {"type": "Nope", "id": "s-3"})
            wait_until(lambda: len(on_dead_letter.calls) >= 3, 180, what="3 dead letters")
            # task_failure follows the CeleryIntegration's own capture of the same task
            wait_until(lambda: len(failed) >= 3, 60, what="task_failure x3")
            sentry_sdk.flush()
            events = transport.events()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
        celery_signals.task_failure.disconnect(on_failure)

    rows = {str(c["row_id"]): c for c in on_dead_letter.calls}
    assert len(rows) == 3 and str(timer_id) in rows
    errors = [e for e in events if e.get("level") in ("error", "fatal")]
    # exactly one error event per dead letter, each a structured DeadLettered
    assert sorted(e["tags"]["ironflow.row_id"] for e in errors) == sorted(rows), [
        (e.get("logentry"), exception_types(e)) for e in errors
    ]
    for event in errors:
        call = rows[event["tags"]["ironflow.row_id"]]
        assert exception_types(event)[-1] == "DeadLettered"
        assert event["fingerprint"] == [
            "ironflow-dead-letter",
            call["kind"],
            T,
            call["effect_type"],
        ]
        assert event["tags"]["ironflow.effect_type"] == call["effect_type"]
        assert event["tags"]["celery_task_id"] == event["tags"]["ironflow.row_id"]
        assert "logentry" not in event  # not a log line's event
    assert {tuple(e["fingerprint"]) for e in errors} == {
        ("ironflow-dead-letter", "effect", T, "Process"),
        ("ironflow-dead-letter", "timer", T, "Nope"),
    }


def test_sentry_failed_attempts_setting_keeps_sentry_to_dead_letters() -> None:
    """``ironflow_sentry_failed_attempts = False``: a failed attempt is not sent to Sentry
    (the dead letter still is, by the CeleryIntegration, as the test above shows)."""
    import sentry_sdk
    from celery import Celery

    from ironflow_celery.engine.tasks import _report_to_sentry

    class Task:
        def __init__(self, **conf: Any) -> None:
            self.app = Celery("sentry-setting", broker="memory://", set_as_current=False)
            self.app.conf.update(conf)

    transport = MemoryTransport()
    sentry_sdk.init(transport=transport, default_integrations=False)
    try:
        _report_to_sentry(Task(ironflow_sentry_failed_attempts=False), RuntimeError("quiet"))
        _report_to_sentry(Task(), RuntimeError("reported"))
        sentry_sdk.flush()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    events = transport.events()
    assert [e["exception"]["values"][0]["value"] for e in events] == ["reported"]
    assert events[0]["level"] == "warning"


def test_a_failing_sentry_sdk_changes_no_outcome_and_loses_no_signal(
    store: PostgresStore,
    on_dead_letter: Received,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reporting to Sentry comes after the outcome is committed. An SDK whose API fails
    (sentry-sdk 3.0 removed ``Scope.level``: every failed attempt raised AttributeError,
    and the dead letter's ``dead_lettered`` signal was never sent) is logged, and every
    attempt still ends as its row did."""
    import sentry_sdk

    from ironflow_celery.engine import tasks

    def broken_scope() -> Any:
        raise AttributeError("'Scope' object has no attribute 'level'")

    transport = MemoryTransport()
    sentry_sdk.init(transport=transport, default_integrations=False)
    monkeypatch.setattr(sentry_sdk, "new_scope", broken_scope)

    app = TestApp(store)

    class Task:
        app = None  # the failed attempt's task, as `_report_to_sentry` reads it

    Task.app = app.app
    try:
        app.service.execute(Start(id="sdk", mode=Mode(mode="PermanentFailure")))
        with caplog.at_level(logging.WARNING, logger="ironflow_celery.tasks"):
            results = run_until_final(app)
            tasks._report_to_sentry(Task(), RuntimeError("a failed attempt"))
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
        app.stop()
    assert [r["status"] for r in results] == ["failed-will-retry"] * (MAX - 1) + ["dead-lettered"]
    [call] = on_dead_letter.calls
    assert str(call["row_id"]) == results[0]["row_id"]
    unreported = [r.getMessage() for r in caplog.records if "could not report" in r.getMessage()]
    assert any(f"dead letter of {results[0]['row_id']}" in text for text in unreported)
    assert any("failed attempt of this task" in text for text in unreported)
    assert all("no attribute 'level'" in text for text in unreported)


def test_dead_lettered_survives_pickle_and_a_json_result_backend() -> None:
    """Celery rebuilds a task's exception from its args: pickled back from a prefork
    child, or stored as JSON by a result backend."""
    import pickle

    from celery import Celery

    exc = DeadLettered("effect", "row-1", "orders:o-1", "Charge", 3, "RuntimeError: boom")
    for copy in (
        pickle.loads(pickle.dumps(exc)),
        (backend := Celery("dl-json", set_as_current=False).backend).exception_to_python(
            backend.prepare_exception(exc, serializer="json")
        ),
    ):
        assert type(copy).__name__ == "DeadLettered" and str(copy) == str(exc)
        assert copy.row_id == "row-1" and copy.effect_type == "Charge" and copy.attempts == 3
    assert repr(exc).startswith("DeadLettered('effect row-1 of orders:o-1 (Charge) dead-")


def test_a_group_reports_each_failing_row_to_sentry_once_and_its_retry_travels_alone(
    store: PostgresStore, db: sa.Engine, on_dead_letter: Received, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that travelled in one group (the default): the group's task ends SUCCESS, so
    Celery's integration sees no failure; each failing row is sent to Sentry itself — a
    dead letter as one error event, a failed attempt as a warning, each tagged with its
    row id — and the failed row's next attempt travels alone (its own task, id = row id)."""
    import celery.app.trace
    import celery.worker.consumer.consumer
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    from tests.e2e_apps.batch_app import BatchWorkflow, Go, handle_job

    transport = MemoryTransport()
    retried: list[Any] = []

    def on_retry(sender: Any = None, request: Any = None, **kw: Any) -> None:
        retried.append(request.id)

    celery_signals.task_retry.connect(on_retry, weak=False)
    sentry_sdk.init(
        transport=transport,
        integrations=[CeleryIntegration()],
        default_integrations=False,
        traces_sample_rate=0,
    )
    monkeypatch.setattr(
        celery.worker.consumer.consumer, "build_tracer", celery.app.trace.build_tracer
    )
    app = TestApp(store, workflows=((BatchWorkflow, handle_job),), config=test_config())
    try:
        app.service.execute(Go(id="grp-sentry", jobs=["ok", "perm", "flaky", "fail"]))
        app.start()  # all four are due before the first claim: one group
        with db.connect() as conn:
            ok, perm, flaky, fail = conn.execute(
                sa.text(
                    "SELECT id FROM ironflow.outbox WHERE workflow_id = 'grp-sentry'"
                    " ORDER BY (payload->>'index')::int"
                )
            ).scalars()

        def settled() -> bool:
            with db.connect() as conn:
                return not conn.execute(
                    sa.text(
                        "SELECT 1 FROM ironflow.outbox WHERE workflow_id = 'grp-sentry'"
                        " AND processed_at IS NULL AND dead_lettered_at IS NULL"
                    )
                ).all()

        wait_until(settled, 120, what="every row processed or dead-lettered")
        wait_until(lambda: len(transport.events()) >= 2 + MAX, 60, what="Sentry events")
        time.sleep(0.5)  # an extra event would show up now
    finally:
        app.stop()
        sentry_sdk.flush()
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)  # later tests run without Sentry
        celery_signals.task_retry.disconnect(on_retry)

    events = transport.events()
    by_row: dict[str, list[dict]] = {}
    for event in events:
        row = event["tags"].get("ironflow.row_id") or event["tags"].get("celery_task_id")
        by_row.setdefault(row, []).append(event)
    assert str(ok) not in by_row
    [dead] = by_row[str(perm)]  # one event per dead letter
    assert dead["level"] == "error" and "PermanentEffectError" in exception_types(dead)
    [first] = by_row[str(flaky)]  # its retry ran alone and succeeded
    assert first["level"] == "warning" and first["tags"]["ironflow.row_id"] == str(flaky)
    # the always-failing row: its first attempt in the group, then alone (task id = row id)
    assert len(by_row[str(fail)]) == MAX
    assert retried.count(str(fail)) == MAX - 2 and str(flaky) not in retried
    assert sorted(str(c["row_id"]) for c in on_dead_letter.calls) == sorted([str(perm), str(fail)])
