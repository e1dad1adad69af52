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
Other transports (RabbitMQ requeues a dead consumer's messages at once) are left alone.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["LostDeliveries", "LostFinder"]

log = logging.getLogger("ironflow_celery.relay")

LostFinder = Callable[[Sequence[uuid.UUID], float], set[uuid.UUID]]
"""``(row ids, older_than seconds) -> the lost ones``: what a relay calls (see `Relay`)."""

_SCAN_LIMIT = 5000
"""Unacknowledged messages read per check, at most (the oldest first)."""


class LostDeliveries:
    """Finds published rows whose message a worker that is gone took (Redis only)."""

    def __init__(self, app: Any, *, reply_timeout: float = 3.0) -> None:
        self.app = app
        self.reply_timeout = reply_timeout
        self.enabled = True
        self._suspects: set[str] = set()

    def __call__(self, ids: Sequence[uuid.UUID], older_than: float) -> set[uuid.UUID]:
        """Those of `ids` whose message has waited unacknowledged over `older_than` seconds
        with no live worker holding it, at this look and the one before."""
        if not self.enabled or not ids:
            return set()
        wanted = {str(row_id): row_id for row_id in ids}
        with self.app.pool.acquire(block=True) as conn:
            if getattr(conn.transport, "driver_type", None) != "redis":
                self.enabled = False  # RabbitMQ & co. give a dead consumer's messages back
                return set()
            channel = conn.default_channel
            taken = self._unacked(channel, set(wanted), older_than)
            if not taken:
                self._suspects.clear()
                return set()
            missing = set(taken) - self._held(list(taken))
            lost = missing & self._suspects
            self._suspects = missing - lost
            if lost:
                tags = [tag for task_id in lost for tag in taken[task_id][1]]
                channel.client.pipeline().zrem(channel.unacked_index_key, *tags).hdel(
                    channel.unacked_key, *tags
                ).execute()
        return {wanted[row] for task_id in lost for row in taken[task_id][0]}

    def _unacked(
        self, channel: Any, wanted: set[str], older_than: float
    ) -> dict[str, tuple[list[str], list[str]]]:
        """{task id: (its rows among `wanted`, delivery tags)} of the messages
        unacknowledged for over `older_than` seconds that carry any of `wanted`."""
        client = channel.client
        tags = client.zrangebyscore(
            channel.unacked_index_key, "-inf", time.time() - older_than, start=0, num=_SCAN_LIMIT
        )
        found: dict[str, tuple[list[str], list[str]]] = {}
        for start in range(0, len(tags), 500):
            chunk = tags[start : start + 500]
            for tag, raw in zip(chunk, client.hmget(channel.unacked_key, chunk), strict=True):
                task_id, rows = _rows_of(raw)
                rows = [row for row in rows if row in wanted]
                if task_id is not None and rows:
                    entry = found.setdefault(task_id, ([], []))
                    entry[0].extend(r for r in rows if r not in entry[0])
                    entry[1].append(tag)
        return found

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
    and the rows its message carries: the task id itself (a row's task id is its id), or
    the row ids of a grouped message (``rows=[…]``, JSON only)."""
    if raw is None:
        return None, []
    try:
        message = json.loads(raw)[0]
        headers = message.get("headers") or {}
        properties = message.get("properties") or {}
        task_id = headers.get("id") or properties.get("correlation_id")
        name = headers.get("task") or ""
        if not isinstance(task_id, str):
            return None, []
        # A group travels in the type's effect task with ``rows=[[row id, …], …]`` and a
        # task id of its own; a single row's task id is the row id.
        if not (name.startswith("ironflow.") and name.endswith(".effect")):
            return task_id, [task_id]
        if "json" not in (message.get("content-type") or ""):
            return task_id, [task_id]
        body = message.get("body") or ""
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        kwargs = json.loads(body)[1]  # body [args, kwargs, embed]
        items = kwargs.get("rows") if isinstance(kwargs, dict) else None
        if not items:
            return task_id, [task_id]
        return task_id, [str(item[0]) for item in items]
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None, []
