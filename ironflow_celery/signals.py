"""Celery signals ironflow sends, the public module (``ironflow_celery.signals``)."""

from ironflow_celery.engine.signals import dead_lettered

__all__ = ["dead_lettered"]
