"""Groups of effects (the default, ``effect_batch_size``; `tasks.run_rows` with the
grouped completer) on real PostgreSQL and a real Celery worker (in-thread, Redis): one
start-guard statement and one durable acknowledgement per group, failures recorded per
row as the single-row task does, stale rows skipped per row, every row's lease kept alive
while the group runs. The per-row tests run in both delivery modes (``size`` 1: one row
per message).

A worker killed mid-batch is in tests/test_e2e_batches.py (it needs a real process).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import TestApp, rows, scalar, test_config

from ironflow_celery import RetryPolicy
from ironflow_celery.engine.relay import celery_publisher, message_groups
from ironflow_celery.errors import InvalidWorkflowDefinition
from ironflow_celery.model.workflow import Workflow
from ironflow_celery.storage.kinds import EFFECT
from ironflow_celery.storage.store import PostgresStore
from tests.e2e_apps.batch_app import CALLS, BatchWorkflow, Go, handle_job

WT = BatchWorkflow.type
WORKFLOWS = ((BatchWorkflow, handle_job),)


def effects_of(db: sa.Engine, wid: str) -> list[Any]:
    return rows(
        db,
        "SELECT id, payload, processed_at, dead_lettered_at, attempts, last_error, locked_by,"
        " run_started_at FROM ironflow.outbox WHERE workflow_id = :wid"
        " ORDER BY (payload->>'index')::int",
        wid=wid,
    )


class AckCounter:
    """Counts the store's acknowledgement calls (single-row and grouped)."""

    def __init__(self, store: PostgresStore) -> None:
        self.lock = threading.Lock()
        self.calls: list[str] = []
        for name in ("record_processed", "mark_many_processed", "mark_many_processed_in"):
            original = getattr(store, name)
            setattr(store, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.calls.append(name)
            return original(*args, **kwargs)

        return wrapped


@contextmanager
def batch_app(store: PostgresStore, **config: Any) -> Iterator[TestApp]:
    app = TestApp(store, workflows=WORKFLOWS, config=test_config(**config))
    try:
        yield app
    finally:
        app.stop()


def test_batch_size_must_be_a_positive_int() -> None:
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(InvalidWorkflowDefinition, match="effect_batch_size"):
            type(
                "Bad",
                (BatchWorkflow,),
                {"type": f"bad_{uuid.uuid4().hex[:6]}", "effect_batch_size": bad},
            )
    assert Workflow.effect_batch_size is None


def test_a_batch_of_noops_is_started_and_acknowledged_once(store: PostgresStore, db) -> None:
    with batch_app(store) as app:
        counter = AckCounter(store)
        # Decided before the relays start: one claim takes all eight, one message carries them.
        app.service.execute(Go(id="b1", jobs=["ok"] * 8))
        assert app.runtime.effect_batch_sizes == {WT: 200}  # the default
        app.start()
        app.wait_until(lambda: all(r.processed_at for r in effects_of(db, "b1")), what="8 acks")
        effects = effects_of(db, "b1")
        # One durable statement acknowledged all eight: they share its transaction's now().
        assert len({r.processed_at for r in effects}) == 1
        assert counter.calls == ["mark_many_processed"]
        assert all(r.attempts == 0 and r.locked_by is None for r in effects)
        assert all(CALLS.counts[("b1", i)] == 1 for i in range(8))


def test_follow_ups_go_through_the_service_in_the_group_transaction(
    store: PostgresStore, db
) -> None:
    with batch_app(store) as app:
        counter = AckCounter(store)
        app.service.execute(Go(id="b2", jobs=["follow", "ok", "follow", "follow"]))
        app.start()
        app.wait_for_events(WT, "b2", ["Went", "Finished", "Finished", "Finished"])
        effects = effects_of(db, "b2")
        assert len({r.processed_at for r in effects}) == 1
        assert counter.calls == ["mark_many_processed_in"]
        state = app.service.fetch_latest_state(BatchWorkflow, "b2")
        assert sorted(state.finished) == [0, 2, 3]


MODES = pytest.mark.parametrize("size", [1, 10], ids=["single-row", "grouped"])


@MODES
def test_a_failing_handler_leaves_the_others_acknowledged(
    store: PostgresStore, db, size: int
) -> None:
    retry = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)
    b3 = f"b3-{size}"
    with batch_app(store, retry_policy=retry, effect_batch_size=size) as app:
        app.service.execute(Go(id=b3, jobs=["ok", "fail", "flaky", "perm", "follow"]))
        app.start()

        def settled() -> bool:
            return all(r.processed_at or r.dead_lettered_at for r in effects_of(db, b3))

        app.wait_until(settled, what="every row acknowledged or dead-lettered")
        ok, fail, flaky, perm, follow = effects_of(db, b3)
        assert ok.processed_at is not None and follow.processed_at is not None
        if size > 1:  # the first group acknowledged ok and follow together
            assert ok.processed_at == follow.processed_at
        assert ok.attempts == 0 and follow.attempts == 0
        # A failing row: retried per policy, then a dead letter with its error.
        assert fail.dead_lettered_at is not None and fail.processed_at is None
        assert fail.attempts == 3 and "RuntimeError: job 1 fails" in fail.last_error
        assert CALLS.counts[(b3, 1)] == 3
        # Failed once, then acknowledged by a later group.
        assert flaky.processed_at is not None and flaky.attempts == 1
        assert "fails once" in flaky.last_error
        assert CALLS.counts[(b3, 2)] == 2
        # Permanent: a dead letter at once.
        assert perm.dead_lettered_at is not None and CALLS.counts[(b3, 3)] == 1
        app.wait_for_events(WT, b3, ["Went", "Finished"])


@MODES
def test_a_stale_row_in_a_batch_is_skipped(store: PostgresStore, db, size: int) -> None:
    b4 = f"b4-{size}"
    with batch_app(store) as app:
        app.service.execute(Go(id=b4, jobs=["ok", "ok", "ok"]))
        claimed = store.claim(
            "effect",
            "test-claim#1",
            [WT],
            lease_seconds=60,
            max_attempts=app.runtime.attempt_limits,
            limit=10,
        )
        assert len(claimed) == 3
        stale = claimed[1]
        # Another relay re-claimed this one meanwhile: its claim token is no longer ours.
        with db.begin() as conn:
            conn.execute(
                sa.text("UPDATE ironflow.outbox SET locked_by = 'other#9' WHERE id = :id"),
                {"id": stale.id},
            )
        publish = celery_publisher(app.app)
        app.start(relays=False)
        messages = message_groups(EFFECT, claimed, {WT: size})
        assert publish("effect", messages) == [r.id for r in claimed]
        app.wait_until(
            lambda: (
                scalar(
                    db,
                    "SELECT count(*) FROM ironflow.outbox WHERE workflow_id = :wid"
                    " AND processed_at IS NOT NULL",
                    wid=b4,
                )
                == 2
            ),
            what="the two held rows acknowledged",
        )
        by_id = {r.id: r for r in effects_of(db, b4)}
        skipped = by_id[stale.id]
        assert skipped.processed_at is None and skipped.locked_by == "other#9"
        assert skipped.attempts == 0 and skipped.run_started_at is None
        assert CALLS.counts[(b4, 1)] == 0


def test_every_row_of_a_batch_keeps_its_lease_while_the_group_runs(
    store: PostgresStore, db, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first handler outlives the 1 s lease twice over; the rows after it wait for it.
    # Without renewal of every started row the relay would claim them again and run them
    # a second time (and the first group's acknowledgement would find them stale).
    monkeypatch.setenv("BATCH_TEST_SLEEP", "2.5")
    with batch_app(store, effect_lock_duration=1.0) as app:
        app.service.execute(Go(id="b5", jobs=["sleep", "ok", "ok", "follow"]))
        app.start()
        app.wait_until(lambda: all(r.processed_at for r in effects_of(db, "b5")), what="acks")
        effects = effects_of(db, "b5")
        assert len({r.processed_at for r in effects}) == 1
        assert all(r.attempts == 0 for r in effects)
        assert [CALLS.counts[("b5", i)] for i in range(4)] == [1, 1, 1, 1]
