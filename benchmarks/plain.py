"""Plain Celery baselines: a no-op task with the same signature as ironflow's tasks (row 1),
and a task that notes when it starts (row 4's reference).

``celery -A benchmarks.plain worker``; each finished no-op appends one byte to
``IRONFLOW_BENCH_DONE_FILE`` so the benchmark can see the drain without a result backend;
each ``bench.mark`` appends its id and start time to a file in ``IRONFLOW_BENCH_MARKS``,
as ironflow's handlers in `benchmarks.workloads` do.
"""

from __future__ import annotations

import os
import time

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


_marks: tuple[int, int] | None = None  # (pid, fd)


@app.task(name="bench.mark", ignore_result=True, acks_late=False, typing=False)
def mark(ref: str) -> None:
    global _marks
    now = time.time()
    pid = os.getpid()
    if _marks is None or _marks[0] != pid:
        path = os.path.join(os.environ["IRONFLOW_BENCH_MARKS"], f"{pid}.marks")
        _marks = (pid, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    os.write(_marks[1], f"{ref} {now:.6f}\n".encode())
