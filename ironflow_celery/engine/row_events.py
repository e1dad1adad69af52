"""Each row of a group message as its own task in Flower and ``celery events``.

A single-row message is a Celery task whose id is the row id, so Celery's own task events
show it. A group message is one task for many rows; so that every row still shows as its
own task, the group's task sends, for each of its rows, the task events Celery would have
sent had the row travelled alone: ``task-received`` and ``task-started`` when the group
starts (its start guard starts every row in one statement), then ``task-succeeded``,
``task-retried`` or ``task-failed`` once the row's outcome is committed, with the row id
as uuid, the single-row task's name, args and kwargs, and the group's task as parent.

They go out only when the worker sends task events (``-E``, ``worker_send_task_events``
or ``celery control enable_events``, which Flower sends by default):

- a pool that runs tasks in the worker's process (threads, solo, gevent, eventlet) sends
  them through the worker's own event dispatcher, so its settings apply as they stand;
- a prefork pool process has no dispatcher of its worker: it reads whether the worker
  sends task events from a byte of memory shared with it at fork, which the worker keeps
  current (`WorkerEvents`, every `REFRESH_SECONDS`), and sends through the app's producer
  pool under the worker's host name.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ironflow_celery.model.storable import storable_text

__all__ = ["REFRESH_SECONDS", "RowEvents", "WorkerEvents", "announce"]

log = logging.getLogger("ironflow_celery.tasks")

REFRESH_SECONDS = 1.0
"""How often a worker copies its current choice (task events or not) for its prefork pool
processes: a ``celery control enable_events`` reaches their groups' rows within this."""

# One byte shared with the pool processes this process forks: 1 while its worker sends
# task events. Anonymous and MAP_SHARED: a child reads what the worker writes later.
_SHARED = mmap.mmap(-1, 1)
_lock = threading.Lock()
# The consumer of the worker running in this process, by app, with the pid that owns it:
# a forked pool process inherits the entry but must not use the parent's connection.
_consumers: dict[int, tuple[int, Any]] = {}


def _sends_task_events(dispatcher: Any) -> bool:
    groups = getattr(dispatcher, "groups", None)
    return bool(dispatcher is not None and dispatcher.enabled and (not groups or "task" in groups))


class WorkerEvents:
    """The worker side: which dispatcher a group's task may send its rows' events through
    (`ironflow_celery.integration.task_events` attaches it to the worker's consumer)."""

    def __init__(self, app: Any, task_events: bool) -> None:
        self.app = app
        _SHARED[0] = 1 if task_events else 0  # before the pool forks: its first value

    def attach(self, consumer: Any) -> None:
        with _lock:
            _consumers[id(self.app)] = (os.getpid(), consumer)
        self.refresh(consumer)

    def refresh(self, consumer: Any) -> None:
        """Copy the worker's current choice for its prefork pool processes."""
        _SHARED[0] = 1 if _sends_task_events(getattr(consumer, "event_dispatcher", None)) else 0

    def detach(self) -> None:
        with _lock:
            _consumers.pop(id(self.app), None)
        _SHARED[0] = 0


def _own_worker(task: Any) -> Any:
    """The consumer of the worker running in this very process, if any."""
    owner = _consumers.get(id(task.app))
    return owner[1] if owner is not None and owner[0] == os.getpid() else None


def _active(task: Any) -> bool:
    """Whether the worker running `task` sends task events now (cheap: no I/O)."""
    consumer = _own_worker(task)
    if consumer is not None:
        return _sends_task_events(getattr(consumer, "event_dispatcher", None))
    return bool(_SHARED[0])


@contextmanager
def _dispatcher(task: Any) -> Iterator[Any]:
    """The dispatcher to send this task's rows' events through, or None when the worker
    running it sends no task events."""
    consumer = _own_worker(task)
    if consumer is not None:
        dispatcher = getattr(consumer, "event_dispatcher", None)
        yield dispatcher if _sends_task_events(dispatcher) else None
        return
    if not _SHARED[0]:
        yield None
        return
    with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
        yield dispatcher


class RowEvents:
    """The task events of one group's rows, sent as each row's state becomes known."""

    def __init__(self, task: Any, rows: Sequence[Any]) -> None:
        self.task = task
        self.rows = {str(r.row_id): r for r in rows}
        self._maxsize = getattr(task, "resultrepr_maxsize", 1024)

    def _send(self, events: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        if not events:
            return
        try:
            with _dispatcher(self.task) as dispatcher:
                if dispatcher is None:
                    return
                for type_, row_id, fields in events:
                    dispatcher.send(type_, uuid=row_id, **fields)
        except Exception as exc:  # a monitoring event never fails the run it describes
            log.warning("ironflow: could not send the task events of a group's rows: %s", exc)

    def started(self) -> None:
        """``task-received`` and ``task-started`` for every row: what a single-row message
        would have shown when its worker took it."""
        from kombu.utils.encoding import safe_repr

        request = self.task.request
        group_id = request.id
        root_id = getattr(request, "root_id", None) or group_id
        events: list[tuple[str, str, dict[str, Any]]] = []
        for row_id, row in self.rows.items():
            kwargs: dict[str, Any] = {"lease": row.lease}
            if row.effect_type is not None:
                kwargs["effect_type"] = row.effect_type
            if row.due is not None:
                kwargs["due"] = row.due
            received = {
                "name": self.task.name,
                "args": safe_repr([row.ref, row_id, row.attempt]),
                "kwargs": safe_repr(kwargs),
                "root_id": root_id,
                "parent_id": group_id,
                "retries": max(0, row.attempt - 1),
                "eta": None,
                "expires": None,
            }
            events.append(("task-received", row_id, received))
            events.append(("task-started", row_id, {}))
        self._send(events)

    def finished(self, outcomes: Sequence[tuple[str, str, Any]]) -> None:
        """Each row's outcome, ``(row id, state, value)``: SUCCESS with its result dict,
        RETRY with the handler's exception, FAILURE with `DeadLettered` (caused by it)."""
        from celery.utils.saferepr import saferepr
        from kombu.utils.encoding import safe_repr

        events: list[tuple[str, str, dict[str, Any]]] = []
        for row_id, state, value in outcomes:
            if state == "SUCCESS":
                fields = {"result": saferepr(value, self._maxsize)}
                events.append(("task-succeeded", row_id, fields))
                continue
            fields = {"exception": safe_repr(value), "traceback": _traceback(value)}
            events.append(("task-retried" if state == "RETRY" else "task-failed", row_id, fields))
        self._send(events)

    def sent_back(self, exc: BaseException) -> None:
        """The group went back through the broker before any row ran (its start guard
        could not reach PostgreSQL): RETRY for every row, as the group's task shows."""
        from kombu.utils.encoding import safe_repr

        fields = {"exception": safe_repr(exc), "traceback": _traceback(exc)}
        self._send([("task-retried", row_id, dict(fields)) for row_id in self.rows])


def _traceback(exc: BaseException) -> str:
    """The exception's traceback with its causes, escaped as ``last_error`` is."""
    return storable_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def announce(task: Any, rows: Sequence[Any]) -> RowEvents | None:
    """Send ``task-received``/``task-started`` for each row of a group and return what
    sends their outcomes; None when its worker sends no task events now (or the task
    opted out: ``Task.send_events``), which costs a dictionary look-up."""
    if not getattr(task, "send_events", True) or not _active(task):
        return None
    events = RowEvents(task, rows)
    events.started()
    return events
