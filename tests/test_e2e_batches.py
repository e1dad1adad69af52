"""End-to-end: a worker killed in the middle of a run, in both delivery modes (a group of
rows in one message, the default; one row per message, ``effect_batch_size = 1``), and
every delivery mode on per-type queues (``ironflow_queue_per_workflow_type``).

Killed mid-run: the first handler finished, the second was running when the worker died.
The first row's acknowledgement was committed (a grouped row waits at most
`tasks.GROUP_ACK_DELAY` for its group's, never for the slow handler after it); nothing of
the second is acknowledged; it comes back once its lease runs out and another worker runs
it, the lost run counted as an attempt. In a group the third row was started by the
group's start guard, so its lost run counts too; alone, its message was never started.
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
from tests.e2e import (
    BIN,
    REDIS_URL,
    DisposableRedis,
    Processes,
    alive,
    descendants,
    make_env,
    redis_queue_cleanup,
    sql,
    wait_until,
)
from tests.e2e_apps.batch_app import BatchWorkflow, Go, handle_job

pytestmark = pytest.mark.e2e

MODES = pytest.mark.parametrize("size", [None, 1], ids=["grouped", "single-row"])
APP = "tests.e2e_apps.batch_app"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.kill_all()
        print(processes.report())  # pytest shows it when the test failed


def _service(store: PostgresStore):  # type: ignore[no-untyped-def]
    from runtime_helpers import build_runtime, test_config

    return build_runtime(store, None, test_config(), [(BatchWorkflow, handle_job)]).service


def _outbox(database_url: str, wid: str) -> list[tuple]:
    return sql(
        database_url,
        "SELECT (payload->>'index')::int, processed_at, attempts, run_started_at, last_error"
        f" FROM ironflow.outbox WHERE workflow_id = '{wid}' ORDER BY 1",
    )


@MODES
def test_worker_killed_mid_run_acknowledges_what_finished_and_rows_come_back(
    database_url: str, store: PostgresStore, workers: Processes, tmp_path: Path, size: int | None
) -> None:
    service = _service(store)
    marks = tmp_path / "marks"

    def lines() -> list[str]:
        return marks.read_text().splitlines() if marks.exists() else []

    def outbox() -> list[tuple]:
        return _outbox(database_url, "k1")

    queue = f"e2e-batch-{uuid.uuid4().hex[:12]}"
    procs = workers
    env = make_env(database_url, REDIS_URL, queue, effect_lock_duration=2)
    env.update(BATCH_TEST_APP="1", BATCH_TEST_MARKS=str(tmp_path), BATCH_TEST_SLEEP="60")
    if size is not None:
        env["BATCH_TEST_SIZE"] = str(size)
    with redis_queue_cleanup(queue):
        a = procs.worker("worker-a", env, pool="prefork", concurrency=1, app=APP)
        a.wait_for_output("ironflow relay started (process)", 60)
        service.execute(Go(id="k1", jobs=["ok", "sleep", "ok"]))
        wait_until(
            lambda: "end k1:0" in lines() and "start k1:1" in lines(),
            60,
            lambda: f"worker A to finish job 0 and start job 1 (marks {lines()})",
        )
        # Job 0's acknowledgement does not wait for job 1's 60 s handler.
        wait_until(
            lambda: outbox()[0][1] is not None,
            30,
            lambda: f"job 0 acknowledged while job 1 still runs ({outbox()})",
        )
        tree = descendants(a.pid)
        os.kill(a.pid, signal.SIGKILL)
        a.popen.wait(5)
        wait_until(lambda: not alive(tree), 30, "worker A's children to exit")
        a.kill()

        rows = outbox()
        assert rows[0][1] is not None and rows[0][2] == 0, rows
        assert rows[1][1] is None and rows[1][3] is not None, rows  # started, never finished
        assert rows[2][1] is None, rows
        # in a group, the group's start guard started job 2 too; alone it was not started
        assert (rows[2][3] is not None) == (size != 1), rows
        assert "start k1:2" not in lines()

        b = procs.worker("worker-b", env, pool="prefork", concurrency=1, app=APP)
        wait_until(
            lambda: all(r[1] is not None for r in outbox()),
            90,
            lambda: f"worker B to acknowledge the rows after their leases ({outbox()})",
        )
        time.sleep(1.0)  # room for a duplicate run to show up
        rows = outbox()
        # Per row: job 0 once (A); job 1's lost run counted (A, then B); job 2 once (B),
        # its lost start counted when a group had started it.
        lost = 1 if size != 1 else 0
        assert [r[2] for r in rows] == [0, 1, lost], rows
        assert all(r[3] is None for r in rows), rows
        assert rows[1][4].startswith("WorkerLost"), rows
        ended = [line for line in lines() if line.startswith("end ")]
        assert sorted(ended) == ["end k1:0", "end k1:1", "end k1:2"], lines()
        # B's log has one line per row it ran (the documented per-row format)
        out = b.output()
        for index, row_id in _ids(database_url, "k1")[1:]:
            assert f"ironflow effect {row_id} of batch_test:k1 (Job) attempt" in out, (index, out)
        assert b.terminate(20) == 0, b.output()[-3000:]


def _ids(database_url: str, wid: str) -> list[tuple]:
    return sql(
        database_url,
        "SELECT (payload->>'index')::int, id FROM ironflow.outbox"
        f" WHERE workflow_id = '{wid}' ORDER BY 1",
    )


@MODES
def test_every_delivery_mode_on_per_type_queues(
    database_url: str, store: PostgresStore, workers: Processes, tmp_path: Path, size: int | None
) -> None:
    """``ironflow_queue_per_workflow_type`` with a worker consuming only
    ``ironflow.batch_test``: a group, a lone row, a retry (which travels alone) and a
    follow-up input all run there. On 6964a2b the batch task went to the default queue,
    which this worker does not consume, and the grouped rows never ran."""
    service = _service(store)
    broker = DisposableRedis(tmp_path)
    broker.start()
    try:
        env = make_env(database_url, broker.url, "celery", queue_per_workflow_type="true")
        env.update(BATCH_TEST_APP="1")
        if size is not None:
            env["BATCH_TEST_SIZE"] = str(size)
        argv = [
            str(BIN / "celery"), "-A", APP, "worker", "-l", "info", "-P", "threads", "-c", "2",
            "-Q", f"ironflow.{BatchWorkflow.type}", "-n", f"typed-{uuid.uuid4().hex[:6]}@%h",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        w = workers.spawn("typed-worker", argv, env)
        w.wait_for_output("ironflow relay started", 60)
        service.execute(Go(id="g1", jobs=["ok", "follow", "flaky", "ok", "follow"]))
        service.execute(Go(id="g2", jobs=["ok"]))  # a lone row

        def done() -> bool:
            rows = _outbox(database_url, "g1") + _outbox(database_url, "g2")
            return all(r[1] is not None for r in rows)

        wait_until(done, 90, lambda: f"every row processed ({w.output()[-2000:]})")
        g1 = _outbox(database_url, "g1")
        assert [r[2] for r in g1] == [0, 0, 1, 0, 0], g1  # the flaky row's retry ran alone
        assert "fails once" in g1[2][4]
        finished = sql(
            database_url,
            "SELECT count(*) FROM ironflow.events"
            " WHERE workflow_id = 'g1' AND payload->>'type' = 'Finished'",
        )
        assert finished[0][0] == 2
        assert w.terminate(20) == 0, w.output()[-3000:]
    finally:
        broker.stop()
