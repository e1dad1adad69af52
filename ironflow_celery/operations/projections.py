"""Projections: checkpointed readers of the event stream that never skip an event.

A projection has a stable ``name`` (its checkpoint key in ``ironflow.projection_positions``)
and a ``handle(event, conn)`` that receives every stored event of its workflow types in
global order, typed when the workflow is registered. Two modes:

- checkpoint (default): ``conn`` is None; the position is stored once per batch, so a
  crash re-delivers at most one batch (at-least-once);
- ``transactional=True``: ``conn`` is the SQLAlchemy connection of the transaction that
  also stores the position, so a read model in the same database is updated exactly once.

Beyond ironflow: the reader never skips an event committed out of order (see `_Fence`),
one runner per projection name works at a time (an advisory lock per batch), positions
only move forward, types are filtered in SQL, and a poison event is recorded in the
position row (``last_error``/``failed_sequence``/``failed_at``) while it is retried with
backoff.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from celery.utils.imports import import_from_cwd
from sqlalchemy.engine import Connection

from ironflow_celery.engine.runtime import WorkflowRuntime
from ironflow_celery.errors import (
    ConfigurationError,
    EventDeserializationError,
    InvalidPayload,
    ProjectionError,
)
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.storable import check_text, storable_text
from ironflow_celery.storage.store import (
    PostgresStore,
    ProjectionEventRow,
    ProjectionPositionRow,
)

log = logging.getLogger("ironflow_celery.projections")

__all__ = [
    "ConfiguredProjections",
    "FunctionProjection",
    "Projection",
    "ProjectionConfig",
    "ProjectionEvent",
    "ProjectionRunner",
    "configured_projections",
    "load_projections",
    "projection",
    "projection_config_from",
    "projection_status",
    "reset_projection",
    "run_projections",
]


@dataclass(frozen=True, slots=True)
class ProjectionEvent:
    """One stored event as a projection sees it.

    ``payload`` is the decoded Message when the workflow type is registered with the
    runner, else the raw JSON (``typed`` says which); ``raw`` is always the stored JSON.
    """

    global_sequence: int
    workflow_type: str
    workflow_id: str
    sequence: int
    payload: Any
    created_at: datetime
    raw: Any = None
    typed: bool = False


class Projection:
    """Base class: set ``name``, optionally ``workflow_types`` and ``transactional``;
    define ``handle(event, conn)`` and optionally ``reset(conn)`` (clear the read model)."""

    name: str = ""
    workflow_types: tuple[str, ...] | None = None
    """Only these workflow types are delivered (filtered in SQL); None = all."""
    transactional: bool = False
    """True: ``handle`` gets the connection whose transaction also stores the position."""

    def handle(self, event: ProjectionEvent, conn: Connection | None) -> None:
        """Apply one event to the read model; raise to stop the projection at it."""
        raise NotImplementedError

    def reset(self, conn: Connection) -> None:
        """Clear the read model (called in the transaction that resets the position)."""


class FunctionProjection(Projection):
    """A projection made from a function by the `projection` decorator."""

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        types: Iterable[str] | None = None,
        transactional: bool = False,
        reset: Callable[[Connection], Any] | None = None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.workflow_types = None if types is None else tuple(types)
        self.transactional = transactional
        self._reset = reset
        params = inspect.signature(fn).parameters
        self._takes_conn = len(params) >= 2
        self.__doc__ = fn.__doc__

    def handle(self, event: ProjectionEvent, conn: Connection | None) -> None:
        if self._takes_conn:
            self.fn(event, conn)
        else:
            self.fn(event)

    def reset(self, conn: Connection) -> None:
        if self._reset is not None:
            self._reset(conn)

    def on_reset(self, fn: Callable[[Connection], Any]) -> Callable[[Connection], Any]:
        """Decorator: the function that clears this projection's read model."""
        self._reset = fn
        return fn

    def __call__(self, event: ProjectionEvent, conn: Connection | None = None) -> None:
        self.handle(event, conn)

    def __repr__(self) -> str:
        return f"<projection {self.name!r}>"


def projection(
    name: str, *, types: Iterable[str] | None = None, transactional: bool = False
) -> Callable[[Callable[..., Any]], FunctionProjection]:
    """Decorator: ``@projection("orders_summary", types=["orders"], transactional=True)``
    over ``def fn(event, conn)`` (or ``def fn(event)``) gives a `Projection`."""

    def wrap(fn: Callable[..., Any]) -> FunctionProjection:
        return FunctionProjection(name, fn, types=types, transactional=transactional)

    return wrap


@dataclass(frozen=True, slots=True)
class ProjectionConfig:
    """Runner settings (ironflow's defaults, plus how long a batch waits for its fence)."""

    poll_interval: float = 0.2
    batch_size: int = 100
    error_backoff_base: float = 0.2
    error_backoff_max: float = 5.0
    fence_timeout: float = 1.0
    """How long `run_once` waits for older transactions to finish before giving up."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigurationError("projection batch_size must be at least 1")

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the n-th consecutive failure (1-based)."""
        exponent = min(max(0, failures - 1), 32)
        return min(self.error_backoff_base * (2.0**exponent), self.error_backoff_max)


@dataclass
class _Fence:
    """The sequence high-water mark and an xid drawn after it (see sql.PROJECTION_FENCE_*)."""

    high_water: int
    xid: str


@dataclass
class BatchResult:
    """What one batch did."""

    delivered: int = 0
    waiting: bool = False
    """True when older transactions were still open (events may still appear below)."""
    error: str | None = None
    failed_sequence: int | None = None
    more: bool = False


def _check_projection(p: Any) -> Projection:
    if not getattr(p, "name", None) or not isinstance(p.name, str):
        raise ConfigurationError(f"projection {p!r} has no name")
    check_text(p.name, "projection name")
    if not callable(getattr(p, "handle", None)):
        raise ConfigurationError(f"projection {p.name!r} has no handle(event, conn)")
    return cast(Projection, p)  # checked above: a name and a handle, as Projection asks


class ProjectionRunner:
    """Delivers the events of one projection, batch by batch, from its stored position."""

    def __init__(
        self,
        store: PostgresStore,
        projection: Projection,
        registry: Any = None,
        config: ProjectionConfig | None = None,
    ) -> None:
        self.store = store
        self.projection = _check_projection(projection)
        self.registry = registry
        self.config = config or ProjectionConfig()
        self.failures = 0
        self.last_error: str | None = None
        self._fence: _Fence | None = None
        self._ensured = False
        types = getattr(projection, "workflow_types", None)
        self._types = None if types is None else list(types)

    @property
    def name(self) -> str:
        return self.projection.name

    # -- the loop ------------------------------------------------------------------------
    def run(self, shutdown: Any) -> None:
        """Process events until `shutdown` (a threading/multiprocessing Event) is set."""
        log.info("projection %s: started", self.name)
        while not shutdown.is_set():
            try:
                result = self.run_batch(shutdown)
            except Exception as exc:  # database trouble: back off like a handler failure
                result = BatchResult(error=f"{type(exc).__name__}: {exc}")
                log.warning("projection %s: %s", self.name, result.error)
            if result.error is not None:
                self.failures += 1
                delay = self.config.backoff(self.failures)
                log.warning(
                    "projection %s: stopped at event %s (%s); retrying in %.2fs",
                    self.name,
                    result.failed_sequence,
                    result.error,
                    delay,
                )
                shutdown.wait(delay)
            elif result.more:
                continue
            else:
                shutdown.wait(self.config.poll_interval)
        log.info("projection %s: stopped", self.name)

    def run_once(self) -> int:
        """Process the events available now; returns how many were delivered.

        Stops at a failing event (its error is stored; `last_error` says it) and when
        older transactions stay open longer than ``fence_timeout``.
        """
        total = 0
        while True:
            result = self.run_batch()
            total += result.delivered
            if result.error is not None or not result.more:
                return total

    def run_batch(self, shutdown: Any = None) -> BatchResult:
        """One batch: fence, lock, fetch, handle, store the position."""
        self._ensure_position()
        fence = self._fence or self._new_fence()
        if fence is None:
            return BatchResult()
        deadline = time.monotonic() + self.config.fence_timeout
        while True:
            result = self._batch(fence)
            if not result.waiting:
                break
            if time.monotonic() >= deadline or (shutdown is not None and shutdown.is_set()):
                return result
            time.sleep(0.01)
        if result.error is None:
            self.failures = 0
            self.last_error = None
        else:
            self.last_error = result.error
        return result

    # -- internals -----------------------------------------------------------------------
    def _ensure_position(self) -> None:
        if not self._ensured:
            self.store.load_projection_position(self.name)
            self._ensured = True

    def _new_fence(self) -> _Fence | None:
        """Read the high-water mark, then draw an xid (only when there may be new events)."""
        fence = self.store.projection_fence(self.name)
        if fence is None:
            return None
        self._fence = _Fence(*fence)
        return self._fence

    def _batch(self, fence: _Fence) -> BatchResult:
        limit = self.config.batch_size
        transactional = bool(getattr(self.projection, "transactional", False))
        with self.store.connection() as conn:
            tx = conn.begin()
            try:
                if not self.store.try_lock_projection(self.name, connection=conn):
                    tx.rollback()
                    return BatchResult()  # another runner of this projection holds its lock
                position = self.store.projection_position(self.name, connection=conn)
                # Before any write: a transaction's own xid would hold its snapshot's xmin.
                passed, events = self.store.fetch_events_for_projection(
                    fence_xid=fence.xid,
                    after=position,
                    high_water=fence.high_water,
                    types=self._types,
                    limit=limit,
                    connection=conn,
                )
                if not passed:
                    tx.rollback()
                    return BatchResult(waiting=True)
                more = len(events) == limit
                handler_conn = conn if transactional else None
                failed: ProjectionError | None = None
                done = 0
                for row in events:
                    try:
                        self._deliver(row, handler_conn)
                    except Exception as exc:
                        failed = ProjectionError(row.global_sequence, _describe(exc))
                        break
                    done += 1
                if failed is not None and transactional:
                    # The failed event may have half-written the read model: drop the whole
                    # batch, then redo the events before it in a fresh transaction.
                    tx.rollback()
                    return self._after_failure(events[:done], failed, position)
                if failed is not None:
                    last = events[done - 1].global_sequence if done else position
                    self._record_error(conn, last, failed)
                    tx.commit()
                    return BatchResult(
                        done, error=str(failed), failed_sequence=failed.global_sequence
                    )
                # Every event <= high_water is final: a filtered projection may jump there.
                new_position = events[-1].global_sequence if more else fence.high_water
                self.store.advance_projection(self.name, new_position, connection=conn)
                tx.commit()
                if not more:
                    self._fence = None
                    # Events may have arrived meanwhile: look again at once when the batch
                    # delivered something.
                    more = bool(events)
                return BatchResult(done, more=more)
            except BaseException:
                if tx.is_active:
                    tx.rollback()
                raise

    def _after_failure(
        self, before: Sequence[Any], failed: ProjectionError, position: int
    ) -> BatchResult:
        """Transactional mode: commit the events before the poison one, then the error."""
        with self.store.connection() as conn, conn.begin():
            if not self.store.try_lock_projection(self.name, connection=conn):
                return BatchResult()  # another runner of this projection holds its lock
            last = position
            done = 0
            for row in before:
                try:
                    self._deliver(row, conn)
                except Exception as exc:  # not deterministic: stop here instead
                    failed = ProjectionError(row.global_sequence, _describe(exc))
                    break
                last = row.global_sequence
                done += 1
            self._record_error(conn, last, failed)
        return BatchResult(done, error=str(failed), failed_sequence=failed.global_sequence)

    def _record_error(self, conn: Connection, position: int, failed: ProjectionError) -> None:
        self.store.record_projection_error(
            self.name, position, str(failed)[:4000], failed.global_sequence, connection=conn
        )

    def _deliver(self, row: ProjectionEventRow, conn: Connection | None) -> None:
        payload, typed = row.payload, False
        if self.registry is not None and row.workflow_type in self.registry:
            workflow = self.registry.get(row.workflow_type).workflow
            try:
                payload = workflow.events.decode(row.payload)
            except InvalidPayload as exc:
                raise EventDeserializationError(
                    row.workflow_type, row.workflow_id, row.sequence, str(exc)
                ) from None
            typed = True
        event = ProjectionEvent(
            row.global_sequence,
            row.workflow_type,
            row.workflow_id,
            row.sequence,
            payload,
            row.created_at,
            row.payload,
            typed,
        )
        self.projection.handle(event, conn)


def _describe(exc: BaseException) -> str:
    # escaped: a NUL or lone surrogate in the message would make the error unrecordable
    return storable_text(f"{type(exc).__name__}: {exc}")


# -- operations ---------------------------------------------------------------------------


def reset_projection(store: PostgresStore, projection: Projection | str) -> None:
    """Rebuild from zero: position 0, error cleared, and the projection's ``reset(conn)``
    (its read model) in the same transaction, under the projection's lock."""
    name = projection if isinstance(projection, str) else projection.name
    check_text(name, "projection name")
    with store.transaction() as conn:
        store.lock_projection(name, connection=conn)
        if not isinstance(projection, str):
            reset = getattr(projection, "reset", None)
            if reset is not None:
                reset(conn)
        store.reset_projection_position(name, connection=conn)


def projection_status(
    store: PostgresStore, projections: Iterable[Projection] = ()
) -> list[dict[str, Any]]:
    """One dict per stored (or given) projection: name, position, head, lag, status,
    last_error, failed_sequence, failed_at, updated_at. Lag counts from the newest event
    of the projection's workflow types when the projection object is given."""
    known = {p.name: p for p in projections}
    rows, heads, global_head = store.projection_status_rows(
        {p.name: list(p.workflow_types) for p in known.values() if p.workflow_types is not None},
        with_global_head=bool(known),
    )
    out: list[dict[str, Any]] = []
    seen = set()
    for r in rows:
        head = heads.get(r.projection_name, int(r.head))
        seen.add(r.projection_name)
        out.append(_status_row(r.projection_name, int(r.last_sequence), head, r))
    for name in sorted(set(known) - seen):
        out.append(_status_row(name, 0, heads.get(name, global_head), None))
    return out


def _status_row(
    name: str, position: int, head: int, row: ProjectionPositionRow | None
) -> dict[str, Any]:
    error = row.last_error if row is not None else None
    return {
        "name": name,
        "position": position,
        "head": head,
        "lag": max(0, head - position),
        "status": "failing" if error else ("new" if row is None else "ok"),
        "last_error": error,
        "failed_sequence": row.failed_sequence if row is not None else None,
        "failed_at": row.failed_at if row is not None else None,
        "updated_at": row.updated_at if row is not None else None,
    }


def load_projections(specs: Iterable[Any] | str | None) -> list[Projection]:
    """Projections from objects or ``"module:attr"`` names (comma separated in a string).

    An attribute may be a `Projection` instance, a Projection subclass (instantiated), or
    a list/tuple of those.
    """
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    found: list[Projection] = []
    for spec in specs:
        if isinstance(spec, str):
            module_name, _, attr = spec.partition(":")
            if not attr:
                raise ConfigurationError(f"projection {spec!r}: expected 'module:attribute'")
            try:
                module = import_from_cwd(module_name)  # like Celery's `imports`
            except ImportError as exc:
                raise ConfigurationError(
                    f"cannot import projection module {module_name!r}: {exc}"
                ) from exc
            try:
                obj = getattr(module, attr)
            except AttributeError:
                raise ConfigurationError(f"{module_name!r} has no attribute {attr!r}") from None
            found.extend(load_projections(obj if isinstance(obj, list | tuple) else [obj]))
        elif isinstance(spec, type) and issubclass(spec, Projection):
            found.append(_check_projection(spec()))
        else:
            found.append(_check_projection(spec))
    names = [p.name for p in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigurationError(f"projection names configured twice: {', '.join(duplicates)}")
    return found


def configured_projections(conf: Any) -> list[Projection]:
    """``ironflow_projections`` on a Celery app's conf, else ``IRONFLOW_PROJECTIONS``."""
    return load_projections(read_settings(conf)["projections"])


def projection_config_from(conf: Any) -> ProjectionConfig:
    """A `ProjectionConfig` from ``ironflow_projection_*`` settings."""
    return ProjectionConfig(**read_settings(conf).fields("ProjectionConfig"))


def run_projections(
    store: PostgresStore,
    projections: Iterable[Projection],
    shutdown: Any,
    *,
    registry: Any = None,
    config: ProjectionConfig | None = None,
    join_timeout: float = 30.0,
) -> None:
    """Run each projection in its own thread until `shutdown` is set, then join them."""
    threads = []
    for p in projections:
        runner = ProjectionRunner(store, p, registry, config)
        t = threading.Thread(
            target=runner.run, args=(shutdown,), name=f"ironflow-projection-{p.name}", daemon=True
        )
        t.start()
        threads.append(t)
    try:
        while not shutdown.wait(0.5):
            pass
    finally:
        shutdown.set()
        deadline = time.monotonic() + join_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


# -- what the worker bootstep runs (integration.projections.ProjectionStep) ----------------


@dataclass
class _ProjectionJob:
    runtime: WorkflowRuntime
    projections: list[Projection]
    config: ProjectionConfig

    def __call__(self, stop_event: Any) -> None:
        run_projections(
            self.runtime.store,
            self.projections,
            stop_event,
            registry=self.runtime.registry,
            config=self.config,
            join_timeout=self.runtime.config.shutdown_timeout,
        )


@dataclass(frozen=True)
class ConfiguredProjections:
    """The projections an app's settings configure and the job that runs them: the plan
    the worker's `ProjectionStep` (integration) drives, bound by `ironflow_celery.celery_app`."""

    projections: list[Projection]
    config: ProjectionConfig

    @classmethod
    def of(cls, conf: Any) -> ConfiguredProjections:
        return cls(configured_projections(conf), projection_config_from(conf))

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.projections]

    def job(self, runtime: WorkflowRuntime) -> _ProjectionJob:
        return _ProjectionJob(runtime, self.projections, self.config)
