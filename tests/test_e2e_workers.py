"""End-to-end: real ``celery worker`` and ``ironflow-celery relay`` processes.

Each DESIGN invariant that needs real processes: a worker killed mid-handler (leases and
the relay child's lifecycle), a broker that is down while the relay publishes, the
back-pressure bound on the broker queue, many relays and workers sharing one database,
a PostgreSQL restart under load, RabbitMQ as the transport, and the package's own app.

Workers run ``tests/e2e_apps/orders_like.py`` (or ``ironflow_celery``'s own app) in their
own process groups, each test on its own queue and database; every wait has a deadline
and every process group is killed in teardown. Services that a test stops or restarts
(Redis, PostgreSQL) are disposable instances on free ports, never the shared ones.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from ironflow_celery.storage import schema
from ironflow_celery.storage.db import create_engine
from tests.e2e import (
    AMQP_URL,
    REDIS_URL,
    WF,
    DisposablePostgres,
    DisposableRedis,
    Processes,
    alive,
    all_processed,
    calls_per_effect,
    charged_per_instance,
    descendants,
    event_types,
    free_port,
    insert_effects,
    make_env,
    outbox_counts,
    prepare_database,
    redis_queue_cleanup,
    require_rabbitmq,
    scalar,
    service_for,
    sql,
    wait_until,
)
from tests.e2e_apps.workflows import Place
from tests.waiting import wait_for_progress

pytestmark = pytest.mark.e2e

# The back-pressure backlog: 20x the in-flight limit shows the bound as well as 10,000 do,
# and its drain (~2 ms of worker CPU per task) keeps the file under two minutes on two busy
# cores. IRONFLOW_E2E_BACKLOG=10000 runs the full-size backlog (30-70 s for that test).
BACKPRESSURE_BACKLOG = int(os.environ.get("IRONFLOW_E2E_BACKLOG", "4000"))


def test_worker_killed_mid_handler_effect_completes_once_elsewhere(
    database_url: str, procs: Processes, queue: str
) -> None:
    """Invariants 2 and 7: a dead worker's lease expires, another worker completes the effect
    once; the prefork relay child does not outlive its worker."""
    prepare_database(database_url)
    env = make_env(database_url, REDIS_URL, queue, effect_lock_duration=2)
    with redis_queue_cleanup(queue):
        a = procs.worker("worker-a", env, pool="prefork")
        a.wait_for_output("ironflow relay started (process)", 60)
        service_for(database_url).execute(Place(id="o1", sleep=30, sleep_once=True))

        first = wait_until(
            lambda: sql(database_url, "SELECT effect_id, pid FROM e2e_calls"),
            60,
            "worker A to start the handler",
        )
        ((effect_id, handler_pid),) = first
        tree = descendants(a.pid)
        assert handler_pid in {p.pid for p in tree}, "the handler ran outside worker A"
        assert len(tree) >= 3, f"expected 2 pool children and a relay child, got {tree}"

        # SIGKILL only the worker's main process: its pool children die with it
        # (PDEATHSIG), the relay child notices its parent is gone and stops by itself.
        os.kill(a.pid, signal.SIGKILL)
        a.popen.wait(5)
        wait_until(lambda: not alive(tree), 30, "worker A's children (relay, pool) to exit")
        a.kill()  # the whole group, should anything have survived

        b = procs.worker("worker-b", env, pool="prefork")
        wait_until(
            lambda: scalar(
                database_url,
                "SELECT processed_at IS NOT NULL FROM ironflow.outbox WHERE id = %s",
                (effect_id,),
            ),
            60,
            "worker B to complete the effect",
        )
        time.sleep(1.0)  # room for a duplicate run or ack to show up

        runs = sql(database_url, "SELECT pid, attempt FROM e2e_calls ORDER BY at")
        assert len(runs) == 2, runs
        assert runs[0][0] == handler_pid
        b_pids = {p.pid for p in descendants(b.pid)}
        assert runs[1][0] in b_pids, "the second run was not worker B's"
        assert event_types(database_url, "o1") == ["Placed", "Charged"]
        attempts, locked_by, dead, last_error = sql(
            database_url,
            "SELECT attempts, locked_by, dead_lettered_at, last_error FROM ironflow.outbox"
            " WHERE id = %s",
            (effect_id,),
        )[0]
        # A's death counts as one failed attempt (its run never recorded an outcome), so a
        # handler that kills every worker it runs in ends as a dead letter.
        assert (attempts, locked_by, dead) == (1, None, None)
        assert last_error.startswith("WorkerLost"), last_error
        assert [attempt for _, attempt in runs] == [1, 2]
        # The attempt history names both runners: A's run, closed as lost by B's start
        # guard, then B's, processed (issue 22 §6: the evidence a double run leaves).
        (attempt_history,) = sql(
            database_url, "SELECT celery_attempts FROM ironflow.outbox WHERE id = %s", (effect_id,)
        )[0]
        lost, done = attempt_history
        assert (lost["n"], lost["outcome"], lost["pid"]) == (1, "lost", handler_pid)
        assert lost["worker"].startswith("worker-a-") and lost["error"].startswith("WorkerLost")
        assert (done["n"], done["outcome"], done["pid"]) == (2, "processed", runs[1][0])
        assert done["worker"].startswith("worker-b-")

        # A warm shutdown (SIGTERM to B's main process) stops its relay process with it.
        children = descendants(b.pid)
        assert b.terminate(20) == 0, b.output()[-3000:]
        assert not alive(children)


# -- 2. the broker is down while the relay publishes -------------------------------------


def test_broker_down_when_relay_publishes_nothing_lost(
    database_url: str, procs: Processes, queue: str, tmp_path: Path
) -> None:
    """Invariant 7: publish failures release the claims; after the broker returns every
    effect is processed exactly once."""
    prepare_database(database_url)
    broker = DisposableRedis(tmp_path)
    broker.start()
    try:
        env = make_env(database_url, broker.url, queue, effect_lock_duration=600)
        worker = procs.worker("worker", env, pool="threads", concurrency=4)
        worker.wait_for_output("ready.", 60)
        worker.wait_for_output("ironflow relay started (thread)", 30)
        service = service_for(database_url)
        service.execute(Place(id="before"))
        wait_until(lambda: outbox_counts(database_url)[0] == 1, 60, "the first effect")

        broker.stop()
        for i in range(20):
            service.execute(Place(id=f"down-{i}"))  # commits to PostgreSQL regardless
        worker.wait_for_output("claims released", 60)
        assert outbox_counts(database_url) == (1, 21)
        time.sleep(1.0)  # a few more failed rounds

        # The lease (600 s) is far longer than the wait below: the effects are processed in
        # time only because each failed publish gave its claims back.
        broker.start()
        wait_until(lambda: all_processed(database_url, 21), 300, "all effects after the outage")
        time.sleep(0.5)
        assert calls_per_effect(database_url) == {1: 21}
        assert charged_per_instance(database_url) == {1: 21}
    finally:
        procs.kill_all()
        broker.stop()


# -- 3. back-pressure --------------------------------------------------------------------


@pytest.mark.timeout(600)  # waits for progress (90 s stall), not for a wall time
@pytest.mark.parametrize("size", [20, 1], ids=["grouped", "single-row"])
def test_backpressure_bounds_the_broker_queue(
    database_url: str, procs: Processes, queue: str, size: int
) -> None:
    """Invariant 5: with no consumer the broker queue never exceeds max_in_flight rows (200
    messages of one row, or 10 groups of 20); a worker then drains the backlog while the
    queue stays bounded."""
    total, limit = BACKPRESSURE_BACKLOG, 200
    messages = limit // size
    insert_effects(database_url, total, "bp-", record=False, follow_up=False)
    env = make_env(
        database_url,
        REDIS_URL,
        queue,
        max_in_flight=limit,
        claim_batch_size=100,
        effect_batch_size=size,
    )
    with redis_queue_cleanup(queue) as client:
        relay = procs.relay("relay", env)
        wait_until(lambda: client.llen(queue) >= messages, 60, f"{messages} messages in queue")
        samples = []
        for _ in range(10):  # ~2 s with no consumer: the relay must not claim any further
            samples.append(client.llen(queue))
            time.sleep(0.2)
        assert samples == [messages] * len(samples), samples
        leased = scalar(
            database_url, "SELECT count(*) FROM ironflow.outbox WHERE locked_by IS NOT NULL"
        )
        assert leased == limit

        procs.worker("drain", env, pool="threads", concurrency=4, relay=False)
        draining: list[int] = []

        def drained() -> int:
            draining.append(client.llen(queue))
            return outbox_counts(database_url)[0]

        wait_for_progress(drained, total, f"the worker to drain {total} effects")
        assert max(draining) <= messages, max(draining)
        assert client.llen(queue) == 0
        assert relay.popen.poll() is None


# -- 4. many relays, many workers --------------------------------------------------------


@pytest.mark.scale  # several relays and workers at once: CI's `-m scale` step
@pytest.mark.timeout(600)  # waits for progress (90 s stall), not for a wall time
def test_two_relays_three_workers_2000_effects_each_once(
    database_url: str, procs: Processes, queue: str
) -> None:
    """Invariant 6: two relays and three workers share one database; each effect runs once."""
    n = 2000
    prepare_database(database_url)
    env = make_env(database_url, REDIS_URL, queue, claim_batch_size=50, max_in_flight=400)
    with redis_queue_cleanup(queue):
        insert_effects(database_url, n, "many-")
        relays = [procs.relay(f"relay-{i}", env) for i in range(2)]
        workers = [
            procs.worker(f"worker-{i}", env, pool="threads", concurrency=4, relay=False)
            for i in range(3)
        ]
        wait_for_progress(lambda: outbox_counts(database_url)[0], n, f"{n} effects")
        time.sleep(0.5)
        assert calls_per_effect(database_url) == {1: n}
        assert charged_per_instance(database_url) == {1: n}
        # All three workers ran handlers (threads pool: the handler's pid is the worker's).
        pids = {r[0] for r in sql(database_url, "SELECT DISTINCT pid FROM e2e_calls")}
        assert pids == {w.pid for w in workers}
        assert all(r.popen.poll() is None for r in relays)
        assert all("claims released" not in r.output() for r in relays)


# -- 5. PostgreSQL restarts under load ---------------------------------------------------


@pytest.mark.timeout(600)  # waits for progress (90 s stall), not for a wall time
def test_postgres_restart_relays_and_workers_reconnect(procs: Processes, queue: str) -> None:
    """Relays, the LISTEN connection and workers reconnect after PostgreSQL restarts; every
    effect completes and no follow-up is appended twice."""
    n = 300
    pg = DisposablePostgres()
    try:
        pg.init()
        sql(pg.url, "CREATE DATABASE e2e")
        url = pg.url.rsplit("/", 1)[0] + "/e2e"
        engine = create_engine(url, pool_size=1)
        schema.upgrade(engine)
        engine.dispose()
        prepare_database(url)
        env = make_env(
            url, REDIS_URL, queue,
            effect_lock_duration=3, max_attempts=50, backoff_base=0.2, backoff_max=1,
        )  # fmt: skip
        with redis_queue_cleanup(queue):
            worker = procs.worker("worker", env, pool="prefork", concurrency=2)
            worker.wait_for_output("ironflow relay started (process)", 60)
            service = service_for(url)
            # 30 s of handler time on 2 processes: at load 16, submitting the 300 took
            # longer than 300 x 20 ms took to run, so all had finished before the restart.
            for i in range(n):
                service.execute(Place(id=f"pg-{i}", sleep=0.2))
            service.store.dispose()
            wait_until(
                lambda: scalar(url, "SELECT count(*) FROM e2e_calls") >= 30,
                60,
                lambda: f"handlers to be under way (processed, total: {outbox_counts(url)})",
                interval=0.05,
            )
            assert outbox_counts(url)[0] < n, "finished before the restart; slow the handler"
            pg.restart()
            wait_for_progress(
                lambda: outbox_counts(url)[0],
                n,
                f"{n} effects after the restart",
                diagnose=lambda: f"(processed, total): {outbox_counts(url)}",
            )
            time.sleep(0.5)
            # At-least-once handler runs, but the follow-up commits with the processed mark.
            assert charged_per_instance(url) == {1: n}
            assert scalar(url, "SELECT count(*) FROM ironflow.events") == 2 * n
            runs = calls_per_effect(url)
            assert sum(runs.values()) == n and min(runs) >= 1, runs
            assert (
                scalar(
                    url, "SELECT count(*) FROM ironflow.outbox WHERE dead_lettered_at IS NOT NULL"
                )
                == 0
            )
            assert worker.popen.poll() is None
            # The restart reached the relay process: its LISTEN connection was cut and renewed.
            assert "LISTEN connection lost" in worker.output()
    finally:
        procs.kill_all()
        pg.destroy()


# -- 6. RabbitMQ -------------------------------------------------------------------------


def test_end_to_end_over_rabbitmq(database_url: str, procs: Processes, queue: str) -> None:
    """The same flow (effect, follow-up input, timer) over AMQP."""
    from kombu import Connection

    require_rabbitmq()
    prepare_database(database_url)
    env = make_env(database_url, AMQP_URL, queue)
    try:
        worker = procs.worker("worker", env, pool="prefork")
        worker.wait_for_output("ironflow relay started (process)", 60)
        worker.wait_for_output("ready.", 60)  # consuming: the effect cannot wait for it
        # The timer must fire after the effect's follow-up (the expected event order): 5 s
        # is ten times what the effect took at load 18, where 1 s lost the race.
        service_for(database_url).execute(Place(id="amqp-1", timer_secs=5.0))
        wait_until(
            lambda: event_types(database_url, "amqp-1") == ["Placed", "Charged", "Expired"],
            60,
            "the effect's follow-up and the timer",
        )
        assert outbox_counts(database_url) == (1, 1)
        assert (
            scalar(
                database_url, "SELECT count(*) FROM ironflow.timers WHERE processed_at IS NOT NULL"
            )
            == 1
        )
        assert calls_per_effect(database_url) == {1: 1}
        assert "amqp://" in worker.output()
    finally:
        procs.kill_all()
        with contextlib.suppress(Exception), Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.default_channel.queue_delete(queue)


# -- metrics under the prefork pool ---------------------------------------------------------


def test_prefork_worker_metrics_count_every_pool_process(
    database_url: str, procs: Processes, queue: str, tmp_path: Path
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR the relay's endpoint serves the task counters that the
    prefork pool's processes wrote, summed: every effect counted once."""
    from prometheus_client.parser import text_string_to_metric_families

    prepare_database(database_url)
    port = free_port()
    env = make_env(database_url, REDIS_URL, queue, metrics_port=port)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")  # created on import
    n = 40
    with redis_queue_cleanup(queue):
        worker = procs.worker("worker", env, pool="prefork", concurrency=2)
        worker.wait_for_output("ironflow relay started (process)", 60)
        # issue 23 §3: the worker's log says where the endpoint listens
        worker.wait_for_output(f"metrics endpoint listening on http://0.0.0.0:{port}/metrics", 60)
        insert_effects(database_url, n, "m-")
        wait_until(lambda: all_processed(database_url, n), 60, "the effects to be processed")

        def samples() -> dict[tuple[str, frozenset], float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
            return {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(body)
                for s in family.samples
            }

        processed = (
            "ironflow_task_results_total",
            frozenset(
                {"kind": "effect", "workflow_type": WF, "effect_type": "Charge",
                 "status": "processed"}.items()
            ),
        )  # fmt: skip
        durations = (
            "ironflow_handler_duration_seconds_count",
            frozenset({"kind": "effect", "workflow_type": WF, "effect_type": "Charge"}.items()),
        )
        # the last acks may land a moment after the rows read as processed
        got = wait_until(
            lambda: (s := samples()).get(processed) == n and s, 30, "every effect counted"
        )
        assert got[durations] == n
        pool_pids = {p.pid for p in descendants(worker.pid)}
        handler_pids = {row[0] for row in sql(database_url, "SELECT DISTINCT pid FROM e2e_calls")}
        assert handler_pids <= pool_pids and worker.pid not in handler_pids  # ran in the pool
        assert (
            got[
                (
                    "ironflow_outbox_rows",
                    frozenset({"workflow_type": WF, "state": "pending"}.items()),
                )
            ]
            == 0
        )


# -- 7. the package's own app ------------------------------------------------------------


def test_celery_a_ironflow_celery_worker_uses_package_app(
    database_url: str, procs: Processes, queue: str
) -> None:
    """``celery -A ironflow_celery worker`` with IRONFLOW_WORKFLOWS names a workflow module.

    Run as the README shows it: from the project directory, no PYTHONPATH. The workflow
    module is found from the current directory, as Celery finds its ``imports``."""
    prepare_database(database_url)
    env = make_env(database_url, REDIS_URL, queue, workflows="tests.e2e_apps.workflows")
    del env["PYTHONPATH"]
    with redis_queue_cleanup(queue):
        worker = procs.worker("pkg-worker", env, pool="threads", app="ironflow_celery")
        worker.wait_for_output("ironflow relay started (thread) for e2e_order", 60)
        service_for(database_url).execute(Place(id="pkg-1"))
        wait_until(
            lambda: event_types(database_url, "pkg-1") == ["Placed", "Charged"],
            60,
            "the package app's worker to run the effect",
        )
        assert outbox_counts(database_url) == (1, 1)
        assert calls_per_effect(database_url) == {1: 1}
        assert "ironflow.e2e_order.effect" in worker.output()  # listed in [tasks]
