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
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from ironflow_celery.engine.host import TaskHost
from ironflow_celery.engine.inputs import register_execute_tasks
from ironflow_celery.engine.metrics import UNKNOWN
from ironflow_celery.engine.redelivery import send_back
from ironflow_celery.engine.signals import dead_lettered
from ironflow_celery.errors import (
    DeadLettered,
    InvalidPayload,
    PermanentEffectError,
    StartGuardUnavailable,
    StorageError,
)
from ironflow_celery.model.config import RetryPolicy
from ironflow_celery.model.messages import Message
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.storable import storable_text
from ironflow_celery.model.workflow import DeadLetterNotice, EffectContext, WorkflowRef
from ironflow_celery.service.aio import call_handler
from ironflow_celery.storage import tracing
from ironflow_celery.storage.kinds import EFFECT, KINDS, TIMER, Kind, RowKind, kind_of
from ironflow_celery.storage.store import LOST_RUN_ERROR, StartedRow

__all__ = [
    "KEEPER_IDLE_EXIT",
    "LeaseKeeper",
    "Status",
    "as_input",
    "dead_letter",
    "describe_error",
    "effect_label",
    "exhausted_by_lost_runs",
    "fail_effect",
    "handler_failure",
    "register_workflow_tasks",
    "row_policy",
    "run_effect",
    "run_timer",
    "run_token_for",
    "stale_reason",
    "task_result",
]

log = logging.getLogger("ironflow_celery.tasks")
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
    return f"{lease}>{_WORKER_TAG}:{uuid.uuid4().hex[:8]}"


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

    One daemon thread per process; handlers register while they run.
    """

    def __init__(self, runtime: TaskHost) -> None:
        self.runtime = runtime
        self._running: dict[tuple[Kind, uuid.UUID], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _lease(self, kind: Kind) -> float:
        return kind_of(kind).lock_duration(self.runtime.config)

    @contextmanager
    def keep(self, kind: Kind, row_id: uuid.UUID, token: str) -> Iterator[None]:
        """Keep `row_id`'s lease alive while the block runs."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="ironflow-lease-keeper", daemon=True
                )
                self._thread.start()
            self._running[(kind, row_id)] = (token, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                # No wake-up here: setting the Event after every task woke the keeper
                # thread once per effect (a GIL hand-off, ~15% of a worker's samples under
                # load); the thread notices it is idle within KEEPER_IDLE_EXIT by itself.
                self._running.pop((kind, row_id), None)

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
            self._wake.wait(min(interval, KEEPER_IDLE_EXIT))
            self._wake.clear()  # before the state is read again at the top: no lost wake-up
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
                        if row_id in renewed and (kind.name, row_id) in self._running:
                            self._running[(kind.name, row_id)] = (token, now)


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
    row_id: str,
    ref: str,
    attempt: int,
    lease: str,
) -> StartedRow | dict:
    """The start guard every run passes first, for either kind: the started row, or the
    task's result when the delivery is stale or the row's attempts were used up by runs
    that never finished. A database it cannot reach raises `StartGuardUnavailable` (the
    task sends its message back through the broker). The started row's ``token`` is this
    run's own token, which every later statement of the run presents."""
    handler_failure.set(None)
    rid = uuid.UUID(row_id)
    try:
        started = runtime.store.start(
            kind, rid, lease, run_token_for(lease), lease_seconds=kind.lock_duration(runtime.config)
        )
    except StorageError as exc:
        raise StartGuardUnavailable(str(exc)) from exc
    if started is None:
        runtime.metrics.task_finished(kind.name, None, "stale-skipped", None)
        return task_result(
            "stale-skipped",
            ref,
            row_id,
            attempt,
            reason=stale_reason(runtime, kind.name, rid, lease),
        )
    if started.attempts >= row_policy(runtime, kind.name, started).max_attempts:
        return exhausted_by_lost_runs(runtime, kind.name, started, ref)
    return started


def run_effect(
    runtime: TaskHost,
    ref: str,
    row_id: str,
    attempt: int,
    lease: str,
    *,
    due_at: datetime | None = None,
) -> dict:
    """Run one claimed effect through its handler and acknowledge it (see module doc).
    `due_at`: when the row became due, as its claim said (for the dispatch metric)."""
    effect_id = uuid.UUID(row_id)
    store = runtime.store
    metrics = runtime.metrics
    begun = _begin(runtime, EFFECT, row_id, ref, attempt, lease)
    if isinstance(begun, dict):
        return begun
    started, run_token = begun, begun.token
    attempt = started.attempts + 1
    registration = runtime.registry.get(started.workflow_type)
    workflow = registration.workflow
    ctx = EffectContext(
        effect_id=effect_id,
        workflow=WorkflowRef(started.workflow_type, started.workflow_id),
        attempt=attempt,
        created_at=started.created_at,
    )
    if due_at is None and started.attempts == 0:
        due_at = started.created_at  # called without the claim's due time: a first attempt
    metrics.task_started(
        "effect", started.workflow_type, due_at, effect_label(runtime, "effect", started)
    )
    began = time.monotonic()
    try:
        with runtime.lease_keeper.keep("effect", effect_id, run_token):
            effect = workflow.effects.decode(started.payload)
            follow_up = call_handler(registration.handler, effect, ctx)  # async def too
            if follow_up is not None:
                follow_up = as_input(workflow, follow_up)
    except PermanentEffectError as exc:
        handler_failure.set(exc)
        return fail_effect(runtime, started, ref, describe_error(exc), permanent=True, began=began)
    except Exception as exc:
        handler_failure.set(exc)
        return fail_effect(runtime, started, ref, describe_error(exc), permanent=False, began=began)

    outcome = None
    try:
        if follow_up is None:
            held = store.record_processed(EFFECT, effect_id, run_token)
        else:
            with store.transaction(ack=True) as conn:
                held = store.record_processed(EFFECT, effect_id, run_token, connection=conn)
                if held:
                    outcome = runtime.service.execute(
                        follow_up, workflow=workflow, connection=conn
                    ).kind
                else:
                    conn.rollback()
    except Exception as exc:
        handler_failure.set(exc)
        return fail_effect(
            runtime,
            started,
            ref,
            f"Failed to route result: {describe_error(exc)}",
            permanent=False,
            began=began,
        )
    if not held:
        metrics.task_finished("effect", started.workflow_type, "stale-skipped", began)
        return task_result(
            "stale-skipped",
            ref,
            row_id,
            attempt,
            reason="lease lost while the handler ran; result discarded",
        )
    metrics.task_finished("effect", started.workflow_type, "processed", began)
    extra = {"follow_up": follow_up.type_tag, "outcome": outcome} if follow_up is not None else {}
    return task_result("processed", ref, row_id, attempt, **extra)


def row_policy(runtime: TaskHost, kind: Kind, started: StartedRow) -> RetryPolicy:
    """The row's retry policy: its effect type's, its workflow's or the runtime's."""
    payload = started.payload
    typed = kind_of(kind).typed_retry_policies
    tag = payload.get("type") if typed and isinstance(payload, dict) else None
    return runtime.retry_policy_for(started.workflow_type, tag)


def exhausted_by_lost_runs(runtime: TaskHost, kind: Kind, started: StartedRow, ref: str) -> dict:
    """The start guard counted the previous run as lost and that used up the attempts (a
    handler that kills its worker, say): dead-letter the row without running it again."""
    error = started.last_error or LOST_RUN_ERROR
    log.warning(
        "ironflow %s %s (%s): %d attempts never finished; dead-lettered without running it",
        kind,
        started.id,
        ref,
        started.attempts,
    )
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
        return workflow.inputs.decode(value)
    raise InvalidPayload(
        workflow.type,
        "input",
        f"the effect handler returned {type(value).__qualname__}; return an input or None",
    )


def fail_effect(
    runtime: TaskHost,
    started: StartedRow,
    ref: str,
    error: str,
    *,
    permanent: bool,
    began: float,
) -> dict:
    attempt = started.attempts + 1
    policy = row_policy(runtime, "effect", started)
    metrics = runtime.metrics
    if permanent or attempt >= policy.max_attempts:
        status = dead_letter(runtime, "effect", started, error)
        _report_failure(runtime, "effect", started, ref, attempt, status, error)
        metrics.task_finished("effect", started.workflow_type, status, began)
        return task_result(
            status, ref, started.id, attempt, error=error, effect_type=_payload_tag(started)
        )
    backoff = policy.backoff_duration(attempt)
    recorded = runtime.store.record_failed_attempt(
        EFFECT, started.id, started.token, error, backoff_seconds=backoff
    )
    status = "failed-will-retry" if recorded is not None else "stale-skipped"
    _report_failure(runtime, "effect", started, ref, attempt, status, error, retry_in=backoff)
    metrics.task_finished("effect", started.workflow_type, status, began)
    return task_result(
        status,
        ref,
        started.id,
        attempt,
        error=error,
        retry_in_seconds=round(backoff, 3),
        effect_type=_payload_tag(started),
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
        return tag if tag is not None and tag in union.tags() else UNKNOWN
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
        sentry = _active_sentry()
        dead_letter_log.error(
            "ironflow %s %s of %s (%s) dead-lettered after %d attempt(s): %s%s",
            kind, started.id, ref, tag, attempt, error,
            "" if exc is None else "\n" + _traceback_text(exc),
        )  # fmt: skip
        if sentry is not None:
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


def _active_sentry() -> Any:
    """sentry-sdk when the app initialised it (never imported here), else None. Its logging
    integration is told to skip the dead-letter log line first (see `DEAD_LETTER_LOGGER`)."""
    sentry_sdk = sys.modules.get("sentry_sdk")
    if sentry_sdk is None or not sentry_sdk.get_client().is_active():
        return None
    from sentry_sdk.integrations.logging import ignore_logger

    ignore_logger(DEAD_LETTER_LOGGER)
    return sentry_sdk


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
        scope.level = "error"
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


# -- timers ----------------------------------------------------------------------------


def run_timer(
    runtime: TaskHost,
    ref: str,
    row_id: str,
    attempt: int,
    lease: str,
    *,
    due_at: datetime | None = None,
) -> dict:
    """Execute a due timer's input and mark the timer processed, in one transaction.
    `due_at`: when the timer became due (``fire_at``, or its backoff's end)."""
    timer_id = uuid.UUID(row_id)
    store = runtime.store
    metrics = runtime.metrics
    begun = _begin(runtime, TIMER, row_id, ref, attempt, lease)
    if isinstance(begun, dict):
        return begun
    started, run_token = begun, begun.token
    attempt = started.attempts + 1
    metrics.task_started(
        "timer", started.workflow_type, due_at, effect_label(runtime, "timer", started)
    )
    began = time.monotonic()
    try:
        with (
            runtime.lease_keeper.keep("timer", timer_id, run_token),
            store.transaction(ack=True) as conn,
        ):
            if not store.lock_running(TIMER, conn, timer_id, run_token):
                conn.rollback()
                metrics.task_finished("timer", started.workflow_type, "stale-skipped", began)
                return task_result(
                    "stale-skipped", ref, row_id, attempt, reason="lease lost before the timer ran"
                )
            outcome = runtime.service.execute_dynamic(
                started.workflow_type, started.payload, connection=conn
            ).kind
            store.record_processed(TIMER, timer_id, run_token, connection=conn)
    except Exception as exc:
        handler_failure.set(exc)
        error = f"Failed to execute timer input: {describe_error(exc)}"
        policy = row_policy(runtime, "timer", started)
        backoff = None
        if attempt >= policy.max_attempts:
            status = dead_letter(runtime, "timer", started, error)
        else:
            backoff = policy.backoff_duration(attempt)
            recorded = store.record_failed_attempt(
                TIMER, timer_id, run_token, error, backoff_seconds=backoff
            )
            status = "failed-will-retry" if recorded is not None else "stale-skipped"
        _report_failure(runtime, "timer", started, ref, attempt, status, error, retry_in=backoff)
        metrics.task_finished("timer", started.workflow_type, status, began)
        extra = {} if backoff is None else {"retry_in_seconds": round(backoff, 3)}
        return task_result(
            status, ref, row_id, attempt, error=error, effect_type=_payload_tag(started), **extra
        )
    metrics.task_finished("timer", started.workflow_type, "processed", began)
    return task_result("processed", ref, row_id, attempt, outcome=outcome)


# -- Celery registration ------------------------------------------------------------------


def register_workflow_tasks(app: Any, runtime: TaskHost, workflow_types: list[str]) -> list[str]:
    """Register ``ironflow.<type>.effect``, ``.timer`` and ``.execute`` for these types."""
    names = []
    for workflow_type in workflow_types:
        for kind, fn in ((EFFECT, run_effect), (TIMER, run_timer)):
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
            )(_bind(fn, runtime, name))
            names.append(name)
    return names + register_execute_tasks(app, runtime, workflow_types)


def _raise_recorded_failure(task: Any, kind: str, result: dict) -> None:
    """End the Celery task the way Celery users read failures, once the outbox holds the
    outcome: a dead letter raises `DeadLettered` (FAILURE: ``task_failure``, Flower's
    Failed view, Sentry), a failed attempt raises a `Retry` that sends no message (RETRY
    in Flower and ``task_retry``; the outbox owns the next attempt and its backoff)."""
    exc = handler_failure.get()
    handler_failure.set(None)  # hold no handler frames between tasks
    status = result["status"]
    if status not in ("failed-will-retry", "dead-lettered"):
        return
    error = result.get("error") or ""
    if status == "dead-lettered":
        raise DeadLettered(
            kind,
            result["row_id"],
            result["workflow"],
            result.get("effect_type"),
            result["attempt"],
            error,
        ) from exc
    _report_to_sentry(task, exc)
    from celery.exceptions import Retry
    from celery.utils.serialization import get_pickleable_exception

    # Celery sends a new message only from `Task.retry`; raised directly, `Retry` just
    # records the state (and logs "retry" at INFO). `when` is what the outbox decided.
    # A prefork pool pickles it back to the worker: keep an odd handler exception safe.
    cause = get_pickleable_exception(exc if exc is not None else RuntimeError(error))
    raise Retry(exc=cause, when=result.get("retry_in_seconds"))


def _report_to_sentry(task: Any, exc: BaseException | None) -> None:
    """Send a failed attempt's exception to Sentry when the app uses sentry-sdk: its
    CeleryIntegration skips `Retry`, so without this only dead letters would reach it.
    ``ironflow_sentry_failed_attempts = False`` keeps Sentry to dead letters only."""
    sentry_sdk = sys.modules.get("sentry_sdk")
    if exc is None or sentry_sdk is None or not sentry_sdk.get_client().is_active():
        return
    if not read_settings(task.app.conf)["sentry_failed_attempts"]:
        return
    with sentry_sdk.new_scope() as scope:  # inherits the Celery task's tags and context
        scope.level = "warning"  # the outbox will retry it; a dead letter is the error
        scope.capture_exception(exc)


def _bind(fn: Any, runtime: TaskHost, name: str) -> Any:
    kind = name.rsplit(".", 1)[-1]

    workflow_type = name.removeprefix("ironflow.").removesuffix(f".{kind}")
    span_name = f"ironflow.{kind} {workflow_type}"

    def task(
        self: Any,
        ref: str,
        row_id: str,
        attempt: int = 1,
        lease: str = "",
        effect_type: str | None = None,  # for Flower; the start guard loads the payload
        due: float | None = None,
    ) -> dict:
        due_at = datetime.fromtimestamp(due, UTC) if due is not None else None
        try:
            if not tracing.AVAILABLE or not runtime.config.tracing:
                result = fn(runtime, ref, row_id, attempt, lease, due_at=due_at)
            else:
                # The handler, its acknowledgement and its follow-up input run in this
                # span: a child of the publishing input's trace (ironflow_celery.storage.tracing).
                attributes = {"ironflow.workflow": ref, "ironflow.row_id": row_id}
                with tracing.task_span(span_name, self.request, attributes) as current:
                    result = fn(runtime, ref, row_id, attempt, lease, due_at=due_at)
                    tracing.record_outcome(current, result)
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
                kind, row_id, ref, exc, delay,
            )  # fmt: skip
            raise send_back(self, exc, delay=delay) from exc
        except StorageError:  # the ack could not be written; the lease will expire
            runtime.metrics.ack_failed(kind)
            raise
        _raise_recorded_failure(self, kind, result)
        return result

    task.__name__ = name.replace(".", "_")
    task.__qualname__ = task.__name__
    task.__doc__ = fn.__doc__
    task.__module__ = __name__
    return task
