"""OpenTelemetry end to end (issue 14 §3): one trace from an executed input, through the
outbox row, the relay's publish and the Celery task, to the follow-up input.

Spans go to the SDK's in-memory exporter; effects run through a real in-thread worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from runtime_helpers import rows, running_app, wait_until
from workflows import Mode, Start, TimerStart

from ironflow_celery.storage.store import PostgresStore

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _sdk() -> Iterator[None]:
    """The SDK with the in-memory exporter (the global provider can be set once only)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    yield


def _trace_spans(trace_id: int) -> list[Any]:
    return [s for s in EXPORTER.get_finished_spans() if s.context.trace_id == trace_id]


def _named(spans: list[Any], name: str) -> list[Any]:
    return [s for s in spans if s.name == name]


def _wait_for_spans(trace_id: int, names: dict[str, int]) -> list[Any]:
    """Wait until the trace holds at least this many spans of each name (spans are
    exported when they end, after the task has returned)."""

    def complete() -> list[Any] | None:
        spans = _trace_spans(trace_id)
        if all(len(_named(spans, n)) >= k for n, k in names.items()):
            return spans
        return None

    try:
        return wait_until(complete, timeout=60, what=f"spans {names}")
    except AssertionError:
        seen = sorted(s.name for s in _trace_spans(trace_id))
        raise AssertionError(f"trace has {seen}, wanted at least {names}") from None


def _parent(span: Any) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_one_trace_from_input_through_worker_to_follow_up(
    store: PostgresStore, db: sa.Engine
) -> None:
    """Without the Celery instrumentation: web request span → execute → (outbox row, relay
    publish headers) → effect task span → follow-up execute, one trace, parent by parent."""
    EXPORTER.clear()
    tracer = trace.get_tracer("test")
    with running_app(store) as app:
        with tracer.start_as_current_span("web request") as request_span:
            app.service.execute(Start(id="t1", mode=Mode(mode="RouteResult")))
        trace_id = request_span.get_span_context().trace_id
        stored = rows(db, "SELECT celery_trace_context FROM ironflow.outbox")
        assert len(stored) == 1
        carrier = json.loads(stored[0].celery_trace_context)
        assert carrier["traceparent"].split("-")[1] == f"{trace_id:032x}"
        app.wait_for_events("test_workflow", "t1", ["Started", "Completed"], timeout=60)
        spans = _wait_for_spans(
            trace_id, {"ironflow.execute test_workflow": 2, "ironflow.effect test_workflow": 1}
        )
    request = _named(spans, "web request")[0]
    first, follow_up = sorted(
        _named(spans, "ironflow.execute test_workflow"), key=lambda s: s.start_time
    )
    (effect,) = _named(spans, "ironflow.effect test_workflow")
    assert _parent(first) == request.context.span_id
    assert _parent(effect) == first.context.span_id
    assert effect.kind == trace.SpanKind.CONSUMER
    assert effect.attributes["ironflow.status"] == "processed"
    assert _parent(follow_up) == effect.context.span_id
    assert follow_up.attributes["ironflow.input_type"] == "Completed"


def test_celery_instrumentation_task_spans_join_the_trace(
    store: PostgresStore, db: sa.Engine
) -> None:
    """With opentelemetry-instrumentation-celery: its publish span (in the relay) is a child
    of the input's execute span, its task span a child of the publish, ours a child of its
    task span, and the follow-up execute a child of ours."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    instrumentor.instrument()
    try:
        EXPORTER.clear()
        tracer = trace.get_tracer("test")
        with running_app(store) as app:
            with tracer.start_as_current_span("web request") as request_span:
                app.service.execute(Start(id="t2", mode=Mode(mode="RouteResult")))
            trace_id = request_span.get_span_context().trace_id
            app.wait_for_events("test_workflow", "t2", ["Started", "Completed"], timeout=60)
            spans = _wait_for_spans(
                trace_id,
                {
                    "ironflow.execute test_workflow": 2,
                    "apply_async/ironflow.test_workflow.effect": 1,
                    "run/ironflow.test_workflow.effect": 1,
                    "ironflow.effect test_workflow": 1,
                },
            )
    finally:
        instrumentor.uninstrument()
    first, follow_up = sorted(
        _named(spans, "ironflow.execute test_workflow"), key=lambda s: s.start_time
    )
    (publish,) = _named(spans, "apply_async/ironflow.test_workflow.effect")
    (run,) = _named(spans, "run/ironflow.test_workflow.effect")
    (effect,) = _named(spans, "ironflow.effect test_workflow")
    assert _parent(publish) == first.context.span_id
    assert _parent(run) == publish.context.span_id
    assert _parent(effect) == run.context.span_id
    assert _parent(follow_up) == effect.context.span_id


def test_timers_carry_the_trace_of_the_input_that_armed_them(
    store: PostgresStore, db: sa.Engine
) -> None:
    EXPORTER.clear()
    tracer = trace.get_tracer("test")
    with running_app(store) as app:
        with tracer.start_as_current_span("web request") as request_span:
            app.service.execute(TimerStart(id="t3", timeout_secs=0.3))
        trace_id = request_span.get_span_context().trace_id
        (timer,) = rows(db, "SELECT celery_trace_context FROM ironflow.timers")
        assert json.loads(timer.celery_trace_context)["traceparent"].split("-")[1] == (
            f"{trace_id:032x}"
        )
        app.wait_until(
            lambda: "TimedOut" in app.events("timer_test", "t3"), timeout=60, what="timeout"
        )
        spans = _wait_for_spans(
            trace_id, {"ironflow.timer timer_test": 1, "ironflow.execute timer_test": 3}
        )
    (timer_span,) = _named(spans, "ironflow.timer timer_test")
    executes = _named(spans, "ironflow.execute timer_test")
    timeout = [s for s in executes if s.attributes["ironflow.input_type"] == "Timeout"]
    assert len(timeout) == 1 and _parent(timeout[0]) == timer_span.context.span_id


def test_an_input_outside_any_span_starts_its_own_trace(
    store: PostgresStore, db: sa.Engine
) -> None:
    """With the SDK configured, an input executed outside any span is the root of its trace
    (``ironflow.execute``), and its effect row carries that trace."""
    from runtime_helpers import build_runtime, test_config

    EXPORTER.clear()
    runtime = build_runtime(store, None, test_config())
    runtime.service.execute(Start(id="t4", mode=Mode(mode="FireAndForget")))
    (root,) = [s for s in EXPORTER.get_finished_spans() if s.name.startswith("ironflow.")]
    assert root.parent is None and root.attributes["ironflow.outcome"] == "accepted"
    (row,) = rows(db, "SELECT celery_trace_context FROM ironflow.outbox")
    traceparent = json.loads(row.celery_trace_context)["traceparent"]
    assert traceparent.split("-")[1:3] == [
        f"{root.context.trace_id:032x}",
        f"{root.context.span_id:016x}",
    ]


def test_without_sdk_or_without_opentelemetry_nothing_is_stored() -> None:
    """opentelemetry-api alone (no SDK configured: no-op spans) stores no context; without
    opentelemetry-api importable the package imports and the helpers are no-ops. Without an
    SDK the service opens no span per input (`configured`): a no-op span would carry only
    its parent's context, which a row stores all the same."""
    api_only = (
        "import json, ironflow_celery.service.tracing as t\n"
        "assert t.AVAILABLE and not t.configured()\n"
        "with t.span('x'):\n"
        "    assert t.current_carrier() is None\n"
        "tp = '00-' + '1' * 32 + '-' + '2' * 16 + '-01'\n"
        "with t.attached({'traceparent': tp}):\n"
        "    assert json.loads(t.current_carrier())['traceparent'] == tp\n"
        "    with t.span('x'):\n"
        "        assert json.loads(t.current_carrier())['traceparent'] == tp\n"
        "print('ok')\n"
    )
    missing = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import ironflow_celery, ironflow_celery.service.tracing as t\n"
        "assert not t.AVAILABLE and not t.configured() and t.current_carrier() is None\n"
        "with t.span('x') as s, t.task_span('y', object()) as u, t.attached({'a': 'b'}):\n"
        "    assert s is None and u is None\n"
        "print('ok')\n"
    )
    for code in (api_only, missing):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.stdout.strip() == "ok", done.stderr


def test_tracing_setting_off_stops_forwarding_and_task_spans(
    store: PostgresStore, db: sa.Engine
) -> None:
    """``ironflow_tracing = False``: the relay forwards no context and tasks open no spans,
    so the effect and its follow-up stay out of the input's trace."""
    from runtime_helpers import test_config

    from ironflow_celery.model.config import runtime_config_from

    assert runtime_config_from({"ironflow_tracing": "false"}).tracing is False
    assert runtime_config_from({}).tracing is True
    EXPORTER.clear()
    tracer = trace.get_tracer("test")
    with running_app(store, config=test_config(tracing=False)) as app:
        with tracer.start_as_current_span("web request") as request_span:
            app.service.execute(Start(id="t5", mode=Mode(mode="RouteResult")))
        app.wait_for_events("test_workflow", "t5", ["Started", "Completed"], timeout=60)
    trace_id = request_span.get_span_context().trace_id
    names = sorted(s.name for s in _trace_spans(trace_id))
    assert names == ["ironflow.execute test_workflow", "web request"]
    assert not [s for s in EXPORTER.get_finished_spans() if s.name.startswith("ironflow.effect")]


@pytest.mark.parametrize("size", [1, 20], ids=["single-row", "grouped"])
def test_each_row_keeps_its_own_trace_whatever_travels_with_it(
    store: PostgresStore, db: sa.Engine, size: int
) -> None:
    """Two inputs in two traces write one effect each; claimed together, they travel in
    one message by default. Each row's effect span still continues its own input's trace,
    and its follow-up input is a child of that span (on 6964a2b only the first row's
    context travelled with a batch)."""
    from runtime_helpers import TestApp, test_config

    EXPORTER.clear()
    tracer = trace.get_tracer("test")
    app = TestApp(store, config=test_config(effect_batch_size=size))
    try:
        traces = {}
        for wid in ("g1", "g2"):
            with tracer.start_as_current_span(f"request {wid}") as request_span:
                app.service.execute(Start(id=f"{wid}-{size}", mode=Mode(mode="RouteResult")))
            traces[wid] = request_span.get_span_context().trace_id
        app.start()  # both rows are due before the relay's first claim
        for wid in traces:
            app.wait_for_events("test_workflow", f"{wid}-{size}", ["Started", "Completed"])
        for trace_id in traces.values():
            spans = _wait_for_spans(
                trace_id,
                {"ironflow.execute test_workflow": 2, "ironflow.effect test_workflow": 1},
            )
            first, follow_up = sorted(
                _named(spans, "ironflow.execute test_workflow"), key=lambda s: s.start_time
            )
            # (a group's task span joins its first row's trace too: it has no row id)
            (effect,) = [
                s
                for s in _named(spans, "ironflow.effect test_workflow")
                if "ironflow.row_id" in s.attributes
            ]
            assert _parent(effect) == first.context.span_id
            assert _parent(follow_up) == effect.context.span_id
        groups = [
            s for s in EXPORTER.get_finished_spans() if s.attributes.get("ironflow.rows") == 2
        ]
        assert len(groups) == (1 if size > 1 else 0)
    finally:
        app.stop()
