"""The per-workflow-type Celery tasks and their ack path.

``ironflow.<type>.effect(workflow_ref, row_id, attempt, lease=token)``:

1. start guard: the row is still held by the relay's lease token; it moves to a
   per-delivery run token (a duplicate delivery then finds nothing) and the lease is
   renewed, in one statement. Otherwise the task skips as stale and says so;
2. the handler runs while a lease keeper renews the lease of long-running rows;
3. acknowledgement in one transaction: the handler's follow-up input goes through the
   service and the row is marked processed together; or the failure is recorded
   (attempts + 1, last error, backoff in ``locked_until``), or the row is dead-lettered
   and the workflow's ``on_dead_letter`` input is executed in that same transaction.

Timer tasks execute the timer's input and mark the timer processed in one transaction.
Attempts live in PostgreSQL; Celery's own retry machinery is never used.

Failures are reported where Celery teams look, after the outcome is committed: a failed
attempt is logged at WARNING and the task ends RETRY (a ``celery.exceptions.Retry`` that
sends no message: the outbox schedules the next attempt); a dead letter is logged at
ERROR, sent as `signals.dead_lettered`, and the task raises `DeadLettered` so Celery
marks it FAILURE (``task_failure``, Flower's Failed view, Sentry). The message is
acknowledged on receipt either way (``acks_late`` is off), so the broker never redelivers.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any, Literal

from ironflow_celery.engine import row_events
from ironflow_celery.engine.host import TaskHost
from ironflow_celery.engine.inputs import register_execute_tasks
from ironflow_celery.engine.metrics import UNKNOWN, RowMeter
from ironflow_celery.engine.redelivery import send_back
from ironflow_celery.engine.sharing import hand_back, share
from ironflow_celery.engine.signals import dead_lettered
from ironflow_celery.errors import (
    AcknowledgementFailed,
    DeadLettered,
    GroupInputFailed,
    InvalidPayload,
    PermanentEffectError,
    StartGuardUnavailable,
    StorageError,
)
from ironflow_celery.model.config import RetryPolicy, results_ignored
from ironflow_celery.model.messages import Message
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.storable import storable_text
from ironflow_celery.model.workflow import DeadLetterNotice, EffectContext, WorkflowRef
from ironflow_celery.service import tracing
from ironflow_celery.service.aio import call_handler
from ironflow_celery.storage.kinds import EFFECT, KINDS, TIMER, Kind, RowKind, kind_of
from ironflow_celery.storage.store import LOST_RUN_ERROR, StartedRow

__all__ = [
    "GROUP_ACK_DELAY",
    "KEEPER_IDLE_EXIT",
    "ROW_LINE",
    "Completer",
    "Delivery",
    "LeaseKeeper",
    "Ran",
    "Runner",
    "Status",
    "acknowledge",
    "as_input",
    "dead_letter",
    "describe_error",
    "effect_label",
    "exhausted_by_lost_runs",
    "fail_row",
    "handler_failure",
    "log_row",
    "register_workflow_tasks",
    "report_group",
    "row_policy",
    "run_effect",
    "run_rows",
    "run_timer",
    "run_token_for",
    "run_tokens_for",
    "stale_reason",
    "task_result",
]

log = logging.getLogger("ironflow_celery.tasks")

RowResult = dict[str, Any]
"""What running one row returns (JSON: the Celery task's result; see `run_rows`)."""
# The dead-letter ERROR line has its own (child) logger, which Sentry's logging integration
# is told to ignore: the dead letter is sent to Sentry once, as a structured event
# (`_send_dead_letter_to_sentry`), not a second time as a log line titled by its format.
DEAD_LETTER_LOGGER = "ironflow_celery.tasks.dead_letters"
dead_letter_log = logging.getLogger(DEAD_LETTER_LOGGER)

Status = Literal["processed", "failed-will-retry", "dead-lettered", "stale-skipped"]

_WORKER_TAG = f"{socket.gethostname()}:{os.getpid()}"

# The exception behind this task run's failed attempt or dead letter: the Celery task
# re-raises it (as Retry's `exc`, or as DeadLettered's cause) once the outcome is stored.
handler_failure: contextvars.ContextVar[BaseException | None] = contextvars.ContextVar(
    "ironflow_failure", default=None
)


def run_token_for(lease: str) -> str:
    return run_tokens_for([lease])[0]


def run_tokens_for(leases: Sequence[str]) -> list[str]:
    """A fresh run token per claim token: ``<claim token>><host>:<pid>:<8 random hex>``
    (one read of the system's random source for a whole group)."""
    noise = os.urandom(4 * len(leases)).hex()
    return [f"{lease}>{_WORKER_TAG}:{noise[8 * i : 8 * i + 8]}" for i, lease in enumerate(leases)]


def describe_error(exc: BaseException) -> str:
    """``ExceptionType: message`` — what ``last_error`` stores (NUL and lone surrogates
    escaped: text PostgreSQL cannot store would make the failure itself unrecordable)."""
    text = str(exc).strip() or repr(exc)
    return storable_text(f"{type(exc).__name__}: {text}"[:4000])


def task_result(
    status: Status, ref: str, row_id: Any, attempt: int, **extra: Any
) -> dict[str, Any]:
    return {"status": status, "workflow": ref, "row_id": str(row_id), "attempt": attempt, **extra}


# -- lease keeper ----------------------------------------------------------------------


KEEPER_IDLE_EXIT = 1.0
"""Seconds the lease keeper's thread lingers with no handler running before it ends; it
also checks its state this often (it is never woken per task), so it ends within twice this."""


class LeaseKeeper:
    """Renews the leases of rows whose handlers run longer than a third of their lease.

    One daemon thread per process; handlers register while they run. A renewal that comes
    back "not held" while the run still goes on means another run may execute the row too
    (its lease expired and it was claimed again, or it was cancelled): logged at WARNING
    with whoever holds the row now, and the row is no longer renewed.
    """

    def __init__(self, runtime: TaskHost) -> None:
        self.runtime = runtime
        self._running: dict[tuple[Kind, uuid.UUID], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._flushers: list[Callable[[], None]] = []
        # Whether the thread waits longer than a flusher may (it saw none): only then does
        # a new flusher wake it (see `flushing`).
        self._long_wait = False
        # Rows whose last renewal came back not held, by their token: warned about one
        # round later if their run still goes on (a run that just recorded its own
        # outcome also finds its row not held, and has left `_running` by then).
        self._not_held: dict[tuple[Kind, uuid.UUID], str] = {}

    def _lease(self, kind: Kind) -> float:
        return kind_of(kind).lock_duration(self.runtime.config)

    def keep(self, kind: Kind, row_id: uuid.UUID, token: str) -> AbstractContextManager[None]:
        """Keep `row_id`'s lease alive while the block runs."""
        return self.keep_rows(kind, [(row_id, token)])

    @contextmanager
    def keep_rows(self, kind: Kind, rows: Sequence[tuple[uuid.UUID, str]]) -> Iterator[None]:
        """Keep the leases of `rows`, (row id, run token) each, alive while the block runs:
        a group's rows are registered together, under one lock."""
        if not rows:  # (a run whose rows all were stale: no thread to start)
            yield
            return
        now = time.monotonic()
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="ironflow-lease-keeper", daemon=True
                )
                self._thread.start()
            self._running.update({(kind, row_id): (token, now) for row_id, token in rows})
        try:
            yield
        finally:
            # No wake-up here: setting the Event after every task woke the keeper thread
            # once per effect (a GIL hand-off, ~15% of a worker's samples under load); the
            # thread notices it is idle within KEEPER_IDLE_EXIT by itself.
            self.done_rows(kind, [row_id for row_id, _ in rows])

    def done(self, kind: Kind, row_id: uuid.UUID) -> None:
        """Stop renewing a row whose outcome is recorded while its `keep` block still runs
        (a group's row: the block ends with the group)."""
        self.done_rows(kind, [row_id])

    def done_rows(self, kind: Kind, row_ids: Iterable[uuid.UUID]) -> None:
        """`done` for several rows at once (a group's acknowledged rows)."""
        with self._lock:
            for row_id in row_ids:
                self._running.pop((kind, row_id), None)

    @contextmanager
    def flushing(self, flush: Callable[[], None]) -> Iterator[None]:
        """Call `flush` every ``GROUP_ACK_DELAY / 2`` seconds while the block runs (a
        group's `Completer.flush_due`: its pending acknowledgements are committed while a
        slow handler still runs). Inside `keep` blocks: the thread runs while they do."""
        with self._lock:
            self._flushers.append(flush)
            wake = self._long_wait
        # Wait the shorter interval from now on. Only a thread in a longer wait is woken: a
        # wake-up per group was a GIL hand-off per group, and while groups follow each
        # other the thread mostly waits the short interval already.
        if wake:
            self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._flushers.remove(flush)

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            interval = max(0.2, min(k.lock_duration(self.runtime.config) for k in KINDS) / 3)
            with self._lock:
                # Idle for a while: end the thread, so none outlives the worker that ran
                # the handlers (e.g. Celery's in-thread test worker); `keep` starts a new one.
                if self._running:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= KEEPER_IDLE_EXIT:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
            with self._lock:
                flushers = list(self._flushers)
                wait = min(interval, KEEPER_IDLE_EXIT, GROUP_ACK_DELAY / 2 if flushers else 1)
                self._long_wait = wait > GROUP_ACK_DELAY / 2
            self._wake.wait(wait)
            self._wake.clear()  # before the state is read again at the top: no lost wake-up
            with self._lock:
                flushers = list(self._flushers)
            for flush in flushers:
                try:
                    flush()
                except Exception as exc:  # the group's own thread commits it at its end
                    log.warning("ironflow: a group's early acknowledgement failed: %s", exc)
            self._warn_not_held()
            now = time.monotonic()
            for kind in KINDS:
                lease = kind.lock_duration(self.runtime.config)
                with self._lock:
                    due = [
                        (row_id, token)
                        for (k, row_id), (token, since) in self._running.items()
                        if k == kind.name and now - since >= lease / 3
                    ]
                if not due:
                    continue
                try:
                    renewed = self.runtime.store.renew_leases(kind, due, lease_seconds=lease)
                except StorageError as exc:
                    log.warning("ironflow: lease renewal failed: %s", exc)
                    continue
                with self._lock:
                    for row_id, token in due:
                        key = (kind.name, row_id)
                        if key not in self._running or self._running[key][0] != token:
                            continue  # its run ended meanwhile
                        if row_id in renewed:
                            self._running[key] = (token, now)
                        else:
                            self._not_held[key] = token

    def _warn_not_held(self) -> None:
        """Log the rows whose renewal came back not held a round ago and whose runs still
        go on, and stop renewing them."""
        with self._lock:
            if not self._not_held:
                return
            lost = [
                (key, token)
                for key, token in self._not_held.items()
                if key in self._running and self._running[key][0] == token
            ]
            self._not_held.clear()
            for key, _ in lost:
                del self._running[key]
        for (kind, row_id), token in lost:
            log.warning(
                "ironflow: the lease of %s %s is no longer held by this run (%s): %s; another "
                "run may execute it too, and this run's outcome will not be recorded",
                kind, row_id, token, _holder(self.runtime, kind, row_id),
            )  # fmt: skip


def _holder(runtime: TaskHost, kind: Kind, row_id: uuid.UUID) -> str:
    """Who holds a row whose lease renewal came back not held (one SELECT, on that rare
    path only)."""
    try:
        row = runtime.store.describe_stale(kind, row_id)
    except StorageError as exc:
        return f"its state could not be read ({exc})"
    if row is None:
        return "the row no longer exists"
    if row.locked_by:
        lease = "live" if row.lease_live else "expired"
        return f"now held by {row.locked_by} ({lease} lease)"
    if row.discarded:
        return "it was closed without this run (cancelled, or a discarded dead letter)"
    if row.processed:
        return "it was processed by another run"
    if row.dead_lettered:
        return "it was dead-lettered by another run"
    return "it is held by nobody (released, or backing off after another run's failure)"


# -- stale deliveries ------------------------------------------------------------------


def stale_reason(runtime: TaskHost, kind: Kind, row_id: uuid.UUID, lease: str) -> str:
    """Why a start guard found the row no longer held by `lease`, read after the fact.

    One extra SELECT, only on the stale path; the state may move on after it is read, so
    it describes the row as it was just after this delivery was refused.
    """
    noun = kind_of(kind).noun
    try:
        row = runtime.store.describe_stale(kind, row_id)
    except StorageError as exc:
        return f"the {noun} is no longer held by this lease (its state could not be read: {exc})"
    if row is None:
        return f"the {noun} no longer exists (deleted, e.g. by retention)"
    if row.discarded:
        return f"the {noun} was closed without running (cancelled, or a discarded dead letter)"
    if row.processed:
        return f"the {noun} is already processed"
    # ironflow marks a dead letter only by attempts: compare with the limit the claim uses
    # for this row's type (its workflow's own policy), not the global one.
    if row.dead_lettered or row.attempts >= runtime.attempt_limits.for_type(row.workflow_type):
        return f"the {noun} is a dead letter"
    locked_by = row.locked_by or ""
    # A start guard hands the claim token on to a run token "<claim token>>…" (run_token_for).
    if locked_by.startswith(f"{lease}>"):
        if row.lease_live:
            return f"another delivery of this claim is running the {noun} (duplicate message)"
        return (
            f"another delivery of this claim started the {noun} and its lease expired "
            "(that run counts as a lost attempt once the row is claimed again)"
        )
    if locked_by:
        if row.lease_live:
            return f"the {noun} was re-claimed under another lease ({locked_by})"
        return f"the {noun} is held by another, expired lease ({locked_by}); it will be re-claimed"
    return f"the {noun} was released: it waits for its backoff or its next claim"


# -- effects ---------------------------------------------------------------------------


def _begin(
    runtime: TaskHost,
    kind: RowKind,
    rid: uuid.UUID,
    ref: str,
    attempt: int,
    lease: str,
    runner: Runner,
) -> StartedRow | RowResult:
    """The start guard of a single-row run, for either kind: the started row, or the
    task's result when the delivery is stale or the row's attempts were used up by runs
    that never finished. A database it cannot reach raises `StartGuardUnavailable` (the
    task sends its message back through the broker). The started row's ``token`` is this
    run's own token, which every later statement of the run presents."""
    handler_failure.set(None)
    try:
        started = runtime.store.start(
            kind,
            rid,
            lease,
            run_token_for(lease),
            lease_seconds=kind.lock_duration(runtime.config),
            worker=runner.worker,
            task_id=runner.task_id,
        )
    except StorageError as exc:
        raise StartGuardUnavailable(str(exc)) from exc
    if started is None:
        runtime.metrics.task_finished(kind.name, None, "stale-skipped", None)
        return task_result(
            "stale-skipped",
            ref,
            rid,
            attempt,
            reason=stale_reason(runtime, kind.name, rid, lease),
        )
    if started.attempts >= row_policy(runtime, kind.name, started).max_attempts:
        return exhausted_by_lost_runs(runtime, kind.name, started, ref)
    return started


# -- the one execution path: effects and timers, one row or a group ----------------------


@dataclass(frozen=True, slots=True)
class Runner:
    """Who runs a message's rows, for their attempt histories: the Celery worker's name
    (``celery@host``; None: this host's name) and the task id of the message."""

    worker: str | None = None
    task_id: str | None = None


@dataclass(slots=True)
class Delivery:
    """One row as its message names it (the relay's claim): a single-row message carries
    one, a group message several of one workflow type."""

    row_id: str
    ref: str
    """``<workflow type>:<workflow id>``."""
    attempt: int
    lease: str
    """The claim token the start guard checks."""
    effect_type: str | None = None
    due: float | None = None
    """When the row became due (epoch seconds, database clock), for the dispatch metric."""
    trace: str | None = None
    """The row's stored trace context (a group's rows each carry their own)."""


@dataclass(slots=True)
class Ran:
    """A started row whose work returned, waiting for its completer to commit it."""

    started: StartedRow
    ref: str
    attempt: int
    follow_up: Message | None
    """An effect handler's input; None for a timer (its input is its payload)."""
    workflow: Any
    began: float
    trace: str | None = None
    """The row's own span context, current again while its follow-up executes."""
    label: str | None = None
    """Its effect-type metric label (`effect_label`)."""


GROUP_ACK_DELAY = 0.2
"""Seconds a grouped row whose handler returned may wait for the group's acknowledgement:
the group commits what is pending before its next handler once the oldest pending row is
this old, and the lease keeper's thread commits it meanwhile (it checks every half of
this) while a slow handler still runs. A fast row's acknowledgement therefore waits at
most about 1.5 times this plus one commit, whatever the handlers after it do."""


class Completer:
    """How a run's rows are finished once their work returned (River's completer).

    Inline (one row): each row is acknowledged at once, in its own durable transaction.
    Grouped: rows wait, and the pending ones are acknowledged together in one durable
    transaction when the group ends or the oldest has waited `GROUP_ACK_DELAY`. Both
    acknowledge through `acknowledge`; only when they call it differs."""

    def __init__(
        self,
        runtime: TaskHost,
        kind: RowKind,
        errors: dict[uuid.UUID, BaseException],
        *,
        grouped: bool,
        meter: RowMeter | None = None,
    ) -> None:
        self.runtime = runtime
        self.kind = kind
        self.errors = errors
        self.grouped = grouped
        self.meter = meter or runtime.metrics.meter()
        self.results: dict[uuid.UUID, RowResult] = {}
        self._pending: list[Ran] = []
        self._since = 0.0
        # Held for a whole acknowledgement: the lease keeper's thread may flush while the
        # task's thread runs the next handler, and `finish` waits for that flush.
        self._lock = threading.Lock()

    def add(self, ran: Ran) -> None:
        """A row whose work returned: acknowledge it now (inline) or soon (grouped)."""
        with self._lock:
            if not self._pending:
                self._since = time.monotonic()
            self._pending.append(ran)
            if not self.grouped or time.monotonic() - self._since >= GROUP_ACK_DELAY:
                self._flush()

    def flush_due(self) -> None:
        """Acknowledge the pending rows if the oldest has waited long enough (called by
        the lease keeper's thread while a handler runs; never blocks on the task's)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._pending and time.monotonic() - self._since >= GROUP_ACK_DELAY:
                self._flush()
        finally:
            self._lock.release()

    def finish(self) -> dict[uuid.UUID, RowResult]:
        """Acknowledge whatever is pending; the results of every row added."""
        with self._lock:
            self._flush()
            return self.results

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self.results.update(
                acknowledge(self.runtime, self.kind, pending, self.errors, meter=self.meter)
            )
            self.runtime.lease_keeper.done_rows(self.kind.name, [r.started.id for r in pending])


def run_rows(
    runtime: TaskHost,
    kind: RowKind,
    deliveries: Sequence[Delivery],
    *,
    errors: dict[str, BaseException] | None = None,
    runner: Runner | None = None,
) -> list[RowResult]:
    """The one execution path of effects and timers, for one row or a group of one type:

    1. start guard (one statement for the whole group; a stale row is skipped alone, with
       its reason; a row whose attempts were used up by lost runs is dead-lettered);
    2. every started row's lease is kept alive until the run ends;
    3. each row's work (an effect's handler; a timer has none: its input executes in its
       acknowledgement), a failure recorded at once for that row alone;
    4. the completer acknowledges the rows whose work returned (see `Completer`).

    Returns one task result per delivery, in order; `errors` receives the exception of
    each row that failed; `runner`, who runs them, goes to their attempt histories. Nothing
    is reported processed before the transaction that marks it processed commits."""
    runner = runner or Runner()
    ids = [uuid.UUID(d.row_id) for d in deliveries]  # each row id parsed once, here
    if len(deliveries) == 1:
        only = deliveries[0]
        begun = _begin(runtime, kind, ids[0], only.ref, only.attempt, only.lease, runner)
        started = {} if isinstance(begun, dict) else {begun.id: begun}
        results = {ids[0]: begun} if isinstance(begun, dict) else {}
    else:
        started, results = _begin_group(runtime, kind, deliveries, ids, runner)
    failures: dict[uuid.UUID, BaseException] = {}
    meter = runtime.metrics.meter()
    completer = Completer(runtime, kind, failures, grouped=len(deliveries) > 1, meter=meter)
    keeper = runtime.lease_keeper
    with ExitStack() as kept:
        kept.enter_context(keeper.keep_rows(kind.name, [(r.id, r.token) for r in started.values()]))
        if completer.grouped:
            kept.enter_context(keeper.flushing(completer.flush_due))
        for delivery, row_id in zip(deliveries, ids, strict=True):
            row = started.get(row_id)
            if row is None:
                continue
            ran = _work(runtime, kind, row, delivery, failures, meter, grouped=completer.grouped)
            if isinstance(ran, Ran):
                completer.add(ran)
            else:
                results[row_id] = ran
                keeper.done_rows(kind.name, [row_id])
        results.update(completer.finish())
    if errors is not None:
        errors.update({str(row_id): exc for row_id, exc in failures.items()})
    ordered = [results[row_id] for row_id in ids]
    for delivery, result in zip(deliveries, ordered, strict=True):
        log_row(kind.name, delivery, result)
    return ordered


def _begin_group(
    runtime: TaskHost,
    kind: RowKind,
    deliveries: Sequence[Delivery],
    ids: Sequence[uuid.UUID],
    runner: Runner,
) -> tuple[dict[uuid.UUID, StartedRow], dict[uuid.UUID, RowResult]]:
    """The start guard of a group, one statement (`ids`: its rows' parsed ids): the
    started rows, and the results of the rows that did not start (stale, each with its
    reason; or exhausted by lost runs)."""
    if kind is not EFFECT:
        raise InvalidPayload(kind.name, "group", "only effects travel in groups")
    handler_failure.set(None)
    leases = [d.lease for d in deliveries]
    guard = list(zip(ids, leases, run_tokens_for(leases), strict=True))
    try:
        started = runtime.store.start_effects(
            guard,
            lease_seconds=kind.lock_duration(runtime.config),
            worker=runner.worker,
            task_id=runner.task_id,
        )
    except StorageError as exc:
        raise StartGuardUnavailable(str(exc)) from exc
    results: dict[uuid.UUID, RowResult] = {}
    for (row_id, lease, _), delivery in zip(guard, deliveries, strict=True):
        row = started.get(row_id)
        if row is None:
            runtime.metrics.task_finished(kind.name, None, "stale-skipped", None)
            reason = stale_reason(runtime, kind.name, row_id, lease)
            results[row_id] = task_result(
                "stale-skipped", delivery.ref, row_id, delivery.attempt, reason=reason
            )
        # (a first attempt is never exhausted: every policy allows one; skip the look-up)
        elif row.attempts and row.attempts >= row_policy(runtime, kind.name, row).max_attempts:
            results[row_id] = exhausted_by_lost_runs(runtime, kind.name, row, delivery.ref)
            del started[row_id]
    return started, results


def _work(
    runtime: TaskHost,
    kind: RowKind,
    started: StartedRow,
    delivery: Delivery,
    errors: dict[uuid.UUID, BaseException],
    meter: RowMeter,
    *,
    grouped: bool,
) -> Ran | RowResult:
    """A started row's work: an effect's handler (its failure recorded here, for this row
    alone), nothing for a timer. A grouped row runs in its own span, a child of the trace
    that wrote it."""
    attempt = started.attempts + 1
    due = delivery.due  # epoch seconds, database clock
    if due is None and started.attempts == 0 and kind is EFFECT:
        # called without the claim's due time: a first attempt became due when created
        due = started.created_at.timestamp()
    label = effect_label(runtime, kind.name, started)
    meter.started(kind.name, started.workflow_type, due, label)
    began = time.monotonic()
    registration = runtime.registry.get(started.workflow_type)
    workflow = registration.workflow
    if kind is not EFFECT:
        return Ran(started, delivery.ref, attempt, None, workflow, began, label=label)
    span = (
        tracing.row_span(
            f"ironflow.effect {started.workflow_type}",
            delivery.trace,
            {"ironflow.workflow": delivery.ref, "ironflow.row_id": delivery.row_id},
        )
        if grouped and tracing.AVAILABLE and runtime.config.tracing
        else nullcontext()
    )
    with span as current:
        ctx = EffectContext(
            effect_id=started.id,
            workflow=WorkflowRef(started.workflow_type, started.workflow_id),
            attempt=attempt,
            created_at=started.created_at,
        )
        handler_began = time.monotonic()
        try:
            effect = workflow.effects.decode(started.payload)
            try:
                follow_up = call_handler(registration.handler, effect, ctx)  # async def too
            finally:
                # how much of a group this process takes on next time (engine.sharing)
                runtime.handler_times.note(started.workflow_type, time.monotonic() - handler_began)
            if follow_up is not None:
                follow_up = as_input(workflow, follow_up)
        except Exception as exc:
            errors[started.id] = exc
            result = fail_row(
                runtime,
                EFFECT,
                started,
                delivery.ref,
                describe_error(exc),
                exc=exc,
                permanent=isinstance(exc, PermanentEffectError),
                began=began,
            )
            tracing.record_outcome(current, result)
            return result
        trace = tracing.current_carrier() if current is not None else None
    return Ran(started, delivery.ref, attempt, follow_up, workflow, began, trace, label)


def acknowledge(
    runtime: TaskHost,
    kind: RowKind,
    pending: Sequence[Ran],
    errors: dict[uuid.UUID, BaseException],
    *,
    meter: RowMeter | None = None,
) -> dict[uuid.UUID, RowResult]:
    """Acknowledge `pending` in one durable transaction: each row marked processed and
    its follow-up input (a timer's own input) executed through the service, together. A
    row whose input cannot be executed is taken out and recorded as failed, and the
    others are acknowledged again without it; a row no longer held is stale-skipped.
    The acknowledged rows' results are counted in `meter` (the run's) as one increment
    per label set."""
    meter = meter or runtime.metrics.meter()
    try:
        return _acknowledge(runtime, kind, pending, errors, meter)
    finally:
        meter.flush()


def _acknowledge(
    runtime: TaskHost,
    kind: RowKind,
    pending: Sequence[Ran],
    errors: dict[uuid.UUID, BaseException],
    meter: RowMeter,
) -> dict[uuid.UUID, RowResult]:
    results: dict[uuid.UUID, RowResult] = {}
    pending = list(pending)
    together = True
    while pending:
        try:
            held, outcomes = _commit(runtime, kind, pending, together=together)
        except AcknowledgementFailed as failed:
            exc = failed.cause
            shared = sum(r.follow_up is not None for r in pending) > 1
            if failed.ran is None and together and shared:
                # The group's follow-ups failed in a statement they shared: run them one by
                # one, so that only the row whose input fails is recorded as failed.
                together = False
                continue
            failing = [failed.ran] if failed.ran is not None else pending
            for ran in failing:
                errors[ran.started.id] = exc
                results[ran.started.id] = fail_row(
                    runtime,
                    kind,
                    ran.started,
                    ran.ref,
                    f"{kind.ack_failure}: {describe_error(exc)}",
                    exc=exc,
                    permanent=False,
                    began=ran.began,
                )
            pending = [r for r in pending if r not in failing]
            continue
        for ran in pending:
            row = ran.started
            status: Status = "processed" if row.id in held else "stale-skipped"
            meter.finished(kind.name, row.workflow_type, status, ran.began, ran.label or UNKNOWN)
            if status == "stale-skipped":
                extra: dict[str, Any] = {"reason": kind.lost_after_work}
            elif kind is TIMER:
                extra = {"outcome": outcomes.get(row.id)}
            elif ran.follow_up is not None:
                extra = {"follow_up": ran.follow_up.type_tag, "outcome": outcomes.get(row.id)}
            else:
                extra = {}
            results[row.id] = task_result(status, ran.ref, row.id, ran.attempt, **extra)
        break
    return results


def _commit(
    runtime: TaskHost, kind: RowKind, pending: Sequence[Ran], *, together: bool = True
) -> tuple[set[uuid.UUID], dict[uuid.UUID, str]]:
    """One acknowledging transaction: (ids still held and marked processed, the outcome of
    each executed input). A group's follow-up inputs execute together (`execute_group`: two
    statements for all of them) when `together`, else one by one. Raises
    `AcknowledgementFailed` when it rolled back."""
    store = runtime.store
    service = runtime.service
    outcomes: dict[uuid.UUID, str] = {}
    current: Ran | None = None
    try:
        if kind is TIMER:
            [ran] = pending  # timers travel alone
            row = ran.started
            with store.transaction(ack=True) as conn:
                if not store.lock_running(TIMER, conn, row.id, row.token):
                    conn.rollback()
                    return set(), outcomes
                current = ran
                outcomes[row.id] = service.execute_dynamic(
                    row.workflow_type, row.payload, connection=conn
                ).kind
                store.record_processed(TIMER, row.id, row.token, connection=conn)
            return {row.id}, outcomes
        follow_ups = [r for r in pending if r.follow_up is not None]
        if len(pending) == 1:
            [ran] = pending
            row = ran.started
            follow_up = ran.follow_up
            if follow_up is None:  # one autocommit statement: no BEGIN/COMMIT
                marked = store.record_processed(EFFECT, row.id, row.token)
                return ({row.id} if marked else set()), outcomes
            with store.transaction(ack=True) as conn:
                if not store.record_processed(EFFECT, row.id, row.token, connection=conn):
                    conn.rollback()
                    return set(), outcomes
                current = ran
                outcomes[row.id] = service.execute(
                    follow_up, workflow=ran.workflow, connection=conn
                ).kind
            return {row.id}, outcomes
        items = [(r.started.id, r.started.token) for r in pending]
        if not follow_ups:  # one autocommit statement: no BEGIN/COMMIT round trips
            return store.mark_many_processed(items), outcomes
        # Follow-ups in a stable order: two groups lock their instances in the same order.
        follow_ups.sort(key=lambda r: (r.started.workflow_type, r.started.workflow_id))
        with store.transaction(ack=True) as conn:
            held = store.mark_many_processed_in(conn, items)
            live = [r for r in follow_ups if r.started.id in held and r.follow_up is not None]
            group = None
            failure: GroupInputFailed | None = None
            if together and len(live) > 1:
                try:
                    group = service.execute_group(
                        [
                            (r.follow_up, r.workflow, r.trace)
                            for r in live
                            if r.follow_up is not None
                        ],
                        connection=conn,
                    )
                except GroupInputFailed as failed:
                    failure = failed
            if failure is not None:
                # Raised outside the handler, so the input's own exception gets no cycle
                # back to the wrapper (its __cause__) in its chain.
                current = live[failure.index]
                raise failure.cause
            if group is not None:
                outcomes.update({r.started.id: o.kind for r, o in zip(live, group, strict=True)})
            else:
                for ran in live:
                    if ran.follow_up is None:  # (filtered above; for the type checker)
                        continue
                    current = ran
                    with tracing.attached(tracing.headers_of(ran.trace)):
                        outcomes[ran.started.id] = service.execute(
                            ran.follow_up, workflow=ran.workflow, connection=conn
                        ).kind
            current = None
        return held, outcomes
    except Exception as exc:
        raise AcknowledgementFailed(current, exc) from exc


ROW_LINE = "ironflow %s %s of %s (%s) attempt %d %s"
"""The format of every row's worker log line (logger ``ironflow_celery.tasks``):
``ironflow <kind> <row id> of <type>:<workflow id> (<effect type>) attempt <n> <outcome>``,
the outcome one of ``processed``, ``stale-skipped: <why>`` (INFO), ``failed; the outbox
retries it in <s>s: <error>`` (WARNING) or ``dead-lettered after <n> attempt(s): <error>``
(ERROR, with the traceback). docs/operations.md documents it."""


def log_row(kind: Kind, delivery: Delivery, result: Mapping[str, Any]) -> None:
    """The worker log line of a processed or stale-skipped row (failures and dead letters
    have theirs from `_report_failure`, written when they are recorded)."""
    status = result.get("status")
    if status not in ("processed", "stale-skipped") or not log.isEnabledFor(logging.INFO):
        return
    outcome = "processed" if status == "processed" else f"stale-skipped: {result.get('reason')}"
    tag = delivery.effect_type or result.get("effect_type") or "unknown type"
    attempt = int(result.get("attempt", delivery.attempt))
    log.info(ROW_LINE, kind, delivery.row_id, delivery.ref, tag, attempt, outcome)


def run_effect(
    runtime: TaskHost,
    ref: str,
    row_id: str,
    attempt: int,
    lease: str,
    *,
    due_at: datetime | None = None,
) -> RowResult:
    """Run one claimed effect (`run_rows` with one row). `due_at`: when the row became
    due, as its claim said (for the dispatch metric)."""
    due = due_at.timestamp() if due_at is not None else None
    return run_rows(runtime, EFFECT, [Delivery(row_id, ref, attempt, lease, due=due)])[0]


def run_timer(
    runtime: TaskHost,
    ref: str,
    row_id: str,
    attempt: int,
    lease: str,
    *,
    due_at: datetime | None = None,
) -> RowResult:
    """Execute one due timer's input and mark it processed (`run_rows` with one row)."""
    due = due_at.timestamp() if due_at is not None else None
    return run_rows(runtime, TIMER, [Delivery(row_id, ref, attempt, lease, due=due)])[0]


def row_policy(runtime: TaskHost, kind: Kind, started: StartedRow) -> RetryPolicy:
    """The row's retry policy: its effect type's, its workflow's or the runtime's."""
    payload = started.payload
    typed = kind_of(kind).typed_retry_policies
    tag = payload.get("type") if typed and isinstance(payload, dict) else None
    return runtime.retry_policy_for(started.workflow_type, tag)


def exhausted_by_lost_runs(
    runtime: TaskHost, kind: Kind, started: StartedRow, ref: str
) -> RowResult:
    """The start guard counted the previous run as lost and that used up the attempts (a
    handler that kills its worker, say): dead-letter the row without running it again."""
    # its row line (ERROR, below) says "dead-lettered after N attempt(s): WorkerLost: …"
    error = started.last_error or LOST_RUN_ERROR
    status = dead_letter(runtime, kind, started, error)
    _report_failure(runtime, kind, started, ref, started.attempts, status, error)
    label = effect_label(runtime, kind, started)
    runtime.metrics.task_finished(kind, started.workflow_type, status, None, label)
    return task_result(
        status, ref, started.id, started.attempts, error=error, effect_type=_payload_tag(started)
    )


def as_input(workflow: Any, value: Any) -> Message:
    """The handler's return value as an input of its workflow, or a clear error."""
    if isinstance(value, Message):
        if value not in workflow.inputs:
            raise InvalidPayload(
                workflow.type,
                "input",
                f"the effect handler returned {type(value).__qualname__}, which is not one of "
                f"{workflow.inputs.tags()}",
            )
        return value
    if isinstance(value, dict):
        decoded: Message = workflow.inputs.decode(value)
        return decoded
    raise InvalidPayload(
        workflow.type,
        "input",
        f"the effect handler returned {type(value).__qualname__}; return an input or None",
    )


def fail_row(
    runtime: TaskHost,
    kind: RowKind,
    started: StartedRow,
    ref: str,
    error: str,
    *,
    exc: BaseException | None,
    permanent: bool,
    began: float,
) -> RowResult:
    """Record a failed attempt of an effect or a timer once its run failed: its backoff,
    or its dead letter when permanent or out of attempts; report it (`_report_failure`)."""
    handler_failure.set(exc)
    attempt = started.attempts + 1
    policy = row_policy(runtime, kind.name, started)
    backoff: float | None = None
    if permanent or attempt >= policy.max_attempts:
        status = dead_letter(runtime, kind.name, started, error)
    else:
        backoff = policy.backoff_duration(attempt)
        recorded = runtime.store.record_failed_attempt(
            kind, started.id, started.token, error, backoff_seconds=backoff
        )
        status = "failed-will-retry" if recorded is not None else "stale-skipped"
    _report_failure(runtime, kind.name, started, ref, attempt, status, error, retry_in=backoff)
    label = effect_label(runtime, kind.name, started)
    runtime.metrics.task_finished(kind.name, started.workflow_type, status, began, label)
    extra = {} if backoff is None else {"retry_in_seconds": round(backoff, 3)}
    return task_result(
        status, ref, started.id, attempt, error=error, effect_type=_payload_tag(started), **extra
    )


def _payload_tag(started: StartedRow) -> str | None:
    """The tag of a started row's payload: the effect type, or the timer input's type."""
    payload = started.payload
    tag = payload.get("type") if isinstance(payload, dict) else None
    return tag if isinstance(tag, str) else None


def effect_label(runtime: TaskHost, kind: Kind, started: StartedRow) -> str:
    """The effect-type metric label: the payload's tag when the workflow declares it
    (its effects; a timer's inputs), else ``unknown``, so labels stay bounded."""
    tag = _payload_tag(started)
    try:
        workflow = runtime.registry.get(started.workflow_type).workflow
        union = kind_of(kind).union_of(workflow)
        return tag if tag is not None and tag in union.by_tag else UNKNOWN
    except Exception:  # an unregistered type or a workflow without effects
        return UNKNOWN


def _report_failure(
    runtime: TaskHost,
    kind: Kind,
    started: StartedRow,
    ref: str,
    attempt: int,
    status: Status,
    error: str,
    *,
    retry_in: float | None = None,
) -> None:
    """Log a recorded failure where operators look (a failed attempt at WARNING, a dead
    letter at ERROR with its traceback) and send `signals.dead_lettered` once per dead
    letter. Called after the outcome is committed; a stale outcome reports nothing."""
    exc = handler_failure.get()
    tag = _payload_tag(started) or "unknown type"
    if status == "failed-will-retry":
        log.warning(
            "ironflow %s %s of %s (%s) attempt %d failed; the outbox retries it in %ss: %s",
            kind, started.id, ref, tag, attempt,
            "?" if retry_in is None else f"{retry_in:.1f}", error,
        )  # fmt: skip
        if exc is not None:
            log.debug("handler traceback:\n%s", _traceback_text(exc))
    elif status == "dead-lettered":
        sentry = _active_sentry(started.id)
        dead_letter_log.error(
            "ironflow %s %s of %s (%s) attempt %d dead-lettered after %d attempt(s): %s%s",
            kind, started.id, ref, tag, attempt, attempt, error,
            "" if exc is None else "\n" + _traceback_text(exc),
        )  # fmt: skip
        if sentry is not None:
            with _sentry_guard("dead letter", started.id):
                _send_dead_letter_to_sentry(sentry, kind, started, ref, attempt, error, exc)
        dead_lettered.send(
            sender=runtime.registry.get(started.workflow_type).workflow,
            kind=kind,
            row_id=started.id,
            workflow=WorkflowRef(started.workflow_type, started.workflow_id),
            effect_type=_payload_tag(started),
            attempts=attempt,
            error=error,
            exception=exc,
        )


def _active_sentry(row_id: object) -> Any:
    """sentry-sdk when the app initialised it (never imported here), else None. Its logging
    integration is told to skip the dead-letter log line first (see `DEAD_LETTER_LOGGER`)."""
    sentry_sdk = sys.modules.get("sentry_sdk")
    if sentry_sdk is None:
        return None
    with _sentry_guard("dead letter", row_id):
        if not sentry_sdk.get_client().is_active():
            return None
        from sentry_sdk.integrations import logging as sentry_logging

        # sentry-sdk 3 split the 2.x `ignore_logger` (events and breadcrumbs) into
        # `ignore_logger_for_events` and an `ignore_logger` that only covers Sentry Logs.
        ignore = getattr(sentry_logging, "ignore_logger_for_events", sentry_logging.ignore_logger)
        ignore(DEAD_LETTER_LOGGER)
        return sentry_sdk
    return None


def _send_dead_letter_to_sentry(
    sentry_sdk: Any,
    kind: Kind,
    started: StartedRow,
    ref: str,
    attempt: int,
    error: str,
    exc: BaseException | None,
) -> None:
    """One Sentry error event per dead letter: `DeadLettered` caused by the handler's
    exception, grouped by workflow type and effect type (its fingerprint; the error text
    varies per row), with the row id as a tag. The effect and timer tasks declare
    `DeadLettered` in ``throws``, so Sentry's CeleryIntegration does not send it again."""
    effect_type = _payload_tag(started)
    dead = DeadLettered(kind, str(started.id), ref, effect_type, attempt, error)
    dead.__cause__ = exc
    with sentry_sdk.new_scope() as scope:  # inherits the Celery task's tags and context
        scope.set_level("error")  # sentry-sdk 3 removed the `level` attribute
        scope.fingerprint = [
            "ironflow-dead-letter",
            kind,
            started.workflow_type,
            effect_type or "unknown",
        ]
        scope.set_tag("ironflow.row_id", str(started.id))
        scope.set_tag("ironflow.kind", kind)
        scope.set_tag("ironflow.workflow_type", started.workflow_type)
        scope.set_tag("ironflow.effect_type", effect_type or "unknown")
        scope.set_tag("ironflow.workflow", ref)
        scope.capture_exception(dead)


def _traceback_text(exc: BaseException) -> str:
    """The handler's traceback, escaped as ``last_error`` is: formatted here rather than
    passed as ``exc_info``, because a handler's message may hold text (a lone surrogate)
    that no UTF-8 log handler, log shipper or pytest-xdist report can encode."""
    return storable_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def dead_letter(runtime: TaskHost, kind: Kind, started: StartedRow, error: str) -> Status:
    """Dead-letter a row and, in the same transaction, deliver the workflow's
    ``on_dead_letter`` input. When the workflow accepts it, the dead letter is handled:
    closed but kept for audit, so nobody retries what the workflow already compensated.
    If the delivery fails the row is still dead-lettered, with the reason in its error."""
    store = runtime.store
    policy = row_policy(runtime, kind, started)
    row_kind = kind_of(kind)
    registration = runtime.registry.get(started.workflow_type)
    workflow = registration.workflow
    try:
        with store.transaction(ack=True) as conn:
            attempts = store.record_dead_letter(
                row_kind,
                started.id,
                started.token,
                error,
                max_attempts=policy.max_attempts,
                connection=conn,
            )
            if attempts is None:
                conn.rollback()
                return "stale-skipped"
            notice_input = _dead_letter_input(workflow, kind, started, attempts, error)
            if notice_input is not None:
                outcome = runtime.service.execute(notice_input, workflow=workflow, connection=conn)
                if outcome.is_accepted:
                    store.mark_dead_letter_handled(
                        kind,
                        started.id,
                        f"handled by on_dead_letter: {notice_input.type_tag} accepted",
                        connection=conn,
                    )
        return "dead-lettered"
    except Exception as exc:
        log.warning("ironflow: on_dead_letter of %s failed: %s", workflow.type, exc)
        error = f"{error}; on_dead_letter failed: {describe_error(exc)}"
    attempts = store.record_dead_letter(
        row_kind, started.id, started.token, error, max_attempts=policy.max_attempts
    )
    return "dead-lettered" if attempts is not None else "stale-skipped"


def _dead_letter_input(
    workflow: Any, kind: Kind, started: StartedRow, attempts: int, error: str
) -> Message | None:
    try:
        decoded = kind_of(kind).union_of(workflow).decode(started.payload)
    except InvalidPayload:
        decoded = None
    notice = DeadLetterNotice(
        kind=kind,
        row_id=started.id,
        workflow=WorkflowRef(started.workflow_type, started.workflow_id),
        payload=started.payload,
        decoded=decoded,
        attempts=attempts,
        last_error=error,
    )
    value = workflow.on_dead_letter(notice)
    return None if value is None else as_input(workflow, value)


# -- Celery registration ------------------------------------------------------------------


def register_workflow_tasks(app: Any, runtime: TaskHost, workflow_types: list[str]) -> list[str]:
    """Register ``ironflow.<type>.effect``, ``.timer`` and ``.execute`` for these types."""
    names = []
    for workflow_type in workflow_types:
        for kind in KINDS:
            name = kind.task_name(workflow_type)
            app.task(
                name=name,
                bind=True,
                # ignore_result is left to the app (task_ignore_result, result_backend):
                # the relay sends each message with the app's choice (`results_ignored`).
                acks_late=False,
                max_retries=None,  # a message sent back (send_back) is never dropped
                typing=False,
                shared=False,
                # A dead letter is expected: logged and sent to Sentry once by ironflow
                # (Celery logs it at INFO; Sentry's CeleryIntegration skips `throws`).
                throws=(DeadLettered,),
            )(_bind(kind, runtime, workflow_type))
            names.append(name)
    return names + register_execute_tasks(app, runtime, workflow_types)


def _raise_recorded_failure(task: Any, kind: str, result: RowResult) -> None:
    """End the Celery task the way Celery users read failures, once the outbox holds the
    outcome: a dead letter raises `DeadLettered` (FAILURE: ``task_failure``, Flower's
    Failed view, Sentry), a failed attempt raises a `Retry` that sends no message (RETRY
    in Flower and ``task_retry``; the outbox owns the next attempt and its backoff)."""
    exc = handler_failure.get()
    handler_failure.set(None)  # hold no handler frames between tasks
    status = result["status"]
    if status not in ("failed-will-retry", "dead-lettered"):
        return
    if status == "dead-lettered":
        raise _dead_lettered(kind, result) from exc
    _report_to_sentry(task, exc)
    # Celery sends a new message only from `Task.retry`; raised directly, `Retry` just
    # records the state (and logs "retry" at INFO). `when` is what the outbox decided.
    raise _retry(exc, result)


def _dead_lettered(kind: str, result: RowResult) -> DeadLettered:
    return DeadLettered(
        kind,
        result["row_id"],
        result["workflow"],
        result.get("effect_type"),
        result["attempt"],
        result.get("error") or "",
    )


def _retry(exc: BaseException | None, result: RowResult) -> Any:
    from celery.exceptions import Retry
    from celery.utils.serialization import get_pickleable_exception

    # A prefork pool pickles it back to the worker: keep an odd handler exception safe.
    error = result.get("error") or ""
    cause = get_pickleable_exception(exc if exc is not None else RuntimeError(error))
    return Retry(exc=cause, when=result.get("retry_in_seconds"))


def _report_to_sentry(
    task: Any, exc: BaseException | None, *, level: str = "warning", row: RowResult | None = None
) -> None:
    """Send a failed attempt's exception to Sentry when the app uses sentry-sdk: its
    CeleryIntegration skips `Retry`, so without this only dead letters would reach it.
    ``ironflow_sentry_failed_attempts = False`` keeps Sentry to dead letters only. A
    grouped row's failed attempt comes here too (its group task ends SUCCESS, so the
    integration never sees it); `row` tags the event with the row."""
    sentry_sdk = sys.modules.get("sentry_sdk")
    if exc is None or sentry_sdk is None:
        return
    if level == "warning" and not read_settings(task.app.conf)["sentry_failed_attempts"]:
        return
    with _sentry_guard("failed attempt", row["row_id"] if row is not None else "this task"):
        if not sentry_sdk.get_client().is_active():
            return
        with sentry_sdk.new_scope() as scope:  # inherits the Celery task's tags and context
            scope.set_level(level)  # a failed attempt will be retried; a dead letter is the error
            if row is not None:
                scope.set_tag("ironflow.row_id", row["row_id"])
                scope.set_tag("ironflow.workflow", row["workflow"])
            scope.capture_exception(exc)


@contextmanager
def _sentry_guard(what: str, row_id: object) -> Iterator[None]:
    """Around every call into sentry-sdk. Reporting runs after the outcome is committed: an
    SDK that fails (a major version that changed its API, a broken transport) is logged,
    and the task still ends as its row did, with `signals.dead_lettered` sent."""
    try:
        yield
    except Exception as error:
        log.warning("ironflow: could not report the %s of %s to Sentry: %r", what, row_id, error)


def report_group(
    task: Any,
    kind: str,
    results: Sequence[RowResult],
    errors: Mapping[str, BaseException],
    events: row_events.RowEvents | None = None,
) -> None:
    """Make each row of a group visible as if it had travelled alone: its result in the
    app's result backend under the row id (``AsyncResult(row_id)``: SUCCESS, RETRY with
    the error, FAILURE with `DeadLettered`), its failure in Sentry, and its task events
    (`events`: Flower and ``celery events`` show it as its own task in that state)."""
    keep = not results_ignored(task.app.conf)
    outcomes: list[tuple[str, str, Any]] = []
    for result in results:
        status = result["status"]
        row_id = result["row_id"]
        exc = errors.get(row_id)
        value: Any
        # A dead letter, grouped or alone, has already gone to Sentry once, as its own
        # structured event (`_report_failure`); a failed attempt goes here.
        if status == "failed-will-retry":
            _report_to_sentry(task, exc, row=result)
        if status == "dead-lettered":
            state = "FAILURE"
            value = _dead_lettered(kind, result)
            value.__cause__ = exc  # the handler's traceback, in Flower's traceback
        elif status == "failed-will-retry":
            state, value = "RETRY", _retry(exc, result).exc
        else:
            state, value = "SUCCESS", result
        outcomes.append((row_id, state, value))
        if not keep:
            continue
        try:
            task.backend.store_result(row_id, value, state)
        except Exception as error:  # the outcome is committed; a backend hiccup loses a view
            log.warning("ironflow: could not store the result of %s %s: %s", kind, row_id, error)
    if events is not None:
        events.finished(outcomes)


def _deliveries(
    workflow_type: str,
    ref: str | None,
    row_id: str | None,
    attempt: int,
    lease: str,
    effect_type: str | None,
    due: float | None,
    rows: Sequence[Sequence[Any]] | None,
) -> list[Delivery]:
    """The rows a message names: its own (a single-row message), or its group's
    (``rows``: ``[row id, workflow id, attempt, lease, effect type, due, trace]`` each)."""
    if rows is None:
        if ref is None or row_id is None:
            raise InvalidPayload(workflow_type, "message", "neither a row nor a group of rows")
        return [Delivery(row_id, ref, attempt, lease, effect_type, due)]
    if not rows:
        raise InvalidPayload(workflow_type, "message", "an empty group of rows")
    try:
        return [
            Delivery(str(r[0]), f"{workflow_type}:{r[1]}", int(r[2]), str(r[3]), r[4], r[5], r[6])
            for r in rows
        ]
    except (IndexError, TypeError, ValueError) as exc:
        raise InvalidPayload(workflow_type, "message", f"a malformed group of rows: {exc}") from exc


def _share_group(
    task: Any, runtime: TaskHost, workflow_type: str, deliveries: list[Delivery]
) -> list[Delivery]:
    """The rows of a group message this process runs: as many as fit in
    ``group_run_budget`` of the type's handler time here; the rest go back to the broker
    before any starts (`engine.sharing`), so slow handlers spread over processes."""
    mean = runtime.handler_times.mean(workflow_type)
    kept, rest = share(deliveries, mean, runtime.config.group_run_budget)
    if not rest:
        return deliveries
    sent = hand_back(task.app, workflow_type, rest, traces=runtime.config.tracing)
    unsent = [d for message in rest for d in message if d.row_id not in sent]
    log.info(
        "ironflow effect group of %s (%d rows): runs %d, handed %d back in %d messages "
        "(handlers %s here)",
        workflow_type,
        len(deliveries),
        len(kept) + len(unsent),
        len(deliveries) - len(kept) - len(unsent),
        len(rest),
        "not measured yet" if mean is None else f"{mean * 1000:.1f} ms each",
    )
    return kept + unsent


def _revoke_grouped(task: Any, deliveries: Sequence[Delivery]) -> None:
    """``celery control revoke <row id>`` for rows that travel in a group (whose task id is
    not a row id, so Celery itself never matches it): a row in the worker's revoked set is
    announced with ``task_revoked`` as a revoked single-row message would be (the cancel
    handler closes it), and the group's start guard then skips it as cancelled. The set is
    the consumer's: threads, solo and green pools see every revoke; a prefork child sees
    those made before it started (use ``effects cancel`` there, which works in every mode)."""
    from celery import signals
    from celery.worker import state

    revoked = state.revoked
    if not revoked:
        return
    for delivery in deliveries:
        if delivery.row_id in revoked:
            request = SimpleNamespace(id=delivery.row_id, kwargs={"lease": delivery.lease})
            signals.task_revoked.send(
                sender=task, request=request, terminated=False, signum=None, expired=False
            )


def _bind(row_kind: RowKind, runtime: TaskHost, workflow_type: str) -> Any:
    kind = row_kind.name
    name = row_kind.task_name(workflow_type)
    span_name = f"ironflow.{kind} {workflow_type}"

    def task(
        self: Any,
        ref: str | None = None,
        row_id: str | None = None,
        attempt: int = 1,
        lease: str = "",
        effect_type: str | None = None,  # for Flower; the start guard loads the payload
        due: float | None = None,
        rows: list[list[Any]] | None = None,  # a group of this type's rows (see _deliveries)
    ) -> RowResult | list[RowResult]:
        deliveries = _deliveries(workflow_type, ref, row_id, attempt, lease, effect_type, due, rows)
        grouped = rows is not None
        events = None
        if grouped and row_kind is EFFECT:
            deliveries = _share_group(self, runtime, workflow_type, deliveries)
        if grouped:
            _revoke_grouped(self, deliveries)
            events = row_events.announce(self, deliveries)  # each row its own task in Flower
        errors: dict[str, BaseException] = {}
        runner = Runner(getattr(self.request, "hostname", None), self.request.id)
        try:
            if not tracing.AVAILABLE or not runtime.config.tracing:
                results = run_rows(runtime, row_kind, deliveries, errors=errors, runner=runner)
            else:
                # The handler, its acknowledgement and its follow-up input run in this
                # span: a child of the publishing input's trace (ironflow_celery.service.tracing);
                # a group's rows each run in their own span, a child of their own trace.
                attributes = (
                    {"ironflow.workflow": workflow_type, "ironflow.rows": len(deliveries)}
                    if grouped
                    else {"ironflow.workflow": ref, "ironflow.row_id": row_id}
                )
                with tracing.task_span(span_name, self.request, attributes) as current:
                    results = run_rows(runtime, row_kind, deliveries, errors=errors, runner=runner)
                    if not grouped:
                        tracing.record_outcome(current, results[0])
        except StartGuardUnavailable as exc:
            # The message is already acknowledged to the broker (acks_late is off) and the
            # row still waits under the relay's claim, whose lease the relay keeps alive:
            # dropping the message would strand the row until ironflow_dispatch_timeout.
            # Send it back through the broker instead. This is a transport retry, not an
            # attempt: nothing ran, and attempts are counted in the outbox only.
            runtime.metrics.ack_failed(kind)
            # the relay sends `retries` = the attempts the outbox had recorded (for Flower);
            # the transport retries on top of those set this redelivery's delay
            retries = max(0, (self.request.retries or 0) - max(0, attempt - 1))
            delay = min(0.5 * 2 ** min(retries, 5), 10.0)
            log.warning(
                "ironflow %s %s (%s): start guard failed (%s); redelivering in %.1fs",
                kind, row_id or f"group of {len(deliveries)}", ref or workflow_type, exc, delay,
            )  # fmt: skip
            if events is not None:
                events.sent_back(exc)
            raise send_back(self, exc, delay=delay) from exc
        except StorageError:  # the ack could not be written; the lease will expire
            runtime.metrics.ack_failed(kind)
            raise
        if grouped:
            handler_failure.set(None)  # hold no handler frames between tasks
            report_group(self, kind, results, errors, events)
            return results
        _raise_recorded_failure(self, kind, results[0])
        return results[0]

    task.__name__ = name.replace(".", "_")
    task.__qualname__ = task.__name__
    task.__doc__ = run_rows.__doc__
    task.__module__ = __name__
    return task
