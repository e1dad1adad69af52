"""Workflows named by module are registered wherever the app is installed (issue 23 §3):
``install(app, workflows=["pkg.workflows"])``, the ``ironflow_workflows`` setting and
Django's ``CELERY_IRONFLOW_WORKFLOWS`` each give ``app.tasks["ironflow.<type>.execute"]``
in a process that is not a worker (a web process, a script), so ``.delay()`` works there;
a real worker then runs the message. Before, only the worker's ``import_modules`` signal
registered them and the lookup raised ``KeyError`` everywhere else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery.contrib.testing.worker import start_worker
from runtime_helpers import BROKER_URL, delete_queue, wait_until

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    from tests.e2e_apps.bymodule_app import app
    task = app.tasks["ironflow.bymodule.execute"]  # KeyError before issue 23
    print(task.delay({"type": "Open", "id": "m-1"}).id)
""")


@pytest.mark.parametrize("how", ["install", "setting", "django"])
def test_workflows_named_by_module_can_be_delayed_from_any_process(
    how: str, database_url: str, db: sa.Engine
) -> None:
    from tests.e2e_apps.bymodule_app import make_app

    queue = f"bymodule-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "BYMODULE_HOW": how,
        "CELERY_BROKER_URL": BROKER_URL,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "IRONFLOW_DATABASE_URL": database_url,
    }
    try:
        sent = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        assert uuid.UUID(sent.stdout.strip())

        app = make_app(how, BROKER_URL, queue, database_url)
        assert "ironflow.bymodule.execute" in app.tasks  # in this (non-worker) process too

        def opened() -> int:
            with db.connect() as conn:
                return int(
                    conn.execute(
                        sa.text(
                            "SELECT count(*) FROM ironflow.events "
                            "WHERE workflow_type = 'bymodule' AND workflow_id = 'm-1'"
                        )
                    ).scalar()
                )

        with start_worker(
            app, pool="threads", concurrency=1, perform_ping_check=False, shutdown_timeout=60
        ):
            wait_until(opened, 120, what="the delayed input to be executed by a worker")
    finally:
        delete_queue(queue)
