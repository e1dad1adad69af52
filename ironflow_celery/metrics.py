"""Prometheus metrics of relays and tasks (prometheus-client), served on a port by the
worker or relay process when ``ironflow_metrics_port`` is set.

Counters and histograms are process-local, as Prometheus expects; gauges of outbox and
timer depth are read from PostgreSQL at scrape time by a collector.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CLAIM_BATCH = Histogram(
    "ironflow_claim_batch_size",
    "Rows claimed per claim statement",
    ["kind"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    registry=REGISTRY,
)
DISPATCH_LATENCY = Histogram(
    "ironflow_dispatch_to_start_seconds",
    "From the effect row's creation (decision commit) to its handler starting",
    ["workflow_type"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
HANDLER_DURATION = Histogram(
    "ironflow_handler_duration_seconds",
    "Effect handler / timer execution time, ack included",
    ["kind", "workflow_type"],
    registry=REGISTRY,
)
TASK_RESULTS = Counter(
    "ironflow_task_results_total",
    "Effect and timer task results by status",
    ["kind", "workflow_type", "status"],
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
)


class Metrics:
    """What the ack path and relays report; cheap enough for every task."""

    def task_started(self, kind: str, workflow_type: str, created_at: datetime | None) -> None:
        if created_at is not None:
            lag = (datetime.now(UTC) - created_at).total_seconds()
            DISPATCH_LATENCY.labels(workflow_type).observe(max(lag, 0.0))

    def task_finished(
        self, kind: str, workflow_type: str | None, status: str, began: float | None
    ) -> None:
        wt = workflow_type or "unknown"
        TASK_RESULTS.labels(kind, wt, status).inc()
        if began is not None:
            HANDLER_DURATION.labels(kind, wt).observe(time.monotonic() - began)

    def claimed(self, kind: str, count: int) -> None:
        CLAIM_BATCH.labels(kind).observe(count)

    def ack_failed(self, kind: str) -> None:
        ACK_FAILURES.labels(kind).inc()

    def in_flight(self, kind: str, count: int) -> None:
        RELAY_IN_FLIGHT.labels(kind).set(count)
