"""The Celery task names the engine registers per workflow type, in one table.

``ironflow.<type>.<suffix>``: the route function, the start-up queue check, ``workflows
list`` and the docs all read `TASK_SUFFIXES`, so a new task kind cannot be routed by one
and forgotten by another (batched effects once went to the default queue that way).
"""

from __future__ import annotations

from typing import Literal, get_args

from ironflow_celery.errors import UnknownName

__all__ = [
    "KIND_NAMES",
    "OPERATIONS_PREFIXES",
    "OPERATIONS_QUEUE",
    "PREFIX",
    "TASK_SUFFIXES",
    "Kind",
    "is_operations_task",
    "split_task_name",
    "task_name_for",
    "task_names_for",
]

PREFIX = "ironflow."

Kind = Literal["effect", "timer"]
"""A claimable row kind's name, as public APIs, task names, metrics and signals spell it:
the one place the kinds are named (their data: `ironflow_celery.storage.kinds.RowKind`)."""

KIND_NAMES: tuple[Kind, ...] = get_args(Kind)
"""Every kind's name, in `Kind`'s order: code above storage iterates these."""

TASK_SUFFIXES: tuple[str, ...] = ("execute", *KIND_NAMES)
"""What each suffix runs: an input (``execute``), then one task per row kind, named after
it: effect rows, timer rows (one row per message, or a group of one type's rows: the same
task, see engine/tasks.py)."""


def task_name_for(workflow_type: str, suffix: str) -> str:
    """``ironflow.<workflow_type>.<suffix>``; `suffix` must be one of `TASK_SUFFIXES`."""
    if suffix not in TASK_SUFFIXES:
        raise UnknownName(f"unknown ironflow task suffix {suffix!r}; one of {TASK_SUFFIXES}")
    return f"{PREFIX}{workflow_type}.{suffix}"


def task_names_for(workflow_type: str) -> dict[str, str]:
    """Every task name of `workflow_type`, by suffix."""
    return {suffix: task_name_for(workflow_type, suffix) for suffix in TASK_SUFFIXES}


def split_task_name(name: str) -> tuple[str, str] | None:
    """(workflow type, suffix) of a per-type ironflow task name, else None.

    Workflow types may contain dots, so the suffix is the last component and the type is
    everything between the prefix and it."""
    if not name.startswith(PREFIX):
        return None
    workflow_type, _, suffix = name[len(PREFIX) :].rpartition(".")
    if not workflow_type or suffix not in TASK_SUFFIXES:
        return None
    return workflow_type, suffix


OPERATIONS_PREFIXES: tuple[str, ...] = (
    "ironflow.dead_letters.",
    "ironflow.cancel.",
    "ironflow.retention.",
    "ironflow.inspect.",
)
"""The operations tasks `install` registers once per app (not per type): dead letters,
cancel, retention, inspection. Operators call them (``celery call``, Flower)."""

OPERATIONS_QUEUE = "ironflow.operations"
"""Where operations tasks go when ``ironflow_queue_per_workflow_type`` is on and
``ironflow_task_queue`` is not set (a worker reading only ``ironflow.<type>`` queues would
otherwise leave them in the default queue). Routes of your own take precedence."""


def is_operations_task(name: str) -> bool:
    """Whether `name` is one of the operations tasks (`OPERATIONS_PREFIXES`)."""
    return split_task_name(name) is None and name.startswith(OPERATIONS_PREFIXES)
