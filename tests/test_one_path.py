"""One execution path for effects and timers, one row or a group (issue 21), on real
PostgreSQL: which rows travel together (`relay.message_groups`), and per-row outcomes in
both delivery modes — a group of rows in one message (the default) and one row per
message (``effect_batch_size = 1``): duplicate delivery, a poison pill that kills its
worker, one worker log line per row, each row's result under its own id in the result
backend, and a slow handler that does not hold the acknowledgements of fast ones.

Messages are delivered by calling the task's body (`tasks.run_rows`) as a worker would,
with the rows a relay claimed, grouped as the relay groups them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import TestApp, execute, rows, test_config, wait_until

from ironflow_celery.engine.relay import message_groups
from ironflow_celery.engine.tasks import GROUP_ACK_DELAY, Delivery, run_rows
from ironflow_celery.model.workflow import EffectContext
from ironflow_celery.storage.kinds import EFFECT, TIMER
from ironflow_celery.storage.store import ClaimedRow, PostgresStore
from tests.e2e_apps.batch_app import CALLS, BatchWorkflow, Go, Job, handle_job

# dev.py's broker (db 6) on a bare machine; the local Redis otherwise (tests/conftest.py)
RESULT_BACKEND = os.environ.get("IRONFLOW_TEST_RESULT_BACKEND", "redis://127.0.0.1:6379/6")

WT = BatchWorkflow.type
MODES = pytest.mark.parametrize("size", [1, 20], ids=["single-row", "grouped"])


class WorkerDied(BaseException):
    """Stands for a worker killed mid-handler (nothing after it runs in that process)."""


def poison_or_job(effect: Job, ctx: EffectContext) -> Any:
    if effect.mode == "poison":
        CALLS.record(ctx.workflow.workflow_id, effect.index)
        raise WorkerDied()
    return handle_job(effect, ctx)


def make_app(store: PostgresStore, size: int, handler: Any = handle_job, **config: Any) -> TestApp:
    return TestApp(
        store,
        workflows=((BatchWorkflow, handler),),
        config=test_config(effect_batch_size=size, **config),
    )


def claim(app: TestApp) -> list[ClaimedRow]:
    return app.store.claim(
        "effect",
        f"relay#{uuid.uuid4().hex[:6]}",
        [WT],
        lease_seconds=60,
        max_attempts=app.runtime.attempt_limits,
        limit=50,
    )


def deliveries(group: list[ClaimedRow]) -> list[Delivery]:
    return [
        Delivery(
            str(r.id),
            f"{r.workflow_type}:{r.workflow_id}",
            r.attempts + 1,
            r.token,
            r.effect_type,
            r.due_at.timestamp() if r.due_at else None,
            r.trace_context,
        )
        for r in group
    ]


def messages(app: TestApp, claimed: list[ClaimedRow]) -> list[list[ClaimedRow]]:
    return message_groups(EFFECT, claimed, app.runtime.effect_batch_sizes)


def outbox(db: sa.Engine, wid: str) -> list[Any]:
    return rows(
        db,
        "SELECT id, processed_at, dead_lettered_at, attempts, last_error FROM ironflow.outbox"
        " WHERE workflow_id = :wid ORDER BY (payload->>'index')::int",
        wid=wid,
    )


def _row(wt: str, attempts: int = 0, lost: bool = False) -> ClaimedRow:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    due = created + timedelta(seconds=30) if lost else created
    return ClaimedRow(uuid.uuid4(), wt, "w", attempts, created, "t#1", due_at=due)


def test_fresh_rows_of_one_type_claimed_together_travel_in_one_message() -> None:
    a1, a2, b1, a3, retry, lost = (
        _row("a"), _row("a"), _row("b"), _row("a"), _row("a", attempts=1), _row("a", lost=True)
    )  # fmt: skip
    claimed = [a1, a2, b1, a3, retry, lost]
    assert message_groups(EFFECT, claimed, {"a": 2, "b": 5}) == [
        [a1, a2], [b1], [a3], [retry], [lost]
    ]  # fmt: skip
    # grouping off (1), a type without a size, and timers: one row per message
    assert message_groups(EFFECT, claimed, {"a": 1}) == [[r] for r in claimed]
    assert message_groups(TIMER, claimed, {"a": 20, "b": 20}) == [[r] for r in claimed]
    # a lone row still travels alone
    assert message_groups(EFFECT, [a1], {"a": 20}) == [[a1]]


def test_a_types_rows_fill_few_messages_evenly() -> None:
    """Messages are filled to the size, evenly (30 over size 20: 15 + 15), in claim order;
    rows that travel alone do not count in their type's share."""
    a = [_row("a") for _ in range(30)]
    assert [len(m) for m in message_groups(EFFECT, a, {"a": 20})] == [15, 15]
    assert [len(m) for m in message_groups(EFFECT, a[:20], {"a": 20})] == [20]
    assert [len(m) for m in message_groups(EFFECT, a[:21], {"a": 20})] == [11, 10]
    assert [r for m in message_groups(EFFECT, a, {"a": 20}) for r in m] == a
    mixed = [a[0], _row("a", attempts=1), a[1], _row("b"), a[2], a[3], a[4]]
    assert [len(m) for m in message_groups(EFFECT, mixed, {"a": 3})] == [3, 1, 1, 2]


def test_the_default_groups_and_one_turns_it_off(store: PostgresStore) -> None:
    app = TestApp(store, workflows=((BatchWorkflow, handle_job),), config=test_config())
    assert app.runtime.effect_batch_sizes == {WT: 200}
    app.stop()
    app = make_app(store, 1)
    assert app.runtime.effect_batch_sizes == {WT: 1}
    app.stop()
    # a concurrency-limited type's leased rows are meant to run at once: one per message
    limited = type(
        "LimitedBatch", (BatchWorkflow,), {"type": "limited_batch", "concurrency_limit": 2}
    )
    app = TestApp(store, workflows=((limited, handle_job),), config=test_config())
    assert app.runtime.effect_batch_sizes == {"limited_batch": 1}
    app.stop()


@MODES
def test_duplicate_delivery_runs_each_handler_once(
    store: PostgresStore, db: sa.Engine, size: int
) -> None:
    app = make_app(store, size)
    app.service.execute(Go(id=f"dup{size}", jobs=["ok", "follow", "ok"]))
    sent = messages(app, claim(app))
    assert len(sent) == (1 if size > 1 else 3)
    results: list[dict] = []
    lock = threading.Lock()

    def deliver(group: list[ClaimedRow], barrier: threading.Barrier) -> None:
        barrier.wait()
        got = run_rows(app.runtime, EFFECT, deliveries(group))
        with lock:
            results.extend(got)

    threads = []
    for group in sent:
        barrier = threading.Barrier(2, timeout=30)
        threads += [threading.Thread(target=deliver, args=(group, barrier)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    by_row: dict[str, list[str]] = {}
    for r in results:
        by_row.setdefault(r["row_id"], []).append(r["status"])
    assert len(by_row) == 3
    assert all(sorted(s) == ["processed", "stale-skipped"] for s in by_row.values()), by_row
    assert [CALLS.counts[(f"dup{size}", i)] for i in range(3)] == [1, 1, 1]
    assert all(r.processed_at is not None and r.attempts == 0 for r in outbox(db, f"dup{size}"))
    app.stop()


@MODES
def test_a_poison_pill_is_dead_lettered_alone_and_spares_its_group(
    store: PostgresStore, db: sa.Engine, size: int
) -> None:
    """A handler that kills its worker: the rows that shared its message come back (their
    run was lost) and travel alone from then on, so the poison pill is dead-lettered after
    max_attempts and the others are processed — never dead-lettered with it."""
    app = make_app(store, size, poison_or_job)
    app.service.execute(Go(id=f"pp{size}", jobs=["ok", "poison", "ok"]))
    for _ in range(10):
        claimed = claim(app)
        if not claimed:
            break
        for group in messages(app, claimed):
            # the worker dies: nothing more of its message runs
            with contextlib.suppress(WorkerDied):
                run_rows(app.runtime, EFFECT, deliveries(group))
        # the dead worker's leases run out
        execute(
            db,
            "UPDATE ironflow.outbox SET locked_until = now() - interval '1 second'"
            " WHERE processed_at IS NULL AND dead_lettered_at IS NULL",
        )
    ok0, poison, ok2 = outbox(db, f"pp{size}")
    assert poison.dead_lettered_at is not None and poison.attempts == 3
    assert poison.last_error.startswith("WorkerLost")
    assert CALLS.counts[(f"pp{size}", 1)] == 3  # max_attempts runs, not one more
    for ok, index in ((ok0, 0), (ok2, 2)):
        assert ok.processed_at is not None and ok.dead_lettered_at is None, ok
        assert ok.attempts <= 1 and CALLS.counts[(f"pp{size}", index)] <= 2
    if size == 1:  # alone, the poison pill never touched them
        assert (ok0.attempts, ok2.attempts) == (0, 0)
    app.stop()


@MODES
def test_every_row_has_one_log_line_in_the_documented_format(
    store: PostgresStore, db: sa.Engine, caplog: pytest.LogCaptureFixture, size: int
) -> None:
    app = make_app(store, size)
    app.service.execute(Go(id=f"log{size}", jobs=["ok", "fail", "perm", "follow", "ok"]))
    claimed = claim(app)
    stale = claimed[4]
    execute(db, "UPDATE ironflow.outbox SET locked_by = 'other#9' WHERE id = :id", id=stale.id)
    with caplog.at_level(logging.INFO, logger="ironflow_celery.tasks"):
        for group in messages(app, claimed):
            run_rows(app.runtime, EFFECT, deliveries(group))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("ironflow_celery.tasks")]
    expected = {
        0: "attempt 1 processed",
        1: "attempt 1 failed; the outbox retries it in",
        2: "attempt 1 dead-lettered after 1 attempt(s): PermanentEffectError",
        3: "attempt 1 processed",
        4: "attempt 1 stale-skipped: the row was re-claimed under another lease (other#9)",
    }
    for index, row in enumerate(outbox(db, f"log{size}")):
        mine = [line for line in lines if str(row.id) in line]
        assert len(mine) == 1, (index, mine)
        assert mine[0].startswith(f"ironflow effect {row.id} of {WT}:log{size} (Job) "), mine
        assert expected[index] in mine[0], (index, mine)
    app.stop()


@MODES
def test_each_row_has_its_result_under_its_own_id(
    store: PostgresStore, db: sa.Engine, size: int
) -> None:
    """With a result backend, ``AsyncResult(row_id)`` shows each row's outcome, whether it
    travelled alone (Celery stores it: the task id is the row id) or in a group (the group
    task stores one result per row)."""
    app = make_app(store, size)
    app.app.conf.update(result_backend=RESULT_BACKEND, task_ignore_result=False)
    app.service.execute(Go(id=f"res{size}", jobs=["ok", "perm", "follow"]))
    app.start()
    ok, perm, follow = outbox(db, f"res{size}")

    def states() -> list[str]:
        return [app.app.AsyncResult(str(r.id)).state for r in (ok, perm, follow)]

    wait_until(lambda: states() == ["SUCCESS", "FAILURE", "SUCCESS"], what=f"results {states()}")
    assert app.app.AsyncResult(str(ok.id)).result["status"] == "processed"
    assert app.app.AsyncResult(str(follow.id)).result["follow_up"] == "Finish"
    for r in (ok, perm, follow):
        app.app.AsyncResult(str(r.id)).forget()
    app.stop()


def test_a_slow_handler_does_not_hold_the_acknowledgement_of_a_fast_one(
    store: PostgresStore, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 0 returns at once, job 1 runs 8 s in the same group: job 0 is committed while
    job 1 still runs (the lease keeper's thread flushes pending acknowledgements after
    GROUP_ACK_DELAY), not when the group ends."""
    monkeypatch.setenv("BATCH_TEST_SLEEP", "8")
    app = make_app(store, 20)
    app.service.execute(Go(id="slow", jobs=["ok", "sleep", "ok"]))
    [group] = messages(app, claim(app))
    runner = threading.Thread(target=run_rows, args=(app.runtime, EFFECT, deliveries(group)))
    t0 = time.monotonic()
    runner.start()
    wait_until(lambda: outbox(db, "slow")[0].processed_at is not None, what="job 0's ack")
    waited = time.monotonic() - t0
    assert runner.is_alive(), "job 0 was acknowledged only with the group"
    assert outbox(db, "slow")[1].processed_at is None
    runner.join(60)
    first, slow, last = outbox(db, "slow")
    assert slow.processed_at is not None and last.processed_at is not None
    assert (slow.processed_at - first.processed_at).total_seconds() > 4
    assert waited < 8, f"{waited:.1f}s (bound: {GROUP_ACK_DELAY * 1.5:.1f}s plus one commit)"
    app.stop()
