"""Effect types and honest metrics (issue 14 §2): the effect type in the claim, the
message and the task metrics' labels (bounded by the registered types), dispatch-to-start
measured from when a row became due, and the worker-start warning when ``-Q`` skips the
queues ironflow's tasks route to. Real PostgreSQL, Redis, relays and in-thread workers.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery.contrib.testing.worker import start_worker
from runtime_helpers import (
    TestApp,
    execute,
    insert_effect,
    insert_timer,
    running_app,
    scalar,
    test_config,
    wait_until,
)
from workflows import Mode, Start, TestWorkflow, TimerStart, TimerTestWorkflow

from ironflow_celery.engine import metrics
from ironflow_celery.engine.tasks import run_effect
from ironflow_celery.storage.store import PostgresStore

T = TestWorkflow.type
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BROKER = os.environ.get("IRONFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_claims_carry_the_effect_type_and_when_the_row_became_due(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = TestApp(store)
    app.service.execute(Start(id="c1", mode=Mode(mode="RouteResult")))
    execute(db, "UPDATE ironflow.outbox SET created_at = now() - interval '1 hour'")
    [row] = store.claim("effect", "relay#1", [T], lease_seconds=30, max_attempts=3)
    assert row.effect_type == "Process"
    assert row.due_at == row.created_at  # never attempted: due since its creation

    # a failed attempt's backoff ended 2 s ago: that is when the row became due again
    execute(
        db,
        "UPDATE ironflow.outbox SET attempts = 1, locked_by = 'run',"
        " locked_until = now() - interval '2 seconds'",
    )
    [retry] = store.claim("effect", "relay#2", [T], lease_seconds=30, max_attempts=3)
    age = scalar(db, "SELECT EXTRACT(EPOCH FROM now() - created_at) FROM ironflow.outbox")
    waited = scalar(
        db, "SELECT EXTRACT(EPOCH FROM now() - CAST(:due AS timestamptz))", due=retry.due_at
    )
    assert age > 3500 and 1.5 < waited < 60

    timer_id = insert_timer(db, T, "c1", {"type": "Ping", "id": "c1"}, delay=-5)
    [timer] = store.claim("timer", "relay#3", [T], lease_seconds=30, max_attempts=3)
    assert timer.id == timer_id and timer.effect_type == "Ping" and timer.due_at == timer.fire_at
    app.stop()


def test_task_metrics_are_labelled_with_the_registered_effect_type_only(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = TestApp(store, config=test_config())
    processed = {"kind": "effect", "workflow_type": T, "status": "processed"}
    before = sample("ironflow_task_results_total", effect_type="Process", **processed)
    app.service.execute(Start(id="m1", mode=Mode(mode="RouteResult")))
    insert_effect(db, T, "m2", {"type": f"Nope{uuid.uuid4().hex[:6]}"})  # not registered
    dead = {"kind": "effect", "workflow_type": T, "effect_type": "unknown"}
    dead_before = sample("ironflow_task_results_total", status="dead-lettered", **dead)

    deadline = time.monotonic() + 60
    finals = 0
    while finals < 2 and time.monotonic() < deadline:
        for row in store.claim("effect", "relay", [T], lease_seconds=30, max_attempts=3, limit=5):
            ref = f"{row.workflow_type}:{row.workflow_id}"
            result = run_effect(app.runtime, ref, str(row.id), row.attempts + 1, row.token)
            finals += result["status"] != "failed-will-retry"
        time.sleep(0.05)
    assert finals == 2
    assert sample("ironflow_task_results_total", effect_type="Process", **processed) == before + 1
    assert sample("ironflow_task_results_total", status="dead-lettered", **dead) == dead_before + 1
    # the unregistered tag never became a label
    names = {
        s.labels.get("effect_type") for family in metrics.REGISTRY.collect() for s in family.samples
    }
    assert not any(str(n).startswith("Nope") for n in names)
    app.stop()


def test_dispatch_to_start_of_a_retry_and_a_timer_is_measured_from_when_it_became_due(
    store: PostgresStore, db: sa.Engine
) -> None:
    """An hour-old effect's retry starts right after its short backoff, and a timer created
    an hour ago fires on time: neither is observed as an hour of dispatch latency."""
    effect = {"kind": "effect", "workflow_type": T, "effect_type": "Process"}
    timer = {"kind": "timer", "workflow_type": TimerTestWorkflow.type, "effect_type": "Timeout"}
    name = "ironflow_dispatch_to_start_seconds"
    before = {
        "effect": sample(f"{name}_count", **effect),
        "effect_fast": sample(f"{name}_bucket", le="60.0", **effect),
        "timer_fast": sample(f"{name}_bucket", le="60.0", **timer),
    }
    with running_app(store, relays=False) as app:
        # attempt 1 fails, attempt 2 (after a backoff of at most 0.2 s) succeeds
        app.service.execute(Start(id="d1", mode=Mode(mode="TransientFailure")))
        app.service.execute(TimerStart(id="d2", timeout_secs=1.0))
        execute(db, "UPDATE ironflow.outbox SET created_at = now() - interval '1 hour'"
                    " WHERE workflow_id = 'd1'")  # fmt: skip
        execute(db, "UPDATE ironflow.timers SET created_at = now() - interval '1 hour'")
        app.start_relays()
        app.wait_for_events(T, "d1", ["Started", "Completed"], timeout=120)
        assert sample(f"{name}_count", **effect) == before["effect"] + 2
        # the first attempt waited an hour since its creation (honestly); the retry did not
        assert sample(f"{name}_bucket", le="60.0", **effect) == before["effect_fast"] + 1
        app.wait_until(
            lambda: "TimedOut" in app.events(TimerTestWorkflow.type, "d2"), 120, "d2 timed out"
        )
        wait_until(
            lambda: sample(f"{name}_bucket", le="60.0", **timer) > before["timer_fast"], 30,
            what="the timer's dispatch observation",
        )  # fmt: skip
    assert sample(f"{name}_bucket", le="60.0", **timer) == before["timer_fast"] + 1


# -- -Q without routing ironflow's tasks there ----------------------------------------------


def test_a_worker_consuming_other_queues_warns_at_start(database_url: str, tmp_path: Path) -> None:
    """A real ``celery worker -Q other`` whose relay publishes to the default queue."""
    other = f"other-{uuid.uuid4().hex[:8]}"
    default = f"ironflow-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CELERY_BROKER_URL": BROKER,
        "CELERY_TASK_DEFAULT_QUEUE": default,
        "IRONFLOW_DATABASE_URL": database_url,
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [str(BIN / "celery"), "-A", "tests.e2e_apps.ops_app", "worker", "-P", "solo",
             "-Q", other, "-n", f"{other}@%h", "--without-mingle", "--without-gossip",
             "-l", "INFO"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: " ready." in log.read_text(errors="replace"), 90, what="worker ready")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
    text = log.read_text(errors="replace")
    [line] = [line for line in text.splitlines() if "ironflow: this worker consumes" in line]
    assert "WARNING" in line
    assert f"consumes {other}, but ironflow's tasks route to {default}," in line
    assert "ironflow.ops_demo.effect" in line and "ironflow.ops_demo.timer" in line
    assert "Error on stopping" not in text  # the check stops with the worker cleanly


def test_a_worker_without_relay_says_it_at_info_and_a_consuming_one_says_nothing(
    store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    app = TestApp(store)  # relay off: it may serve other queues on purpose
    other = f"other-{uuid.uuid4().hex[:8]}"
    for queues in ([other], [app.queue]):
        with (
            caplog.at_level(logging.INFO, logger="ironflow_celery.queue_check"),
            start_worker(app.app, pool="solo", queues=queues, perform_ping_check=False),
        ):
            pass
    records = [r for r in caplog.records if r.name == "ironflow_celery.queue_check"]
    assert len(records) == 1, [r.getMessage() for r in records]  # only the first worker
    assert records[0].levelno == logging.INFO
    assert f"consumes {other}, but ironflow's tasks route to {app.queue}," in (
        records[0].getMessage()
    )
    assert not [r for r in caplog.records if "ironflow queue check" in r.getMessage()]
    app.stop()


def test_messages_carry_the_effect_type_and_the_recorded_attempts_as_retries(
    store: PostgresStore,
) -> None:
    """What Flower shows comes from the message: kwargs name the effect type, and Celery's
    ``retries`` is the attempts the outbox had recorded (its own counter stays unused)."""
    from celery import signals as celery_signals

    seen: list[tuple[str, int, Any]] = []

    def on_prerun(sender: Any = None, task_id: Any = None, kwargs: Any = None, **kw: Any):
        if sender is not None and sender.name == f"ironflow.{T}.effect":
            seen.append((task_id, sender.request.retries, dict(kwargs or {})))

    celery_signals.task_prerun.connect(on_prerun, weak=False)
    try:
        with running_app(store) as app:
            app.service.execute(Start(id="k1", mode=Mode(mode="TransientFailure")))
            app.wait_for_events(T, "k1", ["Started", "Completed"], timeout=120)
    finally:
        celery_signals.task_prerun.disconnect(on_prerun)
    mine = [s for s in seen if s[2].get("lease")]
    assert [retries for _, retries, _ in mine] == [0, 1]  # attempt 1 failed, 2 succeeded
    assert {kwargs["effect_type"] for _, _, kwargs in mine} == {"Process"}
    assert all(isinstance(kwargs["due"], float) for _, _, kwargs in mine)


def test_per_type_queues_route_every_task_the_engine_registers(
    database_url: str, tmp_path: Path
) -> None:
    """``ironflow_queue_per_workflow_type``: every task the engine registers goes to
    ``ironflow.<type>`` (the old batch task ``ironflow.<type>.effects`` went to the default
    queue, where a worker started with ``-Q ironflow.<type>`` never ran it); groups now
    travel in the ``.effect`` task itself, so there is no separate batch task to route. The
    queue check and ``workflows list --json`` name the same tasks."""
    from celery import Celery

    from ironflow_celery import install
    from ironflow_celery.engine.runtime import runtime_of
    from ironflow_celery.integration.queue_check import routed_queues
    from tests.e2e_apps.batch_app import BatchWorkflow, handle_job

    app = Celery("per_type", broker="memory://", set_as_current=False)
    app.conf.ironflow_queue_per_workflow_type = True
    app.conf.ironflow_database_url = database_url
    install(app, workflows=[(BatchWorkflow, handle_job)])
    wt = BatchWorkflow.type
    for suffix in ("execute", "effect", "timer"):
        queue = app.amqp.router.route({}, f"ironflow.{wt}.{suffix}")["queue"]
        assert queue.name == f"ironflow.{wt}", suffix
    assert f"ironflow.{wt}.effects" not in app.tasks  # no parallel batch task any more
    assert routed_queues(runtime_of(app)) == {
        f"ironflow.{wt}": [f"ironflow.{wt}.effect", f"ironflow.{wt}.timer"]
    }
    listed = subprocess.run(
        [str(BIN / "ironflow-celery"), "-A", "tests.e2e_apps.batch_app:app", "workflows", "list",
         "--json"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "IRONFLOW_DATABASE_URL": database_url,
             "BATCH_TEST_APP": "1", "CELERY_IRONFLOW_QUEUE_PER_WORKFLOW_TYPE": "true"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert f"ironflow.{wt}.effect" in listed.stdout and f"ironflow.{wt}.timer" in listed.stdout
