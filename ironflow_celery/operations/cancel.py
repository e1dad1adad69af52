"""Cancel and revoke: close a pending effect, timer or whole workflow instance, as functions,
as Celery tasks (``ironflow.cancel.row``, ``ironflow.cancel.instance``) and, through
`ironflow_celery.cli.operations`, as the ``effects cancel`` / ``timers cancel`` /
``workflows cancel`` CLI; and give ``celery control revoke <row id>`` a defined meaning.

A cancelled row is closed like a discarded dead letter: ``processed_at``, ``discarded_at``
and ``discard_reason`` are set, its lease is cleared, and it stays for audit. It is never
claimed again, and ``status`` and the dead-letter counts no longer show it. In the same
transaction the workflow's ``on_cancel(notice)`` input (if any) is executed, so an instance
waiting for the effect learns why it will never come.

A row that is *running* (its handler started under a live lease) is refused: cancelling it
would not stop the handler. A claimed row whose message still waits in the broker is not
running, and is cancelled: its start guard then finds it closed and the handler never runs.

Revoke: the task id of every effect and timer message is its row id. When a worker discards
a revoked message (``task_revoked``: revoked before or while it waited in the broker, or
terminated while it ran), the row is cancelled with the reason ``revoked: celery control
revoke``; a row that already finished, runs elsewhere, or is not ours is left alone.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from celery import signals

from ironflow_celery.engine.runtime import APP_ATTRIBUTE, WorkflowRuntime
from ironflow_celery.errors import (
    DatabaseUnavailable,
    InvalidCancelRequest,
    InvalidDeadLetterRequest,
    InvalidPayload,
)
from ironflow_celery.model.messages import Message
from ironflow_celery.model.workflow import CancelNotice, WorkflowRef
from ironflow_celery.service.dead_letters import parse_kind, parse_row_id
from ironflow_celery.storage.inspection import RowInfo
from ironflow_celery.storage.kinds import KIND_NAMES, KINDS, Kind, RowKind, kind_of

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


__all__ = [
    "MAX_REASON_LENGTH",
    "REVOKE_REASON",
    "TASK_PREFIX",
    "CancelResult",
    "Reason",
    "Scope",
    "cancel_effect",
    "cancel_instance",
    "cancel_row",
    "cancel_timer",
    "connect_revoke_handler",
    "on_task_revoked",
    "register_cancel_tasks",
    "revoke_row",
]

log = logging.getLogger("ironflow_celery.cancel")

Scope = Kind | Literal["instance"]
Reason = Literal["cancelled", "not_found", "already_processed", "running", "already_completed"]

REVOKE_REASON = "revoked: celery control revoke"
MAX_REASON_LENGTH = 2000


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What a cancel did, or why it was refused. Truthy when it happened."""

    ok: bool
    reason: Reason
    scope: Scope
    message: str
    workflow: WorkflowRef | None = None
    row_id: uuid.UUID | None = None
    effects: tuple[uuid.UUID, ...] = ()
    timers: tuple[uuid.UUID, ...] = ()
    running: tuple[uuid.UUID, ...] = ()
    on_cancel: str | None = None
    """The on_cancel input's type tag and outcome (``"Cancelled: accepted"``), if any."""

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form: ids as strings."""
        return {
            "ok": self.ok,
            "reason": self.reason,
            "scope": self.scope,
            "workflow": None if self.workflow is None else str(self.workflow),
            "row_id": None if self.row_id is None else str(self.row_id),
            "effects": [str(i) for i in self.effects],
            "timers": [str(i) for i in self.timers],
            "running": [str(i) for i in self.running],
            "on_cancel": self.on_cancel,
            "message": self.message,
        }


# -- validation ---------------------------------------------------------------------------


def _clean_text(value: Any, what: str, *, limit: int = MAX_REASON_LENGTH) -> str:
    """A non-empty string PostgreSQL can store (no NUL, valid UTF-8), else a usage error."""
    if not isinstance(value, str):
        raise InvalidCancelRequest(f"{what} must be text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InvalidCancelRequest(f"a cancel needs a {what}")
    if "\x00" in text:
        raise InvalidCancelRequest(f"{what} contains a NUL character: {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidCancelRequest(f"{what} is not valid UTF-8: {text!r}") from None
    if len(text) > limit:
        raise InvalidCancelRequest(f"{what} is longer than {limit} characters")
    return text


def _kind(kind: str) -> Kind:
    try:
        return parse_kind(kind)
    except InvalidDeadLetterRequest as exc:
        raise InvalidCancelRequest(str(exc)) from None


def _row_id(row_id: uuid.UUID | str) -> uuid.UUID:
    try:
        return parse_row_id(row_id)
    except InvalidDeadLetterRequest as exc:
        raise InvalidCancelRequest(str(exc)) from None


# -- the workflow's on_cancel -------------------------------------------------------------


def _deliver_on_cancel(
    runtime: WorkflowRuntime, conn: Connection, workflow: Any, notice: CancelNotice
) -> str | None:
    """Run ``on_cancel(notice)`` and execute its input in the caller's transaction."""
    value = workflow.on_cancel(notice)
    if value is None:
        return None
    if isinstance(value, dict):
        value = workflow.inputs.decode(value)
    if not isinstance(value, Message) or value not in workflow.inputs:
        raise InvalidPayload(
            workflow.type,
            "input",
            f"on_cancel returned {type(value).__qualname__}, which is not one of "
            f"{workflow.inputs.tags()}",
        )
    outcome = runtime.service.execute(value, workflow=workflow, connection=conn)
    return f"{value.type_tag}: {outcome.kind}"


def _decoded(workflow: Any, kind: RowKind, payload: Any) -> Any:
    try:
        return kind.union_of(workflow).decode(payload)
    except InvalidPayload:
        return None


# -- one effect or timer -------------------------------------------------------------------


def _row_refusal(
    kind: Kind, rid: uuid.UUID, row: RowInfo | None, *, own_run: str | None
) -> CancelResult | None:
    """Why `row` may not be cancelled (None when it may)."""
    if row is None:
        return CancelResult(False, "not_found", kind, f"no {kind} row with id {rid}", row_id=rid)
    ref = WorkflowRef(row.workflow_type, row.workflow_id)
    if row.processed_at is not None:
        what = (
            f"closed at {row.discarded_at.isoformat()} ({row.discard_reason})"
            if row.discarded_at is not None
            else f"processed at {row.processed_at.isoformat()}"
        )
        return CancelResult(False, "already_processed", kind, f"{kind} {rid} was {what}", ref, rid)
    if row.running and not (own_run and (row.locked_by or "").startswith(own_run)):
        assert row.run_started_at is not None and row.locked_until is not None  # running
        return CancelResult(
            False,
            "running",
            kind,
            f"{kind} {rid} is running: its handler started at "
            f"{row.run_started_at.isoformat()} (lease {row.locked_by} until "
            f"{row.locked_until.isoformat()}); cancelling would not stop it. Wait for it to "
            f"finish, or stop it with `celery control terminate SIGTERM {rid}` (prefork pool)",
            ref,
            rid,
        )
    return None


def _cancel_row(
    runtime: WorkflowRuntime,
    kind: Kind,
    rid: uuid.UUID,
    reason: str,
    *,
    revoked: bool,
    own_run: str | None = None,
    deliver: bool = True,
) -> CancelResult:
    store = runtime.store
    row_kind = kind_of(kind)
    ids: dict[str, Any] = {row_kind.plural: (rid,)}  # effects=(rid,) or timers=(rid,)
    with store.transaction() as conn:
        row = store.lock_row_for_cancel(row_kind, rid, runtime.attempt_limits, connection=conn)
        refusal = _row_refusal(kind, rid, row, own_run=own_run)
        if refusal is not None:
            return refusal
        assert row is not None  # _row_refusal refuses a missing row
        ref = WorkflowRef(row.workflow_type, row.workflow_id)
        workflow = runtime.registry.get(row.workflow_type).workflow if deliver else None
        store.cancel_row(row_kind, rid, reason, connection=conn)
        delivered = None
        if workflow is not None:
            notice = CancelNotice(
                scope=kind,
                workflow=ref,
                reason=reason,
                revoked=revoked,
                row_id=rid,
                payload=row.payload,
                decoded=_decoded(workflow, row_kind, row.payload),
                **ids,
            )
            delivered = _deliver_on_cancel(runtime, conn, workflow, notice)
    return CancelResult(
        True,
        "cancelled",
        kind,
        f"{kind} {rid} ({ref}) cancelled: {reason}"
        + (f"; on_cancel: {delivered}" if delivered else ""),
        ref,
        rid,
        on_cancel=delivered,
        **ids,
    )


def cancel_row(
    runtime: WorkflowRuntime, row_id: uuid.UUID | str, reason: str, *, kind: str = "effect"
) -> CancelResult:
    """Cancel one pending effect or timer: closed and kept for audit, with the workflow's
    ``on_cancel`` input executed in the same transaction. Refused, with the reason, for a
    missing, already processed or running row; an error in ``on_cancel`` changes nothing."""
    k, rid = _kind(kind), _row_id(row_id)
    return _cancel_row(runtime, k, rid, _clean_text(reason, "reason"), revoked=False)


def cancel_effect(runtime: WorkflowRuntime, row_id: uuid.UUID | str, reason: str) -> CancelResult:
    """`cancel_row` for an outbox row (an effect)."""
    return cancel_row(runtime, row_id, reason, kind="effect")


def cancel_timer(runtime: WorkflowRuntime, row_id: uuid.UUID | str, reason: str) -> CancelResult:
    """`cancel_row` for a timer."""
    return cancel_row(runtime, row_id, reason, kind="timer")


# -- a whole instance -----------------------------------------------------------------------


def cancel_instance(
    runtime: WorkflowRuntime, workflow_type: str, workflow_id: str, reason: str
) -> CancelResult:
    """Cancel every open effect and timer of one workflow instance (dead letters included)
    and execute its ``on_cancel`` input, in one transaction under the instance's lock.

    Refused for an unknown instance, for a completed one with nothing open, and while any
    of its rows is running (nothing is changed then); an error in ``on_cancel`` changes
    nothing."""
    wt = _clean_text(workflow_type, "workflow type", limit=1000)
    wid = _clean_text(workflow_id, "workflow id", limit=1000)
    reason = _clean_text(reason, "reason")
    ref = WorkflowRef(wt, wid)
    workflow = runtime.registry.get(wt).workflow  # unknown type: a clear error, nothing done
    store = runtime.store
    with store.transaction() as conn:
        instance = store.lock_instance_for_cancel(wt, wid, connection=conn)
        if instance is None:
            return CancelResult(False, "not_found", "instance", f"no workflow instance {ref}", ref)
        running = {
            kind: store.running_rows_of_instance(kind, wt, wid, connection=conn) for kind in KINDS
        }
        busy = tuple(i for ids in running.values() for i in ids)
        if busy:
            listed = ", ".join(f"{kind} {i}" for kind, ids in running.items() for i in ids)
            return CancelResult(
                False,
                "running",
                "instance",
                f"{ref} has running handlers ({listed}); nothing was cancelled. Wait for them "
                "to finish, or stop them with `celery control terminate SIGTERM ID` (prefork pool)",
                ref,
                running=busy,
            )
        closed = {
            kind.plural: store.cancel_rows_of_instance(kind, wt, wid, reason, connection=conn)
            for kind in KINDS
        }
        effects, timers = closed["effects"], closed["timers"]
        if instance.completed_at is not None and not effects and not timers:
            conn.rollback()
            return CancelResult(
                False,
                "already_completed",
                "instance",
                f"{ref} completed at {instance.completed_at.isoformat()} and has no open "
                "effects or timers",
                ref,
            )
        notice = CancelNotice(
            scope="instance",
            workflow=ref,
            reason=reason,
            revoked=False,
            effects=effects,
            timers=timers,
        )
        delivered = _deliver_on_cancel(runtime, conn, workflow, notice)
    return CancelResult(
        True,
        "cancelled",
        "instance",
        f"{ref} cancelled: {len(effects)} effect(s), {len(timers)} timer(s)"
        + (f"; on_cancel: {delivered}" if delivered else ""),
        ref,
        effects=effects,
        timers=timers,
        on_cancel=delivered,
    )


# -- celery control revoke -----------------------------------------------------------------


def revoke_row(
    runtime: WorkflowRuntime,
    kind: Kind,
    row_id: uuid.UUID | str,
    *,
    lease: str | None = None,
    terminated: bool = False,
    signum: Any = None,
) -> CancelResult:
    """What a revoked effect or timer message means: cancel its row (see the module doc).

    A terminated task's own run may be cancelled (its handler was killed); a row running
    under another delivery is left to finish. When ``on_cancel`` fails the row is still
    cancelled, with the failure in its reason: a revoke never leaves a row half-open."""
    rid = _row_id(row_id)
    reason = REVOKE_REASON
    if terminated:
        reason += f" --terminate (signal {signum})" if signum else " --terminate"
    own_run = f"{lease}>" if terminated and lease else None
    try:
        return _cancel_row(runtime, kind, rid, reason, revoked=True, own_run=own_run)
    except DatabaseUnavailable:
        raise
    except Exception as exc:  # workflow code failed: cancel anyway, without its input
        log.warning("ironflow: on_cancel for revoked %s %s failed: %s", kind, rid, exc)
        reason = f"{reason}; on_cancel failed: {type(exc).__name__}: {exc}"[:MAX_REASON_LENGTH]
        return _cancel_row(runtime, kind, rid, reason, revoked=True, own_run=own_run, deliver=False)


def _revoked_kind(name: str) -> Kind | None:
    """``effect`` / ``timer`` for an ironflow row task name (``ironflow.<type>.<kind>``)."""
    if not name.startswith("ironflow."):
        return None
    suffix = name.rsplit(".", 1)[-1]
    if name.count(".") < 2:
        return None
    return next((kind for kind in KIND_NAMES if kind == suffix), None)


def on_task_revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    signum: Any = None,
    expired: bool = False,
    **_: Any,
) -> None:
    """``task_revoked`` handler: cancel the row of a revoked ironflow effect or timer."""
    kind = _revoked_kind(getattr(sender, "name", "") or "")
    runtime = getattr(getattr(sender, "app", None), APP_ATTRIBUTE, None)
    if kind is None or runtime is None or request is None or expired:
        return  # not ours (our messages carry no expiry)
    row_id: Any = getattr(request, "id", None)  # None: revoke_row refuses it, logged below
    kwargs = getattr(request, "kwargs", None) or {}
    lease = kwargs.get("lease") if isinstance(kwargs, dict) else None
    try:
        result = revoke_row(
            runtime, kind, row_id, lease=lease, terminated=terminated, signum=signum
        )
    except Exception as exc:  # the row keeps its lease; the next delivery is revoked again
        log.warning("ironflow: could not cancel revoked %s %s: %s", kind, row_id, exc)
        return
    if result.ok:
        log.warning("ironflow: %s", result.message)
    else:
        log.info("ironflow: revoke of %s %s left the row alone: %s", kind, row_id, result.message)


_connected = False


def connect_revoke_handler() -> None:
    """Connect `on_task_revoked` once per process (it serves every installed app)."""
    global _connected
    if not _connected:
        signals.task_revoked.connect(on_task_revoked, weak=False)
        _connected = True


# -- Celery tasks ----------------------------------------------------------------------------

TASK_PREFIX = "ironflow.cancel."


def register_cancel_tasks(app: Any, runtime: WorkflowRuntime) -> list[str]:
    """Register ``ironflow.cancel.row`` and ``ironflow.cancel.instance`` on `app`, and the
    revoke handler. Both return a JSON dict, so ``celery call`` and Flower can use them."""
    connect_revoke_handler()

    def row(row_id: str, reason: str, kind: str = "effect") -> dict[str, Any]:
        """Cancel one pending effect (or ``kind="timer"``); the result says why if refused."""
        return cancel_row(runtime, row_id, reason, kind=kind).to_json()

    def instance(workflow_type: str, workflow_id: str, reason: str) -> dict[str, Any]:
        """Cancel a workflow instance's open effects and timers and deliver on_cancel."""
        return cancel_instance(runtime, workflow_type, workflow_id, reason).to_json()

    names = []
    for fn in (row, instance):
        name = TASK_PREFIX + fn.__name__
        fn.__module__ = __name__
        # Bad arguments fail the task with the message, logged in one line (no traceback).
        app.task(name=name, bind=False, shared=False, typing=True, throws=(InvalidCancelRequest,))(
            fn
        )
        names.append(name)
    return names
