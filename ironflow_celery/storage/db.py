"""Engines: `create_engine` makes the pooled SQLAlchemy engine over psycopg 3 that a
`PostgresStore` owns (and its relaxed-commit twin).

URLs may be given as ``postgresql://``, ``postgres://`` or ``postgresql+psycopg://``;
they are normalised to the psycopg 3 driver. Every engine made here is disposed after a
fork (Celery's prefork pool) so no child reuses its parent's sockets.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Engine, make_url

from ironflow_celery.errors import ConfigurationError
from ironflow_celery.model.settings import SETTINGS

__all__ = [
    "DATABASE_URL_ENV",
    "IDLE_PING_AFTER",
    "create_engine",
    "dispose_after_fork",
    "normalize_url",
]

DATABASE_URL_ENV = SETTINGS["database_url"].env  # IRONFLOW_DATABASE_URL

IDLE_PING_AFTER = 5.0
"""Seconds a pooled connection may sit unused before it is pinged on checkout."""

_all_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def normalize_url(url: str) -> str:
    """The same URL with the psycopg 3 driver named (``postgresql+psycopg://``)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"not a valid database URL ({exc}); expected postgresql://USER@HOST:PORT/DATABASE"
        ) from None
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(f"not a PostgreSQL URL: {parsed.render_as_string()}")
    if parsed.drivername != "postgresql+psycopg":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10, **kwargs: Any) -> Engine:
    """A new pooled engine: pre-ping on checkout, short connect timeout, app name set."""
    connect_args = {"connect_timeout": 5, "application_name": "ironflow_celery"}
    connect_args.update(kwargs.pop("connect_args", {}))
    engine = sa.create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=1800,
        connect_args=connect_args,
        **kwargs,
    )
    _ping_idle_connections(engine)
    _all_engines.add(engine)
    return engine


def _ping_idle_connections(engine: Engine) -> None:
    """Ping a pooled connection on checkout only when it sat idle for a while.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: a round trip per statement in
    the relay and task hot paths (a third of a busy worker's time). A connection reused
    within seconds is alive; one that idled (perhaps across a server restart) is checked,
    and a dead one is replaced transparently.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        record.info["ironflow_checkin"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        last = record.info.get("ironflow_checkin")
        if last is None or time.monotonic() - last < IDLE_PING_AFTER:
            return
        try:
            dbapi_connection.execute("SELECT 1")
            if not dbapi_connection.autocommit:
                dbapi_connection.rollback()
        except Exception as error:  # the pool replaces the connection and retries
            raise exc.DisconnectionError(str(error)) from error


def dispose_after_fork() -> None:
    """Drop pooled connections inherited from the parent without closing its sockets."""
    for engine in list(_all_engines):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=dispose_after_fork)
