"""Routing and deploys that match Celery's habits (issue 23 §3).

- With per-type queues, the operations tasks (``ironflow.dead_letters.*``,
  ``ironflow.cancel.*``, ``ironflow.retention.*``, ``ironflow.inspect.*``) go to
  ``ironflow.operations`` (they sat in the default queue that per-type workers never read),
  the app's own routes win, and the start-up queue check names them.
- A worker that shares a queue but lacks the workflow's tasks (deployed before it, or
  without ironflow) is found by the relay's check and logged at ERROR.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from runtime_helpers import BROKER_URL, delete_queue

from ironflow_celery import install
from ironflow_celery.integration.queue_check import check_unregistered, unregistered_consumers
from ironflow_celery.model.tasknames import OPERATIONS_QUEUE, is_operations_task
from tests.e2e import (
    REDIS_URL,
    Processes,
    make_env,
    redis_queue_cleanup,
)
from tests.e2e_apps.ops_app import OpsDemoWorkflow

T = OpsDemoWorkflow.type


def per_type_app(database_url: str, **conf: Any) -> Celery:
    app = Celery(f"routing-{uuid.uuid4().hex[:6]}", broker=BROKER_URL, set_as_current=False)
    app.conf.update(
        ironflow_queue_per_workflow_type=True,
        ironflow_relay_enabled=False,
        result_backend=BROKER_URL,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        **conf,
    )
    install(app, workflows=[OpsDemoWorkflow], database_url=database_url)
    return app


def queue_of(app: Celery, name: str) -> str:
    return app.amqp.router.route({}, name)["queue"].name


def test_operations_tasks_route_to_their_queue_and_the_check_names_them(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = per_type_app(database_url)
    operations = sorted(n for n in app.tasks if is_operations_task(n))
    # every task install() registers is per-type or an operations task: none is forgotten
    assert not [n for n in app.tasks if n.startswith("ironflow.") and not n.startswith(
        f"ironflow.{T}.") and n not in operations]  # fmt: skip
    assert {n.rsplit(".", 1)[0] for n in operations} == {
        "ironflow.dead_letters", "ironflow.cancel", "ironflow.retention", "ironflow.inspect"
    }  # fmt: skip
    assert {queue_of(app, n) for n in operations} == {OPERATIONS_QUEUE}
    assert queue_of(app, f"ironflow.{T}.effect") == f"ironflow.{T}"
    # the app's own route for them wins
    mine = per_type_app(database_url, task_routes={"ironflow.dead_letters.*": {"queue": "ops"}})
    assert queue_of(mine, "ironflow.dead_letters.retry") == "ops"
    assert queue_of(mine, "ironflow.cancel.row") == OPERATIONS_QUEUE

    # a worker that reads only its type's queue is told at start
    with (
        caplog.at_level(logging.INFO, logger="ironflow_celery.queue_check"),
        start_worker(app, pool="threads", queues=[f"ironflow.{T}"], perform_ping_check=False),
    ):
        pass
    [record] = [r for r in caplog.records if r.name == "ironflow_celery.queue_check"]
    text = record.getMessage()
    assert f"{OPERATIONS_QUEUE}: ironflow.cancel.*, ironflow.dead_letters.*" in text, text
    assert "ironflow.inspect.*" in text and "ironflow.retention.*" in text

    # a worker that also reads ironflow.operations answers an operator's call
    caplog.clear()
    try:
        with (
            caplog.at_level(logging.INFO, logger="ironflow_celery.queue_check"),
            start_worker(
                app,
                pool="threads",
                queues=[f"ironflow.{T}", OPERATIONS_QUEUE],
                perform_ping_check=False,
            ),
        ):
            result = app.tasks["ironflow.dead_letters.count"].delay()
            assert result.get(timeout=120) == {"kind": "effect", "count": 0}
        assert not [r for r in caplog.records if r.name == "ironflow_celery.queue_check"]
    finally:
        delete_queue(OPERATIONS_QUEUE)
        delete_queue(f"ironflow.{T}")


def test_the_relay_names_a_worker_that_would_reject_its_messages_as_unregistered(
    database_url: str,
    procs: Processes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = f"unreg-{uuid.uuid4().hex[:10]}"
    env = make_env(database_url, REDIS_URL, queue)
    with redis_queue_cleanup(queue):
        old = procs.worker("old", env, pool="solo", app="tests.e2e_apps.no_ironflow_app")
        new = procs.worker("new", env, pool="solo", relay=False, app="tests.e2e_apps.ops_app")
        old.wait_for_output("ready.", 120)
        new.wait_for_output("ready.", 120)
        app = Celery("relay-side", broker=REDIS_URL, set_as_current=False)
        app.conf.update(task_default_queue=queue, ironflow_relay_enabled=False)
        install(app, workflows=[OpsDemoWorkflow], database_url=database_url)

        found = unregistered_consumers(app, [T], timeout=5)
        assert [w.split("@")[0].rsplit("-", 1)[0] for w in found] == ["old"], found
        [(worker, queues)] = found.items()
        assert queues == {queue: [f"ironflow.{T}.effect", f"ironflow.{T}.timer"]}
        with caplog.at_level(logging.ERROR, logger="ironflow_celery.queue_check"):
            assert check_unregistered(app, [T], timeout=5) == 1
        [record] = [r for r in caplog.records if r.name == "ironflow_celery.queue_check"]
        assert worker in record.getMessage() and "rejects" in record.getMessage()
        assert f"ironflow.{T}.effect" in record.getMessage()
