"""Flower shows every effect as a task named after its workflow type (with its effect
type), a failed attempt the outbox will retry as RETRY, a dead letter as FAILURE with its
error, and a dead letter retried with ``celery call`` processed; the rows of a group
message each as their own task in their own state — real worker, Flower and Redis
processes.

The worker runs ``tests/e2e_apps/ops_app.py`` on its own queue with ``-E``; Flower reads
the worker's events from the same broker. Every process is killed in teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ironflow_celery.service.workflow_service import Registry, WorkflowService
from ironflow_celery.storage.store import PostgresStore
from tests.e2e_apps.ops_app import OpsDemoWorkflow, Submit

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "tests.e2e_apps.ops_app"
BROKER = os.environ.get("IRONFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def effect_row(db: sa.Engine, workflow_id: str) -> Any:
    with db.connect() as conn:
        return conn.execute(
            sa.text("SELECT * FROM ironflow.outbox WHERE workflow_id = :wid"), {"wid": workflow_id}
        ).first()


def test_flower_shows_effects_and_a_retried_dead_letter(database_url, db, tmp_path):
    queue = f"ops-{uuid.uuid4().hex[:8]}"
    flower_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CELERY_BROKER_URL": BROKER,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "IRONFLOW_DATABASE_URL": database_url,
        "IRONFLOW_OPS_FLAG_DIR": str(tmp_path),
        "IRONFLOW_EFFECT_POLL_INTERVAL": "0.1",
        "IRONFLOW_METRICS_PORT": str(metrics_port),
        "FLOWER_UNAUTHENTICATED_API": "true",
        # a failed attempt's backoff outlasts the test: Flower keeps showing it as RETRY
        "IRONFLOW_BACKOFF_BASE": "600",
        "IRONFLOW_BACKOFF_MAX": "600",
        # each row its own message (task id = row id). Rows claimed together travel as one
        # group by default; Flower shows each of them as its own task too (the test below).
        "IRONFLOW_EFFECT_BATCH_SIZE": "1",
    }
    celery = str(BIN / "celery")
    procs = []
    try:
        procs.append(
            start(
                [celery, "-A", APP, "flower", f"--port={flower_port}", "--address=127.0.0.1"],
                env,
                tmp_path / "flower.log",
            )
        )
        procs.append(
            start(
                [
                    celery,
                    "-A",
                    APP,
                    "worker",
                    "-E",
                    "-P",
                    "threads",
                    "-c",
                    "4",
                    "-Q",
                    queue,
                    "-n",
                    f"{queue}@%h",
                    "--without-mingle",
                    "--without-gossip",
                    "-l",
                    "INFO",
                ],
                env,
                tmp_path / "worker.log",
            )
        )
        flower = f"http://127.0.0.1:{flower_port}"
        wait_until(
            lambda: get_json(f"{flower}/api/workers?refresh=1").get(
                f"{queue}@{socket.gethostname()}"
            ),
            60,
            "Flower to see the worker",
        )

        service = WorkflowService(
            PostgresStore.from_url(database_url),
            Registry([(OpsDemoWorkflow, OpsDemoWorkflow.handle_effect)]),
        )
        (tmp_path / "ok-1").touch()  # ok-1 is delivered, bad-1 is dead-lettered
        service.execute(Submit(id="ok-1"))
        service.execute(Submit(id="bad-1"))
        service.execute(Submit(id="flaky-1"))
        ok = wait_until(
            lambda: (r := effect_row(db, "ok-1")) and r.processed_at and r, 60, "ok-1 processed"
        )
        bad = wait_until(
            lambda: (r := effect_row(db, "bad-1")) and r.dead_lettered_at and r,
            60,
            "bad-1 dead-lettered",
        )

        def task_info(row_id: uuid.UUID, status: str) -> Any:
            info = get_json(f"{flower}/api/task/info/{row_id}")
            return info if f"'status': '{status}'" in (info.get("result") or "") else None

        info = wait_until(lambda: task_info(ok.id, "processed"), 60, "Flower: ok-1 processed")
        assert info["name"] == "ironflow.ops_demo.effect" and info["state"] == "SUCCESS"
        assert info["args"] == f"['ops_demo:ok-1', '{ok.id}', 1]"  # workflow, row id, attempt
        assert "'effect_type': 'Deliver'" in info["kwargs"]  # the effect's type
        # a dead letter is a FAILURE with its error (Flower's Failed view), not a SUCCESS
        dead = wait_until(
            lambda: (i := get_json(f"{flower}/api/task/info/{bad.id}"))["state"] == "FAILURE" and i,
            60,
            "Flower: the dead letter failed",
        )
        assert dead["name"] == "ironflow.ops_demo.effect"
        assert dead["exception"].startswith("DeadLettered(")
        assert "recipient bad-1 is unreachable" in dead["exception"]
        assert "(Deliver)" in dead["exception"]  # its effect type
        assert "PermanentEffectError" in dead["traceback"]  # the handler's, as the cause
        failed = get_json(f"{flower}/api/tasks?state=FAILURE")
        assert str(bad.id) in failed and str(ok.id) not in failed

        # a failed attempt the outbox retries later: RETRY with the handler's exception,
        # and nothing re-sent through the broker (the outbox holds the backoff)
        flaky = wait_until(
            lambda: (r := effect_row(db, "flaky-1")) and r.attempts == 1 and r,
            60,
            "flaky-1's first attempt recorded",
        )
        retry = wait_until(
            lambda: (i := get_json(f"{flower}/api/task/info/{flaky.id}"))["state"] == "RETRY" and i,
            60,
            "Flower: the failed attempt retried",
        )
        assert retry["name"] == "ironflow.ops_demo.effect"
        assert "ConnectionError('recipient flaky-1 timed out')" in retry["exception"]
        assert flaky.dead_lettered_at is None and flaky.last_error.startswith("ConnectionError")
        assert flaky.locked_until is not None  # the outbox's backoff, not a Celery countdown
        tasks = get_json(f"{flower}/api/tasks?taskname=ironflow.ops_demo.effect")
        assert {str(ok.id), str(bad.id), str(flaky.id)} <= set(tasks)

        # the dead letter is visible to metrics of the worker process, then retried
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            body = r.read().decode()
        assert 'ironflow_dead_letters{kind="effect",workflow_type="ops_demo"} 1.0' in body
        (tmp_path / "bad-1").touch()
        called = subprocess.run(
            [
                celery,
                "-A",
                APP,
                "call",
                "ironflow.dead_letters.retry",
                f"--args={json.dumps([str(bad.id)])}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        retry_task = called.stdout.strip()
        wait_until(
            lambda: (r := effect_row(db, "bad-1")) and r.processed_at,
            60,
            "bad-1 processed after the retry",
        )
        retried = wait_until(lambda: task_info(bad.id, "processed"), 60, "Flower: processed")
        assert retried["name"] == "ironflow.ops_demo.effect"
        call_info = wait_until(
            lambda: (i := get_json(f"{flower}/api/task/info/{retry_task}")).get("result") and i,
            60,
            "Flower: the retry task",
        )
        assert call_info["name"] == "ironflow.dead_letters.retry"
        assert "'reason': 'retried'" in call_info["result"]
    finally:
        for proc in reversed(procs):
            kill(proc)
        for name in ("worker.log", "flower.log"):
            log = tmp_path / name
            if log.exists():
                tail = log.read_text(errors="replace")[-3000:]
                sys.stdout.write(f"--- {name} (tail) ---\n{tail}\n")


GROUP_APP = "tests.e2e_apps.batch_app"


def scalar_outcomes(db: sa.Engine, workflow_id: str) -> int:
    """The effects of `workflow_id` whose outcome is recorded (processed, dead, or failed)."""
    with db.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM ironflow.outbox WHERE workflow_id = :wid AND"
                " (processed_at IS NOT NULL OR dead_lettered_at IS NOT NULL OR attempts > 0)"
            ),
            {"wid": workflow_id},
        ).scalar_one()


@pytest.mark.parametrize(
    ("pool", "events"),
    [("prefork", "-E"), ("threads", "-E"), ("prefork", "enable_events"), ("prefork", "off")],
    ids=["prefork-E", "threads-E", "prefork-enabled-later", "prefork-no-events"],
)
def test_flower_shows_each_row_of_a_group_as_its_own_task(
    database_url, db, tmp_path, pool: str, events: str
):
    """Five effects claimed together travel as one group message; Flower still shows each
    row as its own task (id = row id, the single-row task's name, args and kwargs, the
    group's task as parent) in its own state: the row whose handler raises
    PermanentEffectError on its first attempt FAILURE, the failed attempt RETRY, the others
    SUCCESS — from a prefork pool process (worker started with -E, or events enabled later
    by ``celery control enable_events``, as Flower does) and from a threads pool (the
    worker's own event dispatcher)."""
    from tests.e2e_apps.batch_app import BatchWorkflow, Go, handle_job

    queue = f"grp-{uuid.uuid4().hex[:8]}"
    node = f"{queue}@{socket.gethostname()}"
    flower_port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "BATCH_TEST_APP": "1",
        "CELERY_BROKER_URL": BROKER,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "IRONFLOW_DATABASE_URL": database_url,
        "IRONFLOW_EFFECT_POLL_INTERVAL": "0.1",
        "FLOWER_UNAUTHENTICATED_API": "true",
        "IRONFLOW_BACKOFF_BASE": "600",  # the failed attempt stays RETRY during the test
        "IRONFLOW_BACKOFF_MAX": "600",
    }
    celery = str(BIN / "celery")
    procs = []
    try:
        # Flower's own periodic enable_events is off: the test decides when events start.
        procs.append(
            start(
                [celery, "-A", GROUP_APP, "flower", f"--port={flower_port}",
                 "--address=127.0.0.1", "--enable_events=False"],
                env,
                tmp_path / "flower.log",
            )
        )  # fmt: skip
        worker_args = [celery, "-A", GROUP_APP, "worker", "-P", pool, "-c", "2", "-Q", queue]
        worker_args += ["-n", f"{queue}@%h", "--without-mingle", "--without-gossip", "-l", "INFO"]
        if events == "-E":
            worker_args.append("-E")
        procs.append(start(worker_args, env, tmp_path / "worker.log"))
        flower = f"http://127.0.0.1:{flower_port}"
        wait_until(
            lambda: get_json(f"{flower}/api/workers?refresh=1").get(node), 60, "Flower: worker"
        )
        if events == "enable_events":
            subprocess.run(
                [celery, "-A", GROUP_APP, "control", "enable_events", "-d", node],
                cwd=REPO, env=env, capture_output=True, timeout=60, check=True,
            )  # fmt: skip
            time.sleep(2.5)  # the worker copies the change for its pool within 1 s

        service = WorkflowService(
            PostgresStore.from_url(database_url), Registry([(BatchWorkflow, handle_job)])
        )
        wid = f"grp-{uuid.uuid4().hex[:6]}"
        service.execute(Go(id=wid, jobs=["ok", "perm", "follow", "fail", "ok"]))
        with db.connect() as conn:
            ids = [
                str(r[0])
                for r in conn.execute(
                    sa.text(
                        "SELECT id FROM ironflow.outbox WHERE workflow_id = :wid"
                        " ORDER BY (payload->>'index')::int"
                    ),
                    {"wid": wid},
                )
            ]
        expected = ["SUCCESS", "FAILURE", "SUCCESS", "RETRY", "SUCCESS"]
        if events == "off":
            wait_until(
                lambda: scalar_outcomes(db, wid) == 5, 60, "the group's five outcomes recorded"
            )
            time.sleep(2.0)  # an event sent would have reached Flower now
            tasks = get_json(f"{flower}/api/tasks")
            assert not set(ids) & set(tasks), "row events without task events"
            return

        seen: list[str] = []

        def states() -> bool:
            seen[:] = []
            for row_id in ids:
                try:
                    seen.append(get_json(f"{flower}/api/task/info/{row_id}")["state"])
                except urllib.error.HTTPError:  # not seen yet
                    seen.append("-")
            return seen == expected

        try:
            wait_until(states, 60, "Flower: each row in its own state")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; row states in Flower: {seen}") from None

        infos = [get_json(f"{flower}/api/task/info/{row_id}") for row_id in ids]
        groups = {info["parent_id"] for info in infos}
        assert len(groups) == 1 and None not in groups, f"not one group message: {groups}"
        [group_id] = groups
        for index, (row_id, info) in enumerate(zip(ids, infos, strict=True)):
            assert info["name"] == "ironflow.batch_test.effect"
            assert info["args"] == f"['batch_test:{wid}', '{row_id}', 1]", info["args"]
            assert "'effect_type': 'Job'" in info["kwargs"] and "'lease'" in info["kwargs"]
            assert info["worker"] == node, info["worker"]
            assert info["received"] and info["started"], (index, info)
        ok, perm, follow, fail, _ = infos
        assert "'status': 'processed'" in ok["result"]
        assert "'follow_up': 'Finish'" in follow["result"]
        assert perm["exception"].startswith("DeadLettered(")
        assert "job 1 fails for good" in perm["exception"]
        assert "PermanentEffectError" in perm["traceback"]  # the handler's, as the cause
        assert "RuntimeError('job 3 fails')" in fail["exception"]
        failed = get_json(f"{flower}/api/tasks?state=FAILURE")
        assert ids[1] in failed and ids[0] not in failed
        # the group's own task: SUCCESS (its message was handled), its rows as kwargs,
        # every row's result in its result; each row points at it as its parent
        group = get_json(f"{flower}/api/task/info/{group_id}")
        assert group["name"] == "ironflow.batch_test.effect" and group["state"] == "SUCCESS"
        assert group["kwargs"].startswith("{'rows': <5 rows: "), group["kwargs"]
        assert "'dead-lettered'" in group["result"]
    finally:
        for proc in reversed(procs):
            kill(proc)
        for name in ("worker.log", "flower.log"):
            log = tmp_path / name
            if log.exists():
                tail = log.read_text(errors="replace")[-3000:]
                sys.stdout.write(f"--- {name} (tail) ---\n{tail}\n")
