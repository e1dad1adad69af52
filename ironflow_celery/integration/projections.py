"""The projections' worker bootstep: runs the configured projections inside ``celery
worker``, supervised like the relays; off when none are configured.

The runner is an operator's read model and lives in `ironflow_celery.operations.projections`,
above this layer: the step drives it through a `ProjectionPlan`, and `ironflow_celery.celery_app`
(which knows every layer) binds the operations' plan to the step it adds to the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from celery import bootsteps

from ironflow_celery.engine.runtime import WorkflowRuntime, runtime_of
from ironflow_celery.integration.supervisor import (
    ServiceProcess,
    ServiceThread,
    Target,
    WorkerService,
)

log = logging.getLogger("ironflow_celery.projections")

__all__ = ["ProjectionPlan", "ProjectionService", "ProjectionStep"]


class ProjectionPlan(Protocol):
    """The projections an app's settings configure, and the job that runs them."""

    @property
    def names(self) -> Sequence[str]:
        """The configured projections' names (none: the step is off)."""
        ...

    def job(self, runtime: WorkflowRuntime) -> Callable[[Any], None]:
        """What the supervised process runs until its stop event is set."""
        ...


class ProjectionService(WorkerService):
    """The projections of one worker: what `ProjectionStep` creates and Celery starts and
    stops. A cold shutdown kills the process after a second: each batch commits with its
    checkpoint, so nothing is skipped."""

    label = "projections"
    name = "ironflow-projections"

    def __init__(self, worker: Any, plan: ProjectionPlan) -> None:
        super().__init__(worker)
        self.plan = plan

    def prepare(self) -> tuple[Target, float]:
        runtime = runtime_of(self.worker.app)
        runtime.load_workflows()
        return self.plan.job(runtime), runtime.config.shutdown_timeout

    def started(self, service: ServiceProcess | ServiceThread) -> None:
        log.info("ironflow projections started: %s", ", ".join(self.plan.names))


class ProjectionStep(bootsteps.StartStopStep):
    """Runs the configured projections (``ironflow_projections``) inside ``celery
    worker``, supervised like the relays; off when none are configured. The worker
    bootstep `ironflow_celery.install` adds (with `plan_of` bound): Celery starts and stops
    the `ProjectionService` that ``create`` returns."""

    label = "ironflow projections"

    @classmethod
    def plan_of(cls, conf: Any) -> ProjectionPlan | None:
        """The plan of an app's conf; None here: the step `ironflow_celery.celery_app` adds
        overrides this with the operations' plan."""
        return None

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.plan = self.plan_of(worker.app.conf)
        self.enabled = self.plan is not None and bool(self.plan.names)

    def create(self, worker: Any) -> ProjectionService:
        assert self.plan is not None  # Celery creates only an enabled step
        return ProjectionService(worker, self.plan)

    def ironflow_state(self) -> dict[str, Any]:
        """This step's part of ``celery inspect ironflow_relay``."""
        return {"projections": self.obj.state() if self.obj is not None else {"mode": "stopped"}}
