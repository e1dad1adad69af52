"""Example workflows shipped with the package, so the docs' examples run from a plain install.

`ironflow_celery.examples.orders` is the order saga the docs use; it imports only the public
API (`ironflow_celery`), like a user's own workflow module would.
"""

__all__: list[str] = []
