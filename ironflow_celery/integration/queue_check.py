"""Worker start check: are the queues ironflow's tasks route to consumed by this worker?

A worker started with ``-Q`` (or ``task_queues``) that does not read the queue its relay
publishes effects to starts silently, and every effect then waits out its dispatch
timeout in a queue nobody reads. The check logs a WARNING naming both sides.

The same routes decide which workflow types a worker's relays claim (`relay_types`): the
types whose tasks go to a queue the worker consumes, so a worker group never publishes
(and holds budget for) rows only another group's workers would run.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from ironflow_celery.engine.runtime import WorkflowRuntime, runtime_of
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.tasknames import task_names_for
from ironflow_celery.storage.kinds import KINDS, kind_of

__all__ = [
    "QueueCheckStep",
    "consumed_queues",
    "relay_types",
    "routed_queues",
    "task_names_of",
    "unconsumed_queues",
]

log = logging.getLogger("ironflow_celery.queue_check")


def task_names_of(workflow: Any) -> dict[str, str]:
    """The tasks the engine registers for `workflow`, by suffix (`model.tasknames`)."""
    return task_names_for(workflow.type)


def routed_queues(runtime: WorkflowRuntime) -> dict[str, list[str]]:
    """The queue each task a relay publishes routes to: ``{queue: [task, …]}`` (effects,
    one row or a group per message, and timers)."""
    queues: dict[str, list[str]] = {}
    for workflow_type in runtime.workflow_types:
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
            "does not consume (%s); effects will wait there until their dispatch timeout "
            "unless another worker reads them. Add the queue to -Q, or route the tasks "
            "(task_routes, ironflow_task_queue, ironflow_queue_per_workflow_type).",
            ", ".join(consumed) or "no queue",
            ", ".join(sorted(missing)),
            "; ".join(f"{q}: {', '.join(tasks)}" for q, tasks in sorted(missing.items())),
        )
