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
  current (`WorkerEvents`, every `REFRESH_SECONDS`), and hands them to a thread of its
  own that sends them under the worker's host name (a broker that is down delays
  events, never the rows).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, cast

from kombu.utils.encoding import safe_repr as _kombu_safe_repr

from ironflow_celery.model.storable import storable_text

__all__ = ["REFRESH_SECONDS", "SENDER_QUEUE", "RowEvents", "WorkerEvents", "announce"]

log = logging.getLogger("ironflow_celery.tasks")

# kombu leaves safe_repr unannotated; it always returns a str (what Celery puts in events).
_safe_repr = cast(Callable[[Any], str], _kombu_safe_repr)

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


SENDER_QUEUE = 10_000
"""Events a pool process holds for its sender thread at most; beyond, new ones are dropped
(a broker that is down must not grow a pool process without bound)."""


class _Sender:
    """A pool process's sender of its groups' row events: a daemon thread with its own
    broker connection, so a slow or unreachable broker never holds a group's run (Celery's
    own task events leave from the worker's process, where its event loop buffers them)."""

    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self.queue: queue.Queue[tuple[str, str, dict[str, Any]]] = queue.Queue(SENDER_QUEUE)
        self._dropped = 0
        self.thread = threading.Thread(target=self._run, name="ironflow-row-events", daemon=True)
        self.thread.start()

    def put(self, events: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        now = time.time()  # when it happened, not when the thread sends it
        for type_, row_id, fields in events:
            try:
                self.queue.put_nowait((type_, row_id, {"timestamp": now, **fields}))
            except queue.Full:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.warning(
                        "ironflow: %d row task events dropped: the broker takes none",
                        self._dropped,
                    )

    def _run(self) -> None:
        connection: Any = None
        dispatcher: Any = None
        while True:
            type_, row_id, fields = self.queue.get()
            try:
                if dispatcher is None:
                    connection = self.app.connection_for_write()
                    connection.ensure_connection(max_retries=3)
                    dispatcher = self.app.events.Dispatcher(connection, hostname=self.hostname)
                dispatcher.send(type_, uuid=row_id, **fields)
            except Exception as exc:  # a monitoring event never fails the run it describes
                # what waits now would fail the same way: drop it, say so once
                dropped = 1
                with contextlib.suppress(queue.Empty):
                    while True:
                        self.queue.get_nowait()
                        dropped += 1
                log.warning("ironflow: %d row task event(s) not sent: %s", dropped, exc)
                with contextlib.suppress(Exception):
                    if connection is not None:
                        connection.release()
                connection = dispatcher = None


_senders: dict[tuple[int, int, str], _Sender] = {}


def _sender(task: Any) -> _Sender:
    hostname = task.request.hostname or ""
    key = (os.getpid(), id(task.app), hostname)
    sender = _senders.get(key)
    if sender is None:
        with _lock:
            sender = _senders.get(key)
            if sender is None:
                sender = _senders[key] = _Sender(task.app, hostname)
    return sender


def _send(task: Any, events: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
    """Through the worker's own dispatcher when it runs in this process (as Celery sends
    its task events), else by this pool process's sender thread, when its worker sends
    task events."""
    if not events:
        return
    consumer = _own_worker(task)
    if consumer is None:
        if _SHARED[0]:
            _sender(task).put(events)
        return
    dispatcher: Any = getattr(consumer, "event_dispatcher", None)
    if not _sends_task_events(dispatcher):
        return
    try:
        for type_, row_id, fields in events:
            dispatcher.send(type_, uuid=row_id, **fields)
    except Exception as exc:  # a monitoring event never fails the run it describes
        log.warning("ironflow: could not send the task events of a group's rows: %s", exc)


class RowEvents:
    """The task events of one group's rows, sent as each row's state becomes known."""

    def __init__(self, task: Any, rows: Sequence[Any]) -> None:
        self.task = task
        self.rows = {str(r.row_id): r for r in rows}
        self._maxsize = getattr(task, "resultrepr_maxsize", 1024)

    def _send(self, events: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        _send(self.task, events)

    def started(self) -> None:
        """``task-received`` and ``task-started`` for every row: what a single-row message
        would have shown when its worker took it."""

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
                "args": _safe_repr([row.ref, row_id, row.attempt]),
                "kwargs": _safe_repr(kwargs),
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

        events: list[tuple[str, str, dict[str, Any]]] = []
        for row_id, state, value in outcomes:
            if state == "SUCCESS":
                fields = {"result": saferepr(value, self._maxsize)}
                events.append(("task-succeeded", row_id, fields))
                continue
            fields = {"exception": _safe_repr(value), "traceback": _traceback(value)}
            events.append(("task-retried" if state == "RETRY" else "task-failed", row_id, fields))
        self._send(events)

    def sent_back(self, exc: BaseException) -> None:
        """The group went back through the broker before any row ran (its start guard
        could not reach PostgreSQL): RETRY for every row, as the group's task shows."""

        fields = {"exception": _safe_repr(exc), "traceback": _traceback(exc)}
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
