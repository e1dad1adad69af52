"""Evidence for a double run (issue 22 §6): every effect and timer row keeps its last
attempts (migration 0011, ``celery_attempts``) -- who ran each, when, how it ended, with
what error -- and ``effects show`` / ``timers show`` print them; the lease keeper warns
when a renewal comes back "not held". Real PostgreSQL, and a real Celery worker for the
end-to-end cases (a worker killed mid-handler: tests/test_e2e_workers.py)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from runtime_helpers import (
    build_runtime,
    execute,
    insert_effect,
    insert_timer,
    running_app,
    scalar,
    test_config,
    wait_until,
)
from workflows import Mode, Start, TestWorkflow, TimerTestWorkflow, timer_test_handler

from ironflow_celery import RetryPolicy
from ironflow_celery import inspection as ins
from ironflow_celery.cli import main
from ironflow_celery.engine.tasks import LeaseKeeper
from ironflow_celery.model.messages import Message
from ironflow_celery.storage import sql
from ironflow_celery.storage.kinds import EFFECT, TIMER
from ironflow_celery.storage.store import LOST_RUN_ERROR, PostgresStore, TimerSpec

T = TestWorkflow.type
TT = TimerTestWorkflow.type
FIRE_AND_FORGET = {"type": "Process", "mode": {"mode": "FireAndForget"}}


def history(db: sa.Engine, row_id: uuid.UUID, table: str = "ironflow.outbox") -> list[dict]:
    return scalar(db, f"SELECT celery_attempts FROM {table} WHERE id = :id", id=row_id)


def flaky(effect: Message, ctx: Any) -> None:
    """Fails on its first two attempts, succeeds on the third."""
    if ctx.attempt <= 2:
        raise RuntimeError(f"flaky attempt {ctx.attempt}")


def show_json(app: Any, kind: str, row_id: uuid.UUID) -> dict[str, Any]:
    result = CliRunner().invoke(
        main, [f"{kind}s", "show", str(row_id), "--json"], obj=SimpleNamespace(app=app)
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# -- end to end: a worker, the CLI ---------------------------------------------------------


def test_a_row_that_fails_twice_then_succeeds_shows_three_attempts(
    store: PostgresStore, db: sa.Engine
) -> None:
    config = test_config(retry_policy=RetryPolicy(max_attempts=5, base_delay=0.05, max_delay=0.2))
    with running_app(store, config=config, workflows=[(TestWorkflow, flaky)]) as app:
        app.service.execute(Start(id="flaky", mode=Mode(mode="FireAndForget")))
        row_id = scalar(db, "SELECT id FROM ironflow.outbox WHERE workflow_id = 'flaky'")
        wait_until(
            lambda: scalar(db, "SELECT processed_at FROM ironflow.outbox WHERE id = :id", id=row_id)
        )
        shown = show_json(app.app, "effect", row_id)
        table = CliRunner().invoke(
            main, ["effects", "show", str(row_id)], obj=SimpleNamespace(app=app.app)
        )
    attempts = shown["attempt_history"]
    assert [a["n"] for a in attempts] == [1, 2, 3]
    assert [a["outcome"] for a in attempts] == ["failed", "failed", "processed"]
    assert [a["error"] for a in attempts] == [
        "RuntimeError: flaky attempt 1",
        "RuntimeError: flaky attempt 2",
        None,
    ]
    for a in attempts:
        # the in-thread test worker's name, this process; a single-row message's Celery
        # task id is its row id (so `celery control revoke <row id>` finds it)
        assert a["worker"] and a["pid"] == os.getpid()
        assert a["task_id"] == str(row_id) and a["started_at"] <= a["finished_at"]
    assert table.exit_code == 0, table.output
    assert "attempts (oldest first)" in table.output
    assert "flaky attempt 2" in table.output and "processed" in table.output
    # `list` leaves it out (as the payload): one row's history is what `show` is for
    [listed] = ins.list_rows(app.runtime, ins.InspectQuery.of("effect", workflow_id="flaky")).items
    assert listed.attempt_history == ()


def test_rows_written_by_ironflow_claim_and_run_with_an_empty_history(
    store: PostgresStore, db: sa.Engine
) -> None:
    """ironflow's INSERTs name none of our columns: the history starts empty, our workers
    claim and run the rows as ever, and their runs are recorded."""
    effect = insert_effect(db, T, "from-ironflow", FIRE_AND_FORGET)
    timer = insert_timer(db, T, "from-ironflow", {"type": "Ping", "id": "from-ironflow"})
    assert history(db, effect) == []
    assert history(db, timer, "ironflow.timers") == []
    workflows = [(TestWorkflow, lambda effect, ctx: None), (TimerTestWorkflow, timer_test_handler)]
    with running_app(store, workflows=workflows):
        for row_id, table in ((effect, "ironflow.outbox"), (timer, "ironflow.timers")):
            wait_until(
                lambda row_id=row_id, table=table: scalar(
                    db, f"SELECT processed_at FROM {table} WHERE id = :id", id=row_id
                ),
                what=f"{table} row processed",
            )
    for row_id, table in ((effect, "ironflow.outbox"), (timer, "ironflow.timers")):
        [entry] = history(db, row_id, table)
        assert entry["outcome"] == "processed" and entry["n"] == 1


# -- the statements, on the store ------------------------------------------------------


def claim_and_start(
    store: PostgresStore, kind: Any, types: list[str], worker: str, *, lease: float = 30.0
) -> Any:
    token = f"relay-{uuid.uuid4().hex[:6]}"
    [claimed] = store.claim(kind, token, types, lease_seconds=lease, max_attempts=50)
    started = store.start(
        kind, claimed.id, token, f"{token}>run", lease_seconds=lease, worker=worker, task_id="t-1"
    )
    assert started is not None
    return started


def expire(db: sa.Engine, row_id: uuid.UUID, table: str = "ironflow.outbox") -> None:
    """The lease runs out (its worker died, or stopped renewing)."""
    execute(
        db,
        f"UPDATE {table} SET locked_until = now() - interval '1 second',"
        " celery_claim_after = NULL WHERE id = :id",
        id=row_id,
    )


def test_a_lost_run_is_closed_by_the_next_start_guard_naming_both_runners(
    store: PostgresStore, db: sa.Engine
) -> None:
    row_id = insert_effect(db, T, "lost", FIRE_AND_FORGET)
    first = claim_and_start(store, EFFECT, [T], "celery@host-a")
    [entry] = history(db, row_id)
    assert entry["worker"] == "celery@host-a" and entry["task"] == "t-1"
    assert "outcome" not in entry and entry["n"] == 1  # open while it runs
    expire(db, row_id)
    second = claim_and_start(store, EFFECT, [T], "celery@host-b")
    assert second.attempts == 1 and first.token != second.token
    assert store.record_processed(EFFECT, row_id, second.token)
    lost, done = history(db, row_id)
    assert (lost["n"], lost["worker"], lost["outcome"]) == (1, "celery@host-a", "lost")
    assert lost["error"] == LOST_RUN_ERROR[: sql.ATTEMPT_ERROR_CHARS]
    assert (done["n"], done["worker"], done["outcome"]) == (2, "celery@host-b", "processed")
    # the first run's late outcome changes nothing (its token no longer holds the row)
    assert not store.record_processed(EFFECT, row_id, first.token)
    assert len(history(db, row_id)) == 2


def test_failure_and_dead_letter_close_the_attempt_with_their_error(
    store: PostgresStore, db: sa.Engine
) -> None:
    row_id = insert_effect(db, T, "dl", FIRE_AND_FORGET)
    run = claim_and_start(store, EFFECT, [T], "w")
    long_error = "E" * 5000
    store.record_failed_attempt(EFFECT, row_id, run.token, long_error, backoff_seconds=0)
    expire(db, row_id)
    run = claim_and_start(store, EFFECT, [T], "w")
    store.record_dead_letter(EFFECT, row_id, run.token, "Boom: no", max_attempts=2)
    failed, dead = history(db, row_id)
    assert failed["outcome"] == "failed" and failed["error"] == "E" * sql.ATTEMPT_ERROR_CHARS
    assert dead["outcome"] == "dead-lettered" and dead["error"] == "Boom: no"
    assert dead["started"] <= dead["finished"]


def test_the_history_keeps_the_last_attempts_only(store: PostgresStore, db: sa.Engine) -> None:
    row_id = insert_effect(db, T, "hot", FIRE_AND_FORGET)
    runs = sql.ATTEMPT_HISTORY_LIMIT + 5
    for n in range(runs):
        run = claim_and_start(store, EFFECT, [T], f"w{n}")
        store.record_failed_attempt(EFFECT, row_id, run.token, f"e{n}", backoff_seconds=0)
        expire(db, row_id)
    kept = history(db, row_id)
    assert len(kept) == sql.ATTEMPT_HISTORY_LIMIT
    assert [e["n"] for e in kept] == list(range(runs - sql.ATTEMPT_HISTORY_LIMIT + 1, runs + 1))
    assert kept[-1]["error"] == f"e{runs - 1}"


def test_a_batch_start_guard_and_its_processed_marks_record_each_row(
    store: PostgresStore, db: sa.Engine
) -> None:
    ids = [insert_effect(db, T, f"b{i}", FIRE_AND_FORGET) for i in range(3)]
    claimed = store.claim(EFFECT, "relay-b", [T], lease_seconds=30, max_attempts=5, limit=3)
    guard = [(c.id, "relay-b", f"relay-b>run{i}") for i, c in enumerate(claimed)]
    started = store.start_effects(guard, lease_seconds=30, worker="celery@batch", task_id="g-1")
    assert set(started) == set(ids)
    store.mark_many_processed([(i, r.token) for i, r in started.items()])
    for row_id in ids:
        [entry] = history(db, row_id)
        assert (entry["worker"], entry["task"], entry["outcome"]) == (
            "celery@batch",
            "g-1",
            "processed",
        )


def test_a_keyed_timer_re_armed_while_it_runs_closes_that_run(
    store: PostgresStore, db: sa.Engine
) -> None:
    timer = insert_timer(db, TT, "rearm", {"type": "Ping", "id": "rearm"}, key="k")
    run = claim_and_start(store, TIMER, [TT], "w")
    with store.begin(TT, "rearm") as uow:
        uow.schedule_timers([TimerSpec(3600, {"type": "Ping", "id": "rearm"}, key="k")])
        uow.commit()
    assert not store.record_processed(TIMER, timer, run.token)  # the re-armed timer stays
    [entry] = history(db, timer, "ironflow.timers")
    assert entry["outcome"] == "re-armed"


def test_a_row_ironflow_ran_itself_keeps_its_history(store: PostgresStore, db: sa.Engine) -> None:
    """ironflow's own claim and processed mark touch none of our columns."""
    row_id = insert_effect(db, T, "rust", FIRE_AND_FORGET)
    execute(
        db,
        "UPDATE ironflow.outbox SET locked_by = 'ironflow-worker',"
        " locked_until = now() + interval '30 seconds' WHERE id = :id",
        id=row_id,
    )
    execute(db, "UPDATE ironflow.outbox SET processed_at = now() WHERE id = :id", id=row_id)
    assert history(db, row_id) == []


# -- the lease keeper ----------------------------------------------------------------------


def test_the_lease_keeper_warns_when_a_renewal_comes_back_not_held(
    store: PostgresStore, db: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    config = test_config(effect_lock_duration=0.6, timer_lock_duration=0.6)
    runtime = build_runtime(store, None, config)
    keeper = LeaseKeeper(runtime)
    row_id = insert_effect(db, T, "stolen", FIRE_AND_FORGET)
    run = claim_and_start(store, EFFECT, [T], "w", lease=0.6)
    caplog.set_level(logging.WARNING, logger="ironflow_celery.tasks")
    with keeper.keep("effect", row_id, run.token):
        time.sleep(0.5)  # renewed at least once: held
        assert "no longer held" not in caplog.text
        # another relay's claim took the row (as after an expired lease), another run holds it
        execute(
            db, "UPDATE ironflow.outbox SET locked_by = 'relay-x#7>other' WHERE id = :id", id=row_id
        )
        wait_until(lambda: "no longer held" in caplog.text, 10, what="the not-held warning")
        time.sleep(1.0)  # warned once: the row is no longer renewed
    [record] = [r for r in caplog.records if "no longer held" in r.getMessage()]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert str(row_id) in message and run.token in message
    assert "now held by relay-x#7>other" in message


def test_the_lease_keeper_does_not_warn_about_a_run_that_recorded_its_outcome(
    store: PostgresStore, db: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A group's row is acknowledged before the group's `keep` blocks end: `done` stops
    its renewals, and a renewal racing its own outcome is not reported."""
    config = test_config(effect_lock_duration=0.6, timer_lock_duration=0.6)
    runtime = build_runtime(store, None, config)
    keeper = LeaseKeeper(runtime)
    row_id = insert_effect(db, T, "acked", FIRE_AND_FORGET)
    run = claim_and_start(store, EFFECT, [T], "w", lease=0.6)
    caplog.set_level(logging.WARNING, logger="ironflow_celery.tasks")
    with keeper.keep("effect", row_id, run.token):
        assert store.record_processed(EFFECT, row_id, run.token)
        keeper.done("effect", row_id)
        time.sleep(1.5)
    assert "no longer held" not in caplog.text
