"""Per-workflow-type retry policies and concurrency limits (issue 14 §6).

Concurrency limits are checked against PostgreSQL itself: concurrent claim statements in
real threads, and a real worker whose handlers record their runs in the database.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from runtime_helpers import execute, rows, running_app, scalar, test_config, wait_until

from ironflow_celery import (
    Decision,
    EffectContext,
    InvalidWorkflowDefinition,
    Message,
    RetryPolicy,
    Workflow,
)
from ironflow_celery.model.config import AttemptLimits
from ironflow_celery.storage.store import PostgresStore

LEASE = 60.0


class Go(Message):
    id: str
    n: int = 1


class Went(Message):
    n: int


class Work(Message):
    n: int


class Other(Message):
    n: int


class Empty(BaseModel):
    pass


def _decide(now: Any, state: Empty, input: Go) -> Decision:
    decision = Decision.accept(Went(n=input.n))
    for i in range(input.n):
        decision = decision.with_effect(Work(n=i))
    return decision


class LimitedWorkflow(Workflow):
    type = "policy_limited"
    State = Empty
    Input = Go
    Event = Went
    Effect = Work
    concurrency_limit = 2

    evolve = staticmethod(lambda state, event: state)
    decide = staticmethod(_decide)


class StrictWorkflow(Workflow):
    type = "policy_strict"
    State = Empty
    Input = Go
    Event = Went
    Effect = Work
    retry_policy = RetryPolicy(max_attempts=2, base_delay=0.05, max_delay=0.1)

    evolve = staticmethod(lambda state, event: state)
    decide = staticmethod(_decide)


class LenientWorkflow(Workflow):
    type = "policy_lenient"
    State = Empty
    Input = Go
    Event = Went
    Effect = Work | Other
    effect_retry_policies = {"Other": RetryPolicy(max_attempts=7)}

    evolve = staticmethod(lambda state, event: state)
    decide = staticmethod(_decide)


def _insert_effects(db: sa.Engine, workflow_type: str, n: int) -> None:
    execute(
        db,
        "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload)"
        " SELECT :wt, i::text, jsonb_build_object('type', 'Work', 'n', i)"
        " FROM generate_series(1, :n) AS i",
        wt=workflow_type,
        n=n,
    )


def _leased(db: sa.Engine, workflow_type: str) -> int:
    return scalar(
        db,
        "SELECT count(*) FROM ironflow.outbox WHERE workflow_type = :wt"
        " AND processed_at IS NULL AND locked_by IS NOT NULL AND locked_until >= now()",
        wt=workflow_type,
    )


# -- definitions --------------------------------------------------------------------------


def test_bad_policies_are_refused_at_definition() -> None:
    base: dict[str, Any] = {
        "State": Empty,
        "Input": Go,
        "Event": Went,
        "Effect": Work,
        "evolve": staticmethod(lambda s, e: s),
        "decide": staticmethod(_decide),
    }
    for attrs, words in (
        ({"concurrency_limit": 0}, "concurrency_limit must be a positive int"),
        ({"concurrency_limit": "5"}, "concurrency_limit must be a positive int"),
        ({"retry_policy": {"max_attempts": 2}}, "retry_policy must be a RetryPolicy"),
        ({"effect_retry_policies": {"Nope": RetryPolicy()}}, "'Nope', which is not one"),
    ):
        with pytest.raises(InvalidWorkflowDefinition, match=words):
            type("Bad", (Workflow,), {"type": "bad", **base, **attrs})


def test_policy_lookup_per_workflow_and_effect_type(store: PostgresStore) -> None:
    from runtime_helpers import build_runtime

    config = test_config(retry_policy=RetryPolicy(max_attempts=5))
    runtime = build_runtime(
        store,
        None,
        config,
        [(StrictWorkflow, lambda e, c: None), (LenientWorkflow, lambda e, c: None),
         (LimitedWorkflow, lambda e, c: None)],
    )  # fmt: skip
    assert runtime.retry_policy_for("policy_strict", "Work").max_attempts == 2
    assert runtime.retry_policy_for("policy_lenient", "Work").max_attempts == 5
    assert runtime.retry_policy_for("policy_lenient", "Other").max_attempts == 7
    assert runtime.retry_policy_for("unregistered").max_attempts == 5
    # the claim of a type lets through the largest of its effect types' limits
    assert runtime.attempt_limits == AttemptLimits(5, {"policy_strict": 2, "policy_lenient": 7})
    assert runtime.concurrency_limits == {"policy_limited": 2}


# -- concurrency limit: the claim ---------------------------------------------------------


def test_concurrent_claimers_never_exceed_the_limit(store: PostgresStore, db: sa.Engine) -> None:
    """Four claimers in threads, many rounds each, random batch sizes, finishing some of
    their rows between rounds: the type's leased rows never exceed its limit."""
    limit, wt = 3, "policy_limited"
    _insert_effects(db, wt, 400)
    _insert_effects(db, "policy_free", 50)
    peak = {"leased": 0, "claimed": 0}
    failures: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def watch() -> None:  # an outside observer, sampling all the time
        while not stop.is_set():
            seen = _leased(db, wt)
            with lock:
                peak["leased"] = max(peak["leased"], seen)

    def claimer(name: str) -> None:
        try:
            rng = random.Random(name)
            held: list[tuple[uuid.UUID, str]] = []
            for round_ in range(40):
                token = f"{name}#{round_}"
                got = store.claim(
                    "effect",
                    token,
                    [wt],
                    lease_seconds=LEASE,
                    max_attempts=5,
                    limit=rng.randint(1, 5),
                    concurrency_limits={wt: limit},
                )
                seen = _leased(db, wt)
                with lock:
                    peak["leased"] = max(peak["leased"], seen)
                    peak["claimed"] += len(got)
                held += [(row.id, token) for row in got]
                rng.shuffle(held)
                # finish about half of what this claimer holds, so claiming goes on
                k = (len(held) + 1) // 2
                done, held = held[:k], held[k:]
                if done:
                    for row_id, held_by in done:
                        store.record_processed("effect", row_id, held_by)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    observer = threading.Thread(target=watch, daemon=True)
    observer.start()
    threads = [threading.Thread(target=claimer, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    observer.join(30)
    assert not failures, failures
    assert not any(t.is_alive() for t in threads)
    assert peak["leased"] <= limit, peak
    assert peak["claimed"] > 4 * limit, peak  # rows came back and were claimed again
    # the unlimited type beside it was untouched by the limited claims
    assert _leased(db, "policy_free") == 0


def test_limited_and_unlimited_types_in_one_claim(store: PostgresStore, db: sa.Engine) -> None:
    _insert_effects(db, "policy_limited", 10)
    _insert_effects(db, "policy_free", 10)
    types = ["policy_free", "policy_limited"]
    limits = {"policy_limited": 2}
    got = store.claim(
        "effect",
        "a",
        types,
        lease_seconds=LEASE,
        max_attempts=5,
        limit=50,
        concurrency_limits=limits,
    )
    by_type = {t: sum(1 for r in got if r.workflow_type == t) for t in types}
    assert by_type == {"policy_free": 10, "policy_limited": 2}
    again = store.claim(
        "effect",
        "b",
        types,
        lease_seconds=LEASE,
        max_attempts=5,
        limit=50,
        concurrency_limits=limits,
    )
    assert again == []
    # a lease that ran out (a dead relay) no longer counts: its row and one more are claimable
    expired = next(r.id for r in got if r.workflow_type == "policy_limited")
    execute(
        db,
        "UPDATE ironflow.outbox SET locked_until = now() - interval '1 second' WHERE id = :id",
        id=expired,
    )
    third = store.claim(
        "effect",
        "c",
        types,
        lease_seconds=LEASE,
        max_attempts=5,
        limit=50,
        concurrency_limits=limits,
    )
    assert len(third) == 1
    # a row failed into backoff holds no lease either (the one "a" still holds: which row
    # "c" took, the expired one or a fresh one, is up to the claim order)
    row = next(r for r in got if r.workflow_type == "policy_limited" and r.id != expired)
    assert (
        store.record_failed_attempt("effect", row.id, "a", "boom", backoff_seconds=60) is not None
    )
    fourth = store.claim(
        "effect",
        "d",
        types,
        lease_seconds=LEASE,
        max_attempts=5,
        limit=50,
        concurrency_limits=limits,
    )
    assert len(fourth) == 1 and fourth[0].id != row.id


# -- concurrency limit: a real worker -----------------------------------------------------


def test_worker_runs_at_most_limit_effects_at_once(store: PostgresStore, db: sa.Engine) -> None:
    """50 effects with limit 2 through two relays and a 6-thread worker: handlers record
    their runs in PostgreSQL (its clock), and no instant ever has more than 2 running."""
    execute(
        db,
        "CREATE TABLE policy_runs (effect_id uuid PRIMARY KEY,"
        " started timestamptz NOT NULL, finished timestamptz)",
    )

    def handler(effect: Work, ctx: EffectContext) -> None:
        execute(
            db,
            "INSERT INTO policy_runs (effect_id, started) VALUES (:id, clock_timestamp())",
            id=ctx.effect_id,
        )
        time.sleep(0.15)
        execute(
            db,
            "UPDATE policy_runs SET finished = clock_timestamp() WHERE effect_id = :id",
            id=ctx.effect_id,
        )

    # two relay threads claim concurrently, as two relays of one deployment would
    config = test_config(effect_workers=2)
    with running_app(
        store, workflows=[(LimitedWorkflow, handler)], concurrency=6, config=config
    ) as app:
        for i in range(10):
            app.service.execute(Go(id=f"w{i}", n=5))
        wait_until(
            lambda: (
                scalar(
                    db,
                    "SELECT count(*) FROM ironflow.outbox WHERE processed_at IS NOT NULL",
                )
                == 50
            ),
            timeout=180,
            what="50 effects processed",
        )
    runs = rows(db, "SELECT started, finished FROM policy_runs")
    assert len(runs) == 50 and all(r.finished is not None for r in runs)
    overlap = max(
        sum(1 for other in runs if other.started <= r.started < other.finished) for r in runs
    )
    assert overlap <= 2, overlap
    assert overlap == 2, "the limit is 2, not 1: two effects should have run together"


# -- per-type max attempts ----------------------------------------------------------------


def test_per_type_max_attempts_dead_letters_each_at_its_own_limit(
    store: PostgresStore, db: sa.Engine
) -> None:
    """A workflow with max_attempts 2 dead-letters after 2 attempts while another type keeps
    the global 5, through a real worker; the dead-letter and status queries agree."""
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def failing(effect: Work, ctx: EffectContext) -> None:
        with lock:
            calls[ctx.workflow.workflow_type] = calls.get(ctx.workflow.workflow_type, 0) + 1
        raise RuntimeError("always fails")

    config = test_config(retry_policy=RetryPolicy(max_attempts=5, base_delay=0.05, max_delay=0.1))
    workflows = [(StrictWorkflow, failing), (LenientWorkflow, failing)]
    with running_app(store, workflows=workflows, config=config) as app:
        app.service.execute(Go(id="s", n=1), workflow=StrictWorkflow)
        app.service.execute(Go(id="l", n=1), workflow=LenientWorkflow)
        wait_until(
            lambda: (
                scalar(
                    db, "SELECT count(*) FROM ironflow.outbox WHERE dead_lettered_at IS NOT NULL"
                )
                == 2
            ),
            timeout=120,
            what="both effects dead-lettered",
        )
        runtime = app.runtime
    attempts = {
        r.workflow_type: r.attempts
        for r in rows(db, "SELECT workflow_type, attempts FROM ironflow.outbox")
    }
    assert attempts == {"policy_strict": 2, "policy_lenient": 5}
    assert calls == {"policy_strict": 2, "policy_lenient": 5}
    assert runtime.count_dead_letters() == 2

    # A row counted to its type's max without being marked (ironflow's kind of dead letter,
    # or a max lowered later): dead for the strict type only, and only the lenient one is
    # claimed again.
    execute(
        db,
        "UPDATE ironflow.outbox SET dead_lettered_at = NULL, attempts = 2,"
        " locked_until = NULL, locked_by = NULL",
    )
    from ironflow_celery.operations.status import queue_status

    status = queue_status(store, max_attempts=runtime.attempt_limits)
    assert {s.workflow_type: s.effects.dead for s in status} == {
        "policy_strict": 1,
        "policy_lenient": 0,
    }
    letters = runtime.fetch_dead_letters()
    assert [d.workflow.workflow_type for d in letters] == ["policy_strict"]
    claimed = store.claim(
        "effect",
        "x",
        ["policy_strict", "policy_lenient"],
        lease_seconds=LEASE,
        max_attempts=runtime.attempt_limits,
        limit=10,
    )
    assert [r.workflow_type for r in claimed] == ["policy_lenient"]
