"""Layer 6, operations and read side: dead letters, cancellation, retention, status,
projections and the metrics endpoint, as Python functions and Celery tasks."""

__all__: list[str] = []
