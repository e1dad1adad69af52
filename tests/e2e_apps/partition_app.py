"""Two workflow types on two queues, for worker groups (``celery worker -Q``).

``celery -A tests.e2e_apps.partition_app worker -Q ironflow.e2e_part_a``: the e2e order
workflow twice, as ``e2e_part_a`` and ``e2e_part_b``, with
``ironflow_queue_per_workflow_type`` so each type's tasks go to ``ironflow.<type>``. The
rest is configured from the environment like `orders_like`.
"""

from __future__ import annotations

import os

from celery import Celery

from ironflow_celery import install
from ironflow_celery.celery_app import settings_from_env
from tests.e2e_apps.workflows import OrderWorkflow


class PartA(OrderWorkflow):
    type = "e2e_part_a"


class PartB(OrderWorkflow):
    type = "e2e_part_b"


app = Celery("e2e_partitions")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
    ironflow_queue_per_workflow_type=True,
)
app.conf.update(settings_from_env())
runtime = install(app, workflows=[PartA, PartB])
