"""Metrics: the HTTP endpoint serves the process's counters and the depth read from
PostgreSQL at scrape time."""

from __future__ import annotations

import socket
import threading
import urllib.request

import sqlalchemy as sa
from celery import Celery
from ops_helpers import MAX_ATTEMPTS, insert_row

from ironflow_celery import install
from ironflow_celery.operations import metrics_endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_endpoint_serves_depth_and_process_metrics(database_url, db):
    app = Celery("metrics-test", broker="memory://", set_as_current=False)
    port = free_port()
    app.conf.update(
        ironflow_max_attempts=MAX_ATTEMPTS, ironflow_metrics_port=port, ironflow_relay_enabled=False
    )
    runtime = install(app, database_url=database_url)
    for _ in range(2):
        insert_row(db, workflow_type="orders")  # dead
    insert_row(db, workflow_type="orders", attempts=0, dead=False, age_seconds=5)  # pending
    insert_row(db, "timer", workflow_type="orders", attempts=0, dead=False, fire_in_seconds=60)
    with db.begin() as conn:  # one healthy projection, one stuck on a poison event
        conn.execute(
            sa.text(
                "INSERT INTO ironflow.projection_positions (projection_name, last_sequence, "
                "updated_at, last_error, failed_sequence, failed_at) VALUES "
                "('healthy', 0, now(), NULL, NULL, NULL), "
                "('stuck', 0, now(), 'RuntimeError: boom', 1, now())"
            )
        )
    runtime.metrics.task_finished("effect", "orders", "processed", None)
    runtime.metrics.ack_failed("effect")
    runtime.metrics.in_flight("effect", 4)
    server = metrics_endpoint.serve_metrics_from_settings(runtime, app.conf)
    assert server is not None
    body = scrape(server[0].server_port)  # once per process: an earlier test's port is kept
    assert 'ironflow_outbox_rows{state="dead",workflow_type="orders"} 2.0' in body
    assert 'ironflow_outbox_rows{state="pending",workflow_type="orders"} 1.0' in body
    assert 'ironflow_timer_rows{state="pending",workflow_type="orders"} 1.0' in body
    assert 'ironflow_dead_letters{kind="effect",workflow_type="orders"} 2.0' in body
    assert "ironflow_oldest_pending_age_seconds" in body
    assert "ironflow_database_up 1.0" in body
    assert 'ironflow_projection_failing{projection="stuck"} 1.0' in body
    assert 'ironflow_projection_failing{projection="healthy"} 0.0' in body
    assert 'ironflow_projection_lag_events{projection="healthy"} 0.0' in body
    for name in (
        "ironflow_task_results_total",
        "ironflow_ack_failures_total",
        "ironflow_relay_in_flight",
        "ironflow_claim_batch_size",
        "ironflow_dispatch_to_start_seconds",
        "ironflow_handler_duration_seconds",
    ):
        assert name in body, name
    assert 'ironflow_relay_in_flight{kind="effect"} 4.0' in body


def test_relay_run_starts_the_endpoint(database_url):
    """`WorkflowRuntime.run` (worker bootstep and ``relay`` command) serves the metrics."""
    app = Celery("metrics-run", broker="memory://", set_as_current=False)
    app.conf.update(ironflow_metrics_port=free_port(), ironflow_relay_enabled=False)
    runtime = install(app, database_url=database_url)
    stop = threading.Event()
    thread = threading.Thread(target=runtime.run, args=(stop,), daemon=True)
    thread.start()
    try:
        import time

        deadline = time.monotonic() + 60
        # One server per process: an earlier test's may exist; wait until run() points
        # the depth collector at this runtime.
        while time.monotonic() < deadline and (
            metrics_endpoint._server is None
            or metrics_endpoint._collector is None
            or metrics_endpoint._collector.runtime is not runtime
        ):
            time.sleep(0.05)
        assert metrics_endpoint._server is not None
        body = scrape(metrics_endpoint._server[0].server_port)
        assert "ironflow_database_up 1.0" in body
    finally:
        stop.set()
        thread.join(10)
