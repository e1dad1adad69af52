"""A Celery app running `ChainWorkflow` (the crash test's), configured from the environment."""

from __future__ import annotations

import os

from celery import Celery

from ironflow_celery import install
from ironflow_celery.celery_app import settings_from_env
from tests.e2e_apps.chains import ChainWorkflow

app = Celery("e2e_chains")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
)
app.conf.update(settings_from_env())
runtime = install(app, workflows=[ChainWorkflow])
