"""A Celery worker's own services (the relays, the projections), supervised.

Under the prefork pool a service runs in a child process of the worker, so the pool never
forks a process with relay threads in it; under the solo, threads or gevent pools it runs
in a thread. Either way the worker watches it: a service that dies (the OOM killer's
SIGKILL, a crash) is logged with its exit status, reaped, counted in
``ironflow_relay_restarts_total`` and restarted with exponential backoff.

Stopping never waits on a peer that may be dead: the worker asks a child to stop by writing
one byte to a pipe only the child reads (never a lock or condition shared with it), waits
at most the shutdown timeout, then kills it. The child drops the signal handlers it
inherited from Celery: SIGTERM, SIGINT and SIGHUP stop it gracefully, a second one or
SIGQUIT ends it at once, and it stops by itself when the worker process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_for
from typing import Any

from ironflow_celery.engine import metrics
from ironflow_celery.storage.db import dispose_after_fork

__all__ = [
    "COLD_GRACE",
    "RESTART_BACKOFF_BASE",
    "RESTART_BACKOFF_MAX",
    "STABLE_AFTER",
    "THREAD_COLD_GRACE",
    "ServiceProcess",
    "ServiceThread",
    "Target",
    "WorkerService",
    "describe_exit",
    "start_service",
]

log = logging.getLogger("ironflow_celery.supervisor")

Target = Callable[[Any], Any]
"""A service body: runs until the event it is given is set."""

RESTART_BACKOFF_BASE = 1.0
"""Seconds before the first restart of a service that died."""
RESTART_BACKOFF_MAX = 30.0
"""The backoff doubles per consecutive death up to this many seconds."""
STABLE_AFTER = 60.0
"""A service that ran this long before dying restarts after the base delay again."""
COLD_GRACE = 1.0
"""Cold shutdown: seconds a child gets to stop by itself before it is killed."""
THREAD_COLD_GRACE = 5.0
"""Cold shutdown of an in-thread service: seconds to wait for its threads to end."""


def describe_exit(code: int | None) -> str:
    """A child's exit status in words: ``exit code 1`` / ``killed by SIGKILL``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _celery_shutting_down() -> bool:
    """True once Celery's own signal handlers asked this worker to stop (warm or cold)."""
    from celery.worker import state

    return state.should_stop is not None or state.should_terminate is not None


def _set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def _poke(fd: int) -> None:
    """Write one byte to a pipe; never blocks, never fails (the reader may be dead)."""
    with contextlib.suppress(OSError):
        os.write(fd, b"x")


# fork, never spawn/forkserver: the child needs the loaded app, registry and runtime as
# they are (Python 3.14 changes the platform default).
class _Child(multiprocessing.context.ForkProcess):
    """The child process: runs `target` in a thread until asked to stop."""

    def __init__(
        self, name: str, target: Target, stop_fds: tuple[int, int], shutdown_timeout: float
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._body = target
        self._stop_r, self._stop_w = stop_fds
        self._shutdown_timeout = shutdown_timeout

    def run(self) -> None:
        os.close(self._stop_w)  # only the worker writes to it
        wake_r, wake_w = os.pipe()
        _set_nonblocking(wake_w)
        _reset_signals(wake_w)
        dispose_after_fork()
        parent = os.getppid()
        stop = threading.Event()
        failure: list[BaseException] = []

        def body() -> None:
            try:
                self._body(stop)
            except BaseException as exc:  # reported by the exit code and the log below
                failure.append(exc)
                log.exception("ironflow %s: stopped by an error", self.name)

        runner = threading.Thread(target=body, name=self.name, daemon=True)
        runner.start()
        try:
            while runner.is_alive():
                if wait_for([self._stop_r, wake_r], timeout=1.0):
                    break
                if os.getppid() != parent:
                    log.warning("ironflow %s: worker process gone; stopping", self.name)
                    break
            stop.set()
            runner.join(self._shutdown_timeout + 1.0)
            if runner.is_alive():
                log.error(
                    "ironflow %s: did not stop within %.1fs; exiting anyway",
                    self.name,
                    self._shutdown_timeout,
                )
                os._exit(1)
        finally:
            metrics.process_exiting()
        if failure:
            raise SystemExit(1)


def _reset_signals(wake_fd: int) -> None:
    """Replace the handlers the child inherited from Celery (which would run a warm
    shutdown of a worker that is not there, or re-exec the worker on SIGHUP)."""
    received = 0

    def graceful(signum: int, frame: Any) -> None:
        nonlocal received
        received += 1
        if received > 1:  # a second request: the operator means it
            os._exit(128 + signum)
        _poke(wake_fd)

    def at_once(signum: int, frame: Any) -> None:
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, graceful)
    signal.signal(signal.SIGQUIT, at_once)


class ServiceProcess:
    """A supervised child process of the worker running `target` (prefork pools)."""

    mode = "process"

    def __init__(self, label: str, name: str, target: Target, shutdown_timeout: float) -> None:
        self.label = label  # "relay" / "projections": the metric's label
        self.name = name  # the child's process name
        self.target = target
        self.shutdown_timeout = shutdown_timeout
        self.restarts = 0
        self.last_exit: str | None = None
        self.started_at: float | None = None
        self._proc: Any = None
        self._stop_w: int | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        """Start the child and the thread that watches it."""
        metrics.relay_restarted(self.label, 0)
        with self._lock:
            self._spawn()
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"ironflow-{self.label}-supervisor", daemon=True
        )
        self._supervisor.start()

    def _spawn(self) -> None:
        """Fork a child with a fresh stop pipe (caller holds the lock)."""
        stop_r, stop_w = os.pipe()
        _set_nonblocking(stop_w)
        proc = _Child(self.name, self.target, (stop_r, stop_w), self.shutdown_timeout)
        metrics.relay_up(self.label, True)  # before the fork: the child inherits it
        try:
            proc.start()
        except BaseException:
            metrics.relay_up(self.label, False)
            os.close(stop_w)
            raise
        finally:
            os.close(stop_r)  # the child has its copy
        self._proc, self._stop_w = proc, stop_w
        self.started_at = time.monotonic()

    def _supervise(self) -> None:
        """Wait for the child to die; reap it, log it, restart it after a backoff."""
        delay = RESTART_BACKOFF_BASE
        while True:
            proc = self._proc
            died = wait_for([proc.sentinel], timeout=0.5)
            with self._lock:
                if self._stopping.is_set():
                    return
                if not died:
                    continue
                proc.join()  # reap: no zombie
                self._close_stop_pipe()
                code = proc.exitcode
                lived = time.monotonic() - (self.started_at or 0.0)
            self.last_exit = describe_exit(code)
            metrics.relay_up(self.label, False)
            metrics.process_exiting(proc.pid)  # its live gauges go with it
            if _celery_shutting_down():  # the worker is stopping: no restart
                log.log(
                    logging.INFO if code in (0, 128 + signal.SIGINT) else logging.WARNING,
                    "ironflow %s process %d exited during the worker's shutdown (%s)",
                    self.label,
                    proc.pid,
                    self.last_exit,
                )
                return
            if lived >= STABLE_AFTER:
                delay = RESTART_BACKOFF_BASE
            log.error(
                "ironflow %s process %d died (%s) after %.1fs; restarting it in %.1fs",
                self.label,
                proc.pid,
                self.last_exit,
                lived,
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                # Counted before the fork, so the new child's metrics endpoint shows it.
                self.restarts += 1
                metrics.relay_restarted(self.label)
                try:
                    self._spawn()
                except Exception:
                    log.exception("ironflow %s: restart failed; trying again", self.label)
                    self._proc = proc  # its sentinel stays ready: the loop retries
                    self.started_at = time.monotonic()  # so the backoff keeps growing
                    delay = min(delay * 2, RESTART_BACKOFF_MAX)
                    continue
            log.warning(
                "ironflow %s process restarted (pid %d, restart %d)",
                self.label,
                self._proc.pid,
                self.restarts,
            )
            delay = min(delay * 2, RESTART_BACKOFF_MAX)

    def _close_stop_pipe(self) -> None:
        if self._stop_w is not None:
            with contextlib.suppress(OSError):
                os.close(self._stop_w)
            self._stop_w = None

    def stop(self, *, cold: bool = False) -> bool:
        """Ask the child to stop, wait at most the shutdown timeout (a second on a cold
        shutdown), then kill it. True when it stopped by itself."""
        with self._lock:
            self._stopping.set()
            proc, stop_w = self._proc, self._stop_w
        clean = True
        if proc is not None and proc.exitcode is None:
            if stop_w is not None:
                _poke(stop_w)
            grace = min(self.shutdown_timeout, COLD_GRACE) if cold else self.shutdown_timeout
            proc.join(grace)
            if proc.exitcode is None:
                clean = False
                log.warning(
                    "ironflow %s process %d did not stop within %.1fs; killing it",
                    self.label,
                    proc.pid,
                    grace,
                )
                proc.kill()
                proc.join(5.0)
            self.last_exit = describe_exit(proc.exitcode)
        with self._lock:
            self._close_stop_pipe()
        if self._supervisor is not None:
            self._supervisor.join(2.0)
        metrics.relay_up(self.label, False)
        return clean

    def state(self) -> dict[str, Any]:
        """What ``celery inspect ironflow_relay`` shows."""
        proc = self._proc
        # Its sentinel, not is_alive(): reaping belongs to the supervisor thread alone.
        alive = proc is not None and not wait_for([proc.sentinel], timeout=0)
        return {
            "mode": self.mode,
            "pid": proc.pid if proc is not None else None,
            "alive": alive,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "uptime": round(time.monotonic() - self.started_at, 1)
            if alive and self.started_at is not None
            else None,
        }


class ServiceThread:
    """A supervised thread of the worker process running `target` (solo/threads pools)."""

    mode = "thread"

    def __init__(self, label: str, name: str, target: Target, shutdown_timeout: float) -> None:
        self.label = label
        self.name = name
        self.target = target
        self.shutdown_timeout = shutdown_timeout
        self.restarts = 0
        self.last_exit: str | None = None
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        metrics.relay_restarted(self.label, 0)
        self._thread.start()

    def _loop(self) -> None:
        """Run `target`; if it ends before we are stopped, log it and run it again."""
        delay = RESTART_BACKOFF_BASE
        while not self._stop.is_set():
            self.started_at = time.monotonic()
            metrics.relay_up(self.label, True)
            try:
                self.target(self._stop)
                self.last_exit = "returned"
            except Exception as exc:
                self.last_exit = f"raised {exc!r}"
                log.exception("ironflow %s thread failed", self.label)
            metrics.relay_up(self.label, False)
            if self._stop.is_set():
                return
            if time.monotonic() - self.started_at >= STABLE_AFTER:
                delay = RESTART_BACKOFF_BASE
            log.error(
                "ironflow %s thread ended (%s); restarting it in %.1fs",
                self.label,
                self.last_exit,
                delay,
            )
            if self._stop.wait(delay):
                return
            self.restarts += 1
            metrics.relay_restarted(self.label)
            delay = min(delay * 2, RESTART_BACKOFF_MAX)

    def stop(self, *, cold: bool = False) -> bool:
        """Ask the thread to stop and wait for it. A thread cannot be killed, so a cold
        shutdown waits for it too, at most `THREAD_COLD_GRACE` (Celery's test worker joins
        its own thread for 10 s); past that the daemon thread dies with the process."""
        self._stop.set()
        grace = (
            min(self.shutdown_timeout, THREAD_COLD_GRACE) if cold else self.shutdown_timeout + 1.0
        )
        self._thread.join(grace)
        if self._thread.is_alive():
            log.warning("ironflow %s thread did not stop within %.1fs", self.label, grace)
            return False
        return True

    def state(self) -> dict[str, Any]:
        alive = self._thread.is_alive()
        return {
            "mode": self.mode,
            "pid": os.getpid(),
            "alive": alive,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "uptime": round(time.monotonic() - self.started_at, 1)
            if alive and self.started_at is not None
            else None,
        }


def start_service(
    label: str, name: str, target: Target, *, worker: Any, shutdown_timeout: float
) -> ServiceProcess | ServiceThread:
    """Start `target` the way `worker`'s pool allows: a child process under prefork, a
    thread otherwise."""
    pool = getattr(worker, "pool_cls", None)
    pool_name = getattr(pool, "__module__", "") + "." + getattr(pool, "__name__", str(pool))
    cls = ServiceProcess if "prefork" in pool_name else ServiceThread
    service = cls(label, name, target, shutdown_timeout)
    service.start()
    return service


class WorkerService:
    """A worker's own service as its bootstep's ``create`` returns it: Celery's
    ``StartStopStep`` calls `start` when the worker starts, `stop` on a warm shutdown and
    `terminate` on a cold one, so the step itself holds no lifecycle code.

    `start` asks `prepare` for the body (at start, in the worker: its settings and ``-Q``
    are final then) and runs it supervised (`start_service`). A subclass names the service
    (`label`, `name`) and says what it runs (`prepare`) and what started (`started`)."""

    label = "service"
    """The metric's label (``relay`` / ``projections``)."""
    name = "ironflow-service"
    """The child process's (or thread's) name."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.running: ServiceProcess | ServiceThread | None = None

    def prepare(self) -> tuple[Target, float]:
        """(the body, its shutdown timeout in seconds); may refuse to start by raising."""
        raise NotImplementedError

    def started(self, service: ServiceProcess | ServiceThread) -> None:
        """Say what started (a log line); nothing by default."""

    def start(self) -> None:
        target, shutdown_timeout = self.prepare()
        self.running = start_service(
            self.label, self.name, target, worker=self.worker, shutdown_timeout=shutdown_timeout
        )
        self.started(self.running)

    def stop(self) -> None:
        """Warm shutdown: the body finishes its work, within the shutdown timeout."""
        running, self.running = self.running, None
        if running is not None:
            running.stop()

    def terminate(self) -> None:
        """Cold shutdown (SIGQUIT, a second Ctrl-C, the test worker's exit): a second at
        most, then a child process is killed (its claims come back after their lease)."""
        running, self.running = self.running, None
        if running is not None:
            running.stop(cold=True)

    def state(self) -> dict[str, Any]:
        """Its part of ``celery inspect ironflow_relay``."""
        return self.running.state() if self.running is not None else {"mode": "stopped"}
