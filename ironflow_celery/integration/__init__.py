"""Layer 5, Celery integration: the engine installed on a Celery app, the worker bootsteps
that run relays and projections inside ``celery worker``, their supervision, the queue
checks, the database gate, the worker's side of a group's per-row task events, and the
hints printed with errors (from this process's command line)."""

__all__: list[str] = []
