"""Layer 6, operations and read side: dead letters, cancellation, inspection, retention,
status, projections, the metrics endpoint and the web view, as Python functions and what
runs them (Celery tasks, a bootstep's plan, a relay process's duties)."""

__all__: list[str] = []
