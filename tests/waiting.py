"""Waiting for a large amount of work on a loaded machine: by progress, not by wall time.

Dependency-free so that both the in-process tests (``from waiting import …``, via
`runtime_helpers`) and the end-to-end tests (``from tests.waiting import …``) can use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for_progress(
    count: Callable[[], int],
    target: int,
    what: str,
    *,
    stall: float = 90.0,
    interval: float = 0.25,
    diagnose: Callable[[], str] | None = None,
) -> int:
    """Wait until ``count() >= target``; fail only when the count stops moving for `stall`
    seconds (a loaded machine is slow, a stuck system is stuck). An exception from `count`
    (a server restarting) counts as no movement. Returns the last count."""
    last, moved = -1, time.monotonic()
    while True:
        try:
            now = count()
        except Exception:
            now = last
        if now >= target:
            return now
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall:
            detail = ""
            if diagnose is not None:
                try:
                    detail = "\n" + diagnose()
                except Exception as exc:
                    detail = f"\n(diagnosis failed: {exc!r})"
            raise AssertionError(f"no progress for {stall:.0f}s on {what}: {now}/{target}{detail}")
        time.sleep(interval)
