"""Worker start check: are the queues ironflow's tasks route to consumed by this worker?

A worker started with ``-Q`` (or ``task_queues``) that does not read the queue its relay
publishes effects to starts silently, and every effect then waits out its dispatch
timeout in a queue nobody reads. The same holds for the operations tasks
(``ironflow.dead_letters.*``, ``ironflow.cancel.*``, …) an operator calls: they would wait
unanswered. The check logs a WARNING naming both sides.

The same routes decide which workflow types a worker's relays claim (`relay_types`): the
types whose tasks go to a queue the worker consumes, so a worker group never publishes
(and holds budget for) rows only another group's workers would run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Any

from celery import bootsteps

from ironflow_celery.engine.host import DutyHost, Stopping
from ironflow_celery.engine.runtime import WorkflowRuntime, runtime_of
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.tasknames import is_operations_task, task_names_for
from ironflow_celery.storage.kinds import KINDS, kind_of

__all__ = [
    "QueueCheckStep",
    "check_unregistered",
    "consumed_queues",
    "operations_queues",
    "relay_types",
    "routed_queues",
    "start_unregistered_watch",
    "task_names_of",
    "unconsumed_queues",
    "unregistered_consumers",
]

log = logging.getLogger("ironflow_celery.queue_check")


def task_names_of(workflow: Any) -> dict[str, str]:
    """The tasks the engine registers for `workflow`, by suffix (`model.tasknames`)."""
    return task_names_for(workflow.type)


def routed_queues(
    runtime: WorkflowRuntime, types: Collection[str] | None = None
) -> dict[str, list[str]]:
    """The queue each task a relay publishes routes to: ``{queue: [task, …]}`` (effects,
    one row or a group per message, and timers), for `types` (all registered types by
    default)."""
    queues: dict[str, list[str]] = {}
    for workflow_type in runtime.workflow_types if types is None else types:
        names = task_names_of(runtime.registry.get(workflow_type).workflow)
        for kind in KINDS:
            name = names[kind.name]
            queues.setdefault(runtime.task_queue(kind.name, workflow_type), []).append(name)
    return queues


def consumed_queues(app: Any) -> list[str]:
    """The queues this worker consumes: ``-Q`` (less ``-X``), else the default ones; the
    set Celery's task consumer is built from."""
    return sorted(app.amqp.queues.consume_from)


def unconsumed_queues(
    runtime: WorkflowRuntime, *, relay: bool = False
) -> tuple[dict[str, list[str]], list[str]]:
    """(ironflow queues this worker does not consume, with their tasks; the queues it does).

    With `relay`, only the queues of the types this worker's relays claim: a worker group's
    relay never publishes another group's types, so their queues are none of its concern."""
    consumed = consumed_queues(runtime.app)
    if relay:
        routed: dict[str, list[str]] = {}
        for kind, queues in runtime.relay_routes(relay_types(runtime)).items():
            for workflow_type, queue in queues.items():
                routed.setdefault(queue, []).append(kind_of(kind).task_name(workflow_type))
    else:
        routed = routed_queues(runtime)
    for queue, names in operations_queues(runtime.app).items():
        routed.setdefault(queue, []).extend(names)
    return {q: tasks for q, tasks in routed.items() if q not in consumed}, consumed


def relay_types(runtime: WorkflowRuntime) -> dict[str, list[str]]:
    """Per kind (``effect``/``timer``), the workflow types a worker's relays claim: those
    whose tasks of that kind route to a queue the worker consumes.

    A worker that consumes none of ironflow's queues (``-Q`` of other queues only, or a
    relay host whose workers run elsewhere) claims every type, as before: it cannot tell
    which groups exist, and the per-queue budgets keep one stalled queue from holding up
    the others. ``ironflow_relay_types`` overrides both (`WorkflowRuntime.relay_routes`).
    """
    consumed = set(consumed_queues(runtime.app))
    types = runtime.workflow_types
    chosen: dict[str, list[str]] = {
        kind.name: [t for t in types if runtime.task_queue(kind.name, t) in consumed]
        for kind in KINDS
    }
    if not any(chosen.values()):
        return {kind.name: list(types) for kind in KINDS}
    return chosen


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
    """Logs at worker start when ironflow's tasks route to queues this worker ignores.

    It creates no object (nothing to stop): the check runs once, in `start`."""

    label = "ironflow queue check"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, without_ironflow_relay: bool = False, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.relay = not without_ironflow_relay and read_settings(worker.app.conf)["relay_enabled"]

    def start(self, worker: Any) -> None:
        try:
            runtime = runtime_of(worker.app)
            runtime.load_workflows()
            missing, consumed = unconsumed_queues(runtime, relay=self.relay)
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
    routed = routed_queues(runtime_of(app), workflow_types)
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


def start_unregistered_watch(
    runtime: DutyHost, conf: Any, shutdown: Stopping
) -> threading.Thread | None:
    """A relay process's duty: `check_unregistered` after `UNREGISTERED_FIRST_CHECK` s and
    every `UNREGISTERED_CHECK_EVERY` s, in a daemon thread, until `shutdown` is set."""
    app = runtime.app
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
