"""A worker that cannot reach PostgreSQL stops consuming ironflow's queues until it can.

A pool process whose start guard (or input) finds the database unreachable sends its
message back through the broker (`ironflow_celery.engine.redelivery`) and asks its own
worker, by a remote-control command, to pause. The worker cancels its consumer of every
queue ironflow's tasks route to (Celery's ``cancel_task_queue``), says so at WARNING, and
probes PostgreSQL from a thread (one connection attempt at a time, backing off to 10 s).
Once a probe succeeds the probe sends the worker the resume command, which adds the
consumers back (``add_task_queue``) and says so at WARNING. Meanwhile the queues' messages
wait in the broker for hosts that can reach the database, instead of bouncing through this
one. Both transitions run in the worker's event loop, as Celery's own ``cancel_consumer``
and ``add_consumer`` commands do.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from celery import bootsteps
from celery.worker.control import control_command
from sqlalchemy.engine import make_url

from ironflow_celery.engine.redelivery import PAUSE_COMMAND, RESUME_COMMAND
from ironflow_celery.engine.runtime import runtime_of
from ironflow_celery.storage import sql

__all__ = ["PROBE_MAX_DELAY", "DatabaseGate", "DatabaseGateStep", "ironflow_queues"]

log = logging.getLogger("ironflow_celery.worker")

PROBE_MAX_DELAY = 10.0
"""Seconds between two probes of an unreachable database, at most."""
_RESEND_AFTER = 10.0
"""Seconds a probe waits for its resume command to arrive before sending it again."""


def ironflow_queues(app: Any, consumed: set[str]) -> list[str]:
    """The queues among `consumed` that ironflow's effect, timer and execute tasks route to."""
    found: set[str] = set()
    for name in list(app.tasks):
        if not name.startswith("ironflow."):
            continue
        queue = app.amqp.router.route({}, name).get("queue")
        queue_name = getattr(queue, "name", queue)
        if isinstance(queue_name, str) and queue_name in consumed:
            found.add(queue_name)
    return sorted(found)


def _consumed(consumer: Any) -> set[str]:
    task_consumer = getattr(consumer, "task_consumer", None)
    return {q.name for q in getattr(task_consumer, "queues", None) or ()}


class DatabaseGate:
    """Pauses and resumes one worker's ironflow queues as PostgreSQL comes and goes."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.paused: list[str] = []
        self.stopping = threading.Event()
        self._resumed = threading.Event()
        self._probe: threading.Thread | None = None

    def start(self) -> None:
        """Nothing to start: the gate acts when a task reports an unreachable database."""

    def stop(self) -> None:
        """Nothing to stop on a consumer restart (a lost broker connection): the queues
        stay paused and the probe keeps going until the database answers."""

    def shutdown(self) -> None:
        """The worker is stopping: end the probe."""
        self.stopping.set()

    def unreachable(self, error: str) -> None:
        """A pool process found the database unreachable (runs in the event loop)."""
        if self._probe is not None and self._probe.is_alive():
            return  # paused already, or a probe is deciding
        consumer = self.consumer
        queues = ironflow_queues(consumer.app, _consumed(consumer))
        for queue in queues:
            consumer.cancel_task_queue(queue)
        self.paused = queues
        self._resumed.clear()
        log.warning(
            "ironflow: PostgreSQL is unreachable from this worker (%s): paused consuming %s "
            "until it answers (their messages wait in the broker for other workers)",
            error,
            ", ".join(queues) or "no queue (it consumes none of ironflow's)",
        )
        self._probe = threading.Thread(
            target=self._run_probe, name="ironflow-database-probe", daemon=True
        )
        self._probe.start()

    def reachable(self) -> None:
        """The probe reached the database (runs in the event loop)."""
        if self._resumed.is_set():
            return
        for queue in self.paused:
            self.consumer.add_task_queue(queue)
        if self.paused:
            log.warning(
                "ironflow: PostgreSQL answers again: resumed consuming %s", ", ".join(self.paused)
            )
        self.paused = []
        self._resumed.set()

    def _conninfo(self) -> str:
        runtime = runtime_of(self.consumer.app)
        url = make_url(runtime.database_url or runtime.store.engine.url)
        return url.set(drivername="postgresql").render_as_string(hide_password=False)

    def _run_probe(self) -> None:
        delay = 1.0
        conninfo = self._conninfo()
        while not self.stopping.is_set():
            try:
                with psycopg.connect(conninfo, connect_timeout=5) as conn:
                    conn.execute(sql.PROBE)
            except psycopg.Error as exc:
                log.debug("ironflow: database probe failed: %s", exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, PROBE_MAX_DELAY)
                continue
            try:
                self.consumer.app.control.broadcast(
                    RESUME_COMMAND, destination=[self.consumer.hostname], reply=False
                )
            except Exception as exc:  # the broker is away: the next round sends it again
                log.debug("ironflow: could not send the resume command: %s", exc)
            if self._resumed.wait(_RESEND_AFTER) or self.stopping.is_set():
                return


class DatabaseGateStep(bootsteps.StartStopStep):
    """Gives the worker's consumer its `DatabaseGate` (``create``); stops the probe when the
    consumer shuts down (a consumer step's ``shutdown``: the worker is stopping)."""

    label = "ironflow database gate"

    def create(self, consumer: Any) -> DatabaseGate:
        gate = DatabaseGate(consumer)
        consumer.ironflow_gate = gate
        return gate

    def shutdown(self, consumer: Any) -> None:
        self.obj.shutdown()


def _gate(state: Any) -> DatabaseGate | None:
    return getattr(state.consumer, "ironflow_gate", None)


@control_command(name=PAUSE_COMMAND, args=[("error", str)], signature="<error>")
def ironflow_database_unreachable(state: Any, error: str = "", **kwargs: Any) -> dict[str, str]:
    """Stop consuming ironflow's queues until PostgreSQL answers (sent by pool processes)."""
    gate = _gate(state)
    if gate is not None:
        state.consumer.call_soon(gate.unreachable, error)
    return {"ok": "pausing"}


@control_command(name=RESUME_COMMAND)
def ironflow_database_reachable(state: Any, **kwargs: Any) -> dict[str, str]:
    """Consume ironflow's queues again (sent by the worker's own database probe)."""
    gate = _gate(state)
    if gate is not None:
        state.consumer.call_soon(gate.reachable)
    return {"ok": "resuming"}
