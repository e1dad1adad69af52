"""A plain Celery app without ironflow installed: the CLI must say so, not crash."""

from celery import Celery

app = Celery("plain", broker="memory://")
