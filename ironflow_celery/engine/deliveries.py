"""Published rows whose message a worker that is gone had taken off a Redis queue.

On Redis, kombu keeps every message a consumer received but has not acknowledged in the
``unacked`` hash (delivery time in ``unacked_index``), and gives it back to its queue only
after ``visibility_timeout`` (1 h by default). A worker killed with prefetched messages, or
one that lost its broker connection (Celery drops its reserved requests then), leaves its
messages there while the relay that published them keeps their rows leased: without this,
they waited for ``ironflow_dispatch_timeout`` (30 min) plus the visibility timeout.

`LostDeliveries` tells those rows apart from rows whose message merely waits (invariant 10):
a row counts as lost when its message has sat unacknowledged for a while, *and* no live
worker reports holding it (Celery's ``inspect query_task`` for reserved and running requests
and ``inspect scheduled`` for countdowns), twice in a row. The relay then releases the row's
claim, so it is claimed and published again at once; the stale message is removed from the
``unacked`` hash (it would only be skipped as stale an hour later). A live worker that is
slow to answer costs at worst a duplicate message, which the start guard skips. A grouped
message (``effect_batch_size``) counts for every row it carries.

A message can also vanish without a trace: Redis hands a pushed message to whichever
consumer's ``BRPOP`` waits, and a host cut off the network a moment before still has one
waiting on the server (until its one-second timeout); the reply never arrives, so the
message is in no queue and in no ``unacked`` entry, and the row would stay leased until
``dispatch_timeout``. Given the queues the rows were published to, a row whose message is
in none of them (all their messages read, up to a bound), in no ``unacked`` entry and held
by no live worker, at two looks in a row, counts as lost as well. A message that waits in
its queue is always seen there (invariant 10); a queue too long to read proves nothing.
Other transports (RabbitMQ requeues a dead consumer's messages at once) are left alone.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

__all__ = ["LostDeliveries", "LostFinder"]

log = logging.getLogger("ironflow_celery.relay")

LostFinder = Callable[[Sequence[uuid.UUID], float, Collection[str]], set[uuid.UUID]]
"""``(row ids, older_than seconds, their queues) -> the lost ones``: what a relay calls
(see `Relay`); with no queues named, only rows found in ``unacked`` can count as lost."""

_SCAN_LIMIT = 5000
"""Unacknowledged messages read per check, at most (the oldest first)."""


class LostDeliveries:
    """Finds published rows whose message a worker that is gone took (Redis only)."""

    def __init__(self, app: Any, *, reply_timeout: float = 3.0) -> None:
        self.app = app
        self.reply_timeout = reply_timeout
        self.enabled = True
        self._suspects: set[str] = set()

    def __call__(
        self, ids: Sequence[uuid.UUID], older_than: float, queues: Collection[str] = ()
    ) -> set[uuid.UUID]:
        """Those of `ids` whose message has waited unacknowledged over `older_than` seconds,
        or is in none of `queues` and in no ``unacked`` entry, with no live worker holding
        it, at this look and the one before."""
        if not self.enabled or not ids:
            return set()
        wanted = {str(row_id): row_id for row_id in ids}
        with self.app.pool.acquire(block=True) as conn:
            if getattr(conn.transport, "driver_type", None) != "redis":
                self.enabled = False  # RabbitMQ & co. give a dead consumer's messages back
                return set()
            channel = conn.default_channel
            taken, delivered = self._unacked(channel, set(wanted), older_than)
            # Rows whose message no consumer took: waiting in a queue, or gone (read after
            # `unacked`, so a message moving on between the two reads is seen at the next
            # look; a complete `unacked` read is needed to say "in no entry").
            vanished: set[str] = set()
            if delivered is not None and queues:
                rest = set(wanted) - delivered
                queued = self._queued(channel, queues) if rest else None
                if queued is not None:
                    vanished = rest - queued
            suspects = set(taken) | vanished
            if not suspects:
                self._suspects.clear()
                return set()
            missing = suspects - self._held(sorted(suspects))
            lost = missing & self._suspects
            self._suspects = missing - lost
            if lost - set(taken):
                log.warning(
                    "ironflow: %d published messages are in no queue (%s) and were taken by "
                    "no live worker (a consumer cut off the network took them)",
                    len(lost - set(taken)), ", ".join(sorted(queues)),
                )  # fmt: skip
            tags = [tag for task_id in lost & set(taken) for tag in taken[task_id][1]]
            if tags:
                channel.client.pipeline().zrem(channel.unacked_index_key, *tags).hdel(
                    channel.unacked_key, *tags
                ).execute()
        rows = {
            row
            for task_id in lost
            for row in (taken[task_id][0] if task_id in taken else [task_id])
        }
        return {wanted[row] for row in rows}

    def _unacked(
        self, channel: Any, wanted: set[str], older_than: float
    ) -> tuple[dict[str, tuple[list[str], list[str]]], set[str] | None]:
        """{task id: (its rows among `wanted`, delivery tags)} of the messages
        unacknowledged for over `older_than` seconds that carry any of `wanted`; and the
        rows among `wanted` any unacknowledged message carries (None: too many to read)."""
        client = channel.client
        entries = client.zrangebyscore(
            channel.unacked_index_key, "-inf", "+inf", start=0, num=_SCAN_LIMIT + 1, withscores=True
        )
        complete = len(entries) <= _SCAN_LIMIT
        entries = entries[:_SCAN_LIMIT]
        old_enough = time.time() - older_than
        found: dict[str, tuple[list[str], list[str]]] = {}
        delivered: set[str] = set()
        for start in range(0, len(entries), 500):
            chunk = entries[start : start + 500]
            tags = [tag for tag, _ in chunk]
            for (tag, at), raw in zip(chunk, client.hmget(channel.unacked_key, tags), strict=True):
                task_id, rows = _rows_of(raw)
                rows = [row for row in rows if row in wanted]
                delivered.update(rows)
                if task_id is not None and rows and at <= old_enough:
                    entry = found.setdefault(task_id, ([], []))
                    entry[0].extend(r for r in rows if r not in entry[0])
                    entry[1].append(tag)
        return found, (delivered if complete else None)

    def _queued(self, channel: Any, queues: Collection[str]) -> set[str] | None:
        """The rows the messages in `queues` carry (every priority list of each), or None
        when they hold more than we read per look: then nothing can be said to be absent."""
        client = channel.client
        lists = [
            channel._q_for_pri(queue, priority)
            for queue in sorted(queues)
            for priority in dict.fromkeys(channel.priority_steps)
        ]
        pipe = client.pipeline(transaction=False)
        for name in lists:
            pipe.llen(name)
        lengths = pipe.execute()
        if sum(lengths) > _SCAN_LIMIT:
            return None
        rows: set[str] = set()
        for name, length in zip(lists, lengths, strict=True):
            for start in range(0, length, 500):
                for raw in client.lrange(name, start, start + 499):
                    rows.update(_rows_of_message(raw))
        return rows

    def _held(self, task_ids: list[str]) -> set[str]:
        """The task ids a live worker reports reserved, running or scheduled (countdown)."""
        inspect = self.app.control.inspect(timeout=self.reply_timeout)
        held: set[str] = set()
        for reply in (inspect.query_task(task_ids) or {}).values():
            held.update(reply)
        for entries in (inspect.scheduled() or {}).values():
            held.update(str(entry.get("request", {}).get("id")) for entry in entries)
        return held


def _rows_of(raw: bytes | str | None) -> tuple[str | None, list[str]]:
    """The task id of an entry of kombu's ``unacked`` hash (``[message, exchange, key]``)
    and the rows its message carries (`_message_rows`)."""
    if raw is None:
        return None, []
    try:
        return _message_rows(json.loads(raw)[0])
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None, []


def _rows_of_message(raw: bytes | str) -> list[str]:
    """The rows a message in a queue's list carries."""
    try:
        return _message_rows(json.loads(raw))[1]
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return []


def _message_rows(message: Any) -> tuple[str | None, list[str]]:
    """A kombu message's task id and the rows it carries: the task id itself (a row's
    task id is its id), or the row ids of a group (the type's effect task with
    ``rows=[[row id, …], …]`` and a task id of its own; JSON only)."""
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    task_id = headers.get("id") or properties.get("correlation_id")
    name = headers.get("task") or ""
    if not isinstance(task_id, str):
        return None, []
    if not (name.startswith("ironflow.") and name.endswith(".effect")):
        return task_id, [task_id]
    if "json" not in (message.get("content-type") or ""):
        return task_id, [task_id]
    try:
        body = message.get("body") or ""
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        kwargs = json.loads(body)[1]  # body [args, kwargs, embed]
    except (ValueError, TypeError, IndexError, KeyError):  # not a group's body
        return task_id, [task_id]
    items = kwargs.get("rows") if isinstance(kwargs, dict) else None
    if not items:
        return task_id, [task_id]
    return task_id, [str(item[0]) for item in items]
