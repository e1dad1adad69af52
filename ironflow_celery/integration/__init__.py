"""Layer 5, Celery integration: the engine installed on a Celery app, the worker bootsteps
that run relays inside ``celery worker``, and their supervision."""

__all__: list[str] = []
