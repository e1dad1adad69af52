"""The worker's own relay process and Celery's controls (issue 12 §3).

Real ``celery -A … worker`` processes: the relay child killed as the OOM killer would
(logged, reaped, restarted, visible in ``celery inspect`` and the metrics, and inputs
submitted afterwards dispatched), SIGTERM to the child alone, then SIGTERM to the worker;
SIGTERM, SIGQUIT and a double Ctrl-C end a worker with its relay about as fast as the
same worker without one. And Celery's in-thread test worker leaves no ``ironflow-*``
thread behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from celery.contrib.testing.worker import start_worker
from runtime_helpers import TestApp, delete_queue, outbox
from runtime_helpers import wait_until as wait_for
from workflows import Mode, Start, TestWorkflow

from ironflow_celery.integration.supervisor import ServiceProcess, ServiceThread
from ironflow_celery.storage.store import PostgresStore
from tests.e2e import (
    APP,
    BIN,
    REDIS_URL,
    Proc,
    Processes,
    alive,
    descendants,
    free_port,
    make_env,
    prepare_database,
    redis_queue_cleanup,
    scalar,
    service_for,
    wait_until,
)
from tests.e2e_apps.workflows import Place

SHUTDOWN_TIMEOUT = 5.0  # make_env's IRONFLOW_SHUTDOWN_TIMEOUT
PROJECTION = "tests.e2e_apps.projections:ORDER_EVENTS"


def nodename(proc: Proc) -> str:
    """The worker's node name (``-n name@%h`` expanded as Celery does)."""
    argv = list(proc.popen.args)  # type: ignore[arg-type]
    return argv[argv.index("-n") + 1].replace("%h", socket.gethostname())


def inspect_relay(proc: Proc, env: dict[str, str]) -> dict[str, Any]:
    """``celery inspect ironflow_relay`` of one worker, as the CLI prints it with --json."""
    node = nodename(proc)
    done = subprocess.run(
        [str(BIN / "celery"), "-A", APP, "inspect", "ironflow_relay", "--json",
         "-d", node, "-t", "10"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)[node]


def relay_state(proc: Proc, env: dict[str, str]) -> dict[str, Any]:
    return inspect_relay(proc, env)["relay"]


def not_a_zombie(pid: int) -> bool:
    """The process is gone and reaped (no zombie left in the process table)."""
    try:
        psutil.Process(pid).status()
    except psutil.ZombieProcess:
        return False
    except psutil.NoSuchProcess:
        return True
    return False


def processed(url: str, prefix: str) -> int:
    return scalar(
        url,
        "SELECT count(*) FROM ironflow.outbox WHERE workflow_id LIKE %s AND processed_at "
        "IS NOT NULL",
        (prefix + "%",),
    )


@pytest.mark.e2e
def test_killed_relay_child_is_reaped_logged_restarted_and_dispatches(
    database_url: str, procs: Processes, queue: str
) -> None:
    """SIGKILL the relay child: the worker logs it, reaps it, restarts it with backoff,
    counts it (inspect and metric) and dispatches inputs submitted afterwards; SIGTERM to
    the new child alone stops it (and it is restarted again); SIGTERM to the worker then
    ends the worker and its relay."""
    prepare_database(database_url)
    port = free_port()
    env = make_env(database_url, REDIS_URL, queue, metrics_port=port, projections=PROJECTION)
    with redis_queue_cleanup(queue):
        worker = procs.worker("worker", env, pool="prefork", concurrency=2)
        worker.wait_for_output("ironflow relay started (process)", 90)
        first = relay_state(worker, env)
        assert first["mode"] == "process" and first["alive"] and first["restarts"] == 0, first
        assert first["pid"] in {p.pid for p in descendants(worker.pid)}

        os.kill(first["pid"], signal.SIGKILL)  # as the OOM killer would
        worker.wait_for_output("died (killed by SIGKILL)", 60)
        worker.wait_for_output("ironflow relay process restarted", 60)
        wait_until(lambda: not_a_zombie(first["pid"]), 30, "the dead relay child to be reaped")

        service = service_for(database_url)
        for i in range(5):
            service.execute(Place(id=f"after-kill-{i}"))
        wait_until(
            lambda: processed(database_url, "after-kill-") == 5,
            120,
            lambda: (
                f"5 inputs submitted after the kill to be dispatched; "
                f"{processed(database_url, 'after-kill-')} were"
            ),
        )

        second = relay_state(worker, env)
        assert second["alive"] and second["restarts"] == 1, second
        assert second["pid"] != first["pid"], second
        assert second["last_exit"] == "killed by SIGKILL", second
        scraped = wait_until(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            ),
            60,
            "the metrics endpoint of the restarted relay process",
        )
        assert 'ironflow_relay_restarts_total{service="relay"} 1.0' in scraped, scraped[-2000:]
        assert 'ironflow_relay_up{service="relay"} 1.0' in scraped

        # The projections child is supervised the same way.
        projections = inspect_relay(worker, env)["projections"]
        assert projections["mode"] == "process" and projections["alive"], projections
        os.kill(projections["pid"], signal.SIGKILL)
        worker.wait_for_output(f"projections process {projections['pid']} died", 60)
        wait_until(
            lambda: (
                (p := inspect_relay(worker, env)["projections"])["restarts"] == 1 and p["alive"]
            ),
            60,
            "the projections process to be restarted",
        )

        # The child stops on SIGTERM (it no longer runs Celery's inherited handlers).
        os.kill(second["pid"], signal.SIGTERM)
        worker.wait_for_output("died (exit code 0)", 60)
        wait_until(lambda: not_a_zombie(second["pid"]), 30, "the stopped relay child reaped")
        third = wait_until(
            lambda: (s := relay_state(worker, env))["restarts"] == 2 and s["alive"] and s,
            60,
            "the second restart",
        )

        # SIGTERM to the worker: a warm shutdown that no longer waits on a dead peer.
        children = descendants(worker.pid)
        assert third["pid"] in {p.pid for p in children}
        assert worker.terminate(60) == 0, worker.output()[-3000:]
        wait_until(lambda: not alive(children), 30, "the worker's children to exit")


def _stop_both(plain: Proc, ours: Proc, how: str, limit: float) -> tuple[float, float]:
    """Stop both workers the same way at the same moment; seconds until each main process
    and all its children were gone."""
    workers = (plain, ours)
    trees = {w.name: [psutil.Process(w.pid), *descendants(w.pid)] for w in workers}
    began = time.monotonic()
    for w in workers:
        if how == "sigterm":
            os.kill(w.pid, signal.SIGTERM)
        elif how == "sigquit":
            os.kill(w.pid, signal.SIGQUIT)
        else:  # a terminal's Ctrl-C goes to the whole foreground process group
            os.killpg(w.pid, signal.SIGINT)
    if how == "double-ctrl-c":
        time.sleep(0.1)  # a quick double tap: the second lands during the warm shutdown
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, signal.SIGINT)
    took: dict[str, float] = {}
    while len(took) < 2:
        for w in workers:
            if w.name not in took:
                w.popen.poll()
                if not alive(trees[w.name]):
                    took[w.name] = time.monotonic() - began
        if time.monotonic() - began > limit:
            break
        time.sleep(0.05)
    assert plain.name in took, f"plain worker did not stop ({how}) in {limit:.0f}s"
    assert ours.name in took, (
        f"the worker with its relay did not stop ({how}) within {limit:.0f}s "
        f"(the same worker without a relay took {took[plain.name]:.1f}s); "
        f"left: {alive(trees[ours.name])}"
    )
    return took[plain.name], took[ours.name]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "how", ["sigterm", "sigquit", "double-ctrl-c", "sigterm-right-after-relay-killed"]
)
def test_worker_and_relay_stop_as_fast_as_plain_celery(
    database_url: str, procs: Processes, queue: str, how: str
) -> None:
    """SIGTERM (also right after the relay child was SIGKILLed), SIGQUIT (cold) and a
    double Ctrl-C end a prefork worker and its relay child about as fast as the same worker
    without a relay, stopped alongside it: within the plain worker's time plus
    ``shutdown_timeout`` plus 5 s for a loaded machine."""
    env = make_env(database_url, REDIS_URL, queue)
    with redis_queue_cleanup(queue):
        plain = procs.worker("plain", env, pool="prefork", concurrency=2, relay=False)
        ours = procs.worker("ours", env, pool="prefork", concurrency=2)
        ours.wait_for_output("ironflow relay started (process)", 90)
        for w in (plain, ours):
            w.wait_for_output(" ready.", 90)
        signal_name = how
        if how == "sigterm-right-after-relay-killed":
            # the hang: the stop waited on a lock the dead child held
            os.kill(relay_state(ours, env)["pid"], signal.SIGKILL)
            signal_name = "sigterm"
        plain_took, ours_took = _stop_both(plain, ours, signal_name, limit=90)
        print(f"{how}: plain {plain_took:.2f}s, with relay {ours_took:.2f}s")
        assert ours_took <= plain_took + SHUTDOWN_TIMEOUT + 5.0, (
            f"{how}: {ours_took:.1f}s with the relay vs {plain_took:.1f}s without"
        )
        assert "missing 1 required positional argument" not in ours.output()
        assert "Error on terminating" not in ours.output()


# -- Celery's in-thread test worker --------------------------------------------------------


def ironflow_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("ironflow-"))


def test_start_worker_leaves_no_ironflow_threads(store: PostgresStore, db: sa.Engine) -> None:
    """``celery.contrib.testing.worker.start_worker`` (threads pool, relays and projections
    in-thread): once its context exits, no ``ironflow-*`` thread (relays, waker, lease
    keeper, projections) is left."""
    before = ironflow_threads()
    app = TestApp(store)
    app.app.conf.ironflow_relay_enabled = True  # the bootstep runs the relays this time
    app.app.conf.ironflow_projections = PROJECTION  # and a projection
    try:
        with start_worker(
            app.app,
            pool="threads",
            concurrency=2,
            perform_ping_check=False,
            shutdown_timeout=30,
            loglevel="WARNING",
        ):
            app.service.execute(Start(id="leak-1", mode=Mode(mode="RouteResult")))
            app.wait_for_events(TestWorkflow.type, "leak-1", ["Started", "Completed"], 60)
            running = ironflow_threads()
            assert any(n.startswith("ironflow-relay") for n in running), running
            assert "ironflow-projections" in running, running
    finally:
        delete_queue(app.queue, app.broker_url)
    wait_for(
        lambda: ironflow_threads() == before,
        timeout=30,
        what=f"ironflow threads to end after the worker stopped: {ironflow_threads()}",
    )
    # and nothing claims an input submitted after the worker is gone
    app.service.execute(Start(id="leak-2", mode=Mode(mode="RouteResult")))
    time.sleep(1.0)
    assert all(row.locked_by is None for row in outbox(db, "leak-2"))


# -- the supervisor on its own (real processes and threads, no worker) ---------------------


def _ignores_stop(stop: Any) -> None:
    """A service body that never looks at its stop event (a wedged relay)."""
    while True:
        time.sleep(0.1)


def _fails_once_then_runs(calls: list[int]) -> Any:
    def body(stop: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first run fails")
        stop.wait()

    return body


def test_a_service_process_that_ignores_stop_is_killed_after_the_shutdown_timeout() -> None:
    """A relay child that does not stop within ``shutdown_timeout`` is killed and reaped:
    stopping never hangs past the timeout."""
    service = ServiceProcess("relay", "ironflow-test-wedged", _ignores_stop, shutdown_timeout=1.0)
    service.start()
    pid = service.state()["pid"]
    began = time.monotonic()
    assert service.stop() is False  # it had to be killed
    took = time.monotonic() - began
    assert took < 1.0 + 15.0, f"stop took {took:.1f}s"  # timeout + a loaded machine's slack
    assert not_a_zombie(pid)
    assert service.state()["alive"] is False


def test_a_service_thread_that_fails_is_restarted_and_stops() -> None:
    """An in-thread relay that raises is logged and run again after the backoff; stop ends it."""
    calls: list[int] = []
    service = ServiceThread("relay", "ironflow-test-flaky", _fails_once_then_runs(calls), 5.0)
    service.start()
    wait_for(lambda: service.restarts == 1 and len(calls) == 2, timeout=60, what="a restart")
    state = service.state()
    assert state["alive"] and state["last_exit"].startswith("raised RuntimeError"), state
    assert service.stop() is True
    assert "ironflow-test-flaky" not in ironflow_threads()
