"""A task that cannot reach PostgreSQL sends its message back through the broker, never
drops it, and asks its worker to stop consuming ironflow's queues until the database
answers again (the worker side: `ironflow_celery.integration.db_gate`).

The tasks are registered with ``max_retries=None``: Celery's ``Task.retry(max_retries=None)``
means "the task's default", which is 3 unless the task itself says None (unlimited), so
without it the fourth redelivery of a message ended in ``raised unexpected`` and dropped it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["PAUSE_COMMAND", "RESUME_COMMAND", "send_back"]

log = logging.getLogger("ironflow_celery.tasks")

PAUSE_COMMAND = "ironflow_database_unreachable"
"""The remote-control command a pool process sends its own worker: stop consuming."""
RESUME_COMMAND = "ironflow_database_reachable"
"""The command the worker's probe sends itself once PostgreSQL answers: consume again."""

_ASK_EVERY = 5.0
"""Seconds between two pause requests of one process (every bounced message would ask)."""
_asked = {"at": float("-inf")}
_lock = threading.Lock()


def send_back(task: Any, exc: BaseException, *, delay: float) -> BaseException:
    """The `Retry` that sends `task`'s message back through the broker after `delay`
    seconds (raise it), after asking the worker to pause its ironflow queues."""
    _ask_worker_to_pause(task, exc)
    # No max_retries argument: None here means the task's own, which is None (unlimited).
    retry: BaseException = task.retry(exc=exc, countdown=delay)
    return retry


def _ask_worker_to_pause(task: Any, exc: BaseException) -> None:
    hostname = getattr(task.request, "hostname", None)
    if not hostname:  # called directly or eagerly: no worker to ask
        return
    now = time.monotonic()
    with _lock:
        if now - _asked["at"] < _ASK_EVERY:
            return
        _asked["at"] = now
    try:
        task.app.control.broadcast(
            PAUSE_COMMAND,
            arguments={"error": str(exc)[:500]},
            destination=[hostname],
            reply=False,
        )
    except Exception as error:  # the broker is flaky too: the retry below still runs
        log.debug("ironflow: could not ask %s to pause its queues: %s", hostname, error)
