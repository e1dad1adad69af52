"""Celery glue: `install(app, ...)` adds ironflow to an existing Celery app, and the
package's own app serves ``celery -A ironflow_celery worker``.

`install` registers the per-workflow-type tasks and the dead-letter tasks, and adds a
worker bootstep that runs the relays inside ``celery worker`` (off with
``--without-ironflow-relay`` or ``ironflow_relay_enabled = False``). Under the prefork
pool the relays run in a child process of the worker, as Celery's embedded beat does, so
the pool never forks a process with relay threads in it; the worker supervises it
(`ironflow_celery.supervisor`) and ``celery inspect ironflow_relay`` reports it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

import click
from celery import Celery, bootsteps, signals
from celery.app.defaults import DEFAULTS
from celery.worker.control import inspect_command

from . import metrics
from .config import runtime_config_from, setting
from .db import DATABASE_URL_ENV
from .errors import ConfigurationError
from .runtime import WorkflowRuntime, WorkflowSpec
from .service import WorkflowServiceConfig
from .supervisor import ServiceProcess, ServiceThread, start_service

log = logging.getLogger(__name__)

APP_ATTRIBUTE = "ironflow"


def runtime_of(app: Any) -> WorkflowRuntime:
    """The runtime `install` attached to `app`."""
    runtime = getattr(app, APP_ATTRIBUTE, None)
    if runtime is None:
        raise LookupError("ironflow is not installed on this Celery app: call install(app)")
    return runtime


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
    conf = app.conf
    if runtime is None:
        runtime = WorkflowRuntime(
            config=runtime_config_from(conf),
            service_config=WorkflowServiceConfig(
                record_input_observations=setting(conf, "record_input_observations", bool, False)
            ),
            database_url=database_url or setting(conf, "database_url"),
            app=app,
        )
    else:
        runtime.app = app
    specs: list[WorkflowSpec] = list(workflows)
    configured = setting(conf, "workflows")
    if isinstance(configured, str):
        specs.extend(m.strip() for m in configured.split(",") if m.strip())
    elif configured:
        specs.extend(configured)
    runtime.add_workflow_specs(specs)
    # Classes are registered (with their tasks) now; module names once the worker has
    # imported its modules (or at first use), so a workflow module may import this package.
    if not any(isinstance(s, str) for s in specs):
        runtime.load_workflows()
    setattr(app, APP_ATTRIBUTE, runtime)

    _install_routing(app)
    _install_dead_letter_tasks(app, runtime)
    from .cancel import register_cancel_tasks  # ironflow.cancel.* and the revoke handler

    register_cancel_tasks(app, runtime)
    app.steps["worker"].add(RelayStep)
    from .queue_check import QueueCheckStep  # warns when -Q skips ironflow's queues

    app.steps["worker"].add(QueueCheckStep)
    from .projections import ProjectionStep  # off unless ironflow_projections is set

    app.steps["worker"].add(ProjectionStep)
    from .aio import AsyncLoopStep  # stops the async handlers' loop with the worker

    app.steps["worker"].add(AsyncLoopStep)
    app.user_options["worker"].add(
        click.Option(
            ["--without-ironflow-relay"],
            is_flag=True,
            default=False,
            help="Do not run ironflow's effect and timer relays in this worker.",
        )
    )

    def _load(sender: Any = None, **kwargs: Any) -> None:
        if sender is None or sender is app:
            runtime.load_workflows()

    signals.import_modules.connect(_load, weak=False)
    return runtime


@signals.worker_process_shutdown.connect(weak=False)
def _pool_process_exiting(pid: int | None = None, **kwargs: Any) -> None:
    """A prefork pool process exits: drop its live gauges (Prometheus multiprocess mode)."""
    metrics.process_exiting(pid)


def _install_routing(app: Celery) -> None:
    """``ironflow_queue_per_workflow_type``: route ``ironflow.<type>.*`` to ``ironflow.<type>``;
    ``ironflow_task_queue``: route every ironflow task to one queue."""
    per_type = setting(app.conf, "queue_per_workflow_type", bool, False)
    single = setting(app.conf, "task_queue")
    if not per_type and not single:
        return

    def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any):
        if not name.startswith("ironflow."):
            return None
        parts = name.split(".")
        if per_type and len(parts) >= 3 and parts[-1] in ("effect", "timer", "execute"):
            return {"queue": "ironflow." + ".".join(parts[1:-1])}
        return {"queue": single} if single else None

    routes = app.conf.task_routes
    if routes is None:
        app.conf.task_routes = (route,)
    elif isinstance(routes, (list, tuple)):
        app.conf.task_routes = (route, *routes)
    else:
        app.conf.task_routes = (route, routes)


def _install_dead_letter_tasks(app: Celery, runtime: WorkflowRuntime) -> None:
    try:
        from .dead_letters import register_dead_letter_tasks
    except ImportError:  # pragma: no cover - module lands with the operations work
        return
    register_dead_letter_tasks(app, runtime)
    from .retention import register_retention_tasks

    register_retention_tasks(app, runtime)


# -- the worker bootstep -----------------------------------------------------------------


class RelayStep(bootsteps.StartStopStep):
    """Runs ironflow's relays inside ``celery worker``, supervised (see `supervisor`)."""

    label = "ironflow relay"

    def __init__(self, worker: Any, without_ironflow_relay: bool = False, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.enabled = not without_ironflow_relay and setting(
            worker.app.conf, "relay_enabled", bool, True
        )
        self.service: ServiceProcess | ServiceThread | None = None
        if not self.enabled:  # Celery never calls start() on a disabled step: say it here
            log.info(
                "ironflow relay disabled in this worker (%s)",
                "--without-ironflow-relay" if without_ironflow_relay else "ironflow_relay_enabled",
            )

    def create(self, worker: Any) -> Any:
        return self

    def start(self, worker: Any) -> None:
        runtime = runtime_of(worker.app)
        if runtime._store is None and not runtime.database_url:
            raise ConfigurationError(
                "ironflow relay: no database configured; set IRONFLOW_DATABASE_URL (or "
                "ironflow_database_url), or start the worker with --without-ironflow-relay"
            )
        runtime.load_workflows()
        self.service = start_service(
            "relay",
            "ironflow-relay",
            runtime.run,
            worker=worker,
            shutdown_timeout=runtime.config.shutdown_timeout,
        )
        log.info(
            "ironflow relay started (%s) for %s",
            self.service.mode,
            ", ".join(runtime.registry.types) or "no workflow types",
        )

    def stop(self, worker: Any) -> None:
        """Warm shutdown: the relays finish publishing, within ``shutdown_timeout``."""
        if self.service is not None:
            self.service.stop()
            self.service = None

    def terminate(self, worker: Any) -> None:
        """Cold shutdown (SIGQUIT, a second Ctrl-C, the test worker's exit): a second at
        most, then the relay process is killed (its claims come back after their lease)."""
        if self.service is not None:
            self.service.stop(cold=True)
            self.service = None

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)

    def ironflow_state(self) -> dict[str, Any]:
        """This step's part of ``celery inspect ironflow_relay``."""
        return {"relay": self.service.state() if self.service is not None else {"mode": "stopped"}}


@inspect_command()
def ironflow_relay(state: Any) -> dict[str, Any]:
    """ironflow's relay (and projections) process or thread: pid, alive, restarts, last exit."""
    worker = getattr(state.consumer, "controller", None)
    found: dict[str, Any] = {}
    for step in getattr(worker, "steps", None) or ():
        report = getattr(step, "ironflow_state", None)
        if callable(report):
            found.update(report())
    found.setdefault("relay", {"mode": "disabled"})
    return found


# -- the package's own app ------------------------------------------------------------------

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
