"""`WorkflowService`: the one place every input goes through, and the workflow registry.

External callers, effect handlers' follow-up inputs and timers all reach a workflow via
`WorkflowService.execute` / `execute_dynamic`: lock the instance, replay its events,
decide, and persist the decision in one transaction. A group's follow-up inputs go through
`execute_group`: the same per input, with one lock-and-load and one write for the group.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Connection

from ironflow_celery.errors import (
    DuplicateWorkflowType,
    EventDeserializationError,
    GroupInputFailed,
    InvalidPayload,
    InvalidWorkflowDefinition,
    UnknownWorkflowType,
)
from ironflow_celery.model.messages import TAG, Message
from ironflow_celery.model.storable import check_text, json_problem, text_problem
from ironflow_celery.model.workflow import (
    Accepted,
    AlreadyCompleted,
    Decision,
    EffectContext,
    EffectHandler,
    ExecuteOutcome,
    Rejected,
    Workflow,
)
from ironflow_celery.service import tracing
from ironflow_celery.service.aio import check_handler
from ironflow_celery.storage.store import (
    DecisionWrite,
    PostgresStore,
    StoredEvent,
    TimerSpec,
    WorkflowInstanceSummary,
)

__all__ = [
    "Registration",
    "Registry",
    "WorkflowService",
    "WorkflowServiceConfig",
    "check_storable",
    "decode_events",
    "input_type_of",
]

log = logging.getLogger("ironflow_celery.service")

_POOL_LOCK = threading.Lock()


# -- registry -------------------------------------------------------------------------


def _noop_handler(effect: Any, ctx: EffectContext) -> None:
    log.warning(
        "workflow %s should not emit effects (registered without effects); effect %s ignored",
        ctx.workflow.workflow_type,
        ctx.effect_id,
    )
    return None


@dataclass(frozen=True, slots=True)
class Registration:
    """A registered workflow and its effect handler."""

    workflow: type[Workflow]
    handler: EffectHandler

    @property
    def workflow_type(self) -> str:
        return self.workflow.type


class Registry:
    """Workflow types by name; refuses a type registered twice."""

    def __init__(self, workflows: Iterable[type[Workflow] | tuple[type[Workflow], Any]] = ()):
        self._by_type: dict[str, Registration] = {}
        self._by_input: dict[type, list[Registration]] = {}
        for item in workflows:
            if isinstance(item, tuple):
                self.register(*item)
            else:
                self.register(item)

    def register(
        self, workflow: type[Workflow], handler: EffectHandler | None = None
    ) -> Registration:
        """Register a workflow with its effect handler: `handler`, else the workflow's own
        ``handle_effect`` (one of them is required when it declares effects)."""
        if not (isinstance(workflow, type) and issubclass(workflow, Workflow)) or not hasattr(
            workflow, "inputs"
        ):
            raise InvalidWorkflowDefinition(f"{workflow!r} is not a concrete Workflow subclass")
        if workflow.type in self._by_type:
            raise DuplicateWorkflowType(workflow.type)
        if handler is None:
            # The README's way: a workflow carries its handler as ``handle_effect``.
            handler = getattr(workflow, "handle_effect", None)
        if handler is None:
            if workflow.has_effects():
                raise InvalidWorkflowDefinition(
                    f"workflow '{workflow.type}' declares effects but no handler was given "
                    "and it defines no handle_effect(effect, ctx); define one, pass "
                    "handler=..., or use register_without_effects() to ignore them"
                )
            handler = _noop_handler
        else:  # not callable, or a generator: it could never run to an outcome
            check_handler(workflow.type, handler)
        registration = Registration(workflow, handler)
        self._by_type[workflow.type] = registration
        for cls in workflow.inputs.classes:
            self._by_input.setdefault(cls, []).append(registration)
        return registration

    def register_without_effects(self, workflow: type[Workflow]) -> Registration:
        """Register a workflow with a handler that ignores (and warns about) any effect."""
        if workflow.type in self._by_type:
            raise DuplicateWorkflowType(workflow.type)
        registration = Registration(workflow, _noop_handler)
        self._by_type[workflow.type] = registration
        for cls in workflow.inputs.classes:
            self._by_input.setdefault(cls, []).append(registration)
        return registration

    def get(self, workflow_type: str) -> Registration:
        """The registration of `workflow_type`, or `UnknownWorkflowType`."""
        try:
            return self._by_type[workflow_type]
        except KeyError:
            raise UnknownWorkflowType(workflow_type, self.types) from None

    def for_workflow(self, workflow: type[Workflow]) -> Registration:
        """The registration of a workflow class (typed dispatch)."""
        registration = self._by_type.get(getattr(workflow, "type", ""))
        if registration is None or registration.workflow is not workflow:
            raise UnknownWorkflowType(getattr(workflow, "type", repr(workflow)), self.types)
        return registration

    def for_input(self, input: Any) -> Registration:
        """The one registered workflow whose inputs include this input's class."""
        found = self._by_input.get(type(input), [])
        if len(found) == 1:
            return found[0]
        if not found:
            what = type(input).__qualname__
            hint = "" if isinstance(input, Message) else "; for JSON use execute_dynamic()"
            raise UnknownWorkflowType(f"<no registered workflow takes {what}{hint}>", self.types)
        names = ", ".join(r.workflow_type for r in found)
        raise InvalidWorkflowDefinition(
            f"{type(input).__qualname__} is an input of several workflows ({names}); "
            "pass workflow=... to execute()"
        )

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self._by_type)

    def __contains__(self, workflow_type: object) -> bool:
        return workflow_type in self._by_type

    def __iter__(self) -> Iterator[Registration]:
        return iter(self._by_type.values())

    def __len__(self) -> int:
        return len(self._by_type)


# -- service ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkflowServiceConfig:
    """Service options (ironflow has this one)."""

    record_input_observations: bool = False


def input_type_of(payload: Any, fallback: str) -> str:
    """The input's JSON tag, or the class name when it has none."""
    tag = payload.get(TAG) if isinstance(payload, dict) else None
    return tag if isinstance(tag, str) else fallback


def decode_events(workflow: type[Workflow], workflow_id: str, payloads: Iterable[Any]) -> list[Any]:
    """Decode stored event payloads, naming the sequence of the first that fails."""
    decoded = []
    for sequence, payload in enumerate(payloads, start=1):
        try:
            decoded.append(workflow.events.decode(payload))
        except InvalidPayload as exc:
            raise EventDeserializationError(
                workflow.type, workflow_id, sequence, exc.detail
            ) from None
    return decoded


def check_storable(workflow_type: str, kind: str, value: Any) -> None:
    """`InvalidPayload` naming the field when PostgreSQL cannot store a JSON value (a NUL
    character or a lone surrogate in a string or key), before anything is written."""
    found = json_problem(value)
    if found is None:
        return
    field, problem = found
    tag = value.get(TAG) if isinstance(value, dict) else None
    prefix = f"{tag}: " if isinstance(tag, str) and text_problem(tag) is None else ""
    raise InvalidPayload(workflow_type, kind, f"{prefix}{field or 'value'}: {problem}")


def _check_decision(
    workflow_type: str,
    events: Sequence[Any],
    effects: Sequence[Any],
    timers: Sequence[TimerSpec],
    cancel_keys: Iterable[str | None],
) -> None:
    """Workflow code may build text of its own (not only copy the input's): what a decision
    writes must be storable, or the input fails before any write."""
    for kind, values in (
        ("event", events),
        ("effect", effects),
        ("timer input", [t.input for t in timers]),
    ):
        for value in values:
            check_storable(workflow_type, kind, value)
    for key in [*(t.key for t in timers), *cancel_keys]:
        if key is not None and text_problem(key) is not None:
            raise InvalidPayload(workflow_type, "timer key", f"{key!r}: {text_problem(key)}")


@dataclass(frozen=True, slots=True)
class _Accepted:
    """An accepted decision, encoded and checked: what either execution path writes."""

    events: list[Any]
    effects: list[Any]
    timers: list[TimerSpec]
    cancel_keys: list[str]
    completed: bool


def _decide(
    wf: type[Workflow], now: Any, state: Any, input: Any
) -> tuple[Decision, _Accepted | None]:
    """Run `decide` on a replayed state; for an accepted decision also evolve, encode and
    check what it writes (None for a rejection). One input or a group's: the same rules."""
    decision = wf.decide(now, state, input)
    if not isinstance(decision, Decision):
        raise InvalidWorkflowDefinition(
            f"{wf.type}.decide returned {type(decision).__name__}, not a Decision"
        )
    if decision.is_reject:
        return decision, None
    events = [wf.events.encode(e) for e in decision.events]
    for event in decision.events:
        state = wf.evolve(state, event)
    effects = [wf.effects.encode(f) for f in decision.effects]
    timers = [
        TimerSpec(t.delay.total_seconds(), wf.inputs.encode(t.input), t.key)
        for t in decision.timers
    ]
    cancel_keys = list(decision.cancel_timer_keys)
    _check_decision(wf.type, events, effects, timers, cancel_keys)
    return decision, _Accepted(events, effects, timers, cancel_keys, wf.is_terminal(state))


def _check_key(workflow_type: str, what: str, value: str | None) -> None:
    problem = None if value is None else text_problem(value)
    if problem is not None:
        raise InvalidPayload(workflow_type, "input", f"{what} {value!r}: {problem}")


class WorkflowService:
    """Executes inputs against registered workflows and answers queries about them."""

    def __init__(
        self,
        store: PostgresStore,
        registry: Registry,
        config: WorkflowServiceConfig | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.config = config or WorkflowServiceConfig()
        self._clock = clock or (lambda: datetime.now(UTC))

    # -- execution -----------------------------------------------------------------------
    def execute(
        self,
        input: Message,
        *,
        workflow: type[Workflow] | None = None,
        connection: Connection | None = None,
    ) -> ExecuteOutcome[Any]:
        """Execute a typed input; the rejection payload comes back typed.

        The workflow is the registered one that takes the input's class, or `workflow`.
        With `connection`, the input runs inside the caller's transaction, which stays
        usable after a `UniqueKeyConflict` or a rejection.
        """
        if workflow is not None:
            registration = self.registry.for_workflow(workflow)
            if input not in registration.workflow.inputs:
                expected = registration.workflow.inputs.tags()
                raise InvalidPayload(
                    workflow.type, "input", f"{type(input).__qualname__} is not one of {expected}"
                )
        else:
            registration = self.registry.for_input(input)
        return self._execute(registration, input, None, connection)

    def execute_dynamic(
        self, workflow_type: str, payload: Any, *, connection: Connection | None = None
    ) -> ExecuteOutcome[Any]:
        """Execute a JSON input by workflow type name; a rejection comes back as JSON."""
        registration = self.registry.get(workflow_type)
        input = registration.workflow.inputs.decode(payload)
        outcome = self._execute(registration, input, payload, connection)
        if isinstance(outcome, Rejected):
            return Rejected(registration.workflow.rejection_codec.encode(outcome.reason))
        return outcome

    async def execute_async(
        self, input: Message, *, workflow: type[Workflow] | None = None
    ) -> ExecuteOutcome[Any]:
        """`execute` for asyncio callers (FastAPI): runs in a bounded thread pool, so the
        event loop never blocks on PostgreSQL. Cancelling the await does not cancel the
        input: it may still commit."""
        call = functools.partial(self.execute, input, workflow=workflow)
        return await asyncio.get_running_loop().run_in_executor(self._async_pool(), call)

    async def execute_dynamic_async(self, workflow_type: str, payload: Any) -> ExecuteOutcome[Any]:
        """`execute_dynamic` for asyncio callers, in the same bounded thread pool."""
        call = functools.partial(self.execute_dynamic, workflow_type, payload)
        return await asyncio.get_running_loop().run_in_executor(self._async_pool(), call)

    def _async_pool(self) -> ThreadPoolExecutor:
        """One pool per service, as many threads as the engine's pool has connections:
        more would only queue on the connection pool, and its timeout, inside a thread."""
        pool = self.__dict__.get("_executor")
        if pool is None:
            with _POOL_LOCK:
                pool = self.__dict__.get("_executor")
                if pool is None:
                    size = getattr(self.store.engine.pool, "size", lambda: 5)()
                    pool = ThreadPoolExecutor(max(1, size), thread_name_prefix="ironflow-execute")
                    self.__dict__["_executor"] = pool
        return pool

    def _execute(
        self,
        registration: Registration,
        input: Any,
        payload: Any,
        connection: Connection | None,
    ) -> ExecuteOutcome[Any]:
        # A span per input: the effects and timers it writes carry its trace onwards.
        if not tracing.configured():
            return self._execute_input(registration, input, payload, connection)
        with self._input_span(registration.workflow, input) as current:
            outcome = self._execute_input(registration, input, payload, connection)
            if current is not None and current.is_recording():
                current.set_attribute("ironflow.outcome", outcome.kind)
            return outcome

    @staticmethod
    def _input_span(wf: type[Workflow], input: Any) -> Any:
        """The span of one input's execution (a no-op without an OpenTelemetry SDK)."""
        if not tracing.configured():
            return nullcontext()
        attributes = {"ironflow.workflow_type": wf.type, "ironflow.input_type": input.type_tag}
        return tracing.span(f"ironflow.execute {wf.type}", attributes)

    def _execute_input(
        self,
        registration: Registration,
        input: Any,
        payload: Any,
        connection: Connection | None,
    ) -> ExecuteOutcome[Any]:
        wf = registration.workflow
        workflow_id = wf.workflow_id(input)
        unique_key = wf.unique_key(input)
        observe = self.config.record_input_observations
        if payload is None and (observe or isinstance(input, Message)):
            payload = input.to_json()
        # Text PostgreSQL cannot store is bad input: say which field, before any write.
        check_storable(wf.type, "input", payload)
        _check_key(wf.type, "workflow id", workflow_id)
        _check_key(wf.type, "unique key", unique_key)
        input_type = input_type_of(payload, type(input).__name__) if observe else ""

        if connection is None and not observe:
            created = self._create_with_decision(wf, workflow_id, unique_key, input)
            if created is not None:
                return created
        uow = self.store.begin(wf.type, workflow_id, unique_key, connection=connection)
        with uow:
            if uow.completed:
                if observe:
                    self.store.record_observation(
                        wf.type,
                        workflow_id,
                        input_type,
                        payload,
                        "already_completed",
                        connection=connection,
                    )
                return AlreadyCompleted()

            state = wf.replay(decode_events(wf, workflow_id, uow.events))
            decision, accepted = _decide(wf, self._clock(), state, input)
            if accepted is None:
                rejection_json = wf.rejection_codec.encode(decision.rejection)
                uow.rollback()
                if observe:
                    check_storable(wf.type, "rejection", rejection_json)
                    self.store.record_observation(
                        wf.type,
                        workflow_id,
                        input_type,
                        payload,
                        "rejected",
                        rejection_json,
                        connection=connection,
                    )
                return Rejected(decision.rejection)

            if observe:
                uow.record_input_observation(input_type, payload, "accepted")
            uow.append_events(accepted.events)
            uow.enqueue_effects(accepted.effects)
            uow.cancel_timers(accepted.cancel_keys)
            uow.schedule_timers(accepted.timers)
            if accepted.effects or accepted.timers:
                # the input's trace, stored with its effects and timers (see service.tracing)
                uow.trace_context = tracing.current_carrier()
            if accepted.completed:
                uow.mark_completed()
            return Accepted(uow.commit())

    def _create_with_decision(
        self, wf: type[Workflow], workflow_id: str, unique_key: str | None, input: Any
    ) -> Accepted | None:
        """An input that starts a new instance, in one durable statement instead of four
        round trips (`PostgresStore.create_with_decision`); None: the usual path decides.

        The input is decided against the initial state, which is exactly the state of an
        instance that does not exist yet, so when the statement creates the instance the
        decision is the usual path's. It is tried only when that decision is accepted and
        schedules or cancels no timers; when the instance exists (or the unique key is
        taken) nothing is written, and the usual path decides on the stored state: one
        cheap round trip more for an input to an existing instance that the initial state
        would accept too."""
        try:
            _, accepted = _decide(wf, self._clock(), wf.replay(()), input)
        except Exception:
            return None  # the usual path decides on the stored state, and says what failed
        if accepted is None or accepted.timers or accepted.cancel_keys:
            return None
        # the input's trace, stored with its effects (see service.tracing)
        trace = tracing.current_carrier() if accepted.effects else None
        created = self.store.create_with_decision(
            wf.type,
            workflow_id,
            unique_key,
            accepted.events,
            accepted.effects,
            trace=trace,
            completed=accepted.completed,
        )
        return Accepted(len(accepted.events)) if created else None

    def execute_group(
        self,
        items: Sequence[tuple[Message, type[Workflow], str | None]],
        *,
        connection: Connection,
    ) -> list[ExecuteOutcome[Any]] | None:
        """Execute several inputs, each on a different existing instance, inside the
        caller's transaction in two statements for the whole group: lock and load every
        instance (in key order), then write every accepted decision. Each item is (input,
        its workflow, the stored trace context it runs under). What each input decides and
        the outcome it gets are what `execute` would give it; only the round trips differ.

        Returns None, having written nothing, when the group does not qualify (an instance
        named twice, one that does not exist yet, input observations on): the caller then
        executes the inputs one by one in the same transaction. Raises `GroupInputFailed`
        for an input whose decision fails, before anything is written."""
        if self.config.record_input_observations or not items:
            return None
        plans: list[tuple[Registration, Message, str, str | None]] = []
        for index, (input, workflow, trace) in enumerate(items):
            try:
                registration = self.registry.for_workflow(workflow)
                wf = registration.workflow
                if input not in wf.inputs:
                    raise InvalidPayload(
                        wf.type, "input", f"{type(input).__qualname__} is not one of "
                        f"{wf.inputs.tags()}",
                    )  # fmt: skip
                workflow_id = wf.workflow_id(input)
                check_storable(wf.type, "input", input.to_json())
                _check_key(wf.type, "workflow id", workflow_id)
                _check_key(wf.type, "unique key", wf.unique_key(input))
            except Exception as exc:
                raise GroupInputFailed(index, exc) from exc
            plans.append((registration, input, workflow_id, trace))
        keys = [(r.workflow.type, wid) for r, _, wid, _ in plans]
        if len(set(keys)) != len(keys):
            return None
        # Sorted keys: two groups (or a group and a lone input) lock instances in one order.
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        loaded = self.store.lock_and_load_many(connection, [keys[i] for i in order])
        if not all(found for found, _, _ in loaded):
            return None  # a new instance: `begin` creates it (the locks taken are kept)
        outcomes: list[ExecuteOutcome[Any]] = [AlreadyCompleted()] * len(items)
        writes: list[DecisionWrite] = []
        for i, (_, completed, events) in zip(order, loaded, strict=True):
            registration, input, workflow_id, trace = plans[i]
            if completed:
                continue
            try:
                with tracing.attached(tracing.headers_of(trace)):
                    outcome, write = self._decide_in_group(registration, input, workflow_id, events)
            except Exception as exc:
                raise GroupInputFailed(i, exc) from exc
            outcomes[i] = outcome
            if write is not None:
                writes.append(write)
        self.store.write_decisions(connection, writes)
        return outcomes

    def _decide_in_group(
        self, registration: Registration, input: Message, workflow_id: str, stored: list[Any]
    ) -> tuple[ExecuteOutcome[Any], DecisionWrite | None]:
        """`_execute_input`'s decision for one input of `execute_group`, in its own span:
        the outcome, and what to write (None for a rejection)."""
        wf = registration.workflow
        with self._input_span(wf, input) as current:
            state = wf.replay(decode_events(wf, workflow_id, stored))
            decision, accepted = _decide(wf, self._clock(), state, input)
            if accepted is None:
                outcome: ExecuteOutcome[Any] = Rejected(decision.rejection)
                write = None
            else:
                write = DecisionWrite(
                    wf.type,
                    workflow_id,
                    len(stored) + 1,
                    accepted.events,
                    accepted.effects,
                    tracing.current_carrier() if accepted.effects or accepted.timers else None,
                    accepted.completed,
                    accepted.cancel_keys,
                    accepted.timers,
                )
                outcome = Accepted(len(accepted.events))
            if current is not None and current.is_recording():
                current.set_attribute("ironflow.outcome", outcome.kind)
            return outcome, write

    # -- queries ---------------------------------------------------------------------------
    def list_workflows(
        self, workflow_type: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[WorkflowInstanceSummary]:
        """Instances (optionally of one type), most recently active first."""
        check_text(workflow_type, "workflow type")
        return self.store.list_workflows(workflow_type, limit, offset)

    def fetch_workflow_events(self, workflow_type: str, workflow_id: str) -> list[StoredEvent]:
        """An instance's stored events in order."""
        check_text(workflow_type, "workflow type")
        check_text(workflow_id, "workflow id")
        return self.store.fetch_workflow_events(workflow_type, workflow_id)

    def fetch_latest_state(self, workflow: type[Workflow], workflow_id: str) -> Any:
        """Replay an instance's events into its typed state (default state if unknown)."""
        registration = self.registry.for_workflow(workflow)
        return self._latest_state(registration, workflow_id)

    def fetch_latest_state_dynamic(self, workflow_type: str, workflow_id: str) -> Any:
        """Replay an instance's events; the state as JSON."""
        registration = self.registry.get(workflow_type)
        state = self._latest_state(registration, workflow_id)
        return registration.workflow.state_codec.encode(state)

    def _latest_state(self, registration: Registration, workflow_id: str) -> Any:
        wf = registration.workflow
        check_text(workflow_id, "workflow id")
        stored = self.store.fetch_workflow_events(wf.type, workflow_id)
        return wf.replay(decode_events(wf, workflow_id, (e.payload for e in stored)))
