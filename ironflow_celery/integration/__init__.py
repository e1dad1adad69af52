"""Layer 5, Celery integration: the engine installed on a Celery app, the worker bootsteps
that run relays and projections inside ``celery worker``, their supervision, and the
hints printed with errors (from this process's command line)."""

__all__: list[str] = []
