"""OpenTelemetry: one trace from an executed input to its follow-up (issue 14 §3).

Uses ``opentelemetry-api`` only (the ``otel`` extra); without it every function here is a
cheap no-op. The application configures the SDK and exporters as usual.

How the context travels:

1. ``service.execute`` runs in a span (``ironflow.execute <type>``), a child of whatever
   span is current (a web request, a Celery task). The effects and timers it writes store
   that span's context (the W3C ``traceparent``/``tracestate`` carrier, as JSON) in
   ``outbox.celery_trace_context`` / ``timers.celery_trace_context``.
2. The relay publishes each row with that context current and in the message headers, so
   ``opentelemetry-instrumentation-celery``'s publish span (and through it, its task span
   in the worker) joins the input's trace; without the instrumentation, the headers alone
   carry it.
3. The task runs the handler and its acknowledgement in a span (``ironflow.effect <type>``
   / ``ironflow.timer <type>``): a child of the instrumentation's task span when there is
   one, else of the context in the message headers. The follow-up input executes inside
   it, and its effects store the same trace again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

__all__ = [
    "AVAILABLE",
    "attached",
    "configured",
    "current_carrier",
    "headers_of",
    "record_outcome",
    "row_span",
    "span",
    "task_span",
]

try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is optional
    _trace = None  # type: ignore[assignment]

AVAILABLE = _trace is not None
"""True when ``opentelemetry-api`` is importable."""

_TRACER_NAME = "ironflow_celery"


def configured() -> bool:
    """Whether spans made here can record: opentelemetry-api is importable and the
    application has set a tracer provider (an SDK). Until then the API hands out spans that
    record nothing and only carry their parent's context, which `current_carrier` reads
    just as well without them: a span per input would only cost time (~50 µs of CPU)."""
    if not AVAILABLE:
        return False
    provider = _trace.get_tracer_provider()
    return not isinstance(provider, (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider))


def current_carrier() -> str | None:
    """The current trace context as a JSON carrier to store with a row, or None."""
    if not AVAILABLE or not _trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return json.dumps(carrier, separators=(",", ":")) if carrier else None


def headers_of(stored: str | None) -> dict[str, str] | None:
    """A stored carrier as message headers (``traceparent``, …), or None."""
    if not stored:
        return None
    try:
        carrier = json.loads(stored)
    except ValueError:
        return None  # a column someone else wrote: never fail a publish over it
    if not isinstance(carrier, dict):
        return None
    return {str(k): str(v) for k, v in carrier.items() if isinstance(v, str)} or None


def attached(headers: Mapping[str, str] | None) -> Any:
    """A context manager making `headers`' trace context current (for a publish)."""
    if not AVAILABLE or not headers:
        return nullcontext()
    return _attach(_propagate.extract(dict(headers)))


@contextmanager
def _attach(ctx: Any) -> Iterator[None]:
    token = _context.attach(ctx)
    try:
        yield
    finally:
        _context.detach(token)


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A span (child of the current one) around a block; yields None without OTel."""
    if not AVAILABLE:
        yield None
        return
    tracer = _trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(name, attributes=dict(attributes or {})) as current:
        yield current


def task_span(
    name: str, request: Any, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Any]:
    """The span of an ironflow task: a child of the instrumentation's task span when one
    is current, else of the trace context in the message headers (``request``); started
    when called, current while the block runs."""
    if not AVAILABLE:
        return nullcontext()
    parent = None
    kind = _trace.SpanKind.INTERNAL
    if not _trace.get_current_span().get_span_context().is_valid:
        carrier = {
            key: value
            for key in ("traceparent", "tracestate")
            if isinstance(value := getattr(request, key, None), str)
        }
        if carrier:
            parent = _propagate.extract(carrier)
            kind = _trace.SpanKind.CONSUMER
    return _current_span(name, parent, kind, attributes)


def row_span(
    name: str, stored: str | None, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Any]:
    """The span of one row of a group: a child of the trace that wrote the row (its stored
    carrier), so each row keeps its own trace whatever travelled with it; without a
    stored context, a child of the current (group) span. Started when called."""
    if not AVAILABLE:
        return nullcontext()
    headers = headers_of(stored)
    parent = _propagate.extract(headers) if headers else None
    return _current_span(name, parent, _trace.SpanKind.INTERNAL, attributes)


_tracer: Any = None


def _current_span(
    name: str, parent: Any, kind: Any, attributes: Mapping[str, Any] | None
) -> AbstractContextManager[Any]:
    """A new span, current while the block runs and ended after it (with an escaping
    exception recorded), as ``start_as_current_span`` makes it: every row of a group runs
    in one, and the tracer look-up and two wrapping context managers were two thirds of
    its cost. The tracer is looked up once per process: a proxy until the application
    sets its provider, which it then follows (a global provider is set once only)."""
    global _tracer
    if _tracer is None:
        _tracer = _trace.get_tracer(_TRACER_NAME)
    current = _tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
    return _trace.use_span(current, end_on_exit=True)


def record_outcome(current: Any, result: Mapping[str, Any]) -> None:
    """Put a task's outcome on its span; a failed or dead-lettered attempt is an error."""
    if current is None or not current.is_recording():
        return
    status = str(result.get("status", ""))
    current.set_attribute("ironflow.status", status)
    if status in ("failed-will-retry", "dead-lettered"):
        error = str(result.get("error", status))
        current.set_status(_trace.Status(_trace.StatusCode.ERROR, error))
