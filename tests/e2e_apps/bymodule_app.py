"""A Celery app whose workflows are named by module (issue 23 §3), three ways:
``install(app, workflows=["…"])`` (``BYMODULE_HOW=install``), the ``ironflow_workflows``
setting (``setting``), and Django's ``CELERY_IRONFLOW_WORKFLOWS`` read through
``config_from_object(…, namespace="CELERY")`` (``django``). Broker, queue and database from
``CELERY_BROKER_URL``, ``CELERY_TASK_DEFAULT_QUEUE`` and ``IRONFLOW_DATABASE_URL``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from ironflow_celery import install

MODULE = "tests.e2e_apps.bymodule_workflows"


def make_app(how: str, broker: str, queue: str, database_url: str | None) -> Celery:
    app = Celery(f"bymodule-{how}", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        ironflow_relay_enabled=False,
        broker_connection_retry_on_startup=True,
    )
    workflows: list[Any] = []
    if how == "install":
        workflows = [MODULE]
    elif how == "setting":
        app.conf.ironflow_workflows = MODULE
    elif how == "django":

        class Settings:  # what django.conf.settings holds
            CELERY_IRONFLOW_WORKFLOWS = [MODULE]
            CELERY_TASK_DEFAULT_QUEUE = queue
            CELERY_IRONFLOW_RELAY_ENABLED = False

        app.config_from_object(Settings, namespace="CELERY")
    else:
        raise ValueError(how)
    install(app, workflows=workflows, database_url=database_url)
    return app


app = make_app(
    os.environ.get("BYMODULE_HOW", "install"),
    os.environ.get("CELERY_BROKER_URL", "memory://"),
    os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery"),
    os.environ.get("IRONFLOW_DATABASE_URL"),
)
