"""Worker start check: are the queues ironflow's tasks route to consumed by this worker?

A worker started with ``-Q`` (or ``task_queues``) that does not read the queue its relay
publishes effects to starts silently, and every effect then waits out its dispatch
timeout in a queue nobody reads. The same holds for the operations tasks
(``ironflow.dead_letters.*``, ``ironflow.cancel.*``, …) an operator calls: they would wait
unanswered. The check logs a WARNING naming both sides.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

from ironflow_celery.engine.runtime import runtime_of
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.tasknames import is_operations_task, task_names_for

__all__ = [
    "QueueCheckStep",
    "check_unregistered",
    "operations_queues",
    "routed_queues",
    "start_unregistered_watch",
    "task_names_of",
    "unconsumed_queues",
    "unregistered_consumers",
]

log = logging.getLogger("ironflow_celery.queue_check")


def task_names_of(workflow: Any) -> dict[str, str]:
    """The tasks the engine registers for `workflow`, by suffix (`model.tasknames`): the
    batch task ``effects`` only for a type with an ``effect_batch_size``."""
    names = task_names_for(workflow.type)
    if getattr(workflow, "effect_batch_size", None) is None:
        names.pop("effects")
    return names


def routed_queues(app: Any, workflow_types: list[str]) -> dict[str, list[str]]:
    """The queue each ironflow task a relay publishes routes to: ``{queue: [task, …]}``.

    Effects, timers, and the batch task of the types that have one."""
    queues: dict[str, list[str]] = {}
    runtime = runtime_of(app)
    for workflow_type in workflow_types:
        published = dict(task_names_of(runtime.registry.get(workflow_type).workflow))
        published.pop("execute")  # submitted by users, not by a relay
        for name in published.values():
            queues.setdefault(_queue_of(app, name), []).append(name)
    return queues


def _queue_of(app: Any, name: str) -> str:
    queue = app.amqp.router.route({}, name).get("queue")
    return str(getattr(queue, "name", queue) or app.conf.task_default_queue)


def operations_queues(app: Any) -> dict[str, list[str]]:
    """The queue each operations task registered on `app` routes to: ``{queue: [task, …]}``
    (`model.tasknames.OPERATIONS_PREFIXES`)."""
    queues: dict[str, list[str]] = {}
    for name in sorted(app.tasks):
        if is_operations_task(name):
            queues.setdefault(_queue_of(app, name), []).append(name)
    return queues


def unconsumed_queues(
    app: Any, workflow_types: list[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """(ironflow queues this worker does not consume, with their tasks; the queues it does):
    the relay's tasks and the operations tasks."""
    consumed = sorted(app.amqp.queues.consume_from)
    routed = routed_queues(app, workflow_types)
    for queue, names in operations_queues(app).items():
        routed.setdefault(queue, []).extend(names)
    return {q: tasks for q, tasks in routed.items() if q not in consumed}, consumed


def _shown(tasks: list[str]) -> str:
    """Task names with the operations tasks folded into their prefixes (``…dead_letters.*``)."""
    shown: list[str] = []
    for name in tasks:
        if is_operations_task(name):
            name = name.rsplit(".", 1)[0] + ".*"
        if name not in shown:
            shown.append(name)
    return ", ".join(shown)


class QueueCheckStep(bootsteps.StartStopStep):
    """Logs at worker start when ironflow's tasks route to queues this worker ignores."""

    label = "ironflow queue check"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, without_ironflow_relay: bool = False, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.relay = not without_ironflow_relay and read_settings(worker.app.conf)["relay_enabled"]

    def create(self, worker: Any) -> Any:
        return None  # nothing to stop: the check runs once, in `start`

    def start(self, worker: Any) -> None:
        try:
            runtime = runtime_of(worker.app)
            runtime.load_workflows()
            missing, consumed = unconsumed_queues(worker.app, list(runtime.registry.types))
        except Exception as exc:  # a check must never stop a worker from starting
            log.debug("ironflow queue check skipped: %s", exc)
            return
        if not missing:
            return
        # A worker that runs the relay publishes into those queues itself; one without it
        # may serve other tasks on purpose, so it only says so at INFO.
        level = logging.WARNING if self.relay else logging.INFO
        log.log(
            level,
            "ironflow: this worker consumes %s, but ironflow's tasks route to %s, which it "
            "does not consume (%s); effects will wait there until their dispatch timeout, "
            "and operations tasks (dead letters, cancel, inspect) unanswered, unless another "
            "worker reads them. Add the queue to -Q, or route the tasks "
            "(task_routes, ironflow_task_queue, ironflow_queue_per_workflow_type).",
            ", ".join(consumed) or "no queue",
            ", ".join(sorted(missing)),
            "; ".join(f"{q}: {_shown(tasks)}" for q, tasks in sorted(missing.items())),
        )


# -- workers that would reject the relay's messages as unregistered --------------------------
# A worker without a workflow type (deployed before it, or without `install`/the module)
# that shares a queue takes ironflow's messages and drops them ("Received unregistered
# task"): Celery's `task_unknown` signal fires in that worker, never in the relay, and the
# row only runs again after the relay gives it up (ironflow_dispatch_timeout) and its lease
# ends. The relay process asks the live workers instead (remote control: which queues they
# consume, which tasks they have) shortly after it starts and every few minutes: one
# broadcast, cheap, and a fact rather than a guess from timings.

UNREGISTERED_FIRST_CHECK = 15.0
"""Seconds after the relay process starts (workers started with it have said hello)."""
UNREGISTERED_CHECK_EVERY = 300.0


def unregistered_consumers(
    app: Any, workflow_types: list[str], *, timeout: float = 2.0
) -> dict[str, dict[str, list[str]]]:
    """``{worker: {queue: [task, …]}}``: live workers that consume a queue the relay
    publishes ironflow tasks to without having those tasks registered. Workers that do not
    answer within `timeout` are not judged."""
    routed = routed_queues(app, workflow_types)
    inspect = app.control.inspect(timeout=timeout)
    consumed = inspect.active_queues() or {}
    registered = inspect.registered() or {}
    found: dict[str, dict[str, list[str]]] = {}
    for worker, queues in sorted(consumed.items()):
        if worker not in registered:
            continue
        # `registered` lists "name [rate_limit=…]" for tasks with options
        have = {str(name).split(" ", 1)[0] for name in registered[worker] or ()}
        names = {q.get("name") for q in queues or () if isinstance(q, dict)}
        for queue, tasks in routed.items():
            missing = [t for t in tasks if t not in have]
            if queue in names and missing:
                found.setdefault(worker, {})[queue] = missing
    return found


def check_unregistered(app: Any, workflow_types: list[str], *, timeout: float = 2.0) -> int:
    """Log an ERROR per worker that would reject the relay's messages as unregistered
    (`unregistered_consumers`); how many such workers there are."""
    found = unregistered_consumers(app, workflow_types, timeout=timeout)
    for worker, queues in found.items():
        log.error(
            "ironflow: worker %s consumes %s but does not have %s registered: it rejects "
            "those messages as unregistered tasks, and each row it drops runs again only "
            "after the relay gives it up (ironflow_dispatch_timeout) and its lease ends. "
            "Deploy workers that register the workflow before relays that publish it "
            "(docs/operations.md, rolling deploys), or keep that worker off the queue.",
            worker,
            ", ".join(sorted(queues)),
            ", ".join(t for tasks in queues.values() for t in tasks),
        )
    return len(found)


def start_unregistered_watch(runtime: Any, conf: Any, shutdown: Any) -> threading.Thread | None:
    """A relay process's duty: `check_unregistered` after `UNREGISTERED_FIRST_CHECK` s and
    every `UNREGISTERED_CHECK_EVERY` s, in a daemon thread, until `shutdown` is set."""
    app = getattr(runtime, "app", None)
    if app is None:
        return None

    def watch() -> None:
        delay = UNREGISTERED_FIRST_CHECK
        while not shutdown.wait(delay):
            delay = UNREGISTERED_CHECK_EVERY
            try:
                check_unregistered(app, list(runtime.registry.types))
            except Exception as exc:  # a broker without remote control, a network error
                log.debug("ironflow: unregistered-task check skipped: %s", exc)

    thread = threading.Thread(target=watch, name="ironflow-unregistered-watch", daemon=True)
    thread.start()
    return thread
