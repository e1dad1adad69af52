"""The metrics endpoint: the engine's Prometheus metrics served on a port by the worker or
relay process when ``ironflow_metrics_port`` is set, with outbox, timer, dead-letter and
projection gauges read from PostgreSQL at each scrape (`DepthCollector`)."""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily

from ironflow_celery.engine.host import RuntimeView
from ironflow_celery.engine.metrics import REGISTRY, multiprocess_dir
from ironflow_celery.errors import IronflowError
from ironflow_celery.model.settings import read_settings
from ironflow_celery.operations.projections import projection_status
from ironflow_celery.operations.status import queue_status

__all__ = ["DepthCollector", "serve_metrics", "serve_metrics_from_settings"]

log = logging.getLogger("ironflow_celery.metrics")


class DepthCollector:
    """Outbox and timer depth per workflow type and state, and dead-letter counts, read
    with `ironflow_celery.operations.status.queue_status` at each scrape."""

    def __init__(self, runtime: RuntimeView) -> None:
        self.runtime = runtime

    def describe(self) -> list[Any]:
        return list(self._families().values())

    def _families(self) -> dict[str, Any]:
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


def serve_metrics(runtime: RuntimeView, port: int, addr: str = "0.0.0.0") -> Any:
    """Serve `REGISTRY` (with the depth collector for `runtime`) on `port`; once per
    process (a second call re-points the collector and returns the running server).

    In multiprocess mode the endpoint serves the samples every process wrote to
    ``PROMETHEUS_MULTIPROC_DIR`` (this one's included) instead of `REGISTRY`."""
    global _server, _collector
    if _server is not None:
        if _collector is not None:
            _collector.runtime = runtime
        return _server
    registry = REGISTRY
    if multiprocess_dir():
        registry = CollectorRegistry()
        # prometheus_client's multiprocess module has no annotations
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server = start_http_server(port, addr=addr, registry=registry)  # OSError: port in use
    _collector = DepthCollector(runtime)
    registry.register(_collector)
    _server = server
    httpd = server[0] if isinstance(server, tuple) else server
    # Said at worker start (the relay process starts it), so operators need not guess
    # which of several workers on a host got the port.
    log.info(
        "ironflow: metrics endpoint listening on http://%s:%s/metrics (pid %d%s)",
        addr,
        getattr(httpd, "server_port", port),
        os.getpid(),
        ", multiprocess mode" if multiprocess_dir() else "",
    )
    return _server


def serve_metrics_from_settings(runtime: RuntimeView, conf: Any) -> Any:
    """`serve_metrics` on ``ironflow_metrics_port`` / ``IRONFLOW_METRICS_PORT``; off when
    unset. A port already in use is logged, not fatal (e.g. several workers on one host)."""
    port = read_settings(conf)["metrics_port"]
    if not port:
        return None
    try:
        return serve_metrics(runtime, port)
    except OSError as exc:
        log.warning("ironflow: cannot serve metrics on port %s: %s", port, exc)
        return None
