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

from ironflow_celery.engine.runtime import runtime_of
from ironflow_celery.integration.supervisor import start_service

log = logging.getLogger("ironflow_celery.projections")

__all__ = ["ProjectionPlan", "ProjectionStep"]


class ProjectionPlan(Protocol):
    """The projections an app's settings configure, and the job that runs them."""

    @property
    def names(self) -> Sequence[str]:
        """The configured projections' names (none: the step is off)."""
        ...

    def job(self, runtime: Any) -> Callable[[Any], None]:
        """What the supervised process runs until its stop event is set."""
        ...


class ProjectionStep(bootsteps.StartStopStep):
    """Runs the configured projections (``ironflow_projections``) inside ``celery
    worker``, supervised like the relays; off when none are configured. The worker
    bootstep `ironflow_celery.install` adds (with `plan_of` bound)."""

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
        self.service: Any = None

    def create(self, worker: Any) -> Any:
        return self

    def start(self, worker: Any) -> None:
        assert self.plan is not None  # enabled only with a plan
        runtime = runtime_of(worker.app)
        runtime.load_workflows()
        self.service = start_service(
            "projections",
            "ironflow-projections",
            self.plan.job(runtime),
            worker=worker,
            shutdown_timeout=runtime.config.shutdown_timeout,
        )
        log.info("ironflow projections started: %s", ", ".join(self.plan.names))

    def stop(self, worker: Any) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def terminate(self, worker: Any) -> None:
        """Cold shutdown: a second at most, then the projections process is killed
        (each batch commits with its checkpoint, so nothing is skipped)."""
        if self.service is not None:
            self.service.stop(cold=True)
            self.service = None

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)

    def ironflow_state(self) -> dict[str, Any]:
        """This step's part of ``celery inspect ironflow_relay``."""
        service = self.service
        return {"projections": service.state() if service is not None else {"mode": "stopped"}}
