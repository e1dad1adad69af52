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
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from ironflow_celery.errors import InvalidDeadLetterRequest, InvalidRetentionRequest, IronflowError
from ironflow_celery.model.settings import read_settings
from ironflow_celery.storage.dead_letters import parse_age

if TYPE_CHECKING:
    from ironflow_celery.storage.store import PostgresStore

log = logging.getLogger("ironflow_celery.retention")

DEFAULT_AGE = timedelta(days=7)

# Each batch: the oldest processed rows first (``*_processed_idx``), rows another purge
# has locked are skipped.
PURGE_OUTBOX = text("""
    DELETE FROM ironflow.outbox WHERE id IN (
        SELECT id FROM ironflow.outbox
        WHERE processed_at < now() - make_interval(secs => :age)
          AND (:include_discarded OR discarded_at IS NULL)
        ORDER BY processed_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED)
""")

PURGE_TIMERS = text("""
    DELETE FROM ironflow.timers WHERE id IN (
        SELECT id FROM ironflow.timers
        WHERE processed_at < now() - make_interval(secs => :age)
          AND (:include_discarded OR discarded_at IS NULL)
        ORDER BY processed_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED)
""")

# Observations of instances completed more than `age` ago (the instance row and its
# events stay: they are the workflow's history).
PURGE_OBSERVATIONS = text("""
    DELETE FROM ironflow.input_observations WHERE id IN (
        SELECT o.id FROM ironflow.input_observations o
        JOIN ironflow.workflow_instances i
          ON i.workflow_type = o.workflow_type AND i.workflow_id = o.workflow_id
        WHERE i.completed_at < now() - make_interval(secs => :age)
        LIMIT :batch
        FOR UPDATE OF o SKIP LOCKED)
""")


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
    params = {
        "age": age.total_seconds(),
        "batch": batch_size,
        "include_discarded": include_discarded,
    }
    counts = {"outbox": 0, "timers": 0, "observations": 0, "batches": 0}
    targets = [("outbox", PURGE_OUTBOX), ("timers", PURGE_TIMERS)]
    if include_observations:
        targets.append(("observations", PURGE_OBSERVATIONS))
    for name, statement in targets:
        while max_batches is None or counts["batches"] < max_batches:
            deleted = store._run(statement, params).rowcount
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


def register_retention_tasks(app: Any, runtime: Any) -> list[str]:
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


def start_retention_duty(runtime: Any, conf: Any, stop: Any) -> threading.Thread | None:
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
                if counts["outbox"] or counts["timers"] or counts["observations"]:
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
