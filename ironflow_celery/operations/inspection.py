"""Find and inspect single effects, timers and workflow instances without SQL.

The read side behind ``effects list/show``, ``timers list/show``, ``workflows show`` and
``workflows list TYPE`` (`ironflow_celery.cli.operations`), the ``ironflow.inspect.*``
Celery tasks (`register_inspection_tasks`) and any web view: every function takes the
runtime and returns typed values (frozen dataclasses with ``to_json``), never raw rows.
Bad arguments raise `InvalidInspectionRequest` (a usage error); nothing here writes.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from ironflow_celery.errors import (
    EventDeserializationError,
    InvalidDeadLetterRequest,
    InvalidInspectionRequest,
    IronflowError,
    UnknownWorkflowType,
)
from ironflow_celery.model.storable import text_problem
from ironflow_celery.model.views import StateMachineView, describe
from ironflow_celery.model.workflow import WorkflowRef
from ironflow_celery.service.dead_letters import (
    decode_cursor,
    encode_cursor,
    parse_age,
    parse_kind,
    parse_row_id,
)
from ironflow_celery.service.workflow_service import decode_events
from ironflow_celery.storage.inspection import ROW_STATES, AttemptRecord, RowInfo, RowState
from ironflow_celery.storage.kinds import Kind
from ironflow_celery.storage.store import WorkflowInstanceSummary

if TYPE_CHECKING:
    from ironflow_celery.engine.runtime import WorkflowRuntime

__all__ = [
    "INSTANCE_STATES",
    "ROW_STATES",
    "TASK_PREFIX",
    "AttemptRecord",
    "EventInfo",
    "InspectQuery",
    "InstanceCounts",
    "InstanceDetail",
    "InstanceInfo",
    "InstancePage",
    "InvalidInspectionRequest",
    "Order",
    "RowInfo",
    "RowPage",
    "RowState",
    "StateMachinePosition",
    "get_row",
    "instance_counts",
    "list_instances",
    "list_rows",
    "parse_state",
    "parse_time",
    "register_inspection_tasks",
    "show_workflow",
]

# What operators type for the same states ("waiting to retry" is how the issue says it).
_STATE_ALIASES: dict[str, RowState] = {
    "inflight": "in_flight",
    "running": "in_flight",
    "leased": "in_flight",
    "waiting": "backing_off",
    "waiting_to_retry": "backing_off",
    "retrying": "backing_off",
    "backoff": "backing_off",
    "due": "pending",
    "discarded": "cancelled",
    "canceled": "cancelled",
    "dead_letter": "dead",
    "done": "processed",
}

INSTANCE_STATES: tuple[str, ...] = ("active", "completed")
"""`list_instances` lifecycle filters; any other value names a state-machine state."""

Order = Literal["newest", "oldest"]

MAX_LIMIT = 1000
SUMMARY_LENGTH = 120
"""Characters of an event's payload shown in a history line."""


# -- values -------------------------------------------------------------------------------


def _check_text(what: str, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidInspectionRequest(f"{what} must be text, got {type(value).__name__}")
    problem = text_problem(value)
    if problem is not None:
        raise InvalidInspectionRequest(f"invalid {what} {value!r}: {problem}")
    return value


def parse_state(value: str | None) -> RowState | None:
    """A row state (`ROW_STATES`; ``waiting-to-retry``, ``discarded``… are accepted)."""
    if value is None or value == "":
        return None
    _check_text("state", value)
    name = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    if name in ROW_STATES:
        return name
    if name in _STATE_ALIASES:
        return _STATE_ALIASES[name]
    raise InvalidInspectionRequest(f"unknown state {value!r}; one of {', '.join(ROW_STATES)}")


def parse_time(value: datetime | str | None, *, now: datetime | None = None) -> datetime | None:
    """An instant: a datetime, ISO 8601 text (UTC if no offset), ``now``, or an offset from
    now: ``-2h`` / ``2h`` (that long ago), ``+30m`` (that far ahead)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    _check_text("time", value)
    text = str(value).strip()
    now = now or datetime.now(UTC)
    if text.lower() == "now":
        return now
    sign = -1
    if text[:1] in "+-":
        sign = 1 if text[0] == "+" else -1
        text_age = text[1:]
    else:
        text_age = text
    try:
        age = parse_age(text_age)
        if age is not None:
            return now + sign * age
    except InvalidDeadLetterRequest:
        pass
    except OverflowError:
        raise InvalidInspectionRequest(f"time out of range: {value!r}") from None
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInspectionRequest(
            f"not a time: {value!r} (use ISO 8601, 'now', or an offset such as -2h or +30m)"
        ) from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _limit(value: int | str | None, default: int) -> int:
    try:
        limit = default if value is None else int(value)
    except (TypeError, ValueError):
        raise InvalidInspectionRequest(f"limit must be a number, got {value!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInspectionRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def _order(value: str | None) -> Order:
    name = (value or "newest").strip().lower()
    if name in ("newest", "desc", "newest-first"):
        return "newest"
    if name in ("oldest", "asc", "oldest-first"):
        return "oldest"
    raise InvalidInspectionRequest(f"order must be 'newest' or 'oldest', got {value!r}")


def _kind(kind: str) -> Kind:
    try:
        return parse_kind(kind)
    except InvalidDeadLetterRequest as exc:
        raise InvalidInspectionRequest(str(exc)) from None


def _row_id(row_id: uuid.UUID | str) -> uuid.UUID:
    try:
        return parse_row_id(row_id)
    except InvalidDeadLetterRequest as exc:
        raise InvalidInspectionRequest(str(exc)) from None


@dataclass(frozen=True, slots=True)
class InspectQuery:
    """Which effects or timers `list_rows` returns: filters, page size, order, cursor.

    ``InspectQuery.of("effect", workflow_type="orders", state="dead", limit=20)``"""

    kind: Kind = "effect"
    workflow_type: str | None = None
    workflow_id: str | None = None
    effect_type: str | None = None
    """The payload's type tag: the effect's type (a timer's input type)."""
    state: RowState | None = None
    due_before: datetime | None = None
    due_after: datetime | None = None
    limit: int = 50
    order: Order = "newest"
    """By creation time: ``newest`` first (default) or ``oldest`` first."""
    cursor: tuple[datetime, uuid.UUID] | None = None

    @classmethod
    def of(
        cls,
        kind: str = "effect",
        *,
        workflow_type: str | None = None,
        workflow_id: str | None = None,
        effect_type: str | None = None,
        state: str | None = None,
        due_before: datetime | str | None = None,
        due_after: datetime | str | None = None,
        limit: int | str | None = None,
        order: str | None = None,
        after: str | None = None,
    ) -> InspectQuery:
        """A query from plain values (CLI options, Celery task kwargs, query strings)."""
        cursor = None
        if after:
            _check_text("cursor", after)
            try:
                cursor = decode_cursor(after)
            except InvalidDeadLetterRequest:
                raise InvalidInspectionRequest(f"not a page cursor: {after!r}") from None
        return cls(
            kind=_kind(kind),
            workflow_type=_check_text("workflow type", workflow_type),
            workflow_id=_check_text("workflow id", workflow_id),
            effect_type=_check_text("effect type", effect_type),
            state=parse_state(state),
            due_before=parse_time(due_before),
            due_after=parse_time(due_after),
            limit=_limit(limit, 50),
            order=_order(order),
            cursor=cursor,
        )

    def after(self, row: RowInfo | str) -> InspectQuery:
        """The next page: after `row` (or an opaque cursor)."""
        if isinstance(row, RowInfo):
            return dataclasses.replace(self, cursor=(row.created_at, row.id))
        return dataclasses.replace(self, cursor=InspectQuery.of(self.kind, after=row).cursor)

    def params(self, runtime: WorkflowRuntime) -> dict[str, Any]:
        """Bind parameters of `sql.INSPECT_STATEMENTS`' list statement."""
        open_rows = None
        if self.state in ("cancelled", "processed"):
            open_rows = False
        elif self.state is not None:
            open_rows = True
        return {
            "wt": self.workflow_type,
            "wid": self.workflow_id,
            "effect_type": self.effect_type,
            "state": self.state,
            "open": open_rows,
            "due_before": self.due_before,
            "due_after": self.due_after,
            "after_at": self.cursor[0] if self.cursor else None,
            "after_id": self.cursor[1] if self.cursor else None,
            "limit": self.limit,
            **runtime.attempt_limits.params(),
        }


@dataclass(frozen=True, slots=True)
class RowPage:
    """One page of `list_rows`, with the cursor of the next (None on the last page)."""

    kind: Kind
    items: tuple[RowInfo, ...]
    next_cursor: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "count": len(self.items),
            "items": [r.to_json() for r in self.items],
            "next_cursor": self.next_cursor,
        }


@dataclass(frozen=True, slots=True)
class EventInfo:
    """One stored event of an instance's history."""

    sequence: int
    global_sequence: int
    type: str
    created_at: datetime
    summary: str
    """The payload as compact JSON, cut to `SUMMARY_LENGTH` characters."""
    payload: Any

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "global_sequence": self.global_sequence,
            "type": self.type,
            "created_at": self.created_at.isoformat(),
            "summary": self.summary,
            "payload": self.payload,
        }


@dataclass(frozen=True, slots=True)
class StateMachinePosition:
    """Where an instance stands in its type's state machine (``state_machine()``).

    ``status`` is the current state's name when the workflow reports it (a
    `StateMachineView`'s ``state_info``); None when the type declares a machine but not
    how a live state maps onto it."""

    states: tuple[str, ...]
    terminal_states: tuple[str, ...]
    initial_state: str
    status: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    next_inputs: tuple[str, ...] = ()
    """Inputs with a transition out of ``status``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "fields": dict(self.fields),
            "next_inputs": list(self.next_inputs),
            "states": list(self.states),
            "terminal_states": list(self.terminal_states),
            "initial_state": self.initial_state,
        }


@dataclass(frozen=True, slots=True)
class InstanceDetail:
    """One workflow instance: stored summary, replayed state, history, rows, position."""

    workflow: WorkflowRef
    created_at: datetime
    event_count: int
    last_event_at: datetime | None
    completed_at: datetime | None
    state: Any
    """The replayed state as JSON (None when it could not be replayed: `state_error`)."""
    terminal: bool | None
    """The workflow's ``is_terminal(state)`` (None when the state could not be replayed)."""
    events: tuple[EventInfo, ...]
    effects: tuple[RowInfo, ...]
    """Every effect of the instance, oldest first (open and closed)."""
    timers: tuple[RowInfo, ...]
    position: StateMachinePosition | None = None
    state_error: str | None = None

    @property
    def completed(self) -> bool:
        return self.completed_at is not None

    @property
    def open_effects(self) -> tuple[RowInfo, ...]:
        """Effects not processed, cancelled or dead."""
        return tuple(r for r in self.effects if r.state not in ("processed", "cancelled", "dead"))

    @property
    def open_timers(self) -> tuple[RowInfo, ...]:
        return tuple(r for r in self.timers if r.state not in ("processed", "cancelled", "dead"))

    @property
    def dead_letters(self) -> tuple[RowInfo, ...]:
        """Dead-lettered effects, then timers."""
        return tuple(r for r in (*self.effects, *self.timers) if r.state == "dead")

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow": str(self.workflow),
            "workflow_type": self.workflow.workflow_type,
            "workflow_id": self.workflow.workflow_id,
            "created_at": self.created_at.isoformat(),
            "event_count": self.event_count,
            "last_event_at": None if self.last_event_at is None else self.last_event_at.isoformat(),
            "completed_at": None if self.completed_at is None else self.completed_at.isoformat(),
            "completed": self.completed,
            "terminal": self.terminal,
            "state": self.state,
            "state_error": self.state_error,
            "position": None if self.position is None else self.position.to_json(),
            "events": [e.to_json() for e in self.events],
            "effects": [r.to_json() for r in self.effects],
            "timers": [r.to_json() for r in self.timers],
            "pending_effects": [str(r.id) for r in self.open_effects],
            "pending_timers": [str(r.id) for r in self.open_timers],
            "dead_letters": [str(r.id) for r in self.dead_letters],
        }


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """One row of `list_instances`: the stored summary, and the state-machine status when
    the type reports one (replayed)."""

    workflow: WorkflowRef
    created_at: datetime
    event_count: int
    last_event_at: datetime | None
    completed_at: datetime | None
    status: str | None = None

    @property
    def completed(self) -> bool:
        return self.completed_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow": str(self.workflow),
            "workflow_id": self.workflow.workflow_id,
            "created_at": self.created_at.isoformat(),
            "event_count": self.event_count,
            "last_event_at": None if self.last_event_at is None else self.last_event_at.isoformat(),
            "completed_at": None if self.completed_at is None else self.completed_at.isoformat(),
            "completed": self.completed,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class InstancePage:
    """One page of `list_instances`; `next_offset` continues it (None: no more)."""

    workflow_type: str
    state: str | None
    items: tuple[InstanceInfo, ...]
    next_offset: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow_type": self.workflow_type,
            "state": self.state,
            "count": len(self.items),
            "items": [i.to_json() for i in self.items],
            "next_offset": self.next_offset,
        }


@dataclass(frozen=True, slots=True)
class InstanceCounts:
    """How many instances of a type are active and completed."""

    workflow_type: str
    active: int
    completed: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- effects and timers ---------------------------------------------------------------------


def list_rows(runtime: WorkflowRuntime, query: InspectQuery | None = None) -> RowPage:
    """Effects or timers matching `query`, one page, newest (or oldest) first."""
    query = query or InspectQuery()
    rows = runtime.store.inspect_rows(
        query.kind, query.params(runtime), newest_first=query.order == "newest"
    )
    cursor = None
    if rows and len(rows) >= query.limit:
        cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
    return RowPage(query.kind, tuple(rows), cursor)


def get_row(
    runtime: WorkflowRuntime, row_id: uuid.UUID | str, *, kind: str = "effect"
) -> RowInfo | None:
    """One effect (or timer) with its payload, lease and state; None when there is none."""
    return runtime.store.inspect_row(_kind(kind), _row_id(row_id), runtime.attempt_limits)


# -- workflow instances -----------------------------------------------------------------------


def _registration(runtime: WorkflowRuntime, workflow_type: str) -> Any:
    _check_text("workflow type", workflow_type)
    return runtime.registry.get(workflow_type)  # UnknownWorkflowType: a clear refusal


def _summary(payload: Any) -> str:
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= SUMMARY_LENGTH else text[: SUMMARY_LENGTH - 1] + "…"


def _event_type(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("type"), str):
        return str(payload["type"])
    return type(payload).__name__


def _position(workflow: Any, state: Any, replayed: bool) -> StateMachinePosition | None:
    try:
        definition = describe(workflow)
    except IronflowError:
        return None  # the type declares no state machine
    status, fields = None, {}
    if replayed and isinstance(workflow, type) and issubclass(workflow, StateMachineView):
        info = workflow.state_info(state)
        status, fields = info.status, dict(info.fields)
    nexts = tuple(t.input for t in definition.transitions_from(status)) if status else ()
    return StateMachinePosition(
        states=tuple(s.name for s in definition.states),
        terminal_states=tuple(definition.terminal_states),
        initial_state=definition.initial_state,
        status=status,
        fields=fields,
        next_inputs=nexts,
    )


def _instance_rows(runtime: WorkflowRuntime, kind: Kind, ref: WorkflowRef) -> tuple[RowInfo, ...]:
    query = InspectQuery(
        kind=kind,
        workflow_type=ref.workflow_type,
        workflow_id=ref.workflow_id,
        limit=MAX_LIMIT,
        order="oldest",
    )
    return list_rows(runtime, query).items


def show_workflow(
    runtime: WorkflowRuntime, workflow_type: str, workflow_id: str
) -> InstanceDetail | None:
    """One instance: its replayed state and terminality, event history, effects and timers
    (dead letters among them) and state-machine position. None when it does not exist;
    `UnknownWorkflowType` for a type this app does not register."""
    registration = _registration(runtime, workflow_type)
    _check_text("workflow id", workflow_id)
    if not workflow_id:
        raise InvalidInspectionRequest("a workflow id is required")
    workflow = registration.workflow
    summary = runtime.store.get_instance(workflow_type, workflow_id)
    if summary is None:
        return None
    stored = runtime.store.fetch_workflow_events(workflow_type, workflow_id)
    state_json: Any = None
    state: Any = None
    terminal: bool | None = None
    error: str | None = None
    try:
        state = workflow.replay(decode_events(workflow, workflow_id, (e.payload for e in stored)))
        state_json = workflow.state_codec.encode(state)
        terminal = bool(workflow.is_terminal(state))
    except (EventDeserializationError, IronflowError) as exc:
        error = str(exc)
    ref = WorkflowRef(workflow_type, workflow_id)
    return InstanceDetail(
        workflow=ref,
        created_at=summary.created_at,
        event_count=summary.event_count,
        last_event_at=summary.last_event_at,
        completed_at=summary.completed_at,
        state=state_json,
        terminal=terminal,
        events=tuple(
            EventInfo(
                e.sequence,
                e.global_sequence,
                _event_type(e.payload),
                e.created_at,
                _summary(e.payload),
                e.payload,
            )
            for e in stored
        ),
        effects=_instance_rows(runtime, "effect", ref),
        timers=_instance_rows(runtime, "timer", ref),
        position=_position(workflow, state, error is None),
        state_error=error,
    )


SCAN_LIMIT = 5000
"""Instances `list_instances` replays at most per call when filtering by a state-machine
state (the next call continues from `next_offset`)."""


def _status_of(runtime: WorkflowRuntime, workflow: Any, workflow_id: str) -> str | None:
    stored = runtime.store.fetch_workflow_events(workflow.type, workflow_id)
    try:
        state = workflow.replay(decode_events(workflow, workflow_id, (e.payload for e in stored)))
        return str(workflow.state_info(state).status)
    except IronflowError:
        return None


def list_instances(
    runtime: WorkflowRuntime,
    workflow_type: str,
    *,
    state: str | None = None,
    limit: int | str | None = 50,
    offset: int = 0,
) -> InstancePage:
    """A type's instances, most recently active first. `state`: ``active``, ``completed``
    or, for a type that reports its status (`StateMachineView`), a state of its machine
    (each candidate is replayed; at most `SCAN_LIMIT` per call)."""
    registration = _registration(runtime, workflow_type)
    workflow = registration.workflow
    page_size = _limit(limit, 50)
    if offset < 0:
        raise InvalidInspectionRequest(f"offset must be at least 0, got {offset}")
    state = _check_text("state", state)
    reports = isinstance(workflow, type) and issubclass(workflow, StateMachineView)
    store = runtime.store
    if state is None or state in INSTANCE_STATES:
        completed = None if state is None else state == "completed"
        rows = store.list_instances(
            workflow_type, completed=completed, limit=page_size, offset=offset
        )
        items = [
            _info(r, _status_of(runtime, workflow, r.workflow_id) if reports else None)
            for r in rows
        ]
        more = offset + len(rows) if len(rows) >= page_size else None
        return InstancePage(workflow_type, state, tuple(items), more)
    try:
        definition = describe(workflow)
    except IronflowError:
        definition = None
    names = () if definition is None else tuple(s.name for s in definition.states)
    if state not in names or not reports:
        allowed = ", ".join((*INSTANCE_STATES, *(names if reports else ())))
        raise InvalidInspectionRequest(
            f"unknown state {state!r} for workflow type {workflow_type!r}; one of {allowed}"
            + ("" if reports else " (the type does not report a state-machine status)")
        )
    found: list[InstanceInfo] = []
    position, scanned = offset, 0
    batch = 200
    while len(found) < page_size and scanned < SCAN_LIMIT:
        rows = store.list_instances(workflow_type, completed=None, limit=batch, offset=position)
        for r in rows:
            position += 1
            scanned += 1
            status = _status_of(runtime, workflow, r.workflow_id)
            if status == state:
                found.append(_info(r, status))
                if len(found) >= page_size:
                    break
        if len(rows) < batch:
            return InstancePage(
                workflow_type, state, tuple(found), None if len(found) < page_size else position
            )
    return InstancePage(workflow_type, state, tuple(found), position)


def _info(row: WorkflowInstanceSummary, status: str | None) -> InstanceInfo:
    return InstanceInfo(
        WorkflowRef(row.workflow_type, row.workflow_id),
        row.created_at,
        row.event_count,
        row.last_event_at,
        row.completed_at,
        status,
    )


def instance_counts(runtime: WorkflowRuntime, workflow_type: str) -> InstanceCounts:
    """How many instances of `workflow_type` are active and completed."""
    _registration(runtime, workflow_type)
    active, completed = runtime.store.count_instances(workflow_type)
    return InstanceCounts(workflow_type, active, completed)


# -- Celery tasks ------------------------------------------------------------------------------

TASK_PREFIX = "ironflow.inspect."


def register_inspection_tasks(app: Any, runtime: WorkflowRuntime) -> list[str]:
    """Register ``ironflow.inspect.{rows,row,workflow,workflows}`` on `app`: the same reads
    for ``celery call`` and Flower, each returning JSON (`to_json` of the typed values)."""

    def rows(
        kind: str = "effect",
        workflow_type: str | None = None,
        workflow_id: str | None = None,
        effect_type: str | None = None,
        state: str | None = None,
        due_before: str | None = None,
        due_after: str | None = None,
        limit: int = 50,
        order: str = "newest",
        after: str | None = None,
    ) -> dict[str, Any]:
        """Effects or timers matching the filters, one page, with the next page's cursor."""
        query = InspectQuery.of(
            kind,
            workflow_type=workflow_type,
            workflow_id=workflow_id,
            effect_type=effect_type,
            state=state,
            due_before=due_before,
            due_after=due_after,
            limit=limit,
            order=order,
            after=after,
        )
        return list_rows(runtime, query).to_json()

    def row(row_id: str, kind: str = "effect") -> dict[str, Any]:
        """One effect or timer; ``{"found": false}`` when there is none."""
        info = get_row(runtime, row_id, kind=kind)
        if info is None:
            return {"found": False, "kind": _kind(kind), "id": str(_row_id(row_id))}
        return {"found": True, **info.to_json()}

    def workflow(workflow_type: str, workflow_id: str) -> dict[str, Any]:
        """One instance: state, history, effects, timers, dead letters, position."""
        detail = show_workflow(runtime, workflow_type, workflow_id)
        if detail is None:
            return {"found": False, "workflow": str(WorkflowRef(workflow_type, workflow_id))}
        return {"found": True, **detail.to_json()}

    def workflows(
        workflow_type: str, state: str | None = None, limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        """A type's instances (by state), one page, with counts."""
        page = list_instances(runtime, workflow_type, state=state, limit=limit, offset=offset)
        counts = instance_counts(runtime, workflow_type)
        return {**page.to_json(), "active": counts.active, "completed": counts.completed}

    names = []
    for fn in (rows, row, workflow, workflows):
        name = TASK_PREFIX + fn.__name__
        fn.__module__ = __name__
        # Bad arguments fail the task with the message, logged in one line.
        app.task(
            name=name,
            bind=False,
            shared=False,
            typing=True,
            throws=(InvalidInspectionRequest, UnknownWorkflowType),
        )(fn)
        names.append(name)
    return names
