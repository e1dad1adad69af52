"""asyncio (issue 14 §5): ``async def`` effect handlers run to their outcome on a real
worker (the lease keeper renewing meanwhile), registration refuses handlers that could
never run, and ``execute_async`` executes inputs without blocking the caller's loop.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import uuid
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from runtime_helpers import DEFAULT_WORKFLOWS, outbox, running_app, test_config
from workflows import CompleteInput, Increment, Mode, Process, Start, TestWorkflow

from ironflow_celery import EffectContext, InvalidWorkflowDefinition, Registry, RetryPolicy
from ironflow_celery.service.aio import LOOP, call_handler, is_async_handler
from ironflow_celery.service.workflow_service import WorkflowService
from ironflow_celery.storage.store import PostgresStore

TIMEOUT = 120
seen_threads: set[str] = set()


async def async_handler(effect: Any, ctx: EffectContext) -> Any:
    """Awaits (on the worker's loop) and routes a follow-up, like ironflow's RouteResult."""
    seen_threads.add(threading.current_thread().name)
    await asyncio.sleep(_DELAY[0])
    if effect.mode.mode == "TransientFailure" and ctx.attempt == 1:
        raise RuntimeError("async transient failure")
    return CompleteInput(id=ctx.workflow.workflow_id, result=f"async attempt {ctx.attempt}")


_DELAY = [0.01]


def workflows_with(handler: Any) -> list[tuple[type, Any]]:
    return [(TestWorkflow, handler), *DEFAULT_WORKFLOWS[1:]]


# -- registration -------------------------------------------------------------------------------


async def async_gen_handler(effect: Any, ctx: EffectContext):
    yield None


def gen_handler(effect: Any, ctx: EffectContext):
    yield None


class AsyncCallable:
    async def __call__(self, effect: Any, ctx: EffectContext) -> None:
        return None


class AsyncGenCallable:
    async def __call__(self, effect: Any, ctx: EffectContext):
        yield None


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (async_gen_handler, "an async generator function"),
        (gen_handler, "a generator function"),
        (AsyncGenCallable(), "an async generator function"),
        ("not a function", "not callable"),
    ],
    ids=["async-generator", "generator", "async-generator-object", "not-callable"],
)
def test_registration_refuses_handlers_that_cannot_run(handler: Any, message: str) -> None:
    registry = Registry()
    with pytest.raises(InvalidWorkflowDefinition, match=message):
        registry.register(TestWorkflow, handler)
    assert TestWorkflow.type not in registry


@pytest.mark.parametrize(
    "handler",
    [async_handler, AsyncCallable(), functools.partial(async_handler)],
    ids=["async-def", "async-callable-object", "partial"],
)
def test_coroutine_handlers_register_and_are_recognised(handler: Any) -> None:
    Registry().register(TestWorkflow, handler)
    assert is_async_handler(handler)


# -- on a real worker ------------------------------------------------------------------------------


def test_async_handler_routes_its_follow_up_on_a_real_worker(
    store: PostgresStore, db: sa.Engine
) -> None:
    seen_threads.clear()
    with running_app(store, workflows=workflows_with(async_handler)) as app:
        app.service.execute(Start(id="a1", mode=Mode(mode="RouteResult")))
        app.service.execute(Start(id="a2", mode=Mode(mode="TransientFailure")))
        app.wait_for_events("test_workflow", "a1", ["Started", "Completed"], TIMEOUT)
        app.wait_for_events("test_workflow", "a2", ["Started", "Completed"], TIMEOUT)
    assert seen_threads == {"ironflow-asyncio"}
    # Nothing outlives its owner: the loop stopped with the worker (worker_shutdown).
    assert not [t for t in threading.enumerate() if t.name == "ironflow-asyncio"]
    state = app.service.fetch_latest_state_dynamic("test_workflow", "a2")
    assert state["result"] == "async attempt 2"  # the first attempt's exception was a failure
    [row] = outbox(db, "a2")
    assert row.attempts == 1 and "async transient failure" in row.last_error
    assert row.processed_at is not None


def test_lease_keeper_renews_while_an_async_handler_awaits(
    store: PostgresStore, db: sa.Engine
) -> None:
    # A 1.5 s lease and a 5 s await: without renewal the row would be re-claimed and the
    # result discarded as stale; with it the first run's follow-up commits.
    _DELAY[0] = 5.0
    try:
        config = test_config(effect_lock_duration=1.5, retry_policy=RetryPolicy(max_attempts=1))
        with running_app(store, workflows=workflows_with(async_handler), config=config) as app:
            app.service.execute(Start(id="long", mode=Mode(mode="RouteResult")))
            app.wait_for_events("test_workflow", "long", ["Started", "Completed"], TIMEOUT)
    finally:
        _DELAY[0] = 0.01
    [row] = outbox(db, "long")
    assert row.attempts == 0 and row.processed_at is not None


def test_the_loop_is_per_process_and_restarts_after_close() -> None:
    async def where() -> str:
        return threading.current_thread().name

    assert LOOP.run(where()) == "ironflow-asyncio"
    LOOP.close()
    assert not [t for t in threading.enumerate() if t.name == "ironflow-asyncio"]
    assert LOOP.run(where()) == "ironflow-asyncio"  # started again on demand
    LOOP.close()


# -- execute_async ---------------------------------------------------------------------------------


def test_execute_async_does_not_block_the_event_loop(store: PostgresStore, db: sa.Engine) -> None:
    registry = Registry()
    registry.register(TestWorkflow, async_handler)
    service = WorkflowService(store, registry)
    service.execute(Increment(id="busy"))

    async def scenario() -> list[Any]:
        with db.connect() as holder:  # another session holds the instance's row lock
            holder.execute(
                sa.text(
                    "SELECT 1 FROM ironflow.workflow_instances WHERE workflow_id = 'busy'"
                    " FOR UPDATE"
                )
            )
            pending = asyncio.ensure_future(service.execute_async(Increment(id="busy")))
            ticks = 0
            for _ in range(10):  # the loop keeps running while execute waits on the lock
                await asyncio.sleep(0.01)
                ticks += 1
            assert ticks == 10 and not pending.done()
            others = await asyncio.gather(
                *(service.execute_dynamic_async("test_workflow", {"type": "Ping", "id": f"p{i}"})
                  for i in range(3))
            )  # fmt: skip
            holder.rollback()  # release the lock
        return [await asyncio.wait_for(pending, TIMEOUT), *others]

    first, *pings = asyncio.run(scenario())
    assert first.is_accepted and all(p.is_accepted for p in pings)
    assert service.fetch_latest_state_dynamic("test_workflow", "busy")["counter"] == 2
    assert service._async_pool()._max_workers == store.engine.pool.size()


def test_call_handler_awaits_a_coroutine_outside_a_worker_too() -> None:
    # The testing kit and scripts call handlers through the same path as the task.
    ctx = EffectContext(
        effect_id=uuid.uuid4(), workflow=TestWorkflow.ref("x"), attempt=1, created_at=datetime.now()
    )
    value = call_handler(async_handler, Process(mode=Mode(mode="RouteResult")), ctx)
    assert value == CompleteInput(id="x", result="async attempt 1")
    assert (
        call_handler(lambda effect, ctx: None, Process(mode=Mode(mode="FireAndForget")), ctx)
        is None
    )


# -- prefork, in real worker processes ---------------------------------------------------------


@pytest.mark.e2e
def test_async_handlers_on_a_prefork_worker_fed_by_celery_call(
    database_url: str, tmp_path: Any
) -> None:
    """`celery call ironflow.async_demo.execute` from a shell starts instances on a real
    prefork worker whose pool processes each run the async handler on their own loop."""
    import subprocess

    from tests.e2e import (
        BIN,
        REDIS_URL,
        REPO,
        Processes,
        make_env,
        redis_queue_cleanup,
        sql,
    )
    from tests.e2e import wait_until as e2e_wait

    app = "tests.e2e_apps.async_app"
    queue = f"e2e-async-{uuid.uuid4().hex[:8]}"
    env = make_env(database_url, REDIS_URL, queue)
    procs = Processes(tmp_path)
    try:
        with redis_queue_cleanup(queue):
            worker = procs.worker("prefork", env, pool="prefork", concurrency=2, app=app)
            worker.wait_for_output("ready", 120)
            for i in range(4):
                called = subprocess.run(
                    [str(BIN / "celery"), "-A", app, "call", "ironflow.async_demo.execute",
                     f'--args=[{{"type": "Begin", "id": "p{i}"}}]'],
                    cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                assert called.returncode == 0, called.stderr
            e2e_wait(
                lambda: (
                    sql(
                        database_url,
                        "SELECT count(*) FROM ironflow.events WHERE payload->>'type' = 'Finished'",
                    )[0][0]
                    == 4
                ),
                120,
                "four instances finished",
            )
            finished = sql(
                database_url,
                "SELECT payload FROM ironflow.events WHERE payload->>'type' = 'Finished'",
            )
            threads = {row[0]["thread"] for row in finished}
            pids = {row[0]["pid"] for row in finished}
            assert threads == {"ironflow-asyncio"}
            assert worker.pid not in pids  # ran in pool processes, not the main process
            assert "returned coroutine" not in worker.output()
    finally:
        procs.kill_all()
        print(procs.report())
