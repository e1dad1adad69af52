"""Prometheus metrics of relays and tasks (prometheus-client), served on a port by the
worker or relay process when ``ironflow_metrics_port`` is set.

Counters and histograms are process-local, as Prometheus expects; gauges of outbox and
timer depth are read from PostgreSQL at scrape time by a collector. Under Celery's
prefork pool the tasks run in pool processes: set ``PROMETHEUS_MULTIPROC_DIR`` (an empty
directory, prometheus-client's multiprocess mode) and the endpoint serves every process's
counters, aggregated.
"""

from __future__ import annotations

import os
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CLAIM_BATCH = Histogram(
    "ironflow_claim_batch_size",
    "Rows claimed per claim statement",
    ["kind"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    registry=REGISTRY,
)
UNKNOWN = "unknown"
"""The label of a workflow or effect type that is not registered (keeps labels bounded)."""

DISPATCH_LATENCY = Histogram(
    "ironflow_dispatch_to_start_seconds",
    "From when the row became due (created, its backoff ended, its timer fired) to its "
    "handler starting",
    ["kind", "workflow_type", "effect_type"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
HANDLER_DURATION = Histogram(
    "ironflow_handler_duration_seconds",
    "Effect handler / timer execution time, ack included",
    ["kind", "workflow_type", "effect_type"],
    registry=REGISTRY,
)
TASK_RESULTS = Counter(
    "ironflow_task_results_total",
    "Effect and timer task results by status",
    ["kind", "workflow_type", "effect_type", "status"],
    registry=REGISTRY,
)
ACK_FAILURES = Counter(
    "ironflow_ack_failures_total",
    "Acknowledgements that could not be written (database errors)",
    ["kind"],
    registry=REGISTRY,
)
RELAY_IN_FLIGHT = Gauge(
    "ironflow_relay_in_flight",
    "Rows a relay dispatched that are not finished yet",
    ["kind"],
    registry=REGISTRY,
    multiprocess_mode="livesum",  # multiprocess mode: the sum over live processes
)
RELAY_RESTARTS = Counter(
    "ironflow_relay_restarts_total",
    "Times a worker restarted its relay (or projections) process or thread after it died",
    ["service"],
    registry=REGISTRY,
)
RELAY_UP = Gauge(
    "ironflow_relay_up",
    "1 while a worker's relay (or projections) process or thread runs, 0 after it died",
    ["service"],
    registry=REGISTRY,
    multiprocess_mode="livemax",  # the worker process sets it; its children leave it 0
)


def multiprocess_dir() -> str | None:
    """prometheus-client's multiprocess directory, when that mode is on (decided by the
    environment before the first metric is created, as prometheus-client requires)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _prepare_multiprocess_dir() -> None:
    """Create the multiprocess directory if it is set and missing: every sample of this
    module's metrics (tasks, relays) would otherwise fail to write."""
    path = multiprocess_dir()
    if path:
        os.makedirs(path, exist_ok=True)


_prepare_multiprocess_dir()  # at import, like prometheus-client's own choice of mode


def process_exiting(pid: int | None = None) -> None:
    """A pool or relay process is exiting: drop its live gauges (multiprocess mode only)."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid if pid is not None else os.getpid())


def relay_restarted(service: str, count: int = 1) -> None:
    """The worker restarted its `service` ("relay", "projections") after it died (0: the
    service started, so its series exists before the first restart)."""
    RELAY_RESTARTS.labels(service).inc(count)


def relay_up(service: str, up: bool) -> None:
    """The worker's `service` started (True) or ended (False)."""
    RELAY_UP.labels(service).set(1 if up else 0)
# The effect-type label of the task this thread (or greenlet) runs, from `task_started` to
# `task_finished`, so the ack path's many outcomes need not each carry it.
_effect_type: ContextVar[str] = ContextVar("ironflow_metrics_effect_type", default=UNKNOWN)


class Metrics:
    """What the ack path and relays report; cheap enough for every task."""

    def task_started(
        self,
        kind: str,
        workflow_type: str,
        due_at: datetime | None,
        effect_type: str | None = None,
    ) -> None:
        """A handler starts; `due_at` is when its row became due (None: not known).
        `effect_type` must already be bounded (a registered tag, else `UNKNOWN`)."""
        label = effect_type or UNKNOWN
        _effect_type.set(label)
        if due_at is not None:
            lag = (datetime.now(UTC) - due_at).total_seconds()
            DISPATCH_LATENCY.labels(kind, workflow_type, label).observe(max(lag, 0.0))

    def task_finished(
        self,
        kind: str,
        workflow_type: str | None,
        status: str,
        began: float | None,
        effect_type: str | None = None,
    ) -> None:
        """A task ended with `status`; the effect type defaults to `task_started`'s."""
        wt = workflow_type or UNKNOWN
        label = effect_type or (_effect_type.get() if workflow_type else UNKNOWN)
        _effect_type.set(UNKNOWN)  # consumed: the thread's next task starts unlabelled
        TASK_RESULTS.labels(kind, wt, label, status).inc()
        if began is not None:
            HANDLER_DURATION.labels(kind, wt, label).observe(time.monotonic() - began)

    def claimed(self, kind: str, count: int) -> None:
        CLAIM_BATCH.labels(kind).observe(count)

    def ack_failed(self, kind: str) -> None:
        ACK_FAILURES.labels(kind).inc()

    def in_flight(self, kind: str, count: int) -> None:
        RELAY_IN_FLIGHT.labels(kind).set(count)


# -- depth read from PostgreSQL at scrape time, and the HTTP endpoint --------------------


class DepthCollector:
    """Outbox and timer depth per workflow type and state, and dead-letter counts, read
    with `ironflow_celery.status.queue_status` at each scrape."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def describe(self) -> list[Any]:
        return list(self._families().values())

    def _families(self) -> dict[str, Any]:
        from prometheus_client.core import GaugeMetricFamily

        return {
            "outbox": GaugeMetricFamily(
                "ironflow_outbox_rows",
                "Unprocessed outbox rows by workflow type and state "
                "(pending, in_flight, backing_off, dead)",
                labels=["workflow_type", "state"],
            ),
            "timers": GaugeMetricFamily(
                "ironflow_timer_rows",
                "Unprocessed timers by workflow type and state "
                "(due, pending, in_flight, backing_off, dead)",
                labels=["workflow_type", "state"],
            ),
            "dead": GaugeMetricFamily(
                "ironflow_dead_letters",
                "Dead-lettered effects and timers by kind and workflow type",
                labels=["kind", "workflow_type"],
            ),
            "age": GaugeMetricFamily(
                "ironflow_oldest_pending_age_seconds",
                "Age of the oldest live effect / lag of the most overdue timer",
                labels=["kind", "workflow_type"],
            ),
            "up": GaugeMetricFamily(
                "ironflow_database_up", "1 when the depth query succeeded at this scrape"
            ),
            "projection_lag": GaugeMetricFamily(
                "ironflow_projection_lag_events",
                "Events a projection has not processed yet (behind the newest stored event)",
                labels=["projection"],
            ),
            "projection_failing": GaugeMetricFamily(
                "ironflow_projection_failing",
                "1 while a projection is stopped at an event its handler keeps failing on",
                labels=["projection"],
            ),
        }

    def collect(self) -> Any:
        from .errors import IronflowError
        from .projections import projection_status
        from .status import queue_status

        families = self._families()
        try:
            runtime = self.runtime
            rows = queue_status(
                runtime.store,
                max_attempts=runtime.attempt_limits,
                workflow_types=tuple(runtime.registry.types),
            )
            projections = projection_status(runtime.store)
        except IronflowError:
            families["up"].add_metric([], 0)
            yield families["up"]
            return
        for row in rows:
            wt, e, t = row.workflow_type, row.effects, row.timers
            for state in ("pending", "in_flight", "backing_off", "dead"):
                families["outbox"].add_metric([wt, state], getattr(e, state))
            for state in ("due", "pending", "in_flight", "backing_off", "dead"):
                families["timers"].add_metric([wt, state], getattr(t, state))
            families["dead"].add_metric(["effect", wt], e.dead)
            families["dead"].add_metric(["timer", wt], t.dead)
            families["age"].add_metric(["effect", wt], e.oldest_pending_age or 0.0)
            families["age"].add_metric(["timer", wt], t.oldest_due_age or 0.0)
        for p in projections:
            families["projection_lag"].add_metric([p["name"]], p["lag"])
            families["projection_failing"].add_metric([p["name"]], int(p["status"] == "failing"))
        families["up"].add_metric([], 1)
        yield from families.values()


_server: Any = None
_collector: DepthCollector | None = None


def serve_metrics(runtime: Any, port: int, addr: str = "0.0.0.0") -> Any:
    """Serve `REGISTRY` (with the depth collector for `runtime`) on `port`; once per
    process (a second call re-points the collector and returns the running server).

    In multiprocess mode the endpoint serves the samples every process wrote to
    ``PROMETHEUS_MULTIPROC_DIR`` (this one's included) instead of `REGISTRY`."""
    global _server, _collector
    from prometheus_client import start_http_server

    if _server is not None:
        if _collector is not None:
            _collector.runtime = runtime
        return _server
    registry = REGISTRY
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server = start_http_server(port, addr=addr, registry=registry)  # OSError: port in use
    _collector = DepthCollector(runtime)
    registry.register(_collector)
    _server = server
    return _server


def serve_metrics_from_settings(runtime: Any, conf: Any) -> Any:
    """`serve_metrics` on ``ironflow_metrics_port`` / ``IRONFLOW_METRICS_PORT``; off when
    unset. A port already in use is logged, not fatal (e.g. several workers on one host)."""
    import logging

    from .config import setting

    port = setting(conf, "metrics_port", int)
    if not port:
        return None
    try:
        return serve_metrics(runtime, port)
    except OSError as exc:
        logging.getLogger(__name__).warning(
            "ironflow: cannot serve metrics on port %s: %s", port, exc
        )
        return None
