"""`WorkflowRuntime`: the registry, store, service and relays of one deployment, and the
dead-letter operations, behind ironflow's builder API.

``WorkflowRuntime.builder(store, service_config).register(W, handler).config(cfg)
.build_runtime()`` gives a runtime whose `run` claims and publishes effects and timers in
this process until a shutdown event; Celery workers of the same app run the handlers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from datetime import datetime
from functools import cached_property
from types import ModuleType
from typing import Any

from celery.utils.imports import import_from_cwd

from ironflow_celery.engine.deliveries import LostDeliveries
from ironflow_celery.engine.host import Duty, Stopping
from ironflow_celery.engine.metrics import Metrics
from ironflow_celery.engine.relay import (
    Publisher,
    RelayGroup,
    celery_publisher,
    celery_queue_depth,
    queue_of,
)
from ironflow_celery.engine.sharing import HandlerTimes
from ironflow_celery.engine.tasks import LeaseKeeper, register_workflow_tasks
from ironflow_celery.errors import ConfigurationError, NotInstalled
from ironflow_celery.model.config import AttemptLimits, RetryPolicy, RuntimeConfig
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.workflow import EffectHandler, Workflow
from ironflow_celery.service import dead_letters
from ironflow_celery.service.dead_letters import DeadLetter, DeadLetterQuery
from ironflow_celery.service.workflow_service import (
    Registration,
    Registry,
    WorkflowService,
    WorkflowServiceConfig,
)
from ironflow_celery.storage import schema
from ironflow_celery.storage.db import engine_options
from ironflow_celery.storage.kinds import EFFECT, KINDS, TIMER, kind_of
from ironflow_celery.storage.store import PostgresStore

__all__ = [
    "APP_ATTRIBUTE",
    "WorkflowBuilder",
    "WorkflowRuntime",
    "WorkflowSpec",
    "handler_of",
    "resolve_workflow_specs",
    "runtime_of",
    "workflows_in",
]

log = logging.getLogger("ironflow_celery.runtime")

WorkflowSpec = type[Workflow] | tuple[type[Workflow], EffectHandler | None] | str | ModuleType


def workflows_in(module: ModuleType) -> list[type[Workflow]]:
    """The concrete Workflow classes a module defines (not those it imports)."""
    found = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if (
            issubclass(obj, Workflow)
            and obj.__module__ == module.__name__
            and "type" in obj.__dict__
        ):
            found.append(obj)
    return found


def resolve_workflow_specs(specs: Iterable[WorkflowSpec]) -> list[tuple[type[Workflow], Any]]:
    """Turn classes, (class, handler) pairs, ``module`` and ``module:Class`` names into pairs."""
    pairs: list[tuple[type[Workflow], Any]] = []
    for spec in specs:
        if isinstance(spec, tuple):
            pairs.append((spec[0], spec[1]))
        elif isinstance(spec, type):
            pairs.append((spec, None))
        elif isinstance(spec, ModuleType):
            pairs.extend((w, None) for w in workflows_in(spec))
        elif isinstance(spec, str):
            module_name, _, attr = spec.strip().partition(":")
            try:
                module = import_from_cwd(module_name)  # like Celery's `imports`
            except ImportError as exc:
                raise ConfigurationError(
                    f"cannot import workflow module {module_name!r}: {exc}"
                ) from exc
            if attr:
                obj = getattr(module, attr, None)
                if obj is None:
                    raise ConfigurationError(f"{module_name!r} has no attribute {attr!r}")
                pairs.extend(resolve_workflow_specs([obj]))
            else:
                found = workflows_in(module)
                if not found:
                    raise ConfigurationError(f"module {module_name!r} defines no Workflow class")
                pairs.extend((w, None) for w in found)
        else:
            raise ConfigurationError(f"cannot read a workflow from {spec!r}")
    return pairs


def handler_of(workflow: type[Workflow], handler: Any) -> Any:
    """The explicit handler, else the workflow's own ``handle_effect``."""
    if handler is not None:
        return handler
    return getattr(workflow, "handle_effect", None)


#: The attribute of a Celery app that holds its runtime (set by `install`).
APP_ATTRIBUTE = "ironflow"


def runtime_of(app: Any) -> WorkflowRuntime:
    """The runtime `ironflow_celery.install` attached to `app`."""
    runtime = getattr(app, APP_ATTRIBUTE, None)
    if not isinstance(runtime, WorkflowRuntime):
        raise NotInstalled("ironflow is not installed on this Celery app: call install(app)")
    return runtime


class WorkflowRuntime:
    """A deployment's workflows, store, service and relays."""

    def __init__(
        self,
        registry: Registry | None = None,
        config: RuntimeConfig | None = None,
        service_config: WorkflowServiceConfig | None = None,
        *,
        store: PostgresStore | None = None,
        database_url: str | None = None,
        app: Any = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.registry = registry or Registry()
        # The `now` given to decide (None: the wall clock); a test passes a test clock.
        self.clock = clock
        self.config = config or RuntimeConfig()
        self.service_config = service_config or WorkflowServiceConfig()
        self._store = store
        self.database_url = database_url
        self.app = app
        self.worker_id = self.config.worker_id or str(uuid.uuid4())
        self.metrics = Metrics()
        self._pending_specs: list[WorkflowSpec] = []
        self._tasks_registered: set[str] = set()
        self._load_lock = threading.RLock()
        #: What a relay process does besides relaying, each ``duty(runtime, conf, shutdown)``
        #: started once its relays run: `ironflow_celery.install` adds the metrics endpoint
        #: (``ironflow_metrics_port``) and retention (``ironflow_retention_interval``).
        self.duties: list[Duty] = []

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def builder(
        cls, store: PostgresStore | None = None, service_config: WorkflowServiceConfig | None = None
    ) -> WorkflowBuilder:
        """ironflow's builder: ``.register(...)``, ``.config(...)``, ``.build_runtime()``."""
        return WorkflowBuilder(store, service_config)

    def register(
        self, workflow: type[Workflow], handler: EffectHandler | None = None
    ) -> Registration:
        """Register a workflow (and its Celery tasks when an app is attached)."""
        registration = self.registry.register(workflow, handler_of(workflow, handler))
        self._register_tasks()
        return registration

    def register_without_effects(self, workflow: type[Workflow]) -> Registration:
        registration = self.registry.register_without_effects(workflow)
        self._register_tasks()
        return registration

    def add_workflow_specs(self, specs: Iterable[WorkflowSpec]) -> None:
        """Queue module names / classes to register at first use (after imports settle)."""
        self._pending_specs.extend(specs)

    def load_workflows(self) -> None:
        """Import and register queued workflow modules (idempotent)."""
        with self._load_lock:
            specs, self._pending_specs = self._pending_specs, []
            for workflow, handler in resolve_workflow_specs(specs):
                if workflow.type in self.registry and (
                    self.registry.get(workflow.type).workflow is workflow
                ):
                    continue
                self.registry.register(workflow, handler_of(workflow, handler))
            self._register_tasks()

    def _register_tasks(self) -> None:
        if self.app is None:
            return
        fresh = [t for t in self.registry.types if t not in self._tasks_registered]
        if fresh:
            register_workflow_tasks(self.app, self, fresh)
            self._tasks_registered.update(fresh)

    # -- parts ----------------------------------------------------------------------------
    @property
    def has_database(self) -> bool:
        """Whether a store can be had: one was given, or a database URL is configured (the
        relay bootstep refuses to start without one)."""
        return self._store is not None or bool(self.database_url)

    @property
    def store(self) -> PostgresStore:
        if self._store is None:
            with self._load_lock:
                if self._store is None:
                    if not self.database_url:
                        raise ConfigurationError(
                            "no database configured: set IRONFLOW_DATABASE_URL "
                            "(or the ironflow_database_url setting)"
                        )
                    self._store = PostgresStore.from_url(
                        self.database_url,
                        relaxed_acks=self.config.relaxed_acknowledgements,
                        **engine_options(read_settings(getattr(self.app, "conf", None))),
                    )
        return self._store

    @cached_property
    def service(self) -> WorkflowService:
        self.load_workflows()
        return WorkflowService(self.store, self.registry, self.service_config, clock=self.clock)

    @cached_property
    def lease_keeper(self) -> Any:
        return LeaseKeeper(self)

    @cached_property
    def handler_times(self) -> HandlerTimes:
        """This process's handler time per workflow type: how much of a group message a
        worker process takes on (`engine.sharing`)."""
        return HandlerTimes()

    @property
    def workflow_count(self) -> int:
        self.load_workflows()
        return len(self.registry)

    @property
    def workflow_types(self) -> tuple[str, ...]:
        self.load_workflows()
        return self.registry.types

    # -- per-type policies -----------------------------------------------------------------
    def retry_policy_for(self, workflow_type: str, effect_type: str | None = None) -> RetryPolicy:
        """The retry policy of a row: its effect type's, its workflow's, or the runtime's."""
        policy = self.config.retry_policy
        if workflow_type in self.registry:
            workflow = self.registry.get(workflow_type).workflow
            policy = workflow.retry_policy or policy
            if effect_type is not None:
                policy = workflow.effect_retry_policies.get(effect_type, policy)
        return policy

    @property
    def attempt_limits(self) -> AttemptLimits:
        """``max_attempts`` per registered type, for the claim and dead-letter queries.

        A workflow whose effect types differ uses the largest: the claim lets those rows
        through and the task's start guard dead-letters a row past its own effect type's."""
        by_type: dict[str, int] = {}
        default = self.config.retry_policy.max_attempts
        for wt in self.registry.types:
            workflow = self.registry.get(wt).workflow
            own = (workflow.retry_policy or self.config.retry_policy).max_attempts
            limits = [own, *(p.max_attempts for p in workflow.effect_retry_policies.values())]
            if max(limits) != default:
                by_type[wt] = max(limits)
        return AttemptLimits(default, by_type)

    @property
    def concurrency_limits(self) -> dict[str, int]:
        """Registered types with a ``concurrency_limit``, and their limit."""
        return {
            wt: limit
            for wt in self.registry.types
            if (limit := self.registry.get(wt).workflow.concurrency_limit) is not None
        }

    @property
    def effect_batch_sizes(self) -> dict[str, int]:
        """Per registered type, the most effects one message carries: the workflow's
        ``effect_batch_size``, else ``ironflow_effect_batch_size`` (1: one per message) —
        but 1 for a type with a ``concurrency_limit``: its few leased rows are meant to run
        at once, and a group would run them one after another."""
        sizes = {}
        for wt in self.registry.types:
            workflow = self.registry.get(wt).workflow
            own = workflow.effect_batch_size
            if own is None:
                own = 1 if workflow.concurrency_limit is not None else self.config.effect_batch_size
            sizes[wt] = own
        return sizes

    def upgrade_schema(self) -> list[int]:
        """Apply pending migrations to this runtime's database."""
        return schema.upgrade(self.store.engine)

    # -- relays ---------------------------------------------------------------------------
    def task_queue(self, kind: str, workflow_type: str) -> str:
        """The queue the app routes `workflow_type`'s `kind` tasks to (``"effect"`` /
        ``"timer"``; a group of rows travels in the same task as a single row)."""
        task = kind_of(kind).task_name(workflow_type)
        return queue_of(self.app, task)

    def relay_routes(
        self, types: Mapping[str, Collection[str]] | None = None
    ) -> dict[str, dict[str, str]]:
        """Per kind, the workflow types this process's relays claim and each one's queue.

        ``relay_types`` (the setting) decides when set; else `types` (per kind: the worker's
        derivation from ``-Q``), else every registered type. Unknown types are refused."""
        self.load_workflows()
        registered = self.registry.types
        configured = self.config.relay_types
        if configured is not None:
            unknown = sorted(set(configured) - {*registered, "*"})
            if unknown:
                raise ConfigurationError(
                    f"ironflow_relay_types names unknown workflow types {', '.join(unknown)}; "
                    f"registered: {', '.join(registered) or 'none'}"
                )
            chosen = registered if "*" in configured else configured
            types = {kind.name: chosen for kind in KINDS}
        elif types is None:
            types = {kind.name: registered for kind in KINDS}
        return {
            kind.name: {
                t: self.task_queue(kind.name, t)
                for t in registered
                if t in types.get(kind.name, ())
            }
            for kind in KINDS
        }

    def start_relays(
        self,
        *,
        effects: bool = True,
        timers: bool = True,
        types: Mapping[str, Collection[str]] | None = None,
    ) -> RelayGroup:
        """Start the relay threads of this process (caller stops them); `types`: per kind,
        the workflow types to claim (see `relay_routes`)."""
        if self.app is None:
            raise ConfigurationError("this runtime has no Celery app to publish to")
        self.load_workflows()
        settings = read_settings(self.app.conf)
        options = engine_options(settings)
        if options["pool_size"]:
            # The relay threads share one connection (their statements are short): with
            # the LISTEN connection a relay holds two backends (docs/scaling.md).
            options.update(pool_size=1, max_overflow=0)
        store = self.store.with_pool(**options)
        group = RelayGroup(
            store,
            self.registry.types,
            self.config,
            self._publisher(),
            worker_id=self.worker_id,
            effects=effects,
            timers=timers,
            on_claimed=lambda kind, n: self.metrics.claimed(kind, n),
            attempt_limits=self.attempt_limits,
            concurrency_limits=self.concurrency_limits,
            routes=self.relay_routes(types),
            queue_depth=celery_queue_depth(self.app),
            lost_finder=(
                (lambda: LostDeliveries(self.app)) if self.config.release_lost_deliveries else None
            ),
            listen_url=settings["listen_url"],
            tcp_user_timeout=settings["tcp_user_timeout"],
            owns_store=True,
            group_sizes=self.effect_batch_sizes,
        )
        group.start()
        return group

    def _publisher(self) -> Publisher:
        """Celery publishing of claimed rows, in the messages the relay groups them into
        (up to each type's ``effect_batch_size`` rows; `relay.message_groups`)."""
        return celery_publisher(self.app, forward_traces=self.config.tracing)

    def run(
        self,
        shutdown: Stopping,
        *,
        effects: bool = True,
        timers: bool = True,
        types: Mapping[str, Collection[str]] | None = None,
    ) -> bool:
        """Run the relays until `shutdown` (a threading/multiprocessing Event) is set, then
        stop claiming and return within ``shutdown_timeout``; True when all stopped cleanly.
        `types`: per kind, the workflow types to claim (see `relay_routes`).
        """
        group = self.start_relays(effects=effects, timers=timers, types=types)
        self._start_duties(shutdown)
        log.info(
            "ironflow relays running (%s) for %s: claim batch %d, max in flight %d per queue",
            ", ".join(f"{r.kind} {r.name}" for r in group.relays) or "none",
            "; ".join(
                f"{r.kind} {', '.join(f'{t} -> {q}' for t, q in r.queues.items()) or 'none'}"
                for r in group.relays
            )
            or "no workflow types",
            self.config.claim_batch_size,
            self.config.max_in_flight,
        )
        try:
            while not shutdown.wait(0.5):
                for kind in KINDS:
                    self.metrics.in_flight(
                        kind.name,
                        sum(len(r.in_flight) for r in group.relays if r.kind == kind.name),
                    )
        finally:
            clean = group.stop(self.config.shutdown_timeout)
            if clean:
                log.info("ironflow relays stopped")
            else:
                log.warning(
                    "ironflow: relays did not stop within %.1fs; forcing stop",
                    self.config.shutdown_timeout,
                )
        return clean

    def _start_duties(self, shutdown: Stopping) -> None:
        """A relay process's other duties (`duties`), each off unless configured."""
        conf = self.app.conf if self.app is not None else {}
        for duty in self.duties:
            duty(self, conf, shutdown)

    async def run_async(self, shutdown: Awaitable[Any], **kwargs: Any) -> bool:
        """`run` for asyncio callers: relays until the `shutdown` awaitable completes."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        runner = loop.run_in_executor(None, lambda: self.run(stop, **kwargs))
        try:
            await shutdown
        finally:
            stop.set()
        return await runner

    # -- dead letters -----------------------------------------------------------------------
    # ironflow's API: the effect methods and their ``timer_`` twins, each one call of
    # `service.dead_letters` with the row kind and this runtime's attempt limits.
    def fetch_dead_letters(self, query: DeadLetterQuery | None = None) -> list[DeadLetter]:
        """Dead-lettered effects matching `query` (newest first)."""
        return dead_letters.fetch_dead_letters(
            self.store, query, kind=EFFECT.name, max_attempts=self.attempt_limits
        )

    def count_dead_letters(self, query: DeadLetterQuery | None = None) -> int:
        return dead_letters.count_dead_letters(
            self.store, query, kind=EFFECT.name, max_attempts=self.attempt_limits
        )

    def retry_dead_letter(self, row_id: uuid.UUID | str) -> bool:
        """Make one dead-lettered effect claimable again (never touches an in-flight row)."""
        return dead_letters.retry_dead_letter(
            self.store, row_id, kind=EFFECT.name, max_attempts=self.attempt_limits
        )

    def retry_dead_letters(
        self, query: DeadLetterQuery | None = None, *, batch_size: int = 500
    ) -> int:
        """Retry every dead-lettered effect matching `query`'s filters, in batches."""
        return dead_letters.retry_dead_letters(
            self.store,
            query,
            kind=EFFECT.name,
            max_attempts=self.attempt_limits,
            batch_size=batch_size,
        )

    def discard_dead_letter(self, row_id: uuid.UUID | str, reason: str) -> bool:
        """Mark a dead-lettered effect handled without running it (kept for audit)."""
        return dead_letters.discard_dead_letter(
            self.store, row_id, reason, kind=EFFECT.name, max_attempts=self.attempt_limits
        )

    def fetch_timer_dead_letters(self, query: DeadLetterQuery | None = None) -> list[DeadLetter]:
        return dead_letters.fetch_dead_letters(
            self.store, query, kind=TIMER.name, max_attempts=self.attempt_limits
        )

    def count_timer_dead_letters(self, query: DeadLetterQuery | None = None) -> int:
        return dead_letters.count_dead_letters(
            self.store, query, kind=TIMER.name, max_attempts=self.attempt_limits
        )

    def retry_timer_dead_letter(self, row_id: uuid.UUID | str) -> bool:
        return dead_letters.retry_dead_letter(
            self.store, row_id, kind=TIMER.name, max_attempts=self.attempt_limits
        )

    def retry_timer_dead_letters(
        self, query: DeadLetterQuery | None = None, *, batch_size: int = 500
    ) -> int:
        return dead_letters.retry_dead_letters(
            self.store,
            query,
            kind=TIMER.name,
            max_attempts=self.attempt_limits,
            batch_size=batch_size,
        )

    def discard_timer_dead_letter(self, row_id: uuid.UUID | str, reason: str) -> bool:
        return dead_letters.discard_dead_letter(
            self.store, row_id, reason, kind=TIMER.name, max_attempts=self.attempt_limits
        )


class WorkflowBuilder:
    """Collects registrations and configuration, then builds a runtime or a service."""

    def __init__(
        self, store: PostgresStore | None, service_config: WorkflowServiceConfig | None
    ) -> None:
        self._store = store
        self._service_config = service_config or WorkflowServiceConfig()
        self._registry = Registry()
        self._config = RuntimeConfig()
        self._app: Any = None
        self._error: Exception | None = None

    def register(
        self, workflow: type[Workflow], handler: EffectHandler | None = None
    ) -> WorkflowBuilder:
        """Register a workflow and its effect handler (a duplicate fails at build time)."""
        try:
            self._registry.register(workflow, handler_of(workflow, handler))
        except Exception as exc:  # reported by build_*, like ironflow
            self._error = self._error or exc
        return self

    def register_without_effects(self, workflow: type[Workflow]) -> WorkflowBuilder:
        try:
            self._registry.register_without_effects(workflow)
        except Exception as exc:
            self._error = self._error or exc
        return self

    def config(self, config: RuntimeConfig) -> WorkflowBuilder:
        self._config = config
        return self

    def celery_app(self, app: Any) -> WorkflowBuilder:
        """The Celery app relays publish to and whose workers run the tasks."""
        self._app = app
        return self

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._store is None:
            raise ConfigurationError("WorkflowRuntime.builder needs a store")

    def build_service(self) -> WorkflowService:
        self._check()
        assert self._store is not None
        return WorkflowService(self._store, self._registry, self._service_config)

    def build_runtime(self) -> WorkflowRuntime:
        self._check()
        runtime = WorkflowRuntime(
            self._registry, self._config, self._service_config, store=self._store, app=self._app
        )
        runtime._register_tasks()
        return runtime
