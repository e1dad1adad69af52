"""The engine on a Celery app: `install_engine` attaches a runtime, registers the
per-workflow-type tasks and routes, and adds the worker bootstep that runs the relays
inside ``celery worker`` (off with ``--without-ironflow-relay`` or
``ironflow_relay_enabled = False``). Under the prefork
pool the relays run in a child process of the worker, as Celery's embedded beat does, so
the pool never forks a process with relay threads in it; the worker supervises it
(`ironflow_celery.integration.supervisor`) and ``celery inspect ironflow_relay`` reports it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable
from typing import Any

import click
from celery import Celery, bootsteps, signals
from celery.worker.control import inspect_command

from ironflow_celery.engine import metrics
from ironflow_celery.engine.runtime import APP_ATTRIBUTE, WorkflowRuntime, WorkflowSpec, runtime_of
from ironflow_celery.errors import ConfigurationError
from ironflow_celery.integration.db_gate import DatabaseGateStep
from ironflow_celery.integration.hints import schema_missing_hint
from ironflow_celery.integration.queue_check import (
    QueueCheckStep,
    consumed_queues,
    relay_types,
    routed_queues,
)
from ironflow_celery.integration.supervisor import (
    ServiceProcess,
    ServiceThread,
    Target,
    WorkerService,
)
from ironflow_celery.integration.task_events import RowEventsStep
from ironflow_celery.model.config import runtime_config_from
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.tasknames import (
    OPERATIONS_QUEUE,
    PREFIX,
    is_operations_task,
    split_task_name,
)
from ironflow_celery.service.aio import LOOP
from ironflow_celery.service.workflow_service import WorkflowServiceConfig
from ironflow_celery.storage.store import set_schema_hint

log = logging.getLogger("ironflow_celery.celery_app")

# A schema-missing StorageError names the upgrade command as this process can run it
# (its `-A` app, its database variable); storage itself knows nothing of the process.
set_schema_hint(schema_missing_hint)

__all__ = [
    "AMQP_HEARTBEAT",
    "REDIS_TRANSPORT_DEFAULTS",
    "AsyncLoopStep",
    "RelayService",
    "RelayStep",
    "install_engine",
    "runtime_of",
]

REDIS_TRANSPORT_DEFAULTS: dict[str, Any] = {
    # a command on a connection whose peer vanished (a cut link, a black-holed route)
    # fails after this many seconds instead of blocking the worker's event loop for good
    "socket_timeout": 10.0,
    "socket_connect_timeout": 5.0,
    "socket_keepalive": True,
    # kombu pings its long-lived connections this often and drops a BRPOP connection
    # whose reply is overdue by more (kombu's default, 25 s, takes ~51 s to notice)
    "health_check_interval": 5,
}
"""``broker_transport_options`` ironflow adds on a Redis broker, each only where the app
did not set it: a host cut off from the broker notices within about 10 s, drops its
reserved messages and reconnects, instead of sitting on them for minutes."""

AMQP_HEARTBEAT = 20.0
"""``broker_heartbeat`` on an AMQP broker where the app kept Celery's 120 s: a dead
connection is noticed within about two heartbeats."""


def install_engine(
    app: Celery,
    workflows: Iterable[WorkflowSpec] = (),
    *,
    database_url: str | None = None,
    runtime: WorkflowRuntime | None = None,
) -> WorkflowRuntime:
    """The engine's part of `ironflow_celery.install`: the runtime attached to `app`, its
    per-workflow-type tasks, routing, and the worker bootsteps of this layer.

    `workflows` are Workflow classes, ``(class, handler)`` pairs, or module names
    (``"myapp.workflows"`` registers every Workflow it defines; ``"mod:Class"`` one).
    Module names in the ``ironflow_workflows`` setting / ``IRONFLOW_WORKFLOWS`` (comma
    separated) are added too, and imported when the worker loads its modules.
    """
    settings = read_settings(app.conf)
    if runtime is None:
        runtime = WorkflowRuntime(
            config=runtime_config_from(settings),
            service_config=WorkflowServiceConfig(**settings.fields("WorkflowServiceConfig")),
            database_url=database_url or settings["database_url"],
            app=app,
        )
    else:
        runtime.app = app
    specs: list[WorkflowSpec] = list(workflows)
    specs.extend(settings["workflows"] or ())  # module names (comma separated) or a list
    runtime.add_workflow_specs(specs)
    # Classes are registered (with their tasks) now; module names when the app is finalized
    # -- the first `app.tasks` lookup (`.delay()`, `app.tasks["ironflow.<type>.execute"]`)
    # in any process: a web process, a script, a worker -- or when the worker imports its
    # modules, whichever comes first; late enough that a workflow module may import the app.
    if not any(isinstance(s, str) for s in specs) or app.finalized:
        runtime.load_workflows()
    else:

        def _on_finalize(sender: Any = None, **kwargs: Any) -> None:
            runtime.load_workflows()

        app.on_after_finalize.connect(_on_finalize, weak=False)
    setattr(app, APP_ATTRIBUTE, runtime)

    _install_routing(app)
    _broker_defaults(app)
    app.steps["worker"].add(RelayStep)
    app.steps["worker"].add(QueueCheckStep)  # warns when -Q skips ironflow's queues
    app.steps["worker"].add(AsyncLoopStep)  # stops the async handlers' loop with the worker
    # pauses ironflow's queues while this host cannot reach PostgreSQL
    app.steps["consumer"].add(DatabaseGateStep)
    # each row of a group message as its own task in Flower (task events)
    app.steps["consumer"].add(RowEventsStep)
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


@signals.worker_process_init.connect(weak=False)
def _pool_process_started(**kwargs: Any) -> None:
    """A prefork pool process starts (the worker's start, ``--max-tasks-per-child``,
    autoscale): connect it to PostgreSQL before it takes its first task, so its first row
    does not wait for the store to be built and the connection opened (90-150 ms on a
    busy 2-core machine, against 1-3 ms for a start guard). Only in a worker that
    consumes a queue ironflow's rows are sent to.

    Here, not in a thread left to run: a task arriving while the thread connected would
    open a second connection, and the pool would keep both (a pool process holds one).
    But waited for `CONNECT_AHEAD_WAIT` at most: Celery kills a pool process that is not
    up within ``worker_proc_alive_timeout`` (4 s), and a connect may take its whole 5 s
    timeout. A connect that outlasts the wait is closed when it ends, and the first task
    connects as it always did; so does a database that cannot be reached."""
    from celery import current_app

    runtime = getattr(current_app, APP_ATTRIBUTE, None)
    if not isinstance(runtime, WorkflowRuntime) or not runtime.has_database:
        return
    try:
        if not set(routed_queues(runtime)) & set(consumed_queues(current_app)):
            return
    except Exception:  # (a check for a speed-up must never stop a pool process)
        log.debug("ironflow: could not tell this worker's queues", exc_info=True)
        return
    ahead = _ConnectAhead(runtime)
    threading.Thread(target=ahead.run, name="ironflow-connect", daemon=True).start()
    ahead.wait(CONNECT_AHEAD_WAIT)


CONNECT_AHEAD_WAIT = 2.0
"""Seconds a new pool process waits for its connection before it takes tasks, at most."""


class _ConnectAhead:
    """One pooled connection of a runtime's store, opened and returned to the pool; or
    closed instead when whoever waited for it stopped waiting (`wait`)."""

    def __init__(self, runtime: WorkflowRuntime) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._abandoned = False

    def run(self) -> None:
        try:
            with self.runtime.store.connection() as conn, self._lock:
                if self._abandoned:  # the first task may have opened its own meanwhile
                    conn.invalidate()  # closed, not kept in the pool
        except Exception as exc:  # the first task connects (and reports) as it always did
            log.debug("ironflow: pool process could not connect ahead: %s", exc)
        finally:
            self._done.set()

    def wait(self, seconds: float) -> bool:
        """Wait for the connection; False (and it is closed when it comes) if it did not
        come within `seconds`."""
        if self._done.wait(seconds):
            return True
        with self._lock:
            self._abandoned = True
        return self._done.is_set()


@signals.worker_process_shutdown.connect(weak=False)
def _pool_process_exiting(pid: int | None = None, **kwargs: Any) -> None:
    """A prefork pool process exits: drop its live gauges (Prometheus multiprocess mode)."""
    metrics.process_exiting(pid)


def _broker_defaults(app: Celery) -> None:
    """Bound how long a worker may sit on a dead broker connection (see
    `REDIS_TRANSPORT_DEFAULTS`, `AMQP_HEARTBEAT`); what the app set is left as it is."""
    from celery.app.defaults import DEFAULTS

    try:
        driver = app.connection_for_write().transport.driver_type
    except Exception:  # an unknown transport: nothing of ours applies
        return
    conf = app.conf
    if driver == "redis":
        options = dict(conf.broker_transport_options or {})
        missing = {k: v for k, v in REDIS_TRANSPORT_DEFAULTS.items() if k not in options}
        if missing:
            conf.broker_transport_options = {**options, **missing}
    elif driver == "amqp" and conf.broker_heartbeat == DEFAULTS["broker_heartbeat"]:
        conf.broker_heartbeat = AMQP_HEARTBEAT


def _install_routing(app: Celery) -> None:
    """``ironflow_queue_per_workflow_type``: route ``ironflow.<type>.*`` to ``ironflow.<type>``
    and the operations tasks to ``ironflow.operations``; ``ironflow_task_queue``: route
    every ironflow task to one queue."""
    settings = read_settings(app.conf)
    per_type = settings["queue_per_workflow_type"]
    single = settings["task_queue"]
    if not per_type and not single:
        return

    def route(
        name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> dict[str, str] | None:
        if not name.startswith(PREFIX):
            return None
        per_type_task = split_task_name(name)
        if per_type and per_type_task is not None:
            return {"queue": PREFIX + per_type_task[0]}
        return {"queue": single} if single else None

    def operations_route(
        name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> dict[str, str] | None:
        # Per-type queues: the operations tasks get a queue of their own (last in the
        # chain, so the app's own routes for them win), instead of the default queue that
        # workers reading only `ironflow.<type>` never consume.
        return {"queue": OPERATIONS_QUEUE} if is_operations_task(name) else None

    routes = app.conf.task_routes
    if routes is None:
        routes = ()
    elif not isinstance(routes, (list, tuple)):
        routes = (routes,)
    app.conf.task_routes = (route, *routes, *((operations_route,) if per_type else ()))


# -- the worker bootstep -----------------------------------------------------------------


class RelayService(WorkerService):
    """The relays of one worker: what `RelayStep` creates and Celery starts and stops."""

    label = "relay"
    name = "ironflow-relay"
    _routes: dict[str, dict[str, str]]  # what `prepare` decided, for `started`

    def prepare(self) -> tuple[Target, float]:
        runtime = runtime_of(self.worker.app)
        if not runtime.has_database:
            raise ConfigurationError(
                "ironflow relay: no database configured; set IRONFLOW_DATABASE_URL (or "
                "ironflow_database_url), or start the worker with --without-ironflow-relay"
            )
        runtime.load_workflows()
        # Decided here, in the worker, from the queues it consumes (-Q): the relay process
        # or thread claims only the types this worker group serves (DESIGN invariant 13).
        types = relay_types(runtime)
        # refuses unknown ironflow_relay_types at start
        self._routes = runtime.relay_routes(types)
        return functools.partial(runtime.run, types=types), runtime.config.shutdown_timeout

    def started(self, service: ServiceProcess | ServiceThread) -> None:
        runtime = runtime_of(self.worker.app)
        routes = self._routes
        claimed = {t for queues in routes.values() for t in queues}
        log.info(
            "ironflow relay started (%s) for %s; %s",
            service.mode,
            ", ".join(t for t in runtime.registry.types if t in claimed) or "no workflow types",
            "; ".join(
                f"{kind} {', '.join(f'{t} -> {q}' for t, q in queues.items()) or 'none'}"
                for kind, queues in routes.items()
            ),
        )


class RelayStep(bootsteps.StartStopStep):
    """Runs ironflow's relays inside ``celery worker``, supervised (see `supervisor`):
    Celery starts and stops the `RelayService` that `create` returns."""

    label = "ironflow relay"

    def __init__(self, worker: Any, without_ironflow_relay: bool = False, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.enabled = (
            not without_ironflow_relay and read_settings(worker.app.conf)["relay_enabled"]
        )
        if not self.enabled:  # Celery never calls start() on a disabled step: say it here
            log.info(
                "ironflow relay disabled in this worker (%s)",
                "--without-ironflow-relay" if without_ironflow_relay else "ironflow_relay_enabled",
            )

    def create(self, worker: Any) -> RelayService:
        return RelayService(worker)

    def ironflow_state(self) -> dict[str, Any]:
        """This step's part of ``celery inspect ironflow_relay``."""
        return {"relay": self.obj.state() if self.obj is not None else {"mode": "stopped"}}


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


# -- asyncio handlers' loop -----------------------------------------------------------------


# Nothing outlives its owner: the loop stops with the pool process (prefork) and, through
# `AsyncLoopStep`, with the worker (solo/threads pools, test workers); a later handler
# call would start a fresh one.
@signals.worker_process_shutdown.connect(weak=False)
def _close_loop(**kwargs: Any) -> None:
    LOOP.close()


class AsyncLoopStep(bootsteps.StartStopStep):
    """Stops this process's handler event loop when the worker stops (any pool)."""

    label = "ironflow asyncio loop"

    def start(self, worker: Any) -> None:
        """Nothing to start: the first coroutine handler starts the loop."""

    def stop(self, worker: Any) -> None:
        LOOP.close()

    def terminate(self, worker: Any) -> None:
        LOOP.close()
