"""Prometheus metrics of relays and tasks (prometheus-client): the counters, histograms and
gauges the engine updates. `ironflow_celery.operations.metrics_endpoint` serves them.

Counters and histograms are process-local, as Prometheus expects; gauges of outbox and
timer depth are read from PostgreSQL at scrape time by that endpoint's collector. Under Celery's
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

__all__ = [
    "ACK_FAILURES",
    "CLAIM_BATCH",
    "DISPATCH_LATENCY",
    "HANDLER_DURATION",
    "REGISTRY",
    "RELAY_IN_FLIGHT",
    "RELAY_RESTARTS",
    "RELAY_UP",
    "TASK_RESULTS",
    "UNKNOWN",
    "Metrics",
    "RowMeter",
    "multiprocess_dir",
    "process_exiting",
    "relay_restarted",
    "relay_up",
]

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

        # prometheus_client's multiprocess module has no annotations
        multiprocess.mark_process_dead(pid if pid is not None else os.getpid())  # type: ignore[no-untyped-call]


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


class RowMeter:
    """The metrics of one run's rows (a group's, or a single row's), as `Metrics` reports
    them row by row: each row's dispatch lag and duration observed, its result counted.
    Label look-ups are made once per label set per run, and result counts are added once
    per label set when `flush` is called (by each acknowledgement): per-row look-ups and
    increments were a tenth of a grouped row's cost. Not shared between threads: one run
    observes starts on its own thread and finishes under its completer's lock."""

    __slots__ = ("_counts", "_dispatch", "_duration")

    def __init__(self) -> None:
        self._dispatch: dict[tuple[str, str, str], Any] = {}
        self._duration: dict[tuple[str, str, str], Any] = {}
        self._counts: dict[tuple[str, str, str, str], int] = {}

    def started(self, kind: str, workflow_type: str, due: float | None, label: str) -> None:
        """A row's handler starts; `due`: when its row became due (epoch seconds, None:
        not known). `label` must already be bounded (a registered tag, else `UNKNOWN`)."""
        if due is None:
            return
        key = (kind, workflow_type, label)
        child = self._dispatch.get(key)
        if child is None:
            child = self._dispatch[key] = DISPATCH_LATENCY.labels(*key)
        child.observe(max(time.time() - due, 0.0))

    def finished(
        self, kind: str, workflow_type: str, status: str, began: float | None, label: str
    ) -> None:
        """A row ended with `status` (counted at the next `flush`); `began`: when its
        handler started (monotonic clock), its duration observed now."""
        counted = (kind, workflow_type, label, status)
        self._counts[counted] = self._counts.get(counted, 0) + 1
        if began is not None:
            key = (kind, workflow_type, label)
            child = self._duration.get(key)
            if child is None:
                child = self._duration[key] = HANDLER_DURATION.labels(*key)
            child.observe(time.monotonic() - began)

    def flush(self) -> None:
        """Add the results counted since the last flush."""
        counts, self._counts = self._counts, {}
        for key, count in counts.items():
            TASK_RESULTS.labels(*key).inc(count)


class Metrics:
    """What the ack path and relays report; cheap enough for every task."""

    def meter(self) -> RowMeter:
        """The meter of one run's rows (see `RowMeter`)."""
        return RowMeter()

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
