"""Worker groups on their own queues (issue 20 §5, DESIGN invariant 13): one group's
outage never stalls another group's workflow types.

Two workflow types routed to two queues (``tests/e2e_apps/partition_app.py``), real
subprocess Celery workers started with ``-Q`` and distinct hostnames, a relay process that
serves both types, a Redis of the test's own. Group B is down while rows of both types
pile up: group A's type drains fully, B's queue holds at most the relay's budget of B's
messages however often its dispatch timeout passes, and once group B starts every B row
runs exactly once.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import redis

from tests.e2e import (
    BIN,
    DisposableRedis,
    Processes,
    calls_per_effect,
    make_env,
    prepare_database,
    sql,
    wait_until,
)
from tests.e2e_apps.partition_app import PartA, PartB
from tests.waiting import wait_for_progress

pytestmark = pytest.mark.e2e

APP = "tests.e2e_apps.partition_app"
A, B = PartA.type, PartB.type
QUEUE_A, QUEUE_B = f"ironflow.{A}", f"ironflow.{B}"
ROWS_A, ROWS_B = 300, 3000
BUDGET, BATCH = 50, 25  # max_in_flight per queue, claim batch size


def insert_rows(url: str, workflow_type: str, n: int) -> None:
    """`n` Charge effects of `workflow_type` (one instance each), straight into the outbox."""
    payload = psycopg.types.json.Jsonb({"type": "Charge"})
    sql(
        url,
        "INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload) "
        "SELECT %s, 'w' || g, %s FROM generate_series(1, %s) AS g",
        (workflow_type, payload, n),
    )


def processed(url: str, workflow_type: str) -> int:
    return int(
        sql(
            url,
            "SELECT count(*) FROM ironflow.outbox WHERE workflow_type = %s "
            "AND processed_at IS NOT NULL",
            (workflow_type,),
        )[0][0]
    )


def worker(
    procs: Processes, name: str, env: dict[str, str], queue: str, *, pool: str = "prefork"
) -> None:
    """A worker of group `name`: its own hostname, consuming `queue` only (-Q)."""
    argv = [
        str(BIN / "celery"), "-A", APP, "worker", "-l", "info", "-P", pool, "-c", "2",
        "-Q", queue, "-n", f"{name}@%h",
        "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    procs.spawn(name, argv, env)


@pytest.mark.scale  # several relays or worker groups at once: its own CI step
@pytest.mark.timeout(900)  # waits for progress (stall bounds), not for a wall time
def test_group_b_down_does_not_stall_group_a_and_b_runs_once_later(
    database_url: str, procs: Processes, tmp_path: Path
) -> None:
    prepare_database(database_url)
    broker = DisposableRedis(tmp_path)
    broker.start()
    client = redis.Redis.from_url(broker.url)
    try:
        # B's rows are the older ones: a relay that takes whatever is due first would fill
        # its whole budget with them.
        insert_rows(database_url, B, ROWS_B)
        insert_rows(database_url, A, ROWS_A)
        base = make_env(database_url, broker.url, "e2e-partitions-default")
        settings = {"max_in_flight": BUDGET, "claim_batch_size": BATCH}
        # Group A, prefork (its relay runs in a child process), the default dispatch timeout.
        worker(procs, "a", {**base, **_ironflow(settings)}, QUEUE_A)
        # A relay host serving both types, with a short dispatch timeout: its B messages
        # are never consumed while group B is down.
        relay_env = {
            **base,
            **_ironflow({**settings, "dispatch_timeout": 2, "effect_lock_duration": 3}),
        }
        relay = procs.spawn(
            "relay", [str(BIN / "ironflow-celery"), "-A", APP, "relay", "-l", "INFO"], relay_env
        )
        group_a = procs.started[0]
        group_a.wait_for_output("ironflow relay started (process)", 120)
        started = next(
            line for line in group_a.output().splitlines() if "ironflow relay started" in line
        )
        assert f"{A} -> {QUEUE_A}" in started and B not in started, started

        depths: list[int] = []

        def a_done() -> int:
            depths.append(int(client.llen(QUEUE_B)))
            return processed(database_url, A)

        wait_for_progress(
            a_done,
            ROWS_A,
            f"group A's {ROWS_A} rows while group B is down",
            diagnose=lambda: f"B's queue held up to {max(depths, default=0)} messages",
        )

        # The relay's dispatch timeout passes again and again (it says so each time), for
        # longer than a hold (30 s): its B rows stay held, never published a second time.
        def timeouts_seen() -> bool:
            depths.append(int(client.llen(QUEUE_B)))
            return relay.output().count("did not start within") >= 5

        wait_until(timeouts_seen, 300, "five dispatch timeouts in the relay", interval=0.5)
        assert max(depths) <= BUDGET, max(depths)
        assert "stay held" in relay.output()
        assert processed(database_url, B) == 0

        # Group B comes up: every B row runs, each exactly once.
        worker(procs, "b", {**base, **_ironflow(settings)}, QUEUE_B, pool="threads")
        wait_for_progress(lambda: processed(database_url, B), ROWS_B, f"group B's {ROWS_B} rows")
        assert calls_per_effect(database_url) == {1: ROWS_A + ROWS_B}
        charged = sql(
            database_url,
            "SELECT count(*) FROM ironflow.events WHERE payload->>'type' = 'Charged'",
        )[0][0]
        assert charged == ROWS_A + ROWS_B
    finally:
        procs.kill_all()
        client.close()
        broker.stop()


def _ironflow(settings: dict[str, object]) -> dict[str, str]:
    return {f"IRONFLOW_{k.upper()}": str(v) for k, v in settings.items()}
