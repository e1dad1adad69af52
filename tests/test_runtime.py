"""The runtime against ironflow's runtime.rs (reference §7.3, 20 tests) and e2e.rs (§7.4),
adapted to Celery: relays publish to Redis, an in-thread Celery worker runs the handlers.
Plus the builder, `RuntimeConfig` and `RetryPolicy` unit tests (reference §4.1-4.3, §7.5).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import (
    TestApp,
    corrupt_event,
    effect_dead_letters,
    execute,
    insert_effect,
    insert_timer,
    outbox,
    rows,
    running_app,
    scalar,
    test_config,
    timer_dead_letters,
    timers,
    wait_until,
)
from workflows import (
    CALLS,
    Complete,
    EffectlessIncrement,
    EffectlessWorkflow,
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
    ConfigurationError,
    DuplicateWorkflowType,
    EffectContext,
    RetryPolicy,
    RuntimeConfig,
    WorkflowRuntime,
)
from ironflow_celery.storage.store import PostgresStore

T = TestWorkflow.type
TT = TimerTestWorkflow.type
MAX = 3  # the harness's retry_policy.max_attempts


def start(app: TestApp, workflow_id: str, mode: str) -> None:
    app.service.execute(Start(id=workflow_id, mode=Mode(mode=mode)))


# -- 7.3 runtime.rs ----------------------------------------------------------------------


def test_shutdown_completes_promptly(store: PostgresStore) -> None:
    """#1: shutdown right after submitting work finishes well within its timeouts (a third
    of them: it never waits one out; ironflow's 2 s of a 5 s timeout, for a loaded machine).
    """
    with running_app(store, config=test_config(shutdown_timeout=60.0)) as app:
        for i in range(5):
            start(app, f"w{i}", "RouteResult")
        relays = app.stop_relays()
        worker = app.stop_worker()
    assert relays < app.config.shutdown_timeout / 3, f"runtime.run took {relays:.2f}s to return"
    assert worker < app.worker_shutdown_timeout / 3, f"the worker took {worker:.2f}s to stop"
    assert app.relay_result is True


def test_full_effect_cycle(store: PostgresStore, db: sa.Engine) -> None:
    """#2: Start(RouteResult) → [Started, Completed]; the outbox row is processed."""
    with running_app(store) as app:
        start(app, "wf-1", "RouteResult")
        app.wait_for_events(T, "wf-1", ["Started", "Completed"])
        wait_until(lambda: outbox(db, "wf-1")[0].processed_at is not None)
    [row] = outbox(db, "wf-1")
    assert row.payload == {"type": "Process", "mode": {"mode": "RouteResult"}}
    assert row.processed_at is not None and row.attempts == 0
    assert row.locked_by is None and row.locked_until is None
    assert scalar(db, "SELECT count(*) FROM ironflow.outbox WHERE processed_at IS NOT NULL") == 1


def test_effect_with_previous_failure_gets_processed(store: PostgresStore, db: sa.Engine) -> None:
    """#3: a row with attempts=1 and a last_error from an earlier run is processed."""
    app = TestApp(store)
    start(app, "wf-prev", "RouteResult")
    execute(
        db,
        "UPDATE ironflow.outbox SET attempts = 1, last_error = 'previous failure'"
        " WHERE workflow_id = 'wf-prev'",
    )
    with app:
        app.start()
        app.wait_for_events(T, "wf-prev", ["Started", "Completed"])
        wait_until(lambda: outbox(db, "wf-prev")[0].processed_at is not None)
    [row] = outbox(db, "wf-prev")
    assert row.attempts == 1
    assert CALLS.calls and CALLS.calls[0][1] == 2  # ctx.attempt = stored attempts + 1


def test_multiple_workflows_same_type_different_ids(store: PostgresStore) -> None:
    """#4: two instances of one type each complete."""
    with running_app(store) as app:
        start(app, "a", "RouteResult")
        start(app, "b", "RouteResult")
        app.wait_for_events(T, "a", ["Started", "Completed"])
        app.wait_for_events(T, "b", ["Started", "Completed"])


def test_multiple_workflow_types_in_same_runtime(store: PostgresStore, db: sa.Engine) -> None:
    """#5: TestWorkflow and TimerTestWorkflow served by one runtime; the 1 h timer is
    cancelled by the routed result, not fired."""
    with running_app(store) as app:
        start(app, "t1", "RouteResult")
        app.service.execute(TimerStart(id="tt1", timeout_secs=3600, timer_key="timeout"))
        app.wait_for_events(T, "t1", ["Started", "Completed"])
        app.wait_for_events(TT, "tt1", ["Started", "Completed", "TimerCancelled"])
    [timer] = timers(db, "tt1")
    assert timer.processed_at is not None and timer.attempts == 0  # cancelled, not fired


def test_parallel_effect_processing_with_multiple_workers(store: PostgresStore) -> None:
    """#6: three 500 ms handlers run concurrently (max observed concurrency ≥ 2)."""
    lock = threading.Lock()
    running = 0
    peak = 0

    def slow_handler(effect: Any, ctx: EffectContext) -> Any:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.5)
            return test_handler(effect, ctx)
        finally:
            with lock:
                running -= 1

    workflows = [(TestWorkflow, slow_handler), (TimerTestWorkflow, timer_test_handler)]
    # One row per message, as in ironflow: three rows claimed together would otherwise
    # travel as one group, which a process that has not measured the type yet runs
    # whole (up to engine.sharing.UNMEASURED_ROWS rows; tests/test_group_sharing.py covers
    # how groups of slow handlers spread once measured).
    config = test_config(effect_workers=3, effect_batch_size=1)
    with running_app(store, workflows=workflows, config=config) as app:
        for i in range(3):
            start(app, f"p{i}", "RouteResult")
        for i in range(3):
            app.wait_for_events(T, f"p{i}", ["Started", "Completed"])
    assert peak >= 2, f"max observed concurrency was {peak}"


def test_unknown_workflow_type_is_not_claimed(store: PostgresStore, db: sa.Engine) -> None:
    """#7: a row of an unregistered type stays untouched and is not a dead letter."""
    ghost = insert_effect(db, "unknown_type", "x", {"type": "Whatever"})
    with running_app(store) as app:
        start(app, "known", "RouteResult")  # committed after the ghost row: claimed past it
        app.wait_for_events(T, "known", ["Started", "Completed"])
        wait_until(lambda: outbox(db, "known")[0].processed_at is not None)
    [row] = rows(db, "SELECT * FROM ironflow.outbox WHERE id = :id", id=ghost)
    assert row.processed_at is None and row.attempts == 0
    assert row.locked_by is None and row.locked_until is None and row.last_error is None
    assert row.dead_lettered_at is None
    assert effect_dead_letters(db, MAX, workflow_type="unknown_type") == []


def test_timer_worker_processes_due_timer_directly(store: PostgresStore) -> None:
    """#8: a due timer whose input is Start(RouteResult) runs it → [Started, Completed]."""
    with running_app(store) as app:
        insert_timer(
            app.store.engine,
            T,
            "timer-wf",
            {"type": "Start", "id": "timer-wf", "mode": {"mode": "RouteResult"}},
        )
        app.wait_for_events(T, "timer-wf", ["Started", "Completed"])


def test_effect_transient_failure_retries_then_succeeds(
    store: PostgresStore, db: sa.Engine
) -> None:
    """#9: the handler fails on attempt 1 and succeeds on attempt 2."""
    with running_app(store) as app:
        start(app, "tf", "TransientFailure")
        app.wait_for_events(T, "tf", ["Started", "Completed"])
        wait_until(lambda: outbox(db, "tf")[0].processed_at is not None)
    [row] = outbox(db, "tf")
    assert row.attempts == 1
    assert "transient failure on first attempt" in row.last_error
    assert [attempt for _, attempt in CALLS.calls] == [1, 2]


def test_effect_permanent_failure_goes_to_dead_letter(store: PostgresStore, db: sa.Engine) -> None:
    """#10: a handler that always fails is dead-lettered after max_attempts; the instance
    only has [Started]."""
    with running_app(store) as app:
        start(app, "pf", "PermanentFailure")
        [dl] = wait_until(lambda: effect_dead_letters(db, MAX, workflow_id="pf"))
        assert dl.attempts == MAX and "permanent failure" in dl.last_error
        assert dl.dead_lettered_at is not None
        assert app.events(T, "pf") == ["Started"]
    assert len(CALLS.calls) == MAX


def test_effect_routing_failure_retries_effect(store: PostgresStore, db: sa.Engine) -> None:
    """#11: the routed result targets an instance with a corrupt event: the effect is
    retried (the handler runs again), then dead-lettered."""
    app = TestApp(store)
    start(app, "rf", "RouteResult")
    corrupt_event(db, T, "rf")
    with app:
        app.start()
        [dl] = wait_until(lambda: effect_dead_letters(db, MAX, workflow_id="rf"))
    assert dl.last_error.startswith("Failed to route result:")
    assert "sequence 2" in dl.last_error
    assert len(CALLS.calls) == MAX  # retried: the handler ran on every attempt
    assert app.events(T, "rf") == ["Started", "Garbage"]


def test_timer_execution_failure_retries_and_dead_letters(
    store: PostgresStore, db: sa.Engine
) -> None:
    """#12: a timer input for an instance with a corrupt event ends as a timer dead letter."""
    app = TestApp(store)
    app.service.execute(Ping(id="broken"))
    corrupt_event(db, T, "broken")
    with app:
        app.start()
        insert_timer(db, T, "broken", {"type": "Ping", "id": "broken"})
        [dl] = wait_until(lambda: timer_dead_letters(db, MAX, "broken"))
    assert dl.attempts == MAX
    assert dl.last_error.startswith("Failed to execute timer input:")
    assert app.events(T, "broken") == ["Pinged", "Garbage"]


def test_timer_with_corrupted_input_dead_letters(store: PostgresStore, db: sa.Engine) -> None:
    """#13: an undeserialisable timer input ends as a timer dead letter naming the variant."""
    with running_app(store):
        insert_timer(db, T, "bad-input", {"type": "NoSuchInput", "id": "bad-input"})
        [dl] = wait_until(lambda: timer_dead_letters(db, MAX, "bad-input"))
    assert "unknown variant" in dl.last_error and "NoSuchInput" in dl.last_error


def test_timer_key_scoped_to_workflow_instance(store: PostgresStore, db: sa.Engine) -> None:
    """#14: the same key on two instances gives one timer each; cancelling one instance's
    key leaves the other's."""
    app = TestApp(store)  # not started: the timers must stay pending
    try:
        for wid in ("k1", "k2"):
            app.service.execute(TimerStart(id=wid, timeout_secs=3600, timer_key="timeout"))
        pending = rows(
            db,
            "SELECT workflow_id, count(*) AS n FROM ironflow.timers"
            " WHERE key = 'timeout' AND processed_at IS NULL GROUP BY 1 ORDER BY 1",
        )
        assert [(r.workflow_id, r.n) for r in pending] == [("k1", 1), ("k2", 1)]
        app.service.execute(Complete(id="k1", cancel_timer_key="timeout"))
        pending = rows(
            db,
            "SELECT workflow_id FROM ironflow.timers WHERE key = 'timeout'"
            " AND processed_at IS NULL",
        )
        assert [r.workflow_id for r in pending] == ["k2"]
    finally:
        app.stop()


def test_lock_expiration_allows_retry_by_another_worker(
    store: PostgresStore, db: sa.Engine
) -> None:
    """#15: an effect locked by 'crashed-worker' whose lease expired is processed."""
    app = TestApp(store)
    start(app, "crash", "RouteResult")
    execute(
        db,
        "UPDATE ironflow.outbox SET locked_by = 'crashed-worker',"
        " locked_until = now() - interval '1 second' WHERE workflow_id = 'crash'",
    )
    with app:
        app.start()
        app.wait_for_events(T, "crash", ["Started", "Completed"])
        wait_until(lambda: outbox(db, "crash")[0].processed_at is not None)
    assert len(CALLS.calls) == 1


def test_dead_letter_query_filters_by_both_type_and_id(store: PostgresStore, db: sa.Engine) -> None:
    """#16: dead letters by type+id → 1, type only → 3, id only → 1."""
    from ironflow_celery.service import dead_letters

    with running_app(store) as app:
        for wid in ("d1", "d2", "d3"):
            start(app, wid, "PermanentFailure")
        wait_until(lambda: len(effect_dead_letters(db, MAX, workflow_type=T)) == 3)
        query = dead_letters.DeadLetterQuery
        rt = app.runtime
        assert rt.count_dead_letters(query().workflow_type(T).workflow_id("d2")) == 1
        assert rt.count_dead_letters(query().workflow_type(T)) == 3
        assert rt.count_dead_letters(query().workflow_id("d2")) == 1
        assert rt.count_dead_letters(query().workflow_type(TT)) == 0
        [dl] = rt.fetch_dead_letters(query().workflow_type(T).workflow_id("d2"))
        assert "permanent failure" in dl.last_error


def test_effect_with_corrupted_payload_dead_letters(store: PostgresStore, db: sa.Engine) -> None:
    """#17: an effect payload that no longer deserialises is dead-lettered."""
    with running_app(store):
        insert_effect(db, T, "corrupt", {"type": "Process", "mode": "not-a-mode"})
        [dl] = wait_until(lambda: effect_dead_letters(db, MAX, workflow_id="corrupt"))
    assert dl.attempts == MAX
    assert "invalid effect for workflow type 'test_workflow'" in dl.last_error
    assert "mode" in dl.last_error


def test_graceful_shutdown_completes_current_effect(store: PostgresStore) -> None:
    """#18: shutdown while a 200 ms handler runs: the relays stop within shutdown_timeout
    and the in-flight effect's result is still applied."""
    started = threading.Event()

    def slow_handler(effect: Any, ctx: EffectContext) -> Any:
        started.set()
        time.sleep(0.2)
        return test_handler(effect, ctx)

    workflows = [(TestWorkflow, slow_handler), (TimerTestWorkflow, timer_test_handler)]
    config = test_config(shutdown_timeout=60.0)
    with running_app(store, workflows=workflows, config=config) as app:
        start(app, "graceful", "RouteResult")
        assert started.wait(60), "the handler never started"
        took = app.stop_relays()
        assert took < app.config.shutdown_timeout
        assert app.relay_result is True
        app.wait_for_events(T, "graceful", ["Started", "Completed"])
        # the worker's warm shutdown also completes, well within its timeout
        assert app.stop_worker() < app.worker_shutdown_timeout / 3


def test_multiple_workers_no_double_processing(store: PostgresStore) -> None:
    """#19: four relay threads and four handler threads, five effects: each handler runs
    exactly once."""
    with running_app(store, config=test_config(effect_workers=4), concurrency=4) as app:
        for i in range(5):
            start(app, f"m{i}", "FireAndForget")
        wait_until(lambda: len(CALLS.counter) == 5)
        time.sleep(0.3)  # give a duplicate the chance to show up
    assert len(CALLS.calls) == 5
    assert set(CALLS.counter.values()) == {1}


class Panic(BaseException):
    """Not an Exception: like a Rust panic, nothing in the ack path catches it."""


def test_shutdown_completes_when_worker_panics(store: PostgresStore, db: sa.Engine) -> None:
    """#20: a handler that crashes (BaseException) does not take the worker down: the
    row is re-claimed once its lease expires, other effects keep flowing, and shutdown
    completes well within its timeouts (a quarter of them)."""
    panicked = threading.Event()

    def panicking_handler(effect: Any, ctx: EffectContext) -> Any:
        if ctx.workflow.workflow_id == "panic" and not panicked.is_set():
            panicked.set()
            raise Panic("handler panicked")
        return test_handler(effect, ctx)

    workflows = [(TestWorkflow, panicking_handler), (TimerTestWorkflow, timer_test_handler)]
    config = test_config(effect_lock_duration=1.0, shutdown_timeout=60.0)
    with running_app(store, workflows=workflows, config=config, concurrency=2) as app:
        start(app, "panic", "RouteResult")
        assert panicked.wait(60)
        start(app, "after", "RouteResult")  # the worker still serves
        app.wait_for_events(T, "after", ["Started", "Completed"])
        # crash recovery: the lease expires and the effect is run again
        app.wait_for_events(T, "panic", ["Started", "Completed"])
        began = time.monotonic()
        app.stop_relays()
        app.stop_worker()
        assert time.monotonic() - began < app.config.shutdown_timeout / 4
    [row] = outbox(db, "panic")
    assert row.processed_at is not None


# -- 7.4 e2e.rs ----------------------------------------------------------------------------


def test_timer_scheduling_and_cancellation(store: PostgresStore, db: sa.Engine) -> None:
    """e2e #1: a 60 s keyed timer is cancelled by the handler's routed Complete."""
    with running_app(store) as app:
        app.service.execute(TimerStart(id="e2e", timeout_secs=60, timer_key="timeout"))
        app.wait_for_events(TT, "e2e", ["Started", "Completed", "TimerCancelled"])
    pending = scalar(
        db,
        "SELECT count(*) FROM ironflow.timers WHERE key = 'timeout' AND processed_at IS NULL",
    )
    assert pending == 0


# -- builder ---------------------------------------------------------------------------------


def test_builder_creates_runtime(store: PostgresStore) -> None:
    runtime = (
        WorkflowRuntime.builder(store)
        .register(TestWorkflow, test_handler)
        .register(TimerTestWorkflow, timer_test_handler)
        .build_runtime()
    )
    assert runtime.workflow_count == 2
    assert set(runtime.workflow_types) == {T, TT}
    assert isinstance(runtime.worker_id, str) and runtime.worker_id
    assert runtime.config == RuntimeConfig()


def test_builder_with_custom_config(store: PostgresStore) -> None:
    config = RuntimeConfig(
        effect_poll_interval=timedelta(milliseconds=20),
        timer_poll_interval=0.5,
        effect_lock_duration=60,
        shutdown_timeout=2,
        retry_policy=RetryPolicy(max_attempts=7, base_delay=0.5, max_delay=10),
        worker_id="my-worker",
        effect_workers=3,
        timer_workers=0,
    )
    runtime = (
        WorkflowRuntime.builder(store)
        .register(TestWorkflow, test_handler)
        .config(config)
        .build_runtime()
    )
    assert runtime.config is config
    assert runtime.worker_id == "my-worker"
    assert runtime.config.effect_poll_interval == pytest.approx(0.02)
    assert runtime.config.effect_workers == 3 and runtime.config.timer_workers == 1  # max(1, n)
    assert runtime.config.retry_policy.max_attempts == 7


def test_builder_rejects_duplicate_registration(store: PostgresStore) -> None:
    builder = (
        WorkflowRuntime.builder(store)
        .register(TestWorkflow, test_handler)
        .register(TestWorkflow, test_handler)  # reported at build time, like ironflow
    )
    with pytest.raises(DuplicateWorkflowType, match="test_workflow"):
        builder.build_runtime()
    builder = (
        WorkflowRuntime.builder(store)
        .register(EffectlessWorkflow)
        .register_without_effects(EffectlessWorkflow)
    )
    with pytest.raises(DuplicateWorkflowType, match="effectless"):
        builder.build_runtime()


def test_register_without_effects(store: PostgresStore, db: sa.Engine) -> None:
    """A workflow registered without effects is served; an effect it emits anyway is
    processed by a no-op handler (no follow-up input)."""
    runtime = WorkflowRuntime.builder(store).register_without_effects(EffectlessWorkflow)
    runtime = runtime.build_runtime()
    assert runtime.workflow_count == 1
    runtime.service.execute(EffectlessIncrement(id="e"))
    assert [e.payload for e in runtime.service.fetch_workflow_events("effectless", "e")] == [
        {"type": "Incremented", "value": 1}
    ]
    workflows = [(TestWorkflow, None), (TimerTestWorkflow, timer_test_handler)]
    with running_app(store, workflows=workflows) as app:
        start(app, "noop", "RouteResult")
        wait_until(lambda: outbox(db, "noop")[0].processed_at is not None)
        assert app.events(T, "noop") == ["Started"]  # the no-op handler routes nothing


# -- RuntimeConfig / RetryPolicy (reference 4.1, 4.2) ----------------------------------------


def test_runtime_config_defaults_match_ironflow() -> None:
    c = RuntimeConfig()
    # The one difference on purpose: ironflow polls every 0.1 s / 1 s; these relays wake
    # on NOTIFY and at the next due time, and poll only as a safety net (issue 20).
    assert c.effect_poll_interval == 5.0
    assert c.timer_poll_interval == 5.0
    assert c.effect_lock_duration == 300.0
    assert c.timer_lock_duration == 300.0
    assert c.shutdown_timeout == 30.0
    assert c.retry_policy == RetryPolicy()
    assert c.worker_id is None
    assert c.effect_workers == 1 and c.timer_workers == 1


def test_retry_policy_defaults_match_ironflow() -> None:
    p = RetryPolicy()
    assert (p.max_attempts, p.base_delay, p.max_delay, p.jitter) == (5, 1.0, 300.0, 0.0)


def test_retry_policy_backoff_sequence_and_cap() -> None:
    p = RetryPolicy()
    assert [p.backoff_duration(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert [p.delay_for_attempt(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert p.backoff_duration(9) == 256.0
    assert p.backoff_duration(10) == 300.0  # capped at max_delay
    assert p.backoff_duration(1000) == 300.0  # saturating, no overflow
    small = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)
    assert [small.backoff_duration(n) for n in (1, 2, 3, 4)] == [0.05, 0.1, 0.2, 0.2]


def test_retry_policy_jitter_bounds() -> None:
    p = RetryPolicy(base_delay=1.0, max_delay=300.0, jitter=0.5)
    for attempt in (1, 2, 3, 12):
        full = RetryPolicy(base_delay=1.0, max_delay=300.0).backoff_duration(attempt)
        samples = [p.backoff_duration(attempt) for _ in range(200)]
        assert all(full * 0.5 <= s <= full for s in samples)
        assert len(set(samples)) > 1  # it does vary
    with pytest.raises(ConfigurationError, match="jitter"):
        RetryPolicy(jitter=1.5)


def test_retry_policy_should_retry() -> None:
    p = RetryPolicy()
    assert [p.should_retry(n) for n in range(1, 7)] == [True, True, True, True, False, False]
    assert RetryPolicy(max_attempts=1).should_retry(1) is False
