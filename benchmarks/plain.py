"""Plain Celery baseline (row 1): a no-op task with the same signature as ironflow's tasks.

``celery -A benchmarks.plain worker``; each finished task appends one byte to
``IRONFLOW_BENCH_DONE_FILE`` so the benchmark can see the drain without a result backend.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench_plain")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery"),
)

_done: tuple[int, int] | None = None


@app.task(name="bench.noop", ignore_result=True, acks_late=False, typing=False)
def noop(ref: str, row_id: str, attempt: int = 1, lease: str = "") -> None:
    global _done
    pid = os.getpid()
    if _done is None or _done[0] != pid:
        path = os.environ["IRONFLOW_BENCH_DONE_FILE"]
        _done = (pid, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    os.write(_done[1], b".")
