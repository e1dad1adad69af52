"""A Celery app for subprocess workers, configured from the environment like a user's app.

``celery -A tests.e2e_apps.orders_like worker …`` / ``ironflow-celery -A
tests.e2e_apps.orders_like relay``: broker from ``CELERY_BROKER_URL``, any other
``CELERY_<SETTING>`` (e.g. ``CELERY_TASK_DEFAULT_QUEUE``), database and runtime settings
from ``IRONFLOW_*``; ``install(app, workflows=[OrderWorkflow])``.
"""

from __future__ import annotations

import os

from celery import Celery

from ironflow_celery import install
from ironflow_celery.celery_app import settings_from_env
from tests.e2e_apps.workflows import OrderWorkflow

app = Celery("e2e_orders_like")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
)
app.conf.update(settings_from_env())
runtime = install(app, workflows=[OrderWorkflow])
