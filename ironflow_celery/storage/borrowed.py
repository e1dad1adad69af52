"""Run an input inside a transaction someone else owns, e.g. Django's.

`WorkflowService.execute(input, connection=conn)` joins a SQLAlchemy `Connection`'s
transaction. Django's ORM holds its own psycopg 3 connection; `borrowed_connection` lends
it to SQLAlchemy so the input's events, effects and timers commit or roll back with the
Django writes of the same ``transaction.atomic()`` block::

    with transaction.atomic():
        order = Order.objects.create(...)
        django_connection.ensure_connection()
        with borrowed_connection(django_connection.connection) as conn:
            runtime.service.execute(PlaceOrder(id=str(order.pk), ...), connection=conn)

SQLAlchemy would end the transaction it thinks it owns (a rollback when its `Connection`
closes, another after its first connect); here its commit, rollback and close are no-ops
on the lent connection, so the owner alone decides. Needs psycopg 3 (Django 4.2+ with
``psycopg``); each call builds a throwaway engine (a few catalogue queries on first use).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool

from ironflow_celery.errors import InvalidArgument, InvalidArgumentType

__all__ = [
    "borrowed_connection",
]


class _Lent:
    """A DBAPI connection lent to SQLAlchemy: the owner keeps the transaction."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def commit(self) -> None:
        """The owner commits."""

    def rollback(self) -> None:
        """The owner rolls back (SQLAlchemy's rollback on close would end its transaction)."""

    def close(self) -> None:
        """The owner closes."""

    def add_notice_handler(self, handler: Any) -> None:
        """Not on the owner's connection: one would pile up per borrow."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner, name)


@contextmanager
def borrowed_connection(dbapi_connection: Any) -> Iterator[Connection]:
    """A SQLAlchemy `Connection` on a caller's open psycopg 3 connection, inside the
    caller's transaction, which the caller alone commits or rolls back."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        raise InvalidArgumentType("borrowed_connection needs psycopg 3") from exc
    if not isinstance(dbapi_connection, psycopg.Connection):
        raise InvalidArgumentType(
            "borrowed_connection needs a psycopg 3 connection (Django: "
            f"django.db.connection.connection with psycopg), got {type(dbapi_connection)!r}"
        )
    if dbapi_connection.closed:
        raise InvalidArgument("borrowed_connection: the connection is closed")
    if dbapi_connection.autocommit:
        raise InvalidArgument(
            "borrowed_connection: the connection is in autocommit mode, so there is no "
            "transaction to join (in Django, call it inside transaction.atomic())"
        )
    lent = _Lent(dbapi_connection)
    engine = sa.create_engine(
        "postgresql+psycopg://",
        creator=lambda: lent,
        poolclass=StaticPool,
        use_native_hstore=False,  # skips a type lookup that needs the real connection type
    )
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()
