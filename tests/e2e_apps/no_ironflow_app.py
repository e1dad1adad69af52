"""A worker's app without ironflow (or deployed before a workflow existed): it shares the
queue and rejects ironflow's messages as unregistered tasks (issue 23 §3)."""

import os

from celery import Celery

app = Celery("no_ironflow", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
app.conf.task_default_queue = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery")
app.conf.broker_connection_retry_on_startup = True
