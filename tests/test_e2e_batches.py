"""End-to-end: a worker killed in the middle of a worker-side batch (``effect_batch_size``).

The group's start guard took every row; the first handler finished, the second was running
when the worker died. Nothing of the group may be acknowledged (no early acks: the first
row's ack would only have committed with the group's), every row comes back once its
lease runs out, and another worker runs and acknowledges them, the lost run counted as an
attempt, as for a single row.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ironflow_celery.storage.store import PostgresStore
from tests.e2e_apps.batch_app import BatchWorkflow, Go, handle_job
from tests.test_e2e_workers import (
    REDIS_URL,
    Processes,
    alive,
    descendants,
    make_env,
    redis_queue_cleanup,
    sql,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.kill_all()
        print(processes.report())  # pytest shows it when the test failed


def test_worker_killed_mid_batch_acknowledges_nothing_and_rows_come_back(
    database_url: str, store: PostgresStore, workers: Processes, tmp_path: Path
) -> None:
    from runtime_helpers import build_runtime, test_config

    service = build_runtime(store, None, test_config(), [(BatchWorkflow, handle_job)]).service
    marks = tmp_path / "marks"
    app = "tests.e2e_apps.batch_app"

    def lines() -> list[str]:
        return marks.read_text().splitlines() if marks.exists() else []

    def outbox() -> list[tuple]:
        return sql(
            database_url,
            "SELECT (payload->>'index')::int, processed_at, attempts, run_started_at, last_error"
            " FROM ironflow.outbox WHERE workflow_id = 'k1' ORDER BY 1",
        )

    queue = f"e2e-batch-{uuid.uuid4().hex[:12]}"
    procs = workers
    env = make_env(database_url, REDIS_URL, queue, effect_lock_duration=2)
    env.update(BATCH_TEST_APP="1", BATCH_TEST_MARKS=str(tmp_path), BATCH_TEST_SLEEP="60")
    with redis_queue_cleanup(queue):
        a = procs.worker("worker-a", env, pool="prefork", concurrency=1, app=app)
        a.wait_for_output("ironflow relay started (process)", 60)
        service.execute(Go(id="k1", jobs=["ok", "sleep", "ok"]))
        wait_until(
            lambda: "end k1:0" in lines() and "start k1:1" in lines(),
            60,
            lambda: f"worker A to finish job 0 and start job 1 (marks {lines()})",
        )
        tree = descendants(a.pid)
        os.kill(a.pid, signal.SIGKILL)
        a.popen.wait(5)
        wait_until(lambda: not alive(tree), 30, "worker A's children to exit")
        a.kill()

        # Job 0's handler finished, but its acknowledgement belongs to the group's commit,
        # which never happened: no row is processed. The group's guard started all three.
        rows = outbox()
        assert [r[1] for r in rows] == [None, None, None], rows
        assert all(r[3] is not None for r in rows), rows
        assert "start k1:2" not in lines()

        b = procs.worker("worker-b", env, pool="prefork", concurrency=1, app=app)
        wait_until(
            lambda: all(r[1] is not None for r in outbox()),
            90,
            lambda: f"worker B to acknowledge the rows after their leases ({outbox()})",
        )
        time.sleep(1.0)  # room for a duplicate run to show up
        rows = outbox()
        # Each row's lost run counts as one attempt, as for a single row.
        assert [r[2] for r in rows] == [1, 1, 1], rows
        assert all(r[3] is None for r in rows), rows
        assert all(r[4].startswith("WorkerLost") for r in rows), rows
        # Job 0 and 1 ran twice (A, then B); job 2 once (B): at-least-once, never skipped.
        ended = [line for line in lines() if line.startswith("end ")]
        assert sorted(ended) == ["end k1:0", "end k1:0", "end k1:1", "end k1:2"], lines()
        assert len({r[1] for r in rows}) == 1, "B acknowledged the group in one commit"
        assert b.terminate(20) == 0, b.output()[-3000:]
