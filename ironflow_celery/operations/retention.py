"""Retention: delete processed outbox and timer rows (and, optionally, the input
observations of long-completed instances) in small batches, so no statement holds many
row locks or runs long.

Discarded dead letters are processed rows kept for audit; they are deleted only with
``include_discarded=True``. Pending rows and dead letters are never deleted.

Run it as a function (`purge`), a Celery task (``ironflow.retention.purge``), the CLI
(``ironflow-celery retention purge --older-than 7d``), or as a periodic duty of every
relay process: set ``ironflow_retention_interval`` (seconds; ``IRONFLOW_RETENTION_INTERVAL``)
and optionally ``ironflow_retention_age`` (default ``7d``) and
``ironflow_retention_include_observations``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from ironflow_celery.engine.host import DutyHost, RuntimeView, Stopping
from ironflow_celery.errors import InvalidDeadLetterRequest, InvalidRetentionRequest, IronflowError
from ironflow_celery.model.settings import read_settings
from ironflow_celery.service.dead_letters import parse_age
from ironflow_celery.storage.kinds import KINDS

if TYPE_CHECKING:
    from ironflow_celery.storage.store import PostgresStore

__all__ = [
    "DEFAULT_AGE",
    "purge",
    "register_retention_tasks",
    "retention_settings",
    "start_retention_duty",
]

log = logging.getLogger("ironflow_celery.retention")

DEFAULT_AGE = timedelta(days=7)


def purge(
    store: PostgresStore,
    older_than: timedelta | float | str = DEFAULT_AGE,
    batch_size: int = 1000,
    include_observations: bool = False,
    *,
    include_discarded: bool = False,
    max_batches: int | None = None,
) -> dict[str, int]:
    """Delete processed rows older than `older_than`, `batch_size` rows per transaction.

    Returns counts ``{"outbox": n, "timers": n, "observations": n, "batches": n}``.
    """
    try:
        age = parse_age(older_than)
    except InvalidDeadLetterRequest as exc:
        raise InvalidRetentionRequest(str(exc)) from None
    if age is None or age < timedelta(0):
        raise InvalidRetentionRequest(f"older_than must be a non-negative age: {older_than!r}")
    if batch_size < 1:
        raise InvalidRetentionRequest("batch_size must be at least 1")
    seconds = age.total_seconds()
    counts = {**{k.retention_name: 0 for k in KINDS}, "observations": 0, "batches": 0}
    # Each batch: the oldest processed rows first, rows another purge has locked skipped.
    targets: list[tuple[str, Callable[[], int]]] = [
        (
            kind.retention_name,
            partial(
                store.purge_processed,
                kind,
                age_seconds=seconds,
                batch_size=batch_size,
                include_discarded=include_discarded,
            ),
        )
        for kind in KINDS
    ]
    if include_observations:
        observations = partial(store.purge_observations, age_seconds=seconds, batch_size=batch_size)
        targets.append(("observations", observations))
    for name, purge_batch in targets:
        while max_batches is None or counts["batches"] < max_batches:
            deleted = purge_batch()
            counts["batches"] += 1
            counts[name] += deleted
            if deleted < batch_size:
                break
    return counts


# -- Celery task and periodic duty ----------------------------------------------------------


def retention_settings(conf: Any) -> dict[str, Any]:
    """``ironflow_retention_*`` settings: interval (None = off), age, observations."""
    settings = read_settings(conf)
    interval = settings["retention_interval"]
    age = parse_age(settings["retention_age"] or DEFAULT_AGE)
    return {
        "interval": interval if interval and interval > 0 else None,
        "older_than": age,
        "include_observations": settings["retention_include_observations"],
        "batch_size": settings["retention_batch_size"],
    }


def register_retention_tasks(app: Any, runtime: RuntimeView) -> list[str]:
    """Register ``ironflow.retention.purge`` on `app`."""
    defaults = retention_settings(app.conf)

    def purge_task(
        older_than: Any = None,
        batch_size: int | None = None,
        include_observations: bool | None = None,
        include_discarded: bool = False,
    ) -> dict[str, int]:
        """Delete processed outbox/timer rows older than `older_than` (default 7d)."""
        return purge(
            runtime.store,
            older_than if older_than is not None else defaults["older_than"],
            batch_size or defaults["batch_size"],
            defaults["include_observations"]
            if include_observations is None
            else include_observations,
            include_discarded=include_discarded,
        )

    purge_task.__name__ = "purge"
    purge_task.__module__ = __name__
    app.task(
        name="ironflow.retention.purge",
        bind=False,
        shared=False,
        throws=(InvalidDeadLetterRequest,),  # a bad age: one log line, not a traceback
    )(purge_task)
    return ["ironflow.retention.purge"]


def start_retention_duty(runtime: DutyHost, conf: Any, stop: Stopping) -> threading.Thread | None:
    """When ``ironflow_retention_interval`` is set, purge every interval in a daemon thread
    until `stop` (a threading/multiprocessing Event) is set. Returns the thread, or None."""
    options = retention_settings(conf)
    interval = options["interval"]
    if interval is None:
        return None

    def loop() -> None:
        while not stop.wait(interval):
            try:
                counts = purge(
                    runtime.store,
                    options["older_than"],
                    options["batch_size"],
                    options["include_observations"],
                )
                if any(n for name, n in counts.items() if name != "batches"):
                    log.info("ironflow retention: purged %s", counts)
            except IronflowError as exc:
                log.warning("ironflow retention: purge failed: %s", exc)
            except Exception:  # the duty must outlive a bug in one run
                log.exception("ironflow retention: unexpected error")

    thread = threading.Thread(target=loop, name="ironflow-retention", daemon=True)
    thread.start()
    log.info(
        "ironflow retention: purging rows processed more than %s ago every %.0fs",
        options["older_than"],
        interval,
    )
    return thread
