"""Unit tests of ironflow_celery.views: definitions, validation, Mermaid and DOT export."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import pytest
from pydantic import BaseModel

from ironflow_celery.errors import InvalidWorkflowDefinition, IronflowError
from ironflow_celery.model.messages import Message
from ironflow_celery.model.views import (
    StateDefinition,
    StateInfo,
    StateMachineBuilder,
    StateMachineDefinition,
    StateMachineView,
    TransitionDefinition,
    TransitionInfo,
    describe,
    render,
)
from ironflow_celery.model.workflow import Decision, Workflow
from tests import golden

assert_golden = golden.assert_golden


def small() -> StateMachineDefinition:
    """The order-like machine the golden files show."""
    return (
        StateMachineDefinition.builder(initial="Pending")
        .state("Paid")
        .terminal("Shipped")
        .terminal("Cancelled")
        .transition(
            "Pending",
            "Paid",
            "PaymentSucceeded",
            effects=["ReserveStock", "SendReceipt"],
            timers=["ShipBy"],
        )
        .transition("Pending", "Cancelled", "PaymentTimedOut")
        .transition("Paid", "Shipped", "Shipped", effects=["NotifyCustomer"])
        .transition("Paid", "Cancelled", "ShipByExpired", timers=["Refund", "Escalate"])
        .build()
    )


SMALL_MERMAID = """\
stateDiagram-v2
    [*] --> Pending
    Pending --> Paid : PaymentSucceeded [ReserveStock, SendReceipt] ⏱ShipBy
    Pending --> Cancelled : PaymentTimedOut
    Paid --> Shipped : Shipped [NotifyCustomer]
    Paid --> Cancelled : ShipByExpired ⏱Refund, Escalate
    Shipped --> [*]
    Cancelled --> [*]
"""

SMALL_DOT = """\
digraph workflow {
    rankdir=LR;
    node [shape=box];
    "__start__" [shape=point];
    "__start__" -> "Pending";
    "Shipped" [shape=doublecircle];
    "Cancelled" [shape=doublecircle];
    "Pending" -> "Paid" [label="PaymentSucceeded\\n[ReserveStock, SendReceipt]\\ntimer:ShipBy"];
    "Pending" -> "Cancelled" [label="PaymentTimedOut"];
    "Paid" -> "Shipped" [label="Shipped\\n[NotifyCustomer]"];
    "Paid" -> "Cancelled" [label="ShipByExpired\\ntimer:Refund\\ntimer:Escalate"];
}
"""


# -- builders -------------------------------------------------------------------------


def test_builder_declares_states_in_order_with_the_initial_first() -> None:
    d = small()
    assert [s.name for s in d.states] == ["Pending", "Paid", "Shipped", "Cancelled"]
    assert d.initial_state == "Pending"
    assert d.terminal_states == ("Shipped", "Cancelled")
    assert d.state("Paid") == StateDefinition("Paid")
    assert d.state("Shipped").is_terminal
    assert [t.input for t in d.transitions_from("Paid")] == ["Shipped", "ShipByExpired"]
    assert d.transitions[0] == TransitionDefinition(
        "Pending", "Paid", "PaymentSucceeded", ("ReserveStock", "SendReceipt"), ("ShipBy",)
    )
    with pytest.raises(KeyError):
        d.state("Nope")


def test_builder_redeclaring_a_state_updates_it() -> None:
    d = (
        StateMachineDefinition.builder("Draft")
        .state("Draft", description="being written")
        .terminal("Draft")  # a one-state machine: the initial state is terminal
        .build()
    )
    assert d.states == (StateDefinition("Draft", is_terminal=True, description="being written"),)
    assert d.to_mermaid() == "stateDiagram-v2\n    [*] --> Draft\n    Draft --> [*]\n"


def test_builder_accepts_transitions_before_their_states_and_several_states_at_once() -> None:
    d = (
        StateMachineDefinition.builder("A")
        .transition("A", "B", "Go")
        .transition("B", "C", "Go")
        .states("B", "C")
        .build()
    )
    assert [s.name for s in d.states] == ["A", "B", "C"]


def test_builder_returns_itself_and_build_gives_a_fresh_immutable_definition() -> None:
    b = StateMachineDefinition.builder("A")
    assert isinstance(b, StateMachineBuilder)
    assert b.state("B") is b
    first = b.build()
    b.transition("A", "B", "Go")
    assert first.transitions == ()
    assert len(b.build().transitions) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.initial_state = "B"  # type: ignore[misc]


def test_definitions_can_be_written_directly_and_lists_become_tuples() -> None:
    d = StateMachineDefinition(
        states=[StateDefinition("A"), StateDefinition("B", is_terminal=True)],
        transitions=[TransitionDefinition("A", "B", "Go", effects=["E"], timers=["T"])],
        initial_state="A",
    )
    assert isinstance(d.states, tuple)
    assert isinstance(d.transitions, tuple)
    assert d.transitions[0].effects == ("E",)
    assert d.transitions[0].timers == ("T",)
    assert (
        d
        == StateMachineDefinition.builder("A")
        .terminal("B")
        .transition("A", "B", "Go", effects=("E",), timers=("T",))
        .build()
    )


def test_state_and_transition_info() -> None:
    info = StateInfo("Paid", {"amount": 12.5, "items": 3, "gift": False, "by": "card"})
    assert info.is_terminal is False
    assert info.fields["items"] == 3
    assert StateInfo("Shipped", is_terminal=True).fields == {}
    t = TransitionInfo("Ship", "Shipped", effects=["Notify"], timers=["Late"])
    assert t.effects == ("Notify",)
    assert t.timers == ("Late",)
    assert t.description is None


# -- validation ---------------------------------------------------------------------------


def test_unknown_initial_state_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"initial state 'Nope' is not a declared state"):
        StateMachineDefinition((StateDefinition("A"),), (), "Nope")


def test_transition_from_an_unknown_state_is_rejected() -> None:
    b = StateMachineDefinition.builder("A").transition("Ghost", "A", "Boo")
    with pytest.raises(ValueError, match=r"unknown source state 'Ghost' \(declared: 'A'\)"):
        b.build()


def test_transition_to_an_unknown_state_is_rejected() -> None:
    b = StateMachineDefinition.builder("A").state("B").transition("A", "Bee", "Go")
    with pytest.raises(ValueError, match=r"'A' --Go--> 'Bee' names an unknown target state 'Bee'"):
        b.build()


def test_duplicate_states_are_rejected() -> None:
    with pytest.raises(ValueError, match="state 'A' is declared twice"):
        StateMachineDefinition((StateDefinition("A"), StateDefinition("A", True)), (), "A")


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="state name must be a non-empty string"):
        StateDefinition(name)
    with pytest.raises(ValueError, match="initial state must be a non-empty string"):
        StateMachineDefinition.builder(name)
    with pytest.raises(ValueError, match="transition input must be a non-empty string"):
        StateMachineDefinition.builder("A").transition("A", "A", name)
    with pytest.raises(ValueError, match="a name in effects must be a non-empty string"):
        TransitionDefinition("A", "A", "Go", effects=(name,))


def test_a_single_string_of_effects_or_timers_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="effects must be a list of names, not the string 'Ship'"):
        StateMachineDefinition.builder("A").transition("A", "A", "Go", effects="Ship")
    with pytest.raises(TypeError, match="timers must be a list of names"):
        TransitionInfo("Go", "A", timers="Late")  # type: ignore[arg-type]


def test_wrong_member_types_are_rejected() -> None:
    with pytest.raises(TypeError, match="states must be StateDefinition objects"):
        StateMachineDefinition(("A",), (), "A")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state name must be a string, got int"):
        StateDefinition(1)  # type: ignore[arg-type]


# -- Mermaid and DOT --------------------------------------------------------------------


def test_mermaid_of_the_small_definition() -> None:
    assert small().to_mermaid() == SMALL_MERMAID


def test_dot_of_the_small_definition() -> None:
    assert small().to_dot() == SMALL_DOT


def test_golden_files_of_the_small_definition() -> None:
    assert_golden("small.mmd", small().to_mermaid())
    assert_golden("small.dot", small().to_dot())


def test_render_dispatches_on_the_format() -> None:
    d = small()
    assert render(d, "mermaid") == SMALL_MERMAID
    assert render(d, "dot") == SMALL_DOT
    assert d.render("dot") == SMALL_DOT
    with pytest.raises(ValueError, match=r"unknown diagram format 'svg'; expected one of"):
        render(d, "svg")  # type: ignore[arg-type]


def test_labels_with_effects_only_timers_only_both_and_neither() -> None:
    d = (
        StateMachineDefinition.builder("A")
        .transition("A", "A", "Plain")
        .transition("A", "A", "Fx", effects=["E1", "E2"])
        .transition("A", "A", "Tm", timers=["T1", "T2"])
        .transition("A", "A", "Both", effects=["E"], timers=["T"])
        .build()
    )
    assert d.to_mermaid().splitlines()[2:] == [
        "    A --> A : Plain",
        "    A --> A : Fx [E1, E2]",
        "    A --> A : Tm ⏱T1, T2",
        "    A --> A : Both [E] ⏱T",
    ]
    assert d.to_dot().splitlines()[5:9] == [
        '    "A" -> "A" [label="Plain"];',
        '    "A" -> "A" [label="Fx\\n[E1, E2]"];',
        '    "A" -> "A" [label="Tm\\ntimer:T1\\ntimer:T2"];',
        '    "A" -> "A" [label="Both\\n[E]\\ntimer:T"];',
    ]


def test_terminal_states_end_in_mermaid_and_are_double_circles_in_dot() -> None:
    d = (
        StateMachineDefinition.builder("Open")
        .terminal("Closed")
        .transition("Open", "Closed", "Close")
        .build()
    )
    assert d.to_mermaid().endswith("    Open --> Closed : Close\n    Closed --> [*]\n")
    assert '    "Closed" [shape=doublecircle];\n' in d.to_dot()
    assert '"Open" [shape' not in d.to_dot()


def test_states_no_arrow_touches_are_still_drawn() -> None:
    d = (
        StateMachineDefinition.builder("A")
        .state("Orphan")
        .terminal("B")
        .transition("A", "B", "Go")
        .build()
    )
    assert "\n    Orphan\n" in d.to_mermaid()
    assert '\n    "Orphan";\n' in d.to_dot()


def test_mermaid_aliases_state_names_that_are_not_plain_identifiers() -> None:
    d = (
        StateMachineDefinition.builder("Awaiting payment")
        .state('Say "hi"')
        .state("state")  # a Mermaid keyword
        .state("Awaiting_payment")  # a plain name that the first alias would have taken
        .terminal("[*]")
        .transition("Awaiting payment", 'Say "hi"', "Go")
        .transition('Say "hi"', "state", "Go")
        .transition("state", "Awaiting_payment", "Go")
        .transition("Awaiting_payment", "[*]", "Go")
        .build()
    )
    assert d.to_mermaid() == (
        "stateDiagram-v2\n"
        '    state "Awaiting payment" as Awaiting_payment_2\n'
        '    state "Say #quot;hi#quot;" as Say__hi_\n'
        '    state "state" as s_state\n'
        '    state "#91;*#93;" as ___\n'
        "    [*] --> Awaiting_payment_2\n"
        "    Awaiting_payment_2 --> Say__hi_ : Go\n"
        "    Say__hi_ --> s_state : Go\n"
        "    s_state --> Awaiting_payment : Go\n"
        "    Awaiting_payment --> ___ : Go\n"
        "    ___ --> [*]\n"
    )


@pytest.mark.parametrize(
    ("name", "alias"),
    [
        ("default", "s_default"),
        ("Note", "s_Note"),
        ("classDef", "s_classDef"),
        ("SetDirection", "s_SetDirection_"),  # "…direction\n    TB…" would be a directive
        ("1st", "s_1st"),
        ("Zahlung ausstehend", "Zahlung_ausstehend"),
        ("Bezahlt✓", "Bezahlt_"),
    ],
)
def test_mermaid_aliases_keywords_and_awkward_names(name: str, alias: str) -> None:
    text = StateMachineDefinition.builder(name).build().to_mermaid()
    assert f" as {alias}\n" in text
    assert f"    [*] --> {alias}\n" in text


@pytest.mark.parametrize(
    "name", ["Pending", "DefaultPolicy", "End", "_private", "Directions", "TBD"]
)
def test_mermaid_keeps_plain_identifiers_as_they_are(name: str) -> None:
    text = StateMachineDefinition.builder(name).build().to_mermaid()
    assert text == f"stateDiagram-v2\n    [*] --> {name}\n"


def test_mermaid_escapes_label_text() -> None:
    d = (
        StateMachineDefinition.builder("A")
        .transition("A", "A", "pay: now; <fast>", effects=["E:1"], timers=["T;2"])
        .transition("A", "A", "two\nlines, go direction LR")
        .build()
    )
    assert d.to_mermaid().splitlines()[2:] == [
        "    A --> A : pay#58; now#59; #lt;fast#gt; [E#58;1] ⏱T#59;2",
        "    A --> A : two lines, go #100;irection LR",
    ]


def test_mermaid_breaks_a_direction_directive_across_lines() -> None:
    d = (
        StateMachineDefinition.builder("A")
        .state("TBD")
        .transition("A", "TBD", "ChangeDirection")
        .transition("TBD", "A", "ChangeDirection")
        .build()
    )
    assert d.to_mermaid().splitlines()[2:] == [
        "    A --> TBD : Change#68;irection",  # the next line starts with "TB"
        "    TBD --> A : ChangeDirection",  # nothing follows it
    ]


def test_dot_escapes_quotes_backslashes_and_newlines() -> None:
    d = (
        StateMachineDefinition.builder('Say "hi"')
        .terminal("C:\\done")
        .transition('Say "hi"', "C:\\done", 'quote " back \\ \nnew', effects=['E"1'])
        .build()
    )
    assert d.to_dot().splitlines()[3:] == [
        '    "__start__" [shape=point];',
        '    "__start__" -> "Say \\"hi\\"";',
        '    "C:\\\\done" [shape=doublecircle];',
        '    "Say \\"hi\\"" -> "C:\\\\done" [label="quote \\" back \\\\ \\nnew\\n[E\\"1]"];',
        "}",
    ]


def test_dot_start_node_never_takes_a_state_name() -> None:
    d = (
        StateMachineDefinition.builder("__start__")
        .terminal("___start___")
        .transition("__start__", "___start___", "Go")
        .build()
    )
    assert '    "____start____" [shape=point];\n' in d.to_dot()
    assert '    "____start____" -> "__start__";\n' in d.to_dot()


# -- workflows ------------------------------------------------------------------------------


class Open(Message):
    id: str


class Opened(Message):
    pass


class Close(Message):
    id: str


class Closed(Message):
    pass


class DoorState(BaseModel):
    status: str = "New"
    opened: int = 0


class Door(Workflow):
    type = "door"
    State = DoorState
    Input = Open | Close
    Event = Opened | Closed

    @staticmethod
    def evolve(state: DoorState, event: Message) -> DoorState:
        if isinstance(event, Opened):
            return DoorState(status="Open", opened=state.opened + 1)
        return DoorState(status="Closed", opened=state.opened)

    @staticmethod
    def decide(now: datetime, state: DoorState, input: Message) -> Decision:
        if state.status == "Closed":
            return Decision.reject("closed for good")
        return Decision.accept(Opened() if isinstance(input, Open) else Closed())

    @staticmethod
    def is_terminal(state: DoorState) -> bool:
        return state.status == "Closed"


class DescribedDoor(StateMachineView, Door):
    type = "described-door"

    @classmethod
    def state_machine(cls) -> StateMachineDefinition:
        return (
            StateMachineDefinition.builder("New")
            .state("Open")
            .terminal("Closed")
            .transition("New", "Open", "Open")
            .transition("Open", "Open", "Open")
            .transition("Open", "Closed", "Close", timers=["AutoLock"])
            .build()
        )

    @staticmethod
    def state_info(state: DoorState) -> StateInfo:
        return StateInfo(state.status, {"opened": state.opened}, state.status == "Closed")


def test_describe_a_workflow_without_a_state_machine_fails_clearly() -> None:
    with pytest.raises(InvalidWorkflowDefinition) as info:
        describe(Door)
    assert isinstance(info.value, IronflowError)
    assert str(info.value) == (
        "workflow 'door' does not describe a state machine: "
        "override state_machine() to return a StateMachineDefinition"
    )


def test_describe_returns_the_definition() -> None:
    d = describe(DescribedDoor)
    assert d.initial_state == "New"
    assert d.terminal_states == ("Closed",)
    assert render(d, "mermaid").splitlines()[-2] == "    Open --> Closed : Close ⏱AutoLock"


def test_describe_rejects_a_builder_or_another_type() -> None:
    class Unbuilt(Door):
        type = "unbuilt"

        @classmethod
        def state_machine(cls) -> StateMachineBuilder:  # type: ignore[override]
            return StateMachineDefinition.builder("New")

    class Odd(Door):
        type = "odd"

        @classmethod
        def state_machine(cls) -> str:  # type: ignore[override]
            return "stateDiagram-v2"

    with pytest.raises(InvalidWorkflowDefinition, match=r"returned a builder; call \.build\(\)"):
        describe(Unbuilt)
    with pytest.raises(InvalidWorkflowDefinition, match="must return a StateMachineDefinition"):
        describe(Odd)
    with pytest.raises(InvalidWorkflowDefinition, match="is not a Workflow class"):
        describe(object)


def test_state_machine_view_mixin() -> None:
    state = DescribedDoor.replay([Opened(), Opened()])
    assert DescribedDoor.state_info(state) == StateInfo("Open", {"opened": 2}, False)
    assert DescribedDoor.transitions(state) == []  # the mixin's default
    assert DescribedDoor.state_info(DescribedDoor.evolve(state, Closed())).is_terminal

    class Bare(StateMachineView):
        pass

    with pytest.raises(NotImplementedError, match="must define state_info"):
        Bare.state_info(None)


# -- the golden helper ----------------------------------------------------------------------


def test_golden_files_live_under_tests_golden() -> None:
    assert golden.GOLDEN_DIR.name == "golden"
    assert golden.GOLDEN_DIR.parent == Path(__file__).resolve().parent
    assert (golden.GOLDEN_DIR / "small.mmd").read_text(encoding="utf-8") == SMALL_MERMAID
    assert (golden.GOLDEN_DIR / "small.dot").read_text(encoding="utf-8") == SMALL_DOT


def test_assert_golden_compares_fails_with_a_diff_and_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    monkeypatch.delenv("UPDATE_GOLDEN", raising=False)

    with pytest.raises(pytest.fail.Exception, match="does not exist; run with UPDATE_GOLDEN=1"):
        golden.assert_golden("sub/x.txt", "one\n")

    monkeypatch.setenv("UPDATE_GOLDEN", "1")
    golden.assert_golden("sub/x.txt", "one\n")
    assert (tmp_path / "sub" / "x.txt").read_bytes() == b"one\n"

    monkeypatch.delenv("UPDATE_GOLDEN")
    golden.assert_golden("sub/x.txt", "one\n")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)differs.*-one\n\+two"):
        golden.assert_golden("sub/x.txt", "two\n")
    with pytest.raises(ValueError, match="leaves"):
        golden.assert_golden("../escape.txt", "x")
