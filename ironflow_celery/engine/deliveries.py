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
slow to answer costs at worst a duplicate message, which the start guard skips.
Other transports (RabbitMQ requeues a dead consumer's messages at once) are left alone.
"""

from __future__ import annotations

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

    def __init__(self, app: Any, *, reply_timeout: float = 2.0) -> None:
        self.app = app
        self.reply_timeout = reply_timeout
        self.enabled = True
        self._suspects: set[str] = set()

    def __call__(self, ids: Sequence[uuid.UUID], older_than: float) -> set[uuid.UUID]:
        """Those of `ids` whose message has waited unacknowledged over `older_than` seconds
        with no live worker holding it, at this check and the one before."""
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
                tags = [tag for row_id in lost for tag in taken[row_id]]
                channel.client.pipeline().zrem(channel.unacked_index_key, *tags).hdel(
                    channel.unacked_key, *tags
                ).execute()
        return {wanted[row_id] for row_id in lost}

    def _unacked(self, channel: Any, wanted: set[str], older_than: float) -> dict[str, list[str]]:
        """{row id: delivery tags} of `wanted` rows unacknowledged for over `older_than` s."""
        client = channel.client
        tags = client.zrangebyscore(
            channel.unacked_index_key, "-inf", time.time() - older_than, start=0, num=_SCAN_LIMIT
        )
        found: dict[str, list[str]] = {}
        for start in range(0, len(tags), 500):
            chunk = tags[start : start + 500]
            for tag, raw in zip(chunk, client.hmget(channel.unacked_key, chunk), strict=True):
                task_id = _task_id(raw)
                if task_id in wanted:
                    found.setdefault(task_id, []).append(tag)
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


def _task_id(raw: bytes | str | None) -> str | None:
    """The task id of an entry of kombu's ``unacked`` hash (``[message, exchange, key]``)."""
    if raw is None:
        return None
    try:
        message = json.loads(raw)[0]
        task_id = (message.get("headers") or {}).get("id") or (message.get("properties") or {}).get(
            "correlation_id"
        )
    except (ValueError, TypeError, IndexError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None
