"""asyncio support: ``async def`` effect handlers, and what registration refuses.

A coroutine handler runs on one event loop per worker process, in a daemon thread of its
own (``ironflow-asyncio``); the task's thread waits for it. One long-lived loop (rather
than ``asyncio.run`` per call) lets handlers keep loop-bound clients (an ``httpx`` or
``aiohttp`` session) between effects, and under the threads pool several handlers await
concurrently on it. It works the same under prefork (each pool process starts its own
loop on first use, never inherited across a fork), threads and solo pools; the lease
keeper is a thread of its own and keeps renewing while the task thread waits. A handler
must not block its loop with synchronous work (that stalls the process's other
coroutine handlers): run such code in ``loop.run_in_executor``.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import os
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

from ironflow_celery.errors import InvalidWorkflowDefinition

__all__ = [
    "LOOP",
    "EventLoopThread",
    "call_handler",
    "check_handler",
    "is_async_handler",
]

T = TypeVar("T")


def _function_of(handler: Any) -> Any:
    """What ``inspect`` should look at: the function, or a callable object's ``__call__``."""
    if inspect.isroutine(handler) or isinstance(handler, functools.partial):
        return handler
    owners = (c for c in type(handler).__mro__ if "__call__" in c.__dict__)
    return next((c.__dict__["__call__"] for c in owners), handler)


def check_handler(workflow_type: str, handler: Any) -> None:
    """Refuse, at registration, an effect handler that could never run to an outcome."""
    if not callable(handler):
        raise InvalidWorkflowDefinition(
            f"handler for '{workflow_type}' is not callable: {type(handler).__name__}"
        )
    fn = _function_of(handler)
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        kind = "an async generator" if inspect.isasyncgenfunction(fn) else "a generator"
        raise InvalidWorkflowDefinition(
            f"handler for '{workflow_type}' is {kind} function ({_name(handler)}): a handler "
            "returns its follow-up input or None once; use a plain 'def' or 'async def' "
            "with 'return', not 'yield'"
        )


def is_async_handler(handler: Any) -> bool:
    """True for an ``async def`` handler (function, method, partial or callable object)."""
    return inspect.iscoroutinefunction(_function_of(handler))


def _name(handler: Any) -> str:
    return getattr(handler, "__qualname__", None) or type(handler).__qualname__


class EventLoopThread:
    """One event loop per process, in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            # After a fork the parent's loop thread does not exist here: start our own.
            if self._loop is None or self._pid != os.getpid() or not self._thread_alive():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=self._serve, args=(loop,), name="ironflow-asyncio", daemon=True
                )
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run `awaitable` on the loop and wait for it; an exception here cancels it."""
        loop = self._ensure()
        future = asyncio.run_coroutine_threadsafe(_await(awaitable), loop)
        try:
            return future.result()
        except BaseException:
            # A time limit or a terminate in this thread must not leave the coroutine going.
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait for its thread (a no-op when never started)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or self._pid != os.getpid():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


LOOP = EventLoopThread()
atexit.register(LOOP.close)


def call_handler(handler: Any, effect: Any, ctx: Any) -> Any:
    """Call an effect handler; a coroutine (or other awaitable) it returns is awaited on the
    process's loop, so ``async def`` handlers return their follow-up like plain ones."""
    value = handler(effect, ctx)
    if inspect.isawaitable(value):
        return LOOP.run(value)
    return value
