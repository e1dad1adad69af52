"""A projection for worker processes the tests start (``IRONFLOW_PROJECTIONS``): it only
has to run, so the worker's projections service can be supervised and stopped."""

from __future__ import annotations

from ironflow_celery.operations.projections import projection

ORDER_EVENTS = projection("e2e_order_events", types=["e2e_order"])(lambda event: None)
