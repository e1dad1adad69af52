"""The package assembled on a Celery app: `install` adds every layer's tasks and worker
bootsteps, and `default_app` is the app ``celery -A ironflow_celery worker`` finds.

This is the one module that knows every layer: the engine's install (tasks, routing,
relay bootstep), then the operations' tasks (dead letters, retention, cancel, inspection),
the projections bootstep (integration's step bound here to the operations' runner, which
sits above integration), and the relay process's duties (metrics endpoint, retention, the
unregistered-task watch).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from celery import Celery
from celery.app.defaults import DEFAULTS

from ironflow_celery.engine.host import DutyHost, Stopping
from ironflow_celery.engine.runtime import WorkflowRuntime, WorkflowSpec
from ironflow_celery.integration.app import install_engine
from ironflow_celery.integration.projections import ProjectionStep as _IntegrationProjectionStep
from ironflow_celery.integration.queue_check import start_unregistered_watch
from ironflow_celery.operations.cancel import register_cancel_tasks
from ironflow_celery.operations.dead_letters import register_dead_letter_tasks
from ironflow_celery.operations.inspection import register_inspection_tasks
from ironflow_celery.operations.metrics_endpoint import serve_metrics_from_settings
from ironflow_celery.operations.projections import ConfiguredProjections
from ironflow_celery.operations.retention import register_retention_tasks, start_retention_duty
from ironflow_celery.storage.db import DATABASE_URL_ENV

__all__ = ["create_app", "default_app", "install", "settings_from_env"]


def install(
    app: Celery,
    workflows: Iterable[WorkflowSpec] = (),
    *,
    database_url: str | None = None,
    runtime: WorkflowRuntime | None = None,
) -> WorkflowRuntime:
    """Add ironflow to a Celery app: tasks, relay bootstep, settings. Returns the runtime.

    `workflows` are Workflow classes, ``(class, handler)`` pairs, or module names
    (``"myapp.workflows"`` registers every Workflow it defines; ``"mod:Class"`` one).
    Module names in the ``ironflow_workflows`` setting / ``IRONFLOW_WORKFLOWS`` (comma
    separated) are added too, and imported when the worker loads its modules.
    """
    runtime = install_engine(app, workflows, database_url=database_url, runtime=runtime)
    register_dead_letter_tasks(app, runtime)
    register_retention_tasks(app, runtime)
    register_cancel_tasks(app, runtime)  # ironflow.cancel.* and the revoke handler
    register_inspection_tasks(app, runtime)  # ironflow.inspect.*: list and show rows, instances
    app.steps["worker"].add(ProjectionStep)  # off unless ironflow_projections is set
    runtime.duties = [_serve_metrics, start_retention_duty, start_unregistered_watch]
    return runtime


class ProjectionStep(_IntegrationProjectionStep):
    """The projections bootstep (integration) bound to the operations' projection runner,
    which sits above integration: the one place both layers meet."""

    @classmethod
    def plan_of(cls, conf: Any) -> ConfiguredProjections:
        return ConfiguredProjections.of(conf)


def _serve_metrics(runtime: DutyHost, conf: Any, shutdown: Stopping) -> None:
    serve_metrics_from_settings(runtime, conf)


_CELERY_ENV_PREFIX = "CELERY_"


def settings_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Celery settings from ``CELERY_<SETTING>`` variables (e.g. ``CELERY_BROKER_URL``)."""
    environ = dict(os.environ if environ is None else environ)
    known = {key.lower(): value for key, value in DEFAULTS.items()}
    found: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(_CELERY_ENV_PREFIX):
            continue
        key = name[len(_CELERY_ENV_PREFIX) :].lower()
        if key not in known:
            continue
        default = known[key]
        value: Any = raw
        if isinstance(default, bool):
            value = raw.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            try:
                value = int(raw)
            except ValueError:
                value = raw
        elif isinstance(default, float):
            try:
                value = float(raw)
            except ValueError:
                value = raw
        found[key] = value
    return found


def create_app(main: str = "ironflow_celery", **settings: Any) -> Celery:
    """A Celery app configured from the environment with ironflow installed."""
    app = Celery(main)
    app.conf.update(
        broker_url="redis://127.0.0.1:6379/0",
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        worker_hijack_root_logger=True,
    )
    app.conf.update(settings_from_env())
    app.conf.update(settings)
    install(app, database_url=os.environ.get(DATABASE_URL_ENV))
    return app


_default_app: Celery | None = None
_default_lock = threading.Lock()


def default_app() -> Celery:
    """The package's app (``ironflow_celery.app``), created on first use."""
    global _default_app
    if _default_app is None:
        with _default_lock:
            if _default_app is None:
                _default_app = create_app()
    return _default_app
