"""The workflow model: `Workflow`, `Decision`, `Timer`, `ExecuteOutcome`, `EffectContext`.

A workflow is a class of pure functions. ``evolve(state, event)`` folds stored events into
state; ``decide(now, state, input)`` answers an input with a `Decision`: accept it with
events (and effects, timers, timer cancellations) or reject it with a payload. The engine
persists everything a decision says in one transaction.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Generic, Literal, TypeVar

from ironflow_celery.errors import InvalidArgument, InvalidArgumentType, InvalidWorkflowDefinition
from ironflow_celery.model.config import RetryPolicy
from ironflow_celery.model.messages import Message, TaggedUnion, ValueCodec, union_members
from ironflow_celery.model.storable import text_problem
from ironflow_celery.model.tasknames import Kind

__all__ = [
    "Accepted",
    "AlreadyCompleted",
    "CancelNotice",
    "DeadLetterNotice",
    "Decision",
    "EffectContext",
    "EffectHandler",
    "ExecuteOutcome",
    "R",
    "Rejected",
    "S",
    "Timer",
    "Workflow",
    "WorkflowRef",
]

R = TypeVar("R")
S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class WorkflowRef:
    """A workflow instance: its type and its id. Displays as ``type:id``."""

    workflow_type: str
    workflow_id: str

    def __str__(self) -> str:
        return f"{self.workflow_type}:{self.workflow_id}"

    @classmethod
    def parse(cls, text: str) -> WorkflowRef:
        """Parse ``type:id`` (the id may itself contain colons)."""
        workflow_type, sep, workflow_id = text.partition(":")
        if not sep or not workflow_type or not workflow_id:
            raise InvalidArgument(f"expected 'workflow_type:workflow_id', got {text!r}")
        return cls(workflow_type, workflow_id)


def _as_timedelta(delay: timedelta | float | int) -> timedelta:
    if isinstance(delay, timedelta):
        value = delay
    elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
        value = timedelta(seconds=delay)
    else:
        raise InvalidArgumentType(
            f"a timer delay is a timedelta or seconds, got {type(delay).__name__}"
        )
    if value < timedelta(0):
        raise InvalidArgument(f"a timer delay cannot be negative ({value})")
    return value


@dataclass(frozen=True, slots=True)
class Timer:
    """An input delivered to its workflow after `delay` (fire time = database now() + delay).

    A keyed timer replaces the pending timer with the same key on the same instance, and
    can be cancelled by key. Timers carry no absolute time: ``decide`` computes the delay
    from its ``now`` argument when it needs one.
    """

    delay: timedelta
    input: Any
    key: str | None = None

    @classmethod
    def after(cls, delay: timedelta | float, input: Any, key: str | None = None) -> Timer:
        """A timer that fires `delay` (a timedelta or seconds) after the decision commits."""
        return cls(_as_timedelta(delay), input, key)

    def with_key(self, key: str) -> Timer:
        """The same timer with a replacement/cancellation key."""
        return dataclasses.replace(self, key=key)

    def to_json(self) -> dict[str, Any]:
        """ironflow's JSON form: ``delay`` as serde's Duration, ``key`` omitted when unset."""
        total_us = (
            self.delay.days * 86_400_000_000
            + self.delay.seconds * 1_000_000
            + self.delay.microseconds
        )
        body: dict[str, Any] = {
            "delay": {"secs": total_us // 1_000_000, "nanos": (total_us % 1_000_000) * 1000},
            "input": self.input.to_json() if isinstance(self.input, Message) else self.input,
        }
        if self.key is not None:
            body["key"] = self.key
        return body


_NO_REJECTION = object()


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``decide`` answers: Accept (one or more events, plus effects, timers and timer
    cancellations) or Reject (a rejection payload).

    The ``with_*`` and ``cancel_*`` builders return a new Decision and are silent no-ops
    on a rejection, so ``Decision.reject(r).with_effect(e)`` is still just a rejection.
    """

    events: tuple[Any, ...] = ()
    effects: tuple[Any, ...] = ()
    timers: tuple[Timer, ...] = ()
    cancel_timer_keys: tuple[str, ...] = ()
    rejection: Any = field(default=_NO_REJECTION)

    # -- constructors -------------------------------------------------------------
    @classmethod
    def accept(cls, event: Any, *more: Any) -> Decision:
        """Accept the input with one event (or several, in order)."""
        return cls(events=(event, *more))

    @classmethod
    def accept_events(cls, events: Iterable[Any]) -> Decision:
        """Accept with a non-empty sequence of events; an empty one is a programming error."""
        evs = tuple(events)
        if not evs:
            raise InvalidArgument("Decision.accept_events needs at least one event")
        return cls(events=evs)

    @classmethod
    def try_accept(cls, events: Iterable[Any]) -> Decision | None:
        """Accept with these events, or None when there are none."""
        evs = tuple(events)
        return cls(events=evs) if evs else None

    @classmethod
    def reject(cls, reason: Any) -> Decision:
        """Reject the input: nothing is written and the caller gets ``Rejected(reason)``."""
        return cls(rejection=reason)

    # -- predicates ---------------------------------------------------------------
    @property
    def is_accept(self) -> bool:
        return self.rejection is _NO_REJECTION

    @property
    def is_reject(self) -> bool:
        return self.rejection is not _NO_REJECTION

    # -- fluent builders (no-ops on Reject) ----------------------------------------
    def _extend(self, **changes: tuple[Any, ...]) -> Decision:
        if self.is_reject:
            return self
        return dataclasses.replace(
            self, **{name: getattr(self, name) + extra for name, extra in changes.items()}
        )

    def with_effect(self, effect: Any) -> Decision:
        return self._extend(effects=(effect,))

    def with_effects(self, effects: Iterable[Any]) -> Decision:
        return self._extend(effects=tuple(effects))

    def with_timer(self, timer: Timer) -> Decision:
        return self._extend(timers=(timer,))

    def with_timers(self, timers: Iterable[Timer]) -> Decision:
        return self._extend(timers=tuple(timers))

    def with_timer_after(
        self, delay: timedelta | float, input: Any, key: str | None = None
    ) -> Decision:
        return self._extend(timers=(Timer.after(delay, input, key),))

    def cancel_timer(self, key: str) -> Decision:
        return self._extend(cancel_timer_keys=(key,))

    def cancel_timers(self, keys: Iterable[str]) -> Decision:
        return self._extend(cancel_timer_keys=tuple(keys))

    def __repr__(self) -> str:
        if self.is_reject:
            return f"Decision.reject({self.rejection!r})"
        return (
            f"Decision.accept(events={list(self.events)!r}, effects={list(self.effects)!r}, "
            f"timers={list(self.timers)!r}, cancel_timer_keys={list(self.cancel_timer_keys)!r})"
        )


# -- outcomes -----------------------------------------------------------------------


class ExecuteOutcome(Generic[R]):
    """What executing one input did: `Accepted`, `Rejected` or `AlreadyCompleted`."""

    kind: ClassVar[str]

    def map(self, fn: Callable[[R], Any]) -> ExecuteOutcome[Any]:
        """Transform the rejection payload; other outcomes pass through unchanged."""
        return self

    @property
    def is_accepted(self) -> bool:
        return self.kind == "accepted"

    @property
    def is_rejected(self) -> bool:
        return self.kind == "rejected"

    @property
    def is_already_completed(self) -> bool:
        return self.kind == "already_completed"

    def to_json(self) -> dict[str, Any]:
        """A JSON dict, ``{"outcome": kind, ...}``: what the execute task returns to Celery."""
        return {"outcome": self.kind}

    def __json__(self) -> dict[str, Any]:
        """kombu's JSON hook: a task may return an outcome with Celery's json serializer."""
        return self.to_json()

    @staticmethod
    def from_json(data: Any) -> ExecuteOutcome[Any]:
        """The outcome `to_json` described (a rejection's reason stays JSON)."""
        kind = data.get("outcome") if isinstance(data, dict) else None
        if kind == "accepted":
            return Accepted(int(data["events_appended"]))
        if kind == "rejected":
            return Rejected(data.get("reason"))
        if kind == "already_completed":
            return AlreadyCompleted()
        raise InvalidArgument(f"not an execute outcome: {data!r}")


def _jsonable(value: Any) -> Any:
    """A rejection reason as JSON: Messages and pydantic models dumped, the rest as given."""
    if isinstance(value, Message):
        return value.to_json()
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value


@dataclass(frozen=True, slots=True)
class Accepted(ExecuteOutcome[Any]):
    """The input was accepted; `events_appended` events were written."""

    events_appended: int
    kind: ClassVar[str] = "accepted"

    def to_json(self) -> dict[str, Any]:
        return {"outcome": self.kind, "events_appended": self.events_appended}


@dataclass(frozen=True, slots=True)
class Rejected(ExecuteOutcome[R]):
    """The workflow rejected the input; nothing was written. `reason` is its payload."""

    reason: R
    kind: ClassVar[str] = "rejected"

    def map(self, fn: Callable[[R], Any]) -> ExecuteOutcome[Any]:
        return Rejected(fn(self.reason))

    def to_json(self) -> dict[str, Any]:
        return {"outcome": self.kind, "reason": _jsonable(self.reason)}


@dataclass(frozen=True, slots=True)
class AlreadyCompleted(ExecuteOutcome[Any]):
    """The instance is terminal; ``decide`` was not called and nothing was written."""

    kind: ClassVar[str] = "already_completed"


# -- effect handlers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EffectContext:
    """What an effect handler knows about the effect it runs."""

    effect_id: uuid.UUID
    workflow: WorkflowRef
    attempt: int
    created_at: datetime

    @property
    def idempotency_key(self) -> str:
        """``type:id:effect_id``: stable across retries, unique per effect."""
        return f"{self.workflow.workflow_type}:{self.workflow.workflow_id}:{self.effect_id}"

    @property
    def is_retry(self) -> bool:
        return self.attempt > 1


@dataclass(frozen=True, slots=True)
class DeadLetterNotice:
    """Given to ``Workflow.on_dead_letter`` when one of its effects or timers dead-letters."""

    kind: Kind
    row_id: uuid.UUID
    workflow: WorkflowRef
    payload: Any
    """The stored JSON (the effect, or the timer's input)."""
    decoded: Any
    """The payload decoded into its Message class, or None when it does not validate."""
    attempts: int
    last_error: str


@dataclass(frozen=True, slots=True)
class CancelNotice:
    """Given to ``Workflow.on_cancel`` when an operator cancels one of its effects or timers,
    a ``celery control revoke`` cancels one, or its whole instance is cancelled."""

    scope: Kind | Literal["instance"]
    workflow: WorkflowRef
    reason: str
    """The operator's reason, as kept in ``discard_reason`` (``revoked: …`` for a revoke)."""
    revoked: bool
    """True when the cancel came from ``celery control revoke``."""
    row_id: uuid.UUID | None = None
    """The cancelled row (scope effect or timer); None for an instance."""
    payload: Any = None
    """The row's stored JSON (the effect, or the timer's input); None for an instance."""
    decoded: Any = None
    """The payload decoded into its Message class, or None."""
    effects: tuple[uuid.UUID, ...] = ()
    """Every effect this cancel closed."""
    timers: tuple[uuid.UUID, ...] = ()
    """Every timer this cancel closed."""


# -- the workflow contract ------------------------------------------------------------


class Workflow:
    """Base class of a workflow: a namespace of pure functions and the types they use.

    Subclasses set ``type`` (a stable string: it routes every row), ``State`` (a class
    whose no-argument constructor is the initial state, e.g. a pydantic model),
    ``Input``, ``Event`` and optionally ``Effect`` (Message classes or unions of them), and
    define ``evolve`` and ``decide``. ``Rejection`` (default ``str``) types what
    ``Decision.reject`` carries. Methods may be plain functions, staticmethods or
    classmethods.
    """

    type: ClassVar[str]
    State: ClassVar[Any]
    Input: ClassVar[Any]
    Event: ClassVar[Any]
    Effect: ClassVar[Any] = None
    Rejection: ClassVar[Any] = str
    id_field: ClassVar[str] = "id"
    """The input field that holds the workflow id (override ``workflow_id`` for more)."""
    retry_policy: ClassVar[RetryPolicy | None] = None
    """This type's attempts and backoff for effects and timers (None: the runtime's)."""
    effect_retry_policies: ClassVar[Mapping[str, RetryPolicy]] = {}
    """Per effect type (its tag): attempts and backoff overriding ``retry_policy``."""
    concurrency_limit: ClassVar[int | None] = None
    """At most this many of this type's effects leased (published or running) at once,
    across all workers and relays; enforced by the claim in PostgreSQL. None: no limit."""
    effect_batch_size: ClassVar[int | None] = None
    """At most this many of this type's effects claimed together travel in one message (to
    its ``ironflow.<type>.effect`` task), which starts them with one statement, runs their
    handlers in turn and acknowledges them together. None (the default): the runtime's
    ``ironflow_effect_batch_size`` (200); 1: one message per effect (for long handlers)."""

    inputs: ClassVar[TaggedUnion]
    events: ClassVar[TaggedUnion]
    effects: ClassVar[TaggedUnion]
    state_codec: ClassVar[ValueCodec]
    rejection_codec: ClassVar[ValueCodec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type" not in cls.__dict__:
            return  # an abstract intermediate base
        wf_type = cls.__dict__["type"]
        if not isinstance(wf_type, str) or not wf_type.strip():
            raise InvalidWorkflowDefinition(f"{cls.__qualname__}.type must be a non-empty string")
        problem = text_problem(wf_type)
        if problem is not None:  # it names every row of the type, in text columns
            raise InvalidWorkflowDefinition(f"{cls.__qualname__}.type {wf_type!r} {problem}")
        for member in ("State", "Input", "Event"):
            if getattr(cls, member, None) is None:
                raise InvalidWorkflowDefinition(f"workflow '{wf_type}' must declare {member}")
        for fn in ("evolve", "decide"):
            if getattr(cls, fn) is getattr(Workflow, fn):
                raise InvalidWorkflowDefinition(f"workflow '{wf_type}' must define {fn}()")
        cls.inputs = TaggedUnion(wf_type, "input", union_members(cls.Input))
        cls.events = TaggedUnion(wf_type, "event", union_members(cls.Event))
        cls.effects = TaggedUnion(wf_type, "effect", union_members(cls.Effect))
        if not cls.inputs or not cls.events:
            raise InvalidWorkflowDefinition(f"workflow '{wf_type}' needs input and event types")
        _check_policies(cls, wf_type)
        cls.state_codec = ValueCodec(wf_type, "state", cls.State)
        cls.rejection_codec = ValueCodec(wf_type, "rejection", cls.Rejection)

    # -- the functions a workflow defines ---------------------------------------------
    @classmethod
    def initial_state(cls) -> Any:
        """The state before any event (``State()`` unless overridden)."""
        return cls.State()

    @staticmethod
    def evolve(state: Any, event: Any) -> Any:
        """Fold one event into the state; pure and deterministic."""
        raise NotImplementedError

    @staticmethod
    def decide(now: datetime, state: Any, input: Any) -> Decision:
        """Answer an input; pure (``now`` is the engine's UTC clock)."""
        raise NotImplementedError

    @staticmethod
    def is_terminal(state: Any) -> bool:
        """True once the instance is finished; it then accepts no more inputs."""
        return False

    @staticmethod
    def unique_key(input: Any) -> str | None:
        """At most one active instance per key and type (needs ``is_terminal`` to release)."""
        return None

    @classmethod
    def workflow_id(cls, input: Any) -> str:
        """The instance an input belongs to: by default its ``id_field`` attribute."""
        try:
            value = getattr(input, cls.id_field)
        except AttributeError:
            raise InvalidWorkflowDefinition(
                f"input {type(input).__qualname__} of workflow '{cls.type}' has no "
                f"'{cls.id_field}' field; set id_field or override workflow_id()"
            ) from None
        return str(value)

    @staticmethod
    def on_dead_letter(notice: DeadLetterNotice) -> Any | None:
        """The input this workflow receives when one of its effects or timers is
        dead-lettered (executed in the same transaction), or None."""
        return None

    @staticmethod
    def on_cancel(notice: CancelNotice) -> Any | None:
        """The input this workflow receives when its effects, timers or whole instance are
        cancelled (executed in the cancel's transaction), or None."""
        return None

    @classmethod
    def state_machine(cls) -> Any | None:
        """An optional `StateMachineDefinition` describing states and transitions."""
        return None

    # -- helpers used by the engine -----------------------------------------------------
    @classmethod
    def replay(cls, events: Iterable[Any]) -> Any:
        """Fold decoded events into a fresh state."""
        state = cls.initial_state()
        for event in events:
            state = cls.evolve(state, event)
        return state

    @classmethod
    def has_effects(cls) -> bool:
        return bool(cls.effects)

    @classmethod
    def ref(cls, workflow_id: str) -> WorkflowRef:
        return WorkflowRef(cls.type, workflow_id)


def _check_policies(cls: type[Workflow], wf_type: str) -> None:
    """Refuse a retry policy or concurrency limit that cannot work, naming the workflow."""
    if cls.retry_policy is not None and not isinstance(cls.retry_policy, RetryPolicy):
        raise InvalidWorkflowDefinition(f"workflow '{wf_type}': retry_policy must be a RetryPolicy")
    for tag, policy in dict(cls.effect_retry_policies).items():
        if tag not in cls.effects.tags():
            raise InvalidWorkflowDefinition(
                f"workflow '{wf_type}': effect_retry_policies names {tag!r}, which is not one "
                f"of its effect types {cls.effects.tags()}"
            )
        if not isinstance(policy, RetryPolicy):
            raise InvalidWorkflowDefinition(
                f"workflow '{wf_type}': effect_retry_policies[{tag!r}] must be a RetryPolicy"
            )
    size = cls.effect_batch_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InvalidWorkflowDefinition(
            f"workflow '{wf_type}': effect_batch_size must be a positive int or None, got {size!r}"
        )
    limit = cls.concurrency_limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidWorkflowDefinition(
            f"workflow '{wf_type}': concurrency_limit must be a positive int or None, got {limit!r}"
        )


EffectHandler = Callable[[Any, EffectContext], Any]
"""``handler(effect, ctx) -> input | None``: run an effect; raise to fail (retryable), or
raise `PermanentEffectError` to dead-letter at once."""
