"""The task side's ack path (DESIGN.md invariants 2-4, 8): start guard, duplicate
deliveries, atomic result routing, lease renewal, failures, backoff, dead letters and their
propagation, timers re-armed by their own execution, bad input.

Most tests claim a row as a relay would and call `tasks.run_effect` / `run_timer` directly
(exactly what the Celery task does), so no broker is involved.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from runtime_helpers import (
    DEFAULT_WORKFLOWS,
    TestApp,
    corrupt_event,
    execute,
    insert_effect,
    insert_timer,
    outbox,
    rows,
    running_app,
    scalar,
    test_config,
)
from workflows import (
    CALLS,
    CompleteInput,
    Mode,
    Ping,
    Start,
    TestWorkflow,
    TimerStart,
    TimerTestWorkflow,
    test_handler,
    timer_test_handler,
)

from ironflow_celery import (
    DeadLetterNotice,
    Decision,
    EffectContext,
    Message,
    PermanentEffectError,
    Timer,
    Workflow,
)
from ironflow_celery.engine.tasks import run_effect, run_timer
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

T = TestWorkflow.type
MAX = 3

# -- a workflow whose effects' dead letters come back as an input -------------------------


class JobStart(Message):
    type_tag = "Start"
    id: str
    fail: str = "permanent"


class JobGaveUp(Message):
    type_tag = "GaveUp"
    id: str
    error: str


class JobStarted(Message):
    type_tag = "Started"


class JobFailed(Message):
    type_tag = "Failed"
    error: str


class RunJob(Message):
    fail: str


class JobState(BaseModel):
    failed: bool = False


class JobWorkflow(Workflow):
    type = "dl_job"
    State = JobState
    Input = JobStart | JobGaveUp
    Event = JobStarted | JobFailed
    Effect = RunJob

    @staticmethod
    def evolve(state: JobState, event: Message) -> JobState:
        return JobState(failed=isinstance(event, JobFailed) or state.failed)

    @staticmethod
    def decide(now: Any, state: JobState, input: Message) -> Decision:
        if isinstance(input, JobStart):
            return Decision.accept(JobStarted()).with_effect(RunJob(fail=input.fail))
        assert isinstance(input, JobGaveUp)
        return Decision.accept(JobFailed(error=input.error))

    @staticmethod
    def on_dead_letter(notice: DeadLetterNotice) -> Message | None:
        return JobGaveUp(id=notice.workflow.workflow_id, error=notice.last_error)


def job_handler(effect: RunJob, ctx: EffectContext) -> None:
    CALLS.record(ctx)
    if effect.fail == "permanent":
        raise PermanentEffectError("the card was declined")
    raise RuntimeError("still broken")


class BrokenStart(Message):
    type_tag = "Start"
    id: str


class BrokenStarted(Message):
    type_tag = "Started"


class BrokenDeadLetterWorkflow(Workflow):
    type = "dl_broken"
    State = JobState
    Input = BrokenStart
    Event = BrokenStarted
    Effect = RunJob

    @staticmethod
    def evolve(state: JobState, event: Message) -> JobState:
        return state

    @staticmethod
    def decide(now: Any, state: JobState, input: Message) -> Decision:
        return Decision.accept(BrokenStarted()).with_effect(RunJob(fail="permanent"))

    @staticmethod
    def on_dead_letter(notice: DeadLetterNotice) -> Message | None:
        raise ValueError("on_dead_letter exploded")


# -- a heartbeat: its timer input re-arms the same key ---------------------------------------


class Beat(Message):
    id: str


class Beaten(Message):
    pass


class Beats(BaseModel):
    n: int = 0


class HeartbeatWorkflow(Workflow):
    type = "heartbeat"
    State = Beats
    Input = Beat
    Event = Beaten

    @staticmethod
    def evolve(state: Beats, event: Message) -> Beats:
        return Beats(n=state.n + 1)

    @staticmethod
    def decide(now: Any, state: Beats, input: Beat) -> Decision:
        return Decision.accept(Beaten()).with_timer(Timer.after(60, Beat(id=input.id), key="hb"))


WORKFLOWS = (
    *DEFAULT_WORKFLOWS,
    (JobWorkflow, job_handler),
    (BrokenDeadLetterWorkflow, job_handler),
    (HeartbeatWorkflow, None),
)
TYPES = [w.type for w, _ in WORKFLOWS]


# -- helpers -----------------------------------------------------------------------------------


def make_app(store: PostgresStore, handler: Any = None, **config: Any) -> TestApp:
    """A runtime + Celery app that is never started (tasks are called directly)."""
    workflows = list(WORKFLOWS)
    if handler is not None:
        workflows[0] = (TestWorkflow, handler)
    return TestApp(store, workflows=workflows, config=test_config(**config))


def claim(app: TestApp, token: str = "relay#1", kind: str = "effect") -> list[ClaimedRow]:
    lease = app.config.effect_lock_duration if kind == "effect" else app.config.timer_lock_duration
    return app.store.claim(kind, token, TYPES, lease_seconds=lease, max_attempts=MAX, limit=10)


def run(app: TestApp, row: ClaimedRow, lease: str | None = None) -> dict:
    return run_effect(
        app.runtime,
        f"{row.workflow_type}:{row.workflow_id}",
        str(row.id),
        row.attempts + 1,
        lease or row.token,
    )


def run_t(app: TestApp, row: ClaimedRow) -> dict:
    return run_timer(
        app.runtime, f"{row.workflow_type}:{row.workflow_id}", str(row.id), 1, row.token
    )


def row_of(db: sa.Engine, table: str, row_id: uuid.UUID) -> Any:
    [row] = rows(db, f"SELECT * FROM ironflow.{table} WHERE id = :id", id=row_id)
    return row


def run_until_final(app: TestApp, kind: str = "effect", timeout: float = 60) -> list[dict]:
    """Claim and run one row again and again (waiting out its backoff) until it is done."""
    results: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        claimed = claim(app, f"relay#{len(results) + 1}", kind)
        if claimed:
            [row] = claimed
            results.append(run(app, row) if kind == "effect" else run_t(app, row))
            if results[-1]["status"] != "failed-will-retry":
                return results
        time.sleep(0.02)
    raise AssertionError(f"still retrying after {timeout}s: {results}")


def start(app: TestApp, workflow_id: str, mode: str) -> None:
    app.service.execute(Start(id=workflow_id, mode=Mode(mode=mode)))


# -- invariant 2: lease-token guards ----------------------------------------------------------


def test_stale_task_changes_nothing_and_does_not_run_the_handler(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = make_app(store)
    start(app, "stale", "RouteResult")
    [first] = claim(app, "relay-a#1")
    # its lease expires in the broker; another relay claims the row again
    execute(db, "UPDATE ironflow.outbox SET locked_until = now() - interval '1 second'")
    [second] = claim(app, "relay-b#1")
    before = row_of(db, "outbox", first.id)
    result = run(app, first)
    assert result["status"] == "stale-skipped"
    assert CALLS.calls == []
    after = row_of(db, "outbox", first.id)
    assert after == before and after.locked_by == "relay-b#1"
    assert app.events(T, "stale") == ["Started"]
    assert run(app, second)["status"] == "processed"  # the current holder still can
    app.stop()


def test_lease_lost_while_handler_runs_discards_the_result(
    store: PostgresStore, db: sa.Engine
) -> None:
    """The start guard passed, then the row was re-claimed: the stale task's result and
    its failure are both discarded."""

    def handler(effect: Any, ctx: EffectContext) -> Any:
        execute(
            db,
            "UPDATE ironflow.outbox SET locked_until = now() - interval '1 second' WHERE id = :id",
            id=ctx.effect_id,
        )
        assert claim(app, "thief#1"), "the expired row should be claimable"
        if ctx.workflow.workflow_id == "fails":
            raise RuntimeError("boom")
        return test_handler(effect, ctx)

    app = make_app(store, handler)
    start(app, "lost", "RouteResult")
    [row] = claim(app)
    assert run(app, row)["status"] == "stale-skipped"
    lost = row_of(db, "outbox", row.id)
    assert lost.processed_at is None and lost.locked_by == "thief#1" and lost.attempts == 0
    assert app.events(T, "lost") == ["Started"]  # the follow-up was not applied

    start(app, "fails", "RouteResult")
    [row] = [r for r in claim(app, "relay#2") if r.workflow_id == "fails"]
    assert run(app, row)["status"] == "stale-skipped"
    failed = row_of(db, "outbox", row.id)
    assert failed.attempts == 0 and failed.last_error is None and failed.locked_by == "thief#1"
    app.stop()


def test_duplicate_delivery_runs_the_handler_once(store: PostgresStore, db: sa.Engine) -> None:
    """The same task message delivered twice at once: one run, one stale skip."""
    entered = threading.Barrier(2, timeout=30)

    def handler(effect: Any, ctx: EffectContext) -> Any:
        time.sleep(0.3)
        return test_handler(effect, ctx)

    app = make_app(store, handler)
    start(app, "dup", "RouteResult")
    [row] = claim(app)
    results: list[dict] = []

    def deliver() -> None:
        entered.wait()
        results.append(run(app, row))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(r["status"] for r in results) == ["processed", "stale-skipped"]
    assert len(CALLS.calls) == 1
    assert app.events(T, "dup") == ["Started", "Completed"]
    assert row_of(db, "outbox", row.id).processed_at is not None
    app.stop()


# -- invariant 3: follow-up input and processed mark in one transaction ------------------------


def test_follow_up_and_processed_mark_commit_together(store: PostgresStore, db: sa.Engine) -> None:
    app = make_app(store)
    start(app, "ok", "RouteResult")
    [row] = claim(app)
    result = run(app, row)
    assert result["status"] == "processed" and result["outcome"] == "accepted"
    done = row_of(db, "outbox", row.id)
    completed_at = scalar(
        db,
        "SELECT created_at FROM ironflow.events WHERE workflow_id = 'ok' AND sequence = 2",
    )
    assert done.processed_at == completed_at  # same transaction: same now()
    app.stop()


def test_failed_follow_up_leaves_the_row_unprocessed(store: PostgresStore, db: sa.Engine) -> None:
    """The follow-up input cannot execute (its instance has a corrupt event): the row is
    not processed, attempts+1, and last_error says the routing failed."""
    app = make_app(store)
    start(app, "corrupt", "RouteResult")
    corrupt_event(db, T, "corrupt")
    [row] = claim(app)
    result = run(app, row)
    assert result["status"] == "failed-will-retry"
    after = row_of(db, "outbox", row.id)
    assert after.processed_at is None and after.attempts == 1 and after.locked_by is None
    assert after.last_error.startswith("Failed to route result: ")
    assert "EventDeserializationError" in after.last_error and "sequence 2" in after.last_error
    assert app.events(T, "corrupt") == ["Started", "Garbage"]
    app.stop()


# -- lease renewal -----------------------------------------------------------------------------


def test_lease_is_renewed_while_a_long_handler_runs(store: PostgresStore, db: sa.Engine) -> None:
    """A 3 s handler with a 1 s lease: nobody can claim the row meanwhile; it runs once."""

    def slow(effect: Any, ctx: EffectContext) -> Any:
        time.sleep(3)
        return test_handler(effect, ctx)

    app = make_app(store, slow, effect_lock_duration=1.0, timer_lock_duration=1.0)
    start(app, "long", "RouteResult")
    [row] = claim(app)
    results: list[dict] = []
    worker = threading.Thread(target=lambda: results.append(run(app, row)))
    worker.start()
    stolen: list[ClaimedRow] = []
    leases = set()
    while worker.is_alive():
        stolen += claim(app, f"intruder#{len(leases)}")
        leases.add(scalar(db, "SELECT locked_until FROM ironflow.outbox WHERE id = :id", id=row.id))
        time.sleep(0.1)
    worker.join()
    assert stolen == []
    assert len(leases - {None}) >= 3  # renewed several times
    assert results[0]["status"] == "processed"
    assert len(CALLS.calls) == 1
    assert app.events(T, "long") == ["Started", "Completed"]
    app.stop()


# -- invariant 4: failures, backoff, dead letters ----------------------------------------------


def test_permanent_effect_error_dead_letters_at_once(store: PostgresStore, db: sa.Engine) -> None:
    app = make_app(store)
    app.service.execute(BrokenStart(id="b"))
    app.service.execute(JobStart(id="j", fail="permanent"))
    row = next(r for r in claim(app) if r.workflow_id == "j")
    result = run(app, row)
    assert result["status"] == "dead-lettered"
    dl = row_of(db, "outbox", row.id)
    assert dl.attempts == MAX and dl.dead_lettered_at is not None
    assert dl.locked_by is None and dl.locked_until is None
    assert dl.last_error == "PermanentEffectError: the card was declined"
    # dl_job's on_dead_letter input (GaveUp) was accepted: closed as handled, kept for audit.
    assert dl.processed_at is not None
    assert dl.discard_reason == "handled by on_dead_letter: GaveUp accepted"
    assert len([c for c in CALLS.calls if c[0] == str(row.id)]) == 1
    app.stop()


def test_failure_stores_backoff_in_locked_until(store: PostgresStore, db: sa.Engine) -> None:
    from ironflow_celery import RetryPolicy

    app = make_app(store, retry_policy=RetryPolicy(max_attempts=MAX, base_delay=2, max_delay=10))
    start(app, "backoff", "PermanentFailure")
    [row] = claim(app)
    result = run(app, row)
    assert result["status"] == "failed-will-retry" and result["retry_in_seconds"] == 2
    after = row_of(db, "outbox", row.id)
    assert after.attempts == 1 and after.locked_by is None
    assert after.last_error == "RuntimeError: permanent failure"
    remaining = scalar(
        db,
        "SELECT EXTRACT(EPOCH FROM locked_until - now()) FROM ironflow.outbox WHERE id = :id",
        id=row.id,
    )
    assert 1.0 < float(remaining) <= 2.0
    assert claim(app, "too-early#1") == []  # not claimable before the backoff ends
    app.stop()


def test_retries_then_dead_letter_after_max_attempts(store: PostgresStore, db: sa.Engine) -> None:
    app = make_app(store)
    start(app, "retry", "PermanentFailure")
    results = run_until_final(app)
    assert [r["status"] for r in results] == ["failed-will-retry"] * (MAX - 1) + ["dead-lettered"]
    dl = outbox(db, "retry")[0]
    assert dl.attempts == MAX and dl.dead_lettered_at is not None
    assert claim(app, "after#1") == []
    app.stop()


def test_dead_letter_delivers_on_dead_letter_input_in_the_same_transaction(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = make_app(store)
    app.service.execute(JobStart(id="job", fail="retryable"))
    results = run_until_final(app)
    assert results[-1]["status"] == "dead-lettered"
    assert [e.payload for e in app.service.fetch_workflow_events("dl_job", "job")] == [
        {"type": "Started"},
        {"type": "Failed", "error": "RuntimeError: still broken"},
    ]
    dl = outbox(db, "job")[0]
    failed_at = scalar(
        db, "SELECT created_at FROM ironflow.events WHERE workflow_id = 'job' AND sequence = 2"
    )
    assert dl.dead_lettered_at == failed_at  # one transaction
    assert dl.attempts == MAX
    # The workflow accepted the notice: the dead letter is handled, kept for audit, and no
    # longer listed (nobody should retry what the workflow already compensated).
    assert dl.processed_at == failed_at
    assert dl.discard_reason == "handled by on_dead_letter: GaveUp accepted"
    assert app.runtime.count_dead_letters() == 0
    app.stop()


def test_on_dead_letter_failure_still_dead_letters(store: PostgresStore, db: sa.Engine) -> None:
    app = make_app(store)
    app.service.execute(BrokenStart(id="brk"))
    [row] = claim(app)
    assert run(app, row)["status"] == "dead-lettered"
    dl = row_of(db, "outbox", row.id)
    assert dl.attempts == MAX and dl.dead_lettered_at is not None
    assert dl.last_error.startswith("PermanentEffectError: the card was declined")
    assert "on_dead_letter failed: ValueError: on_dead_letter exploded" in dl.last_error
    assert app.events("dl_broken", "brk") == ["Started"]
    app.stop()


# -- timers ------------------------------------------------------------------------------------


def test_timer_rearmed_by_its_own_execution_stays_pending(
    store: PostgresStore, db: sa.Engine
) -> None:
    """Reference 3.7: the fired timer's decide re-schedules the same key; the upsert
    updates this very row, so marking it processed is a no-op (heartbeat)."""
    app = make_app(store)
    app.service.execute(Beat(id="hb"))
    [timer_id] = [r.id for r in rows(db, "SELECT id FROM ironflow.timers")]
    execute(db, "UPDATE ironflow.timers SET fire_at = now()")
    [row] = claim(app, kind="timer")
    assert run_t(app, row)["status"] == "processed"
    [after] = rows(db, "SELECT *, fire_at - now() AS due_in FROM ironflow.timers")
    assert after.id == timer_id and after.key == "hb"
    assert after.processed_at is None and after.locked_by is None and after.attempts == 0
    assert after.due_in.total_seconds() > 50
    assert app.events("heartbeat", "hb") == ["Beaten", "Beaten"]
    app.stop()


def test_timer_with_corrupt_input_dead_letters(store: PostgresStore, db: sa.Engine) -> None:
    app = make_app(store)
    timer_id = insert_timer(db, T, "tbad", {"type": "Nope", "id": "tbad"})
    results = run_until_final(app, "timer")
    assert [r["status"] for r in results] == ["failed-will-retry"] * (MAX - 1) + ["dead-lettered"]
    dl = row_of(db, "timers", timer_id)
    assert dl.attempts == MAX and dl.processed_at is None and dl.dead_lettered_at is not None
    assert dl.last_error.startswith("Failed to execute timer input: ")
    assert "unknown variant 'Nope'" in dl.last_error
    assert app.events(T, "tbad") == []
    app.stop()


# -- invariant 8: bad input --------------------------------------------------------------------


def test_effect_payload_that_no_longer_validates_dead_letters(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = make_app(store)
    effect_id = insert_effect(db, T, "nope", {"type": "Nope"})
    results = run_until_final(app)
    assert results[-1]["status"] == "dead-lettered" and len(results) == MAX
    dl = row_of(db, "outbox", effect_id)
    assert dl.attempts == MAX and dl.dead_lettered_at is not None
    assert "unknown variant 'Nope'" in dl.last_error
    assert "invalid effect for workflow type 'test_workflow'" in dl.last_error
    assert CALLS.calls == []  # the handler never saw it
    app.stop()


def test_handler_returning_a_wrong_input_fails_clearly(store: PostgresStore, db: sa.Engine) -> None:
    def wrong(effect: Any, ctx: EffectContext) -> Any:
        if ctx.workflow.workflow_id == "other-workflow":
            return TimerStart(id="x", timeout_secs=1)  # an input of timer_test
        return "done"

    app = make_app(store, wrong)
    start(app, "other-workflow", "RouteResult")
    start(app, "not-a-message", "RouteResult")
    for row in claim(app):
        assert run(app, row)["status"] == "failed-will-retry"
    other, text = outbox(db, "other-workflow")[0], outbox(db, "not-a-message")[0]
    assert other.attempts == 1 and other.processed_at is None
    assert "the effect handler returned TimerStart, which is not one of" in other.last_error
    assert "InvalidPayload" in other.last_error
    assert text.attempts == 1
    assert "the effect handler returned str; return an input or None" in text.last_error
    assert app.events(TimerTestWorkflow.type, "x") == []
    app.stop()


def test_unregistered_workflow_type_row_is_untouched_and_relay_keeps_running(
    store: PostgresStore, db: sa.Engine
) -> None:
    ghost = insert_effect(db, "not_registered", "g", {"type": "Anything"})
    ghost_timer = insert_timer(db, "not_registered", "g", {"type": "Anything"})
    with running_app(store, workflows=WORKFLOWS) as app:
        app.service.execute(Ping(id="p1"))
        start(app, "after-ghost", "RouteResult")
        app.wait_for_events(T, "after-ghost", ["Started", "Completed"])
        insert_timer(db, T, "timer-after-ghost", Ping(id="timer-after-ghost").to_json())
        app.wait_for_events(T, "timer-after-ghost", ["Pinged"])
    for table, row_id in (("outbox", ghost), ("timers", ghost_timer)):
        row = row_of(db, table, row_id)
        assert row.locked_by is None and row.locked_until is None and row.attempts == 0
        assert row.processed_at is None and row.last_error is None


def test_timer_task_is_stale_skipped_when_the_lease_moved(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = make_app(store)
    insert_timer(db, T, "ts", CompleteInput(id="ts", result="r").to_json())
    [first] = claim(app, "a#1", "timer")
    execute(db, "UPDATE ironflow.timers SET locked_until = now() - interval '1 second'")
    [second] = claim(app, "b#1", "timer")
    assert run_t(app, first)["status"] == "stale-skipped"
    assert app.events(T, "ts") == []
    assert run_t(app, second)["status"] == "processed"
    assert app.events(T, "ts") == ["Completed"]
    _ = timer_test_handler  # fixtures module keeps both handlers registered
    app.stop()


# -- runs that never finish: a handler that kills its worker ------------------------------------


class WorkerDied(BaseException):
    """Stands for the process dying mid-handler: nothing after it runs, no outcome recorded."""


def expire_leases(db: sa.Engine, table: str = "outbox") -> None:
    execute(db, f"UPDATE ironflow.{table} SET locked_until = now() - interval '1 second'")


def test_a_run_that_never_finished_counts_as_a_failed_attempt(
    store: PostgresStore, db: sa.Engine
) -> None:
    calls: list[int] = []

    def dies_once(effect: Any, ctx: EffectContext) -> Any:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            raise WorkerDied()
        return test_handler(effect, ctx)

    app = make_app(store, handler=dies_once)
    start(app, "dies-once", "FireAndForget")
    [row] = claim(app, "relay#1")
    with pytest.raises(WorkerDied):
        run(app, row)
    assert row_of(db, "outbox", row.id).run_started_at is not None  # no outcome recorded
    expire_leases(db)

    [again] = claim(app, "relay#2")
    result = run(app, again)

    assert result["status"] == "processed"
    assert calls == [1, 2]  # the lost run counted: the second run is attempt 2
    after = row_of(db, "outbox", row.id)
    assert after.processed_at is not None and after.run_started_at is None
    assert after.attempts == 1
    assert after.last_error.startswith("WorkerLost: the previous attempt never recorded")


def test_a_poison_pill_that_kills_its_worker_ends_as_a_dead_letter(
    store: PostgresStore, db: sa.Engine
) -> None:
    """ironflow re-runs such an effect forever; here it runs max_attempts times, then is
    dead-lettered without running again, and the workflow's on_dead_letter input is
    delivered in the same transaction."""
    calls: list[int] = []

    def poison(effect: Any, ctx: EffectContext) -> Any:
        calls.append(ctx.attempt)
        raise WorkerDied()

    workflows = [(w, poison if w is JobWorkflow else h) for w, h in WORKFLOWS]
    app = TestApp(store, workflows=workflows, config=test_config())
    app.service.execute(JobStart(id="poison"))
    for n in range(1, MAX + 1):
        [row] = claim(app, f"relay#{n}")
        with pytest.raises(WorkerDied):
            run(app, row)
        expire_leases(db)

    [last] = claim(app, "relay#last")
    result = run(app, last)

    assert calls == [1, 2, 3]  # MAX runs, and not one more
    assert result["status"] == "dead-lettered"
    assert result["error"].startswith("WorkerLost")
    dead = row_of(db, "outbox", last.id)
    assert dead.dead_lettered_at is not None and dead.run_started_at is None
    assert dead.attempts == MAX and dead.locked_by is None
    assert dead.discard_reason == "handled by on_dead_letter: GaveUp accepted"
    events = [e.payload for e in app.store.fetch_workflow_events("dl_job", "poison")]
    assert events[-1]["type"] == "Failed" and events[-1]["error"].startswith("WorkerLost")


def test_a_timer_whose_runs_never_finish_is_dead_lettered_and_retry_resets_it(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = make_app(store)
    timer_id = insert_timer(
        db,
        T,
        "timer-poison",
        {"type": "Start", "id": "timer-poison", "mode": {"mode": "FireAndForget"}},
    )
    for n in range(1, MAX + 1):
        [row] = claim(app, f"relay#{n}", "timer")
        # the start guard ran and then the worker died before recording anything
        started = app.store.start("timer", row.id, row.token, f"run-{n}", lease_seconds=60)
        assert started is not None and started.attempts == n - 1
        expire_leases(db, "timers")

    [last] = claim(app, "relay#last", "timer")
    result = run_t(app, last)

    assert result["status"] == "dead-lettered"
    dead = row_of(db, "timers", timer_id)
    assert dead.dead_lettered_at is not None and dead.attempts == MAX
    assert dead.last_error.startswith("WorkerLost")
    assert app.store.fetch_workflow_events(T, "timer-poison") == []  # its input never ran

    assert app.runtime.retry_timer_dead_letter(timer_id)
    retried = row_of(db, "timers", timer_id)
    assert (retried.attempts, retried.run_started_at, retried.dead_lettered_at) == (0, None, None)
    [row] = claim(app, "relay#retry", "timer")
    assert run_t(app, row)["status"] == "processed"
