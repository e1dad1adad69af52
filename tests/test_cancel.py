"""Cancel and revoke (issue 12 §3): cancel a pending effect, timer or whole instance as a
function, a Celery task and a CLI command; ``celery control revoke <row id>`` ends the row
as cancelled (kept for audit) instead of leaving a zombie that is discarded every lease.

Revoke is tested with a real in-thread Celery worker and ``app.control.revoke``; the rest
runs the functions against a real PostgreSQL, as the ack-path tests do.
"""

from __future__ import annotations

import json
import threading
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from pydantic import BaseModel
from runtime_helpers import TestApp, rows, scalar, test_config, wait_until

from ironflow_celery import (
    CancelNotice,
    Decision,
    EffectContext,
    InvalidPayload,
    Message,
    Timer,
    Workflow,
)
from ironflow_celery import dead_letters as dl
from ironflow_celery.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, main
from ironflow_celery.engine.tasks import run_effect
from ironflow_celery.operations import cancel as cx
from ironflow_celery.operations.status import queue_status
from ironflow_celery.storage.store import PostgresStore

MAX = 3

# -- a workflow that hears about cancels ------------------------------------------------------


class Place(Message):
    type_tag = "Place"
    id: str
    charges: int = 1
    block: bool = False


class Expire(Message):
    type_tag = "Expire"
    id: str


class Cancelled(Message):
    type_tag = "Cancelled"
    id: str
    scope: str
    reason: str
    revoked: bool
    effects: int
    timers: int


class Placed(Message):
    type_tag = "Placed"


class Expired(Message):
    type_tag = "Expired"


class WasCancelled(Message):
    type_tag = "WasCancelled"
    scope: str
    reason: str
    revoked: bool
    effects: int
    timers: int


class Charge(Message):
    n: int
    block: bool = False


class OrderState(BaseModel):
    cancelled: bool = False


class CancellableOrder(Workflow):
    type = "cx_order"
    State = OrderState
    Input = Place | Expire | Cancelled
    Event = Placed | Expired | WasCancelled
    Effect = Charge

    @staticmethod
    def evolve(state: OrderState, event: Message) -> OrderState:
        if isinstance(event, WasCancelled) and event.scope == "instance":
            return OrderState(cancelled=True)
        return state

    @staticmethod
    def decide(now: Any, state: OrderState, input: Message) -> Decision:
        if isinstance(input, Place):
            return (
                Decision.accept(Placed())
                .with_effects(Charge(n=i, block=input.block) for i in range(input.charges))
                .with_timer(Timer.after(3600, Expire(id=input.id), key="expire"))
            )
        if isinstance(input, Expire):
            return Decision.accept(Expired())
        assert isinstance(input, Cancelled)
        return Decision.accept(WasCancelled(**input.model_dump(exclude={"id"})))

    @staticmethod
    def is_terminal(state: OrderState) -> bool:
        return state.cancelled

    @staticmethod
    def on_cancel(notice: CancelNotice) -> Message | None:
        return Cancelled(
            id=notice.workflow.workflow_id,
            scope=notice.scope,
            reason=notice.reason,
            revoked=notice.revoked,
            effects=len(notice.effects),
            timers=len(notice.timers),
        )


class Start(Message):
    type_tag = "Place"
    id: str


class Started(Message):
    type_tag = "Placed"


class Nothing(BaseModel):
    pass


class BrokenOnCancel(Workflow):
    """on_cancel raises: a cancel must then change nothing (a revoke still closes the row)."""

    type = "cx_broken"
    State = Nothing
    Input = Start
    Event = Started
    Effect = Charge

    @staticmethod
    def evolve(state: Nothing, event: Message) -> Nothing:
        return state

    @staticmethod
    def decide(now: Any, state: Nothing, input: Message) -> Decision:
        return Decision.accept(Started()).with_effect(Charge(n=0))

    @staticmethod
    def on_cancel(notice: CancelNotice) -> Message | None:
        raise RuntimeError("on_cancel exploded")


CALLED: list[str] = []
RELEASE = threading.Event()


def charge(effect: Charge, ctx: EffectContext) -> None:
    CALLED.append(str(ctx.effect_id))
    if effect.block:
        RELEASE.wait(60)


WORKFLOWS = ((CancellableOrder, charge), (BrokenOnCancel, charge))


@pytest.fixture
def app(store: PostgresStore):
    CALLED.clear()
    RELEASE.clear()
    test_app = TestApp(store, workflows=WORKFLOWS, config=test_config())
    try:
        yield test_app
    finally:
        RELEASE.set()
        test_app.stop()


# -- helpers ------------------------------------------------------------------------------------


def place(app: TestApp, workflow_id: str, **kwargs: Any) -> tuple[list[uuid.UUID], uuid.UUID]:
    """Start an order; its effect ids (in order) and its timer id."""
    app.service.execute(Place(id=workflow_id, **kwargs))
    effects = [
        r.id
        for r in rows(
            app.store.engine,
            "SELECT id FROM ironflow.outbox WHERE workflow_id = :wid ORDER BY created_at, id",
            wid=workflow_id,
        )
    ]
    timer = scalar(
        app.store.engine, "SELECT id FROM ironflow.timers WHERE workflow_id = :wid", wid=workflow_id
    )
    return effects, timer


def row(db: sa.Engine, kind: str, row_id: uuid.UUID) -> Any:
    table = "outbox" if kind == "effect" else "timers"
    [found] = rows(db, f"SELECT * FROM ironflow.{table} WHERE id = :id", id=row_id)
    return found


def events(app: TestApp, workflow_id: str) -> list[dict]:
    return [
        e.payload for e in app.service.fetch_workflow_events(CancellableOrder.type, workflow_id)
    ]


def snapshot(db: sa.Engine) -> list[Any]:
    """Everything a cancel could change."""
    return [
        rows(db, "SELECT * FROM ironflow.outbox ORDER BY id"),
        rows(db, "SELECT * FROM ironflow.timers ORDER BY id"),
        rows(db, "SELECT * FROM ironflow.events ORDER BY global_sequence"),
        rows(db, "SELECT * FROM ironflow.workflow_instances ORDER BY workflow_id"),
    ]


def claim(app: TestApp, token: str, kind: str = "effect") -> list[Any]:
    return app.store.claim(
        kind,
        token,
        [CancellableOrder.type, BrokenOnCancel.type],
        lease_seconds=30,
        max_attempts=MAX,
        limit=10,
    )


def assert_cancelled(db: sa.Engine, kind: str, row_id: uuid.UUID, reason: str) -> Any:
    found = row(db, kind, row_id)
    assert found.processed_at is not None and found.discarded_at is not None
    assert found.discard_reason.startswith(reason), found.discard_reason
    assert found.locked_by is None and found.locked_until is None
    assert found.run_started_at is None
    return found


def open_counts(store: PostgresStore) -> dict[str, int]:
    """What `status` and the dead-letter counts show for the order type."""
    [status] = [
        s
        for s in queue_status(store, max_attempts=MAX, workflow_types=(CancellableOrder.type,))
        if s.workflow_type == CancellableOrder.type
    ]
    e, t = status.effects, status.timers
    return {
        "effects": e.pending + e.in_flight + e.backing_off + e.dead,
        "timers": t.due + t.pending + t.in_flight + t.backing_off + t.dead,
        "dead": dl.count_dead_letters(store, max_attempts=MAX)
        + dl.count_dead_letters(store, kind="timer", max_attempts=MAX),
    }


# -- cancel one effect or timer -------------------------------------------------------------------


def test_cancel_effect_closes_it_for_audit_and_delivers_on_cancel(app, db):
    [effect], _ = place(app, "o-1")
    result = cx.cancel_effect(app.runtime, effect, "customer changed their mind")
    assert result.ok and result.reason == "cancelled" and result.effects == (effect,)
    assert result.on_cancel == "Cancelled: accepted"
    assert_cancelled(db, "effect", effect, "customer changed their mind")
    assert events(app, "o-1")[-1] == {
        "type": "WasCancelled",
        "scope": "effect",
        "reason": "customer changed their mind",
        "revoked": False,
        "effects": 1,
        "timers": 0,
    }
    assert claim(app, "relay#1") == []  # never claimed again
    assert open_counts(app.store) == {"effects": 0, "timers": 1, "dead": 0}
    json.dumps(result.to_json())


def test_cancel_timer_closes_it_and_delivers_on_cancel(app, db):
    _, timer = place(app, "o-1")
    result = cx.cancel_timer(app.runtime, str(timer), "no expiry for VIPs")
    assert result.ok and result.timers == (timer,)
    assert_cancelled(db, "timer", timer, "no expiry for VIPs")
    assert events(app, "o-1")[-1]["scope"] == "timer"
    with db.begin() as conn:  # even once due, a cancelled timer is never claimed
        conn.execute(sa.text("UPDATE ironflow.timers SET fire_at = now() - interval '1 s'"))
    assert claim(app, "relay#1", "timer") == []
    assert open_counts(app.store)["timers"] == 0


def test_cancel_a_claimed_row_whose_message_waits_in_the_broker(app, db):
    [effect], _ = place(app, "o-1")
    [claimed] = claim(app, "relay#1")  # published; the message has not started yet
    assert cx.cancel_effect(app.runtime, effect, "not needed").ok
    # the message arrives later: its start guard finds the row closed, the handler never runs
    result = run_effect(app.runtime, "cx_order:o-1", str(effect), 1, claimed.token)
    assert result["status"] == "stale-skipped" and CALLED == []
    assert_cancelled(db, "effect", effect, "not needed")


def test_cancel_refusals_change_nothing(app, db):
    [effect], timer = place(app, "o-1")
    missing = uuid.uuid4()
    before = snapshot(db)
    refused = cx.cancel_effect(app.runtime, missing, "gone")
    assert not refused and refused.reason == "not_found" and str(missing) in refused.message
    assert cx.cancel_timer(app.runtime, effect, "an effect id is no timer").reason == "not_found"
    assert snapshot(db) == before
    # running: the handler started under a live lease
    [claimed] = claim(app, "relay#1")
    app.store.start("effect", effect, claimed.token, "relay#1>w:1", lease_seconds=30)
    before = snapshot(db)
    running = cx.cancel_effect(app.runtime, effect, "too late")
    assert running.reason == "running" and "running" in running.message
    assert snapshot(db) == before
    # processed (or cancelled before): already_processed, with when and why
    assert app.store.record_processed("effect", effect, "relay#1>w:1")
    done = cx.cancel_effect(app.runtime, effect, "too late")
    assert done.reason == "already_processed" and "processed at" in done.message
    assert row(db, "effect", effect).discarded_at is None  # still plainly processed
    assert cx.cancel_timer(app.runtime, timer, "first").ok
    again = cx.cancel_timer(app.runtime, timer, "second")
    assert again.reason == "already_processed" and "(first)" in again.message
    assert row(db, "timer", timer).discard_reason == "first"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("not-a-uuid", "why"), "not a valid row id"),
        ((None, "   "), "needs a reason"),
        ((None, "bad\x00reason"), "NUL"),
        ((None, "lone \udcff surrogate"), "not valid UTF-8"),
        ((None, 42), "must be text"),
    ],
)
def test_cancel_bad_input_is_a_clear_error_and_changes_nothing(app, db, args, message):
    [effect], _ = place(app, "o-1")
    before = snapshot(db)
    row_id = args[0] or effect
    with pytest.raises(cx.InvalidCancelRequest, match=message):
        cx.cancel_effect(app.runtime, row_id, args[1])
    with pytest.raises(cx.InvalidCancelRequest, match="kind must be"):
        cx.cancel_row(app.runtime, effect, "why", kind="bogus")
    assert snapshot(db) == before


def test_failing_on_cancel_changes_nothing(app, db):
    app.service.execute(Start(id="b-1"))
    effect = scalar(db, "SELECT id FROM ironflow.outbox WHERE workflow_type = 'cx_broken'")
    before = snapshot(db)
    with pytest.raises(RuntimeError, match="on_cancel exploded"):
        cx.cancel_effect(app.runtime, effect, "try")
    assert snapshot(db) == before


def test_on_cancel_returning_a_wrong_input_changes_nothing(app, db, monkeypatch):
    [effect], _ = place(app, "o-1")
    monkeypatch.setattr(CancellableOrder, "on_cancel", staticmethod(lambda notice: Expired()))
    before = snapshot(db)
    with pytest.raises(InvalidPayload, match="on_cancel returned Expired"):
        cx.cancel_effect(app.runtime, effect, "try")
    with pytest.raises(InvalidPayload, match="on_cancel returned Expired"):
        cx.cancel_instance(app.runtime, "cx_order", "o-1", "try")
    assert snapshot(db) == before


# -- cancel a whole instance -----------------------------------------------------------------------


def test_cancel_instance_closes_open_effects_and_timers_and_delivers_on_cancel(app, db):
    effects, timer = place(app, "o-1", charges=3)
    # one effect already ran, one is a dead letter: the dead letter is closed too
    [first, *_] = claim(app, "relay#1")
    app.store.start("effect", first.id, first.token, "relay#1>w:1", lease_seconds=30)
    assert app.store.record_processed("effect", first.id, "relay#1>w:1")
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE ironflow.outbox SET locked_by = NULL, locked_until = NULL,"
                " dead_lettered_at = now(), attempts = 3 WHERE id = :id"
            ),
            {"id": effects[1]},
        )
    other, _ = place(app, "o-2")  # another instance is left alone
    result = cx.cancel_instance(app.runtime, "cx_order", "o-1", "fraud")
    assert result.ok and result.scope == "instance"
    assert set(result.effects) == set(effects) - {first.id} and result.timers == (timer,)
    for effect in effects[1:]:
        assert_cancelled(db, "effect", effect, "fraud")
    assert row(db, "effect", effects[1]).dead_lettered_at is not None  # kept for audit
    assert_cancelled(db, "timer", timer, "fraud")
    assert row(db, "effect", first.id).discarded_at is None  # processed stays processed
    assert events(app, "o-1")[-1] == {
        "type": "WasCancelled",
        "scope": "instance",
        "reason": "fraud",
        "revoked": False,
        "effects": 2,
        "timers": 1,
    }
    assert row(db, "effect", other[0]).processed_at is None
    counts = open_counts(app.store)
    assert counts == {"effects": 1, "timers": 1, "dead": 0}  # o-2's only
    # the instance is now terminal with nothing open: a second cancel is refused
    again = cx.cancel_instance(app.runtime, "cx_order", "o-1", "fraud")
    assert again.reason == "already_completed"


def test_cancel_instance_refusals_change_nothing(app, db):
    [effect], _ = place(app, "o-1")
    before = snapshot(db)
    missing = cx.cancel_instance(app.runtime, "cx_order", "nope", "x")
    assert missing.reason == "not_found" and "cx_order:nope" in missing.message
    [claimed] = claim(app, "relay#1")
    app.store.start("effect", effect, claimed.token, "relay#1>w:1", lease_seconds=30)
    before = snapshot(db)
    running = cx.cancel_instance(app.runtime, "cx_order", "o-1", "x")
    assert running.reason == "running" and running.running == (effect,)
    assert str(effect) in running.message
    assert snapshot(db) == before
    from ironflow_celery import UnknownWorkflowType

    with pytest.raises(UnknownWorkflowType):
        cx.cancel_instance(app.runtime, "no_such_type", "o-1", "x")
    with pytest.raises(cx.InvalidCancelRequest, match="workflow id"):
        cx.cancel_instance(app.runtime, "cx_order", "", "x")
    assert snapshot(db) == before


# -- revoke: the signal handler's rules, then a real worker -------------------------------------


def test_revoke_rules_terminated_own_run_running_elsewhere_and_finished(app, db):
    [a, b], _ = place(app, "o-1", charges=2)
    [ca, cb] = claim(app, "relay#1")
    app.store.start("effect", a, ca.token, f"{ca.token}>w:1", lease_seconds=30)
    # a plain revoke of a row running under another delivery leaves it to finish
    assert cx.revoke_row(app.runtime, "effect", a, lease="relay#0").reason == "running"
    assert row(db, "effect", a).processed_at is None
    # terminate kills this message's own run: the row is cancelled
    killed = cx.revoke_row(app.runtime, "effect", a, lease=ca.token, terminated=True, signum=15)
    assert killed.ok
    assert_cancelled(db, "effect", a, "revoked: celery control revoke --terminate (signal 15)")
    # a finished row is left alone; an unknown id too
    app.store.start("effect", b, cb.token, f"{cb.token}>w:2", lease_seconds=30)
    assert app.store.record_processed("effect", b, f"{cb.token}>w:2")
    assert cx.revoke_row(app.runtime, "effect", b, lease=cb.token).reason == "already_processed"
    assert row(db, "effect", b).discarded_at is None
    assert cx.revoke_row(app.runtime, "effect", uuid.uuid4()).reason == "not_found"
    # a due timer whose message was published: the revoke cancels it, on_cancel hears it
    _, timer = place(app, "o-2")
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE ironflow.timers SET fire_at = now() WHERE id = :id"), {"id": timer}
        )
    [ct] = claim(app, "relay#2", "timer")
    assert cx.revoke_row(app.runtime, "timer", timer, lease=ct.token).ok
    assert_cancelled(db, "timer", timer, "revoked: celery control revoke")
    assert events(app, "o-2")[-1]["scope"] == "timer" and events(app, "o-2")[-1]["revoked"]
    # on_cancel failing does not leave a revoked row half-open
    app.service.execute(Start(id="b-1"))
    broken = scalar(db, "SELECT id FROM ironflow.outbox WHERE workflow_type = 'cx_broken'")
    assert cx.revoke_row(app.runtime, "effect", broken).ok
    assert_cancelled(db, "effect", broken, "revoked: celery control revoke; on_cancel failed")


def revoke(app: TestApp, row_id: uuid.UUID) -> None:
    """``celery control revoke`` through the broker; wait until the worker has it."""
    replies = app.app.control.revoke(str(row_id), reply=True, timeout=30, limit=1)
    assert replies, "no worker answered the revoke"


def test_revoke_before_the_message_arrives_ends_the_row_cancelled(app, db):
    [effect], timer = place(app, "o-1")
    [kept], _ = place(app, "o-2")
    app.start_worker()
    revoke(app, effect)
    revoke(app, uuid.uuid4())  # an id that is not ours changes nothing
    app.start_relays()
    wait_until(
        lambda: row(db, "effect", effect).processed_at is not None,
        60,
        what="the revoked effect to end cancelled",
    )
    found = assert_cancelled(db, "effect", effect, "revoked: celery control revoke")
    assert found.attempts == 0 and str(effect) not in CALLED
    assert events(app, "o-1")[-1]["revoked"] is True
    wait_until(
        lambda: row(db, "effect", kept).processed_at is not None, 60, what="the other effect to run"
    )
    assert row(db, "effect", kept).discarded_at is None and str(kept) in CALLED
    assert claim(app, "relay#9") == []
    assert open_counts(app.store) == {"effects": 0, "timers": 2, "dead": 0}
    assert row(db, "timer", timer).processed_at is None


def test_revoke_of_a_message_waiting_in_the_broker_ends_the_row_cancelled(app, db):
    # One task at a time and one prefetched message: while `busy` runs, `prefetched` waits in
    # the worker (Celery runs what it already handed to its pool) and `queued` in the broker.
    app.app.conf.worker_prefetch_multiplier = 1
    app.start_worker(concurrency=1)
    app.start_relays()
    [busy], _ = place(app, "o-1", block=True)
    wait_until(lambda: str(busy) in CALLED, 60, what="the blocking handler to start")
    [prefetched], _ = place(app, "o-2")
    [queued], _ = place(app, "o-3")
    wait_until(
        lambda: row(db, "effect", queued).locked_by is not None,
        60,
        what="the third effect to be claimed and published",
    )
    revoke(app, queued)
    RELEASE.set()
    wait_until(
        lambda: row(db, "effect", queued).processed_at is not None,
        60,
        what="the queued effect to end cancelled",
    )
    assert_cancelled(db, "effect", queued, "revoked: celery control revoke")
    assert str(queued) not in CALLED
    for other in (busy, prefetched):
        wait_until(lambda other=other: row(db, "effect", other).processed_at is not None, 60)
        assert row(db, "effect", other).discarded_at is None


# -- Celery tasks and the CLI ----------------------------------------------------------------------


def test_cancel_tasks_are_registered_and_return_json(app, db):
    [effect], timer = place(app, "o-1")
    tasks = app.app.tasks
    assert tasks["ironflow.cancel.row"](str(timer), "by task", kind="timer")["ok"] is True
    refused = tasks["ironflow.cancel.row"](str(uuid.uuid4()), "by task")
    assert refused["ok"] is False and refused["reason"] == "not_found"
    done = tasks["ironflow.cancel.instance"]("cx_order", "o-1", "by task")
    assert done["ok"] and done["effects"] == [str(effect)]
    with pytest.raises(cx.InvalidCancelRequest):
        tasks["ironflow.cancel.row"]("nope", "by task")


def test_cli_cancel_commands_and_exit_codes(app, db):
    [effect], timer = place(app, "o-1")
    [other], _ = place(app, "o-2")
    runner = CliRunner()

    def cli(*args: str):
        return runner.invoke(main, list(args), obj=SimpleNamespace(app=app.app))

    ok = cli("effects", "cancel", str(effect), "--reason", "by hand", "--json")
    assert ok.exit_code == EXIT_OK, ok.output
    assert json.loads(ok.stdout)["reason"] == "cancelled"
    again = cli("effects", "cancel", str(effect), "--reason", "by hand")
    assert again.exit_code == EXIT_REFUSED and "already_processed" in again.output
    missing = cli("timers", "cancel", str(uuid.uuid4()), "--reason", "x")
    assert missing.exit_code == EXIT_REFUSED and "no timer row" in missing.output
    bad = cli("timers", "cancel", "not-a-uuid", "--reason", "x")
    assert bad.exit_code == EXIT_USAGE and "not a valid row id" in bad.output
    empty = cli("timers", "cancel", str(timer), "--reason", " ")
    assert empty.exit_code == EXIT_USAGE
    unknown = cli("workflows", "cancel", "nope", "o-1", "--reason", "x")
    assert unknown.exit_code == EXIT_REFUSED and "unknown workflow type" in unknown.output
    whole = cli("workflows", "cancel", "cx_order", "o-2", "--reason", "fraud")
    assert whole.exit_code == EXIT_OK and "1 effect(s), 1 timer(s)" in whole.output
    assert_cancelled(db, "effect", other, "fraud")
    assert row(db, "timer", timer).processed_at is None


# -- revoke with terminate: a real prefork worker -------------------------------------------------


@pytest.mark.e2e
def test_revoke_with_terminate_kills_the_running_handler_and_cancels_its_row(
    database_url: str, tmp_path: Any
) -> None:
    import psutil
    from celery import Celery

    from tests.e2e import (
        REDIS_URL,
        Processes,
        make_env,
        prepare_database,
        redis_queue_cleanup,
        service_for,
    )
    from tests.e2e import sql as esql
    from tests.e2e_apps.workflows import Place as E2EPlace

    prepare_database(database_url)
    queue = f"cx-{uuid.uuid4().hex[:12]}"
    env = make_env(database_url, REDIS_URL, queue)
    procs = Processes(tmp_path)
    control = Celery("cx-control", broker=REDIS_URL, set_as_current=False)
    try:
        with redis_queue_cleanup(queue):
            worker = procs.worker("worker", env, pool="prefork", concurrency=1)
            worker.wait_for_output("ironflow relay started (process)", 90)
            service_for(database_url).execute(E2EPlace(id="o1", sleep=120))
            ((effect_id, handler_pid),) = wait_until(
                lambda: esql(database_url, "SELECT effect_id, pid FROM e2e_calls"),
                90,
                what="the handler to start",
            )
            replies = control.control.revoke(
                str(effect_id), terminate=True, reply=True, timeout=30, limit=1
            )
            assert replies, "no worker answered the revoke"

            def closed() -> Any:
                found = esql(
                    database_url,
                    "SELECT discard_reason, attempts FROM ironflow.outbox"
                    " WHERE id = %s AND processed_at IS NOT NULL",
                    (effect_id,),
                )
                return found[0] if found else None

            reason, attempts = wait_until(closed, 90, what="the terminated row to be cancelled")
            assert reason == "revoked: celery control revoke --terminate (signal 15)"
            assert attempts == 0
            wait_until(
                lambda: not psutil.pid_exists(handler_pid),
                30,
                what="the handler's pool process to be killed",
            )
            events = esql(
                database_url,
                "SELECT payload->>'type' FROM ironflow.events ORDER BY global_sequence",
            )
            assert [e[0] for e in events] == ["Placed"]  # no follow-up from the killed run
    finally:
        procs.kill_all()
        control.close()
        print(procs.report())
