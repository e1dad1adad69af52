"""Worker-side batches of effects, opt-in per workflow type (``effect_batch_size``).

A workflow type with ``effect_batch_size = N`` has its claimed effects published in groups
of up to N rows per message, to the task ``ironflow.<type>.effects``. The task

1. starts the whole group with ONE start-guard statement (``sql.START_EFFECTS``): each row
   still held by its claim token moves to its own run token, exactly as the single-row
   guard does; a row no longer held is skipped as stale, with its reason, as there;
2. keeps the lease of every started row alive (the lease keeper) until the group's
   outcome is committed, and runs the handlers one after another;
3. acknowledges every row whose handler returned in ONE durable transaction (the ack
   engine: ``synchronous_commit`` on unless the store opted into relaxed acks): the rows
   are marked processed with one statement and each follow-up input goes through the
   service in that same transaction. Without follow-ups the statement runs on its own
   (autocommit: still one durable commit). The task returns only after that commit.

A handler that raises records that row's failed attempt, backoff or dead letter exactly as
the single-row task does (`tasks._fail_effect`), after the group's acknowledgement, which
it never undoes. A follow-up input that cannot be executed rolls the group transaction
back; its row is recorded as failed ("Failed to route result", as in the single path) and
the others are acknowledged again without it.

Nothing is acknowledged early: a worker killed mid-batch commits nothing for the group, so
every started row comes back after its lease, and its lost run counts as an attempt.

Reporting: each row's failure is logged and signalled as in the single path; the Celery
task itself ends SUCCESS with the per-row results (it does not raise Retry/DeadLettered,
which describe one row). Trace context: the message carries the first row's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ironflow_celery.engine.host import TaskHost
from ironflow_celery.engine.redelivery import send_back
from ironflow_celery.engine.relay import Publisher, declare_queues
from ironflow_celery.engine.tasks import (
    as_input,
    describe_error,
    effect_label,
    exhausted_by_lost_runs,
    fail_effect,
    handler_failure,
    row_policy,
    run_token_for,
    stale_reason,
    task_result,
)
from ironflow_celery.errors import (
    PermanentEffectError,
    PublishError,
    StartGuardUnavailable,
    StorageError,
)
from ironflow_celery.model.config import results_ignored
from ironflow_celery.model.tasknames import task_name_for
from ironflow_celery.model.workflow import EffectContext, WorkflowRef
from ironflow_celery.service.aio import call_handler
from ironflow_celery.storage import tracing
from ironflow_celery.storage.kinds import EFFECT, Kind
from ironflow_celery.storage.store import ClaimedRow, StartedRow

__all__ = [
    "batch_publisher",
    "batch_task_name",
    "register_batch_tasks",
    "run_effect_batch",
]


def batch_task_name(workflow_type: str) -> str:
    """The batch task of a workflow type: ``ironflow.<type>.effects``."""
    return task_name_for(workflow_type, "effects")


# -- the relay side -------------------------------------------------------------------------

_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0}


def batch_publisher(
    app: Any, single: Publisher, batch_sizes: Mapping[str, int], *, forward_traces: bool = True
) -> Publisher:
    """Wrap `single` (the one-row-per-message publisher): effects of the types in
    `batch_sizes` go out as groups of up to ``batch_sizes[type]`` rows per message."""
    ignore_result = results_ignored(app.conf)

    def publish(kind: Kind, rows: Sequence[ClaimedRow]) -> list[uuid.UUID]:
        if kind != "effect":
            return single(kind, rows)
        singles: list[ClaimedRow] = []
        grouped: dict[str, list[ClaimedRow]] = {}
        for row in rows:
            if row.workflow_type in batch_sizes:
                grouped.setdefault(row.workflow_type, []).append(row)
            else:
                singles.append(row)
        published = single(kind, singles) if singles else []
        if not grouped:
            return published
        sent: list[uuid.UUID] = []
        pipelined = False
        try:
            with app.producer_or_acquire() as producer:
                batch = getattr(producer, "batch", None)  # kombu >= 5.7: one round trip
                pipelined = batch is not None
                buffered = batch(max_size=8 * len(rows) + 8) if batch is not None else nullcontext()
                with buffered:
                    declare_queues(app, producer, {batch_task_name(wt) for wt in grouped})
                    for wt, members in grouped.items():
                        size = batch_sizes[wt]
                        for start in range(0, len(members), size):
                            chunk = members[start : start + size]
                            _send_group(app, producer, wt, chunk, ignore_result, forward_traces)
                            sent.extend(r.id for r in chunk)
        except Exception as exc:
            raise PublishError(published + ([] if pipelined else sent), exc) from exc
        return published + sent

    return publish


def _send_group(
    app: Any,
    producer: Any,
    workflow_type: str,
    chunk: Sequence[ClaimedRow],
    ignore_result: bool,
    forward_traces: bool,
) -> None:
    items = [
        [
            str(r.id),
            r.workflow_id,
            r.attempts + 1,
            r.token,
            round(r.due_at.timestamp(), 6) if r.due_at is not None else None,
        ]
        for r in chunk
    ]
    args = [workflow_type, items]
    headers = (
        tracing.headers_of(chunk[0].trace_context) if forward_traces and tracing.AVAILABLE else None
    )
    with tracing.attached(headers):
        app.send_task(
            batch_task_name(workflow_type),
            args=args,
            kwargs={},
            declare=(),
            argsrepr=f"[{workflow_type!r}, <{len(items)} effects, first {items[0][0]}>]",
            kwargsrepr="{}",
            task_id=str(uuid.uuid4()),
            producer=producer,
            ignore_result=ignore_result,
            retry=True,
            retry_policy=_RETRY_POLICY,
            headers=headers,
        )


# -- the worker side ------------------------------------------------------------------------


@dataclass(slots=True)
class _Done:
    """A row whose handler returned, waiting for the group's acknowledgement."""

    started: StartedRow
    ref: str
    attempt: int
    follow_up: Any
    workflow: Any
    began: float


def run_effect_batch(
    runtime: TaskHost, workflow_type: str, items: Sequence[Sequence[Any]]
) -> list[dict]:
    """Start, run and acknowledge a group of claimed effects (see the module doc).
    `items`: ``[row_id, workflow_id, attempt, lease, due]`` each, as the relay sent them."""
    store = runtime.store
    cfg = runtime.config
    metrics = runtime.metrics
    guard = [(uuid.UUID(i[0]), str(i[3]), run_token_for(str(i[3]))) for i in items]
    try:
        started = store.start_effects(guard, lease_seconds=EFFECT.lock_duration(cfg))
    except StorageError as exc:
        raise StartGuardUnavailable(str(exc)) from exc

    results: dict[uuid.UUID, dict] = {}
    done: list[_Done] = []
    failed: list[tuple[StartedRow, str, BaseException, bool, float]] = []
    with ExitStack() as kept:
        for (row_id, lease, _), item in zip(guard, items, strict=True):
            ref = f"{workflow_type}:{item[1]}"
            row = started.get(row_id)
            if row is None:
                metrics.task_finished("effect", None, "stale-skipped", None)
                results[row_id] = task_result(
                    "stale-skipped",
                    ref,
                    row_id,
                    int(item[2]),
                    reason=stale_reason(runtime, "effect", row_id, lease),
                )
                continue
            kept.enter_context(runtime.lease_keeper.keep("effect", row_id, row.token))
        for (row_id, _, _), item in zip(guard, items, strict=True):
            row = started.get(row_id)
            if row is None:
                continue
            ref = f"{row.workflow_type}:{row.workflow_id}"
            outcome = _run_one(runtime, row, ref, item[4])
            if isinstance(outcome, dict):
                results[row_id] = outcome
            elif isinstance(outcome, _Done):
                done.append(outcome)
            else:
                failed.append(outcome)
        results.update(_acknowledge(runtime, done))
        for row, ref, error, permanent, began in failed:
            handler_failure.set(error)
            results[row.id] = fail_effect(
                runtime, row, ref, describe_error(error), permanent=permanent, began=began
            )
    handler_failure.set(None)
    return [results[row_id] for row_id, _, _ in guard]


def _run_one(
    runtime: TaskHost, row: StartedRow, ref: str, due: float | None
) -> dict | _Done | tuple[StartedRow, str, BaseException, bool, float]:
    """One started row's handler: its result (dead-lettered before running), the row
    waiting for the group's ack, or its failure (recorded after the ack)."""
    if row.attempts >= row_policy(runtime, "effect", row).max_attempts:
        return exhausted_by_lost_runs(runtime, "effect", row, ref)
    attempt = row.attempts + 1
    registration = runtime.registry.get(row.workflow_type)
    workflow = registration.workflow
    ctx = EffectContext(
        effect_id=row.id,
        workflow=WorkflowRef(row.workflow_type, row.workflow_id),
        attempt=attempt,
        created_at=row.created_at,
    )
    due_at = datetime.fromtimestamp(due, UTC) if due is not None else None
    if due_at is None and row.attempts == 0:
        due_at = row.created_at
    runtime.metrics.task_started(
        "effect", row.workflow_type, due_at, effect_label(runtime, "effect", row)
    )
    began = time.monotonic()
    try:
        effect = workflow.effects.decode(row.payload)
        follow_up = call_handler(registration.handler, effect, ctx)
        if follow_up is not None:
            follow_up = as_input(workflow, follow_up)
    except PermanentEffectError as exc:
        return (row, ref, exc, True, began)
    except Exception as exc:
        return (row, ref, exc, False, began)
    return _Done(row, ref, attempt, follow_up, workflow, began)


def _acknowledge(runtime: TaskHost, done: list[_Done]) -> dict[uuid.UUID, dict]:
    """Acknowledge `done` in one durable transaction; a follow-up that cannot be executed
    takes its row out (recorded as failed) and the rest are acknowledged again."""
    store = runtime.store
    metrics = runtime.metrics
    results: dict[uuid.UUID, dict] = {}
    pending = list(done)
    while pending:
        items = [(d.started.id, d.started.token) for d in pending]
        # Follow-ups in a stable order: two groups lock their instances in the same order.
        follow_ups = sorted(
            (d for d in pending if d.follow_up is not None),
            key=lambda d: (d.started.workflow_type, d.started.workflow_id),
        )
        outcomes: dict[uuid.UUID, str] = {}
        current: _Done | None = None
        try:
            if not follow_ups:  # one autocommit statement: no BEGIN/COMMIT round trips
                held = store.mark_many_processed(items)
            else:
                with store.transaction(ack=True) as conn:
                    held = store.mark_many_processed_in(conn, items)
                    for d in follow_ups:
                        if d.started.id in held:
                            current = d
                            outcomes[d.started.id] = runtime.service.execute(
                                d.follow_up, workflow=d.workflow, connection=conn
                            ).kind
                    current = None
        except Exception as exc:
            # A follow-up failed: its row is recorded as failed, the others go again.
            # Else the acknowledgement itself failed: each row as the single path does it.
            failing = [current] if current is not None else pending
            for d in failing:
                handler_failure.set(exc)
                results[d.started.id] = fail_effect(
                    runtime,
                    d.started,
                    d.ref,
                    f"Failed to route result: {describe_error(exc)}",
                    permanent=False,
                    began=d.began,
                )
            pending = [d for d in pending if d not in failing]
            continue
        for d in pending:
            row = d.started
            if row.id not in held:
                metrics.task_finished("effect", row.workflow_type, "stale-skipped", d.began)
                results[row.id] = task_result(
                    "stale-skipped",
                    d.ref,
                    row.id,
                    d.attempt,
                    reason="lease lost while the handler ran; result discarded",
                )
                continue
            metrics.task_finished("effect", row.workflow_type, "processed", d.began)
            extra = (
                {"follow_up": d.follow_up.type_tag, "outcome": outcomes.get(row.id)}
                if d.follow_up is not None
                else {}
            )
            results[row.id] = task_result("processed", d.ref, row.id, d.attempt, **extra)
        break
    return results


# -- Celery registration ----------------------------------------------------------------------


def register_batch_tasks(app: Any, runtime: TaskHost, workflow_types: Sequence[str]) -> list[str]:
    """Register ``ironflow.<type>.effects`` for the types that opted into batches."""
    names = []
    for workflow_type in workflow_types:
        workflow = runtime.registry.get(workflow_type).workflow
        if getattr(workflow, "effect_batch_size", None) is None:
            continue
        name = batch_task_name(workflow_type)
        app.task(
            name=name, bind=True, acks_late=False, max_retries=None, typing=False, shared=False
        )(_bind_batch(runtime, name))
        names.append(name)
    return names


def _bind_batch(runtime: TaskHost, name: str) -> Any:
    def task(self: Any, workflow_type: str, items: list[list[Any]]) -> list[dict]:
        try:
            return run_effect_batch(runtime, workflow_type, items)
        except StartGuardUnavailable as exc:
            # Nothing started: send the group back through the broker (as the single-row
            # task does); the relay keeps the rows' claims alive meanwhile.
            runtime.metrics.ack_failed("effect")
            delay = min(0.5 * 2 ** min(self.request.retries or 0, 5), 10.0)
            raise send_back(self, exc, delay=delay) from exc
        except StorageError:
            runtime.metrics.ack_failed("effect")
            raise

    task.__name__ = name.replace(".", "_")
    task.__qualname__ = task.__name__
    task.__module__ = __name__
    task.__doc__ = run_effect_batch.__doc__
    return task
