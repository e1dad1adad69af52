"""Borrowing a caller's DB-API connection for `WorkflowService.execute`, the public module
(``ironflow_celery.borrowed``). See docs/operations.md."""

from ironflow_celery.storage.borrowed import borrowed_connection

__all__ = ["borrowed_connection"]
