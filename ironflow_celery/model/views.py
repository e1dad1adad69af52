"""State-machine views of workflows, and their Mermaid and Graphviz DOT export.

Visualisation is opt-in and pure data, as in ironflow: a workflow describes itself by
returning a `StateMachineDefinition` from ``state_machine()`` (usually written with
`StateMachineDefinition.builder`), and may describe a live instance's state through the
`StateMachineView` mixin. Nothing here touches the database.

    definition = (
        StateMachineDefinition.builder(initial="Pending")
        .state("Paid")
        .terminal("Shipped")
        .transition("Pending", "Paid", "PaymentSucceeded", effects=["Ship"])
        .transition("Paid", "Shipped", "Shipped")
        .build()
    )
    print(definition.to_mermaid())
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ironflow_celery.errors import (
    InvalidArgument,
    InvalidArgumentType,
    InvalidWorkflowDefinition,
    UnknownName,
)

__all__ = [
    "FORMATS",
    "Format",
    "StateDefinition",
    "StateInfo",
    "StateMachineBuilder",
    "StateMachineDefinition",
    "StateMachineView",
    "TransitionDefinition",
    "TransitionInfo",
    "describe",
    "render",
]

FieldValue = str | int | float | bool
Format = Literal["mermaid", "dot"]
FORMATS: tuple[Format, ...] = ("mermaid", "dot")


# -- live instances -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateInfo:
    """What one instance's state looks like: its status, display fields, and terminality."""

    status: str
    fields: dict[str, FieldValue] = field(default_factory=dict)
    is_terminal: bool = False


@dataclass(frozen=True, slots=True)
class TransitionInfo:
    """A transition available from an instance's current state."""

    input: str
    target_status: str
    effects: tuple[str, ...] = ()
    timers: tuple[str, ...] = ()
    description: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "effects", _names(self.effects, "effects"))
        object.__setattr__(self, "timers", _names(self.timers, "timers"))


class StateMachineView:
    """Mixin for a `Workflow` whose instances can describe their state and next moves."""

    @staticmethod
    def state_info(state: Any) -> StateInfo:
        """The status, display fields and terminality of `state`."""
        raise NotImplementedError("a StateMachineView must define state_info(state)")

    @staticmethod
    def transitions(state: Any) -> list[TransitionInfo]:
        """The transitions available from `state` (none unless overridden)."""
        return []


# -- static definitions -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateDefinition:
    """One state of a state machine; a terminal state accepts no more inputs."""

    name: str
    is_terminal: bool = False
    description: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "state name")


@dataclass(frozen=True, slots=True)
class TransitionDefinition:
    """An input that moves the machine from one state to another, with what it schedules."""

    from_state: str
    to_state: str
    input: str
    effects: tuple[str, ...] = ()
    timers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.from_state, "transition source state")
        _check_name(self.to_state, "transition target state")
        _check_name(self.input, "transition input")
        object.__setattr__(self, "effects", _names(self.effects, "effects"))
        object.__setattr__(self, "timers", _names(self.timers, "timers"))


@dataclass(frozen=True, slots=True)
class StateMachineDefinition:
    """A workflow's states, transitions and initial state; validated when built."""

    states: tuple[StateDefinition, ...]
    transitions: tuple[TransitionDefinition, ...]
    initial_state: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", tuple(self.states))
        object.__setattr__(self, "transitions", tuple(self.transitions))
        seen: set[str] = set()
        for state in self.states:
            if not isinstance(state, StateDefinition):
                raise InvalidArgumentType(f"states must be StateDefinition objects, got {state!r}")
            if state.name in seen:
                raise InvalidArgument(f"state {state.name!r} is declared twice")
            seen.add(state.name)
        known = ", ".join(repr(s.name) for s in self.states) or "none"
        if self.initial_state not in seen:
            raise InvalidArgument(
                f"initial state {self.initial_state!r} is not a declared state (declared: {known})"
            )
        for t in self.transitions:
            if not isinstance(t, TransitionDefinition):
                raise InvalidArgumentType(
                    f"transitions must be TransitionDefinition objects, got {t!r}"
                )
            for role, name in (("source", t.from_state), ("target", t.to_state)):
                if name not in seen:
                    raise InvalidArgument(
                        f"transition {t.from_state!r} --{t.input}--> {t.to_state!r} names an "
                        f"unknown {role} state {name!r} (declared: {known})"
                    )

    @staticmethod
    def builder(initial: str) -> StateMachineBuilder:
        """Start a definition by hand; the initial state is declared for you."""
        return StateMachineBuilder(initial)

    # -- queries ----------------------------------------------------------------
    def state(self, name: str) -> StateDefinition:
        """The state called `name` (`UnknownName`, a KeyError, when there is none)."""
        for state in self.states:
            if state.name == name:
                return state
        raise UnknownName(name)

    @property
    def terminal_states(self) -> tuple[str, ...]:
        """The names of the terminal states, in declaration order."""
        return tuple(s.name for s in self.states if s.is_terminal)

    def transitions_from(self, name: str) -> tuple[TransitionDefinition, ...]:
        """The transitions leaving state `name`, in declaration order."""
        return tuple(t for t in self.transitions if t.from_state == name)

    def _isolated(self) -> list[StateDefinition]:
        """States that no arrow touches (they would otherwise vanish from a diagram)."""
        used = {self.initial_state}
        for t in self.transitions:
            used.update((t.from_state, t.to_state))
        return [s for s in self.states if s.name not in used and not s.is_terminal]

    # -- exporters --------------------------------------------------------------
    def to_mermaid(self) -> str:
        """A Mermaid ``stateDiagram-v2``: initial arrow, one arrow per transition, ends."""
        ids = _mermaid_ids([s.name for s in self.states])
        lines = ["stateDiagram-v2"]
        for state in self.states:
            if ids[state.name] != state.name:
                lines.append(f'    state "{_mermaid_name(state.name)}" as {ids[state.name]}')
        lines.append(f"    [*] --> {ids[self.initial_state]}")
        lines.extend(f"    {ids[s.name]}" for s in self._isolated())
        for t in self.transitions:
            label = _mermaid_text(t.input)
            if t.effects:
                label += f" [{', '.join(_mermaid_text(e) for e in t.effects)}]"
            if t.timers:
                label += f" ⏱{', '.join(_mermaid_text(k) for k in t.timers)}"
            lines.append(f"    {ids[t.from_state]} --> {ids[t.to_state]} : {label}")
        lines.extend(f"    {ids[name]} --> [*]" for name in self.terminal_states)
        return _mermaid_lines(lines)

    def to_dot(self) -> str:
        """A Graphviz ``digraph``: left to right, boxes, double circles for terminal states."""
        names = {s.name for s in self.states}
        start = "__start__"
        while start in names:  # the point node must not capture a state's name
            start = f"_{start}_"
        lines = [
            "digraph workflow {",
            "    rankdir=LR;",
            "    node [shape=box];",
            f'    "{start}" [shape=point];',
            f'    "{start}" -> {_dot_id(self.initial_state)};',
        ]
        lines.extend(f"    {_dot_id(s.name)};" for s in self._isolated())
        lines.extend(f"    {_dot_id(name)} [shape=doublecircle];" for name in self.terminal_states)
        for t in self.transitions:
            parts = [t.input]
            if t.effects:
                parts.append(f"[{', '.join(t.effects)}]")
            parts.extend(f"timer:{name}" for name in t.timers)
            label = "\\n".join(_dot_escape(part) for part in parts)
            lines.append(f'    {_dot_id(t.from_state)} -> {_dot_id(t.to_state)} [label="{label}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def render(self, fmt: Format) -> str:
        """This definition as ``"mermaid"`` or ``"dot"`` text."""
        return render(self, fmt)


class StateMachineBuilder:
    """Collects states and transitions in order; ``build()`` validates them."""

    def __init__(self, initial: str) -> None:
        _check_name(initial, "initial state")
        self._initial = initial
        self._states: dict[str, StateDefinition] = {initial: StateDefinition(initial)}
        self._transitions: list[TransitionDefinition] = []

    def state(self, name: str, description: str | None = None) -> StateMachineBuilder:
        """Declare a non-terminal state (declaring one again updates it)."""
        return self._declare(StateDefinition(name, False, description))

    def terminal(self, name: str, description: str | None = None) -> StateMachineBuilder:
        """Declare a terminal state (declaring one again updates it)."""
        return self._declare(StateDefinition(name, True, description))

    def states(self, *names: str) -> StateMachineBuilder:
        """Declare several non-terminal states at once."""
        for name in names:
            self.state(name)
        return self

    def transition(
        self,
        from_state: str,
        to_state: str,
        input: str,
        *,
        effects: Iterable[str] = (),
        timers: Iterable[str] = (),
    ) -> StateMachineBuilder:
        """Add a transition; its states may be declared before or after it."""
        self._transitions.append(
            TransitionDefinition(
                from_state, to_state, input, _names(effects, "effects"), _names(timers, "timers")
            )
        )
        return self

    def build(self) -> StateMachineDefinition:
        """The validated, immutable definition (an `InvalidArgument`, a ValueError, names
        what is wrong)."""
        return StateMachineDefinition(
            tuple(self._states.values()), tuple(self._transitions), self._initial
        )

    def _declare(self, state: StateDefinition) -> StateMachineBuilder:
        old = self._states.get(state.name)
        if old is not None and state.description is None:
            state = replace(state, description=old.description)
        self._states[state.name] = state
        return self


# -- workflows ------------------------------------------------------------------------


def describe(workflow_cls: Any) -> StateMachineDefinition:
    """The `StateMachineDefinition` a workflow class returns from ``state_machine()``."""
    name = getattr(workflow_cls, "type", None) or getattr(workflow_cls, "__qualname__", "?")
    state_machine = getattr(workflow_cls, "state_machine", None)
    if state_machine is None:
        raise InvalidWorkflowDefinition(f"{workflow_cls!r} is not a Workflow class")
    definition = state_machine()
    if definition is None:
        raise InvalidWorkflowDefinition(
            f"workflow '{name}' does not describe a state machine: "
            "override state_machine() to return a StateMachineDefinition"
        )
    if isinstance(definition, StateMachineBuilder):
        raise InvalidWorkflowDefinition(
            f"workflow '{name}': state_machine() returned a builder; call .build() on it"
        )
    if not isinstance(definition, StateMachineDefinition):
        raise InvalidWorkflowDefinition(
            f"workflow '{name}': state_machine() must return a StateMachineDefinition, "
            f"got {type(definition).__name__}"
        )
    return definition


def render(definition: StateMachineDefinition, fmt: Format) -> str:
    """`definition` as Mermaid (``"mermaid"``) or Graphviz DOT (``"dot"``) text."""
    if fmt == "mermaid":
        return definition.to_mermaid()
    if fmt == "dot":
        return definition.to_dot()
    raise InvalidArgument(f"unknown diagram format {fmt!r}; expected one of {list(FORMATS)}")


# -- helpers --------------------------------------------------------------------------


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidArgument(f"{what} must be a non-empty string")


def _names(values: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):  # ("Ship") is a string, not a list of one name
        raise InvalidArgumentType(f"{what} must be a list of names, not the string {values!r}")
    names = tuple(values)
    for name in names:
        _check_name(name, f"a name in {what}")
    return names


# Mermaid's stateDiagram lexer reads a bare id as [^:\n\s\-{]+, some keywords before
# it, and a transition label as ":" then [^:\n;]+. Everything else is written with
# Mermaid's "#code;" entities, which it decodes after parsing.
_PLAIN_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEYWORDS = frozenset(
    {
        "state",
        "note",
        "class",
        "classdef",
        "scale",
        "statediagram",
        "acctitle",
        "accdescr",
        "direction",
        "default",
    }
)
# ".*direction\s+TB" anywhere in a line is read as a layout directive.
_DIRECTION = re.compile(r"(?i)(d)(?=irection\s)")
_DIRECTION_AT_END = re.compile(r"(?i)(d)(?=irection\Z)")
_NEXT_IS_DIRECTION = re.compile(r"(?i)\s*(tb|bt|rl|lr)")
# A raw "#" is safe: ";" is always escaped, so no "#word;" entity can form by accident.
_TEXT_ENTITIES = {":": "#58;", ";": "#59;", "<": "#lt;", ">": "#gt;", "\n": " ", "\r": " "}
_NAME_ENTITIES = {**_TEXT_ENTITIES, '"': "#quot;", "[": "#91;", "]": "#93;"}


def _is_plain_id(name: str) -> bool:
    lowered = name.lower()
    return (
        _PLAIN_ID.match(name) is not None
        and lowered not in _KEYWORDS
        and not lowered.endswith("direction")  # "...direction\n    TB..." is a directive
    )


def _mermaid_ids(names: list[str]) -> dict[str, str]:
    ids = {name: name for name in names if _is_plain_id(name)}
    taken = set(ids.values())
    for name in names:
        if name in ids:
            continue
        base = re.sub(r"[^A-Za-z0-9_]", "_", name, flags=re.ASCII)
        if not _is_plain_id(base):
            base = f"s_{base}"
            if base.lower().endswith("direction"):
                base += "_"
        alias, n = base, 2
        while alias in taken:
            alias, n = f"{base}_{n}", n + 1
        ids[name] = alias
        taken.add(alias)
    return ids


def _entity(match: re.Match[str]) -> str:
    return f"#{ord(match.group(1))};"


def _escape(text: str, table: dict[str, str]) -> str:
    return _DIRECTION.sub(_entity, "".join(table.get(c, c) for c in text))


def _mermaid_lines(lines: list[str]) -> str:
    # A line ending in "direction" followed by one starting with TB/BT/RL/LR would be
    # lexed as a directive across the line break.
    for i in range(len(lines) - 1):
        if _NEXT_IS_DIRECTION.match(lines[i + 1]):
            lines[i] = _DIRECTION_AT_END.sub(_entity, lines[i])
    return "\n".join(lines) + "\n"


def _mermaid_text(text: str) -> str:
    return _escape(text, _TEXT_ENTITIES)


def _mermaid_name(text: str) -> str:
    return _escape(text, _NAME_ENTITIES)


def _dot_escape(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\r\n", "\\n")
        .replace("\n", "\\n")
        .replace("\r", "\\n")
    )


def _dot_id(name: str) -> str:
    return f'"{_dot_escape(name)}"'
