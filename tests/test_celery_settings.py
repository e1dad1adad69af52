"""How ironflow follows a Celery app's own settings (issue 14 §7): effect results land in a
configured result backend (``AsyncResult(row_id).get()`` returns), ``task_ignore_result``
and a missing backend keep them unstored, and Django-style ``CELERY_IRONFLOW_*`` settings
loaded with ``config_from_object(..., namespace="CELERY")`` are read.
"""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa
from celery import Celery
from runtime_helpers import TestApp, scalar, wait_until
from workflows import Mode, Start

from ironflow_celery import install
from ironflow_celery.model.config import results_ignored
from ironflow_celery.storage.store import PostgresStore

RESULT_BACKEND = os.environ.get("IRONFLOW_TEST_RESULT_BACKEND", "redis://127.0.0.1:6379/6")
TIMEOUT = 120


def test_effect_results_land_in_the_apps_result_backend(
    store: PostgresStore, db: sa.Engine
) -> None:
    app = TestApp(store)
    app.app.conf.result_backend = RESULT_BACKEND  # before the worker and relays start
    with app.start():
        app.service.execute(Start(id="r1", mode=Mode(mode="RouteResult")))
        row_id = wait_until(
            lambda: scalar(db, "SELECT id FROM ironflow.outbox WHERE workflow_id = 'r1'"),
            TIMEOUT,
        )
        result = app.app.AsyncResult(str(row_id)).get(timeout=TIMEOUT)
        assert result["status"] == "processed"
        assert result["row_id"] == str(row_id)
        assert result["outcome"] == "accepted"


@pytest.mark.parametrize(
    ("conf", "ignored"),
    [
        ({}, True),
        ({"result_backend": RESULT_BACKEND}, False),
        ({"result_backend": RESULT_BACKEND, "task_ignore_result": True}, True),
    ],
    ids=["no-backend", "backend", "backend-but-ignored"],
)
def test_results_follow_celerys_own_rule(conf: dict, ignored: bool) -> None:
    app = Celery("results", set_as_current=False)
    app.conf.update(conf)
    assert results_ignored(app.conf) is ignored


class DjangoSettings:
    """What ``django.conf:settings`` holds in a Django project using Celery's namespace."""

    CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    CELERY_IRONFLOW_MAX_ATTEMPTS = 7
    CELERY_IRONFLOW_EFFECT_LOCK_DURATION = 42
    CELERY_IRONFLOW_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/from_django"
    CELERY_IRONFLOW_QUEUE_PER_WORKFLOW_TYPE = True
    IRONFLOW_MAX_ATTEMPTS = 99  # not in the namespace: ignored


def test_django_namespaced_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IRONFLOW_MAX_ATTEMPTS", "IRONFLOW_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    app = Celery("django_project", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    runtime = install(app)
    assert runtime.config.retry_policy.max_attempts == 7
    assert runtime.config.effect_lock_duration == 42
    assert runtime.database_url == DjangoSettings.CELERY_IRONFLOW_DATABASE_URL
    route = app.amqp.router.route({}, "ironflow.orders.execute")
    assert route["queue"].name == "ironflow.orders"
