"""An input inside a transaction its caller owns (issue 14 §7): `borrowed_connection` lends
a caller's psycopg 3 connection -- what Django's ``connection.connection`` is inside
``transaction.atomic()`` (autocommit off, the owner commits) -- to
``execute(connection=...)``; the input's writes commit or roll back with the caller's.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from runtime_helpers import scalar
from sqlalchemy.engine import make_url
from workflows import Increment, Start, TestWorkflow, test_handler

from ironflow_celery import Registry, WorkflowService
from ironflow_celery.storage.borrowed import borrowed_connection
from ironflow_celery.storage.store import PostgresStore


@pytest.fixture
def owner(database_url: str) -> Iterator[psycopg.Connection]:
    """The caller's connection, as Django holds it: autocommit off, one app table."""
    url = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    conn = psycopg.connect(url)
    conn.execute("CREATE TABLE app_orders (id text PRIMARY KEY)")
    conn.commit()
    yield conn
    conn.close()


def counts(db: sa.Engine) -> tuple[int, int, int]:
    return (
        scalar(db, "SELECT count(*) FROM app_orders"),
        scalar(db, "SELECT count(*) FROM ironflow.events"),
        scalar(db, "SELECT count(*) FROM ironflow.outbox"),
    )


def service(store: PostgresStore) -> WorkflowService:
    return WorkflowService(store, Registry([(TestWorkflow, test_handler)]))


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_the_input_commits_or_rolls_back_with_the_callers_writes(
    store: PostgresStore, db: sa.Engine, owner: psycopg.Connection, ending: str
) -> None:
    owner.execute("INSERT INTO app_orders VALUES ('o-1')")  # the caller's own write
    with borrowed_connection(owner) as conn:
        outcome = service(store).execute(Start(id="o-1", mode={"mode": "RouteResult"}),
                                         connection=conn)  # fmt: skip
    assert outcome.is_accepted
    assert owner.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert counts(db) == (0, 0, 0)  # nothing visible before the owner decides
    getattr(owner, ending)()
    assert counts(db) == ((1, 1, 1) if ending == "commit" else (0, 0, 0))


def test_two_inputs_and_a_rejection_share_one_owner_transaction(
    store: PostgresStore, db: sa.Engine, owner: psycopg.Connection
) -> None:
    svc = service(store)
    with borrowed_connection(owner) as conn:
        assert svc.execute(Increment(id="c"), connection=conn).is_accepted
        rejected = svc.execute_dynamic(
            "test_workflow", {"type": "ForceReject", "id": "c", "reason": "no"}, connection=conn
        )
        assert rejected.is_rejected
    with borrowed_connection(owner) as conn:  # a second borrow in the same transaction
        assert svc.execute(Increment(id="c"), connection=conn).is_accepted
    owner.commit()
    assert svc.fetch_latest_state_dynamic("test_workflow", "c")["counter"] == 2


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda owner: object(), TypeError, "psycopg 3 connection"),
        (lambda owner: (owner.close(), owner)[1], ValueError, "closed"),
        (lambda owner: (owner.set_autocommit(True), owner)[1], ValueError, "autocommit"),
    ],
    ids=["not-psycopg", "closed", "autocommit"],
)
def test_what_cannot_be_borrowed_is_refused(
    owner: psycopg.Connection, make, error: type, message: str
) -> None:
    with pytest.raises(error, match=message), borrowed_connection(make(owner)):
        pass
