"""A group's follow-up inputs decided together (`WorkflowService.execute_group`): two
statements for the whole group (lock and load every instance, write every decision), with
the outcomes, events, effects, timers and completions `execute` gives each input alone; a
group that does not qualify falls back to one input at a time; a failing input is named.
The last test runs it through the grouped acknowledgement on a real Celery worker.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from runtime_helpers import TestApp, rows, test_config
from workflows import (
    Complete,
    ForceReject,
    Increment,
    Mode,
    Ping,
    Start,
    Stop,
    TestWorkflow,
    TimerStart,
    TimerTestWorkflow,
    test_handler,
    timer_test_handler,
)

from ironflow_celery import (
    Decision,
    EffectContext,
    Message,
    Registry,
    RetryPolicy,
    Workflow,
    WorkflowService,
)
from ironflow_celery.errors import GroupInputFailed
from ironflow_celery.storage.store import PostgresStore

T = TestWorkflow.type


class Boom(Message):
    id: str


class Fine(Message):
    id: str


class Happened(Message):
    pass


class Nothing(BaseModel):
    pass


class FragileWorkflow(Workflow):
    """`Boom` makes decide raise; `Fine` is accepted."""

    type = "group_fragile"
    State = Nothing
    Input = Fine | Boom
    Event = Happened

    @staticmethod
    def evolve(state: Nothing, event: Message) -> Nothing:
        return state

    @staticmethod
    def decide(now: Any, state: Nothing, input: Message) -> Decision:
        if isinstance(input, Boom):
            raise RuntimeError(f"decide fails for {input.id}")
        return Decision.accept(Happened())


@pytest.fixture
def service(store: PostgresStore) -> WorkflowService:
    registry = Registry(
        [(TestWorkflow, test_handler), (TimerTestWorkflow, timer_test_handler), FragileWorkflow]
    )
    return WorkflowService(store, registry)


def state_of(db: sa.Engine, wt: str, wid: str) -> tuple[Any, ...]:
    """What an instance has stored: events, effects, timers (pending ones by key), done."""
    events = [
        r.payload
        for r in rows(
            db,
            "SELECT payload FROM ironflow.events WHERE workflow_type = :wt AND workflow_id = :wid"
            " ORDER BY sequence",
            wt=wt,
            wid=wid,
        )
    ]
    effects = [
        r.payload
        for r in rows(
            db,
            "SELECT payload FROM ironflow.outbox WHERE workflow_type = :wt AND workflow_id = :wid"
            " ORDER BY created_at, payload::text",
            wt=wt,
            wid=wid,
        )
    ]
    timers = [
        (r.key, r.input, r.processed_at is None)
        for r in rows(
            db,
            "SELECT key, input, processed_at FROM ironflow.timers WHERE workflow_type = :wt"
            " AND workflow_id = :wid ORDER BY key NULLS FIRST, created_at",
            wt=wt,
            wid=wid,
        )
    ]
    [inst] = rows(
        db,
        "SELECT event_count, completed_at IS NOT NULL AS done FROM ironflow.workflow_instances"
        " WHERE workflow_type = :wt AND workflow_id = :wid",
        wt=wt,
        wid=wid,
    )
    return events, effects, timers, inst.event_count, inst.done


def test_a_group_decides_as_each_input_would_alone(
    service: WorkflowService, store: PostgresStore, db: sa.Engine
) -> None:
    run = uuid.uuid4().hex[:6]

    def inputs(side: str) -> list[tuple[Message, type[Workflow]]]:
        w = f"{run}{side}"
        mode = Mode(mode="RouteResult")
        return [
            (Increment(id=f"{w}-inc", with_effect=True), TestWorkflow),
            (ForceReject(id=f"{w}-rej", reason="no"), TestWorkflow),
            (Stop(id=f"{w}-stop"), TestWorkflow),
            (Ping(id=f"{w}-done"), TestWorkflow),  # its instance is completed already
            (Start(id=f"{w}-start", mode=mode), TestWorkflow),
            (Complete(id=f"{w}-timer", cancel_timer_key="timeout"), TimerTestWorkflow),
            (TimerStart(id=f"{w}-arm", timeout_secs=60, timer_key="t"), TimerTestWorkflow),
        ]

    for side in ("alone", "group"):  # the same history on both sides
        for input, _ in inputs(side):
            wid = input.id  # type: ignore[attr-defined]
            if wid.endswith("-timer"):
                service.execute(TimerStart(id=wid, timeout_secs=60, timer_key="timeout"))
            elif wid.endswith("-arm"):
                service.execute(TimerStart(id=wid, timeout_secs=60, timer_key="old"))
            else:
                service.execute(Increment(id=wid))
        service.execute(Stop(id=f"{run}{side}-done"))

    alone = [service.execute(i, workflow=w) for i, w in inputs("alone")]
    with store.transaction(ack=True) as conn:
        grouped = service.execute_group([(i, w, None) for i, w in inputs("group")], connection=conn)
    assert grouped is not None
    assert [o.to_json() for o in grouped] == [o.to_json() for o in alone]
    assert [o.kind for o in grouped] == [
        "accepted", "rejected", "accepted", "already_completed", "accepted", "accepted",
        "accepted",
    ]  # fmt: skip
    for (a, wf), (g, _) in zip(inputs("alone"), inputs("group"), strict=True):
        stored = repr(state_of(db, wf.type, g.id))  # type: ignore[attr-defined]
        assert stored.replace(f"{run}group", f"{run}alone") == repr(
            state_of(db, wf.type, a.id)  # type: ignore[attr-defined]
        )


def test_a_group_takes_two_statements(
    service: WorkflowService, store: PostgresStore, db: sa.Engine
) -> None:
    wids = [f"two-{uuid.uuid4().hex[:6]}-{i}" for i in range(8)]
    for wid in wids:
        service.execute(Increment(id=wid))
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        with store.transaction(ack=True) as conn:
            out = service.execute_group(
                [(Increment(id=w, with_effect=True), TestWorkflow, None) for w in reversed(wids)],
                connection=conn,
            )
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    assert out is not None and all(o.kind == "accepted" for o in out)
    assert len(statements) == 2, statements
    for wid in wids:
        events, effects, _, count_, _ = state_of(db, T, wid)
        assert [e["type"] for e in events] == ["Incremented", "Incremented"]
        assert events[1]["value"] == 2 and count_ == 2
        assert effects == [{"type": "Notify", "message": "Counter is now 2"}]


def test_a_group_that_does_not_qualify_writes_nothing(
    service: WorkflowService, store: PostgresStore, db: sa.Engine
) -> None:
    wid = f"dup-{uuid.uuid4().hex[:6]}"
    service.execute(Increment(id=wid))
    twice = [(Increment(id=wid), TestWorkflow, None)] * 2
    unknown = [(Increment(id=wid), TestWorkflow, None), (Ping(id=f"{wid}-new"), TestWorkflow, None)]
    for items in (twice, unknown):
        with store.transaction(ack=True) as conn:
            assert service.execute_group(items, connection=conn) is None
    assert state_of(db, T, wid)[3] == 1
    assert not rows(db, "SELECT 1 FROM ironflow.workflow_instances WHERE workflow_id = :w",
                    w=f"{wid}-new")  # fmt: skip


def test_a_failing_input_is_named_and_nothing_is_written(
    service: WorkflowService, store: PostgresStore, db: sa.Engine
) -> None:
    run = uuid.uuid4().hex[:6]
    for i in range(3):
        service.execute(Fine(id=f"{run}-{i}"))
    items: list[tuple[Message, type[Workflow], str | None]] = [
        (Fine(id=f"{run}-0"), FragileWorkflow, None),
        (Boom(id=f"{run}-1"), FragileWorkflow, None),
        (Fine(id=f"{run}-2"), FragileWorkflow, None),
    ]
    with pytest.raises(GroupInputFailed) as failed, store.transaction(ack=True) as conn:
        service.execute_group(items, connection=conn)
    assert failed.value.index == 1
    assert isinstance(failed.value.cause, RuntimeError)
    for i in range(3):
        assert state_of(db, FragileWorkflow.type, f"{run}-{i}")[3] == 1


# -- through the grouped acknowledgement ---------------------------------------------------


class Nudge(Message):
    id: str
    bad: bool = False


class Nudged(Message):
    pass


class Answer(Message):
    id: str
    bad: bool


class Answered(Message):
    pass


class Ask(Message):
    bad: bool


class AskWorkflow(Workflow):
    """`Nudge` → `Ask` effect → the handler answers; a bad `Answer` fails in decide."""

    type = "group_ask"
    State = Nothing
    Input = Nudge | Answer
    Event = Nudged | Answered
    Effect = Ask

    @staticmethod
    def evolve(state: Nothing, event: Message) -> Nothing:
        return state

    @staticmethod
    def decide(now: Any, state: Nothing, input: Message) -> Decision:
        if isinstance(input, Nudge):
            return Decision.accept(Nudged()).with_effect(Ask(bad=input.bad))
        assert isinstance(input, Answer)
        if input.bad:
            raise RuntimeError("this answer cannot be decided")
        return Decision.accept(Answered())


def answer(effect: Ask, ctx: EffectContext) -> Answer:
    return Answer(id=ctx.workflow.workflow_id, bad=effect.bad)


def test_only_the_row_whose_follow_up_fails_is_failed(store: PostgresStore, db) -> None:
    app = TestApp(
        store,
        workflows=((AskWorkflow, answer),),
        config=test_config(retry_policy=RetryPolicy(max_attempts=1)),
    )
    try:
        run = uuid.uuid4().hex[:6]
        wids = [f"{run}-{i}" for i in range(6)]
        for i, wid in enumerate(wids):  # decided before the relays start: one group
            app.service.execute(Nudge(id=wid, bad=i == 3))
        app.start()

        def outcomes() -> list[Any]:
            return rows(
                db,
                "SELECT workflow_id, processed_at IS NOT NULL AS done, dead_lettered_at IS NOT"
                " NULL AS dead, last_error FROM ironflow.outbox WHERE workflow_id LIKE :p"
                " ORDER BY workflow_id",
                p=f"{run}-%",
            )

        app.wait_until(lambda: all(r.done or r.dead for r in outcomes()), what="every row")
        result = outcomes()
        assert [(r.done, r.dead) for r in result] == [(i != 3, i == 3) for i in range(6)], result
        assert "Failed to route result: RuntimeError" in result[3].last_error
        for i, wid in enumerate(wids):
            expected = ["Nudged"] if i == 3 else ["Nudged", "Answered"]
            assert app.events(AskWorkflow.type, wid) == expected
    finally:
        app.stop()
