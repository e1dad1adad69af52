"""The worker side of a group's per-row task events (`ironflow_celery.engine.row_events`).

A consumer bootstep: it records whether the worker sends task events before the pool
forks, gives the engine the worker's consumer (whose event dispatcher threads, solo and
green pools send through), and keeps the choice current for prefork pool processes
(``celery control enable_events`` / ``disable_events``, which Flower sends, change it).
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from ironflow_celery.engine.row_events import REFRESH_SECONDS, WorkerEvents

__all__ = ["RowEventsStep"]


class RowEventsStep(bootsteps.StartStopStep):
    """Attaches `WorkerEvents` to the worker's consumer once its event dispatcher exists."""

    label = "ironflow row events"
    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, consumer: Any, task_events: bool = True, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        # Runs while the worker is built, before its pool forks: the pool processes start
        # with the worker's -E choice.
        self.events = WorkerEvents(consumer.app, bool(task_events))
        self._timer: Any = None

    def start(self, consumer: Any) -> None:
        # Called again after each broker reconnection (a new dispatcher): attach again, and
        # schedule again (the event loop cancels the timer entries of a lost connection).
        self.events.attach(consumer)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if getattr(consumer, "timer", None) is not None:
            self._timer = consumer.timer.call_repeatedly(
                REFRESH_SECONDS, self.events.refresh, (consumer,)
            )

    def shutdown(self, consumer: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.events.detach()
