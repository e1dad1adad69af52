"""Retention: old processed rows go, in batches; pending, dead and recent rows stay."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from celery import Celery
from ops_helpers import insert_row, row

from ironflow_celery import install
from ironflow_celery.dead_letters import InvalidDeadLetterRequest
from ironflow_celery.operations.retention import purge

DAY = 86400


def test_purge_deletes_only_old_processed_rows_in_batches(store, db):
    old_effects = [insert_row(db, processed_seconds_ago=8 * DAY) for _ in range(5)]
    old_timers = [insert_row(db, "timer", processed_seconds_ago=9 * DAY) for _ in range(2)]
    keep = [
        insert_row(db, processed_seconds_ago=DAY),  # recent
        insert_row(db, attempts=0, dead=False, age_seconds=30 * DAY),  # old but pending
        insert_row(db, age_seconds=30 * DAY),  # old dead letter
        insert_row(db, processed_seconds_ago=30 * DAY, discarded=True),  # audit
    ]
    keep_timer = insert_row(db, "timer", attempts=0, dead=False, fire_in_seconds=3600)
    counts = purge(store, "7d", batch_size=2)
    assert counts == {"outbox": 5, "timers": 2, "observations": 0, "batches": 3 + 2}
    assert all(row(db, i) is None for i in old_effects)
    assert all(row(db, i, "timer") is None for i in old_timers)
    assert all(row(db, i) is not None for i in keep)
    assert row(db, keep_timer, "timer") is not None
    assert purge(store, "7d")["outbox"] == 0
    assert purge(store, "7d", include_discarded=True)["outbox"] == 1
    assert purge(store, 3600)["outbox"] == 1  # seconds work too


def test_max_batches_bounds_one_run(store, db):
    for _ in range(5):
        insert_row(db, processed_seconds_ago=8 * DAY)
    assert purge(store, "7d", batch_size=2, max_batches=1)["outbox"] == 2


def test_observations_of_long_completed_instances(store, db):
    with db.begin() as conn:
        conn.execute(
            sa.text("""
            INSERT INTO ironflow.workflow_instances (workflow_type, workflow_id, completed_at)
            VALUES ('orders', 'done', now() - interval '10 days'),
                   ('orders', 'fresh', now() - interval '1 day'),
                   ('orders', 'active', NULL)
        """)
        )
        conn.execute(
            sa.text("""
            INSERT INTO ironflow.input_observations (workflow_type, workflow_id, input_type,
                                                     payload, observed_at)
            SELECT 'orders', wid, 'Place', '{}'::jsonb, now() - interval '20 days'
            FROM unnest(ARRAY['done', 'done', 'done', 'fresh', 'active']) AS wid
        """)
        )
    assert purge(store, "7d")["observations"] == 0  # off by default
    assert purge(store, "7d", batch_size=2, include_observations=True)["observations"] == 3
    with db.connect() as conn:
        left = (
            conn.execute(sa.text("SELECT workflow_id FROM ironflow.input_observations ORDER BY 1"))
            .scalars()
            .all()
        )
    assert left == ["active", "fresh"]


def test_bad_arguments(store):
    with pytest.raises(InvalidDeadLetterRequest):
        purge(store, "a while")
    with pytest.raises(InvalidDeadLetterRequest):
        purge(store, "7d", batch_size=0)


def test_celery_task(database_url, db):
    app = Celery("retention-task", broker="memory://", set_as_current=False)
    app.conf.update(ironflow_relay_enabled=False)
    install(app, database_url=database_url)
    insert_row(db, processed_seconds_ago=8 * DAY)
    result = app.tasks["ironflow.retention.purge"].apply(kwargs={"older_than": "7d"}).get()
    assert result["outbox"] == 1
