"""The operations CLI: ``status``, ``dead-letters …``, ``retention purge`` — through click's
CliRunner on a Celery app, and as real ``celery -A … ironflow`` / ``ironflow-celery``
subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery
from click.testing import CliRunner
from ops_helpers import MAX_ATTEMPTS, insert_row, row

from ironflow_celery import install
from ironflow_celery.cli import EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_app(database_url: str) -> Celery:
    app = Celery(f"cli-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(ironflow_max_attempts=MAX_ATTEMPTS, ironflow_relay_enabled=False)
    install(app, database_url=database_url)
    return app


@pytest.fixture
def cli(database_url):
    app = make_app(database_url)
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(main, list(args), obj=SimpleNamespace(app=app), input=input)

    return invoke


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_status(cli, db):
    insert_row(db, workflow_type="orders", attempts=0, dead=False, age_seconds=120)  # pending
    insert_row(
        db, workflow_type="orders", attempts=0, dead=False, locked_by="r#1", lease_seconds=60
    )  # in flight
    insert_row(db, workflow_type="orders", attempts=1, dead=False, lease_seconds=30)  # backoff
    insert_row(db, workflow_type="orders")  # dead
    insert_row(db, "timer", workflow_type="orders", attempts=0, dead=False)  # due
    insert_row(db, "timer", workflow_type="orders", attempts=0, dead=False, fire_in_seconds=600)
    insert_row(db, "timer", workflow_type="billing")  # dead timer
    data = as_json(cli("status", "--json"))
    by_type = {r["workflow_type"]: r for r in data["workflow_types"]}
    orders = by_type["orders"]
    assert {k: orders["effects"][k] for k in ("pending", "in_flight", "backing_off", "dead")} == {
        "pending": 1,
        "in_flight": 1,
        "backing_off": 1,
        "dead": 1,
    }
    assert orders["effects"]["oldest_pending_age"] >= 119
    assert (orders["timers"]["due"], orders["timers"]["pending"], orders["timers"]["dead"]) == (
        1,
        1,
        0,
    )
    assert by_type["billing"]["timers"]["dead"] == 1 and by_type["billing"]["effects"]["dead"] == 0
    human = cli("status")
    assert human.exit_code == 0 and "orders" in human.output and "billing" in human.output


def test_list_count_and_pagination(cli, db):
    empty = cli("dead-letters", "list")
    assert empty.exit_code == 0 and "no dead-lettered effects" in empty.output
    ids = [str(insert_row(db, workflow_id=f"o-{i}", age_seconds=i)) for i in range(5)]
    insert_row(db, workflow_type="billing", error="KeyError: sku")
    first = as_json(cli("dead-letters", "list", "--type", "orders", "--limit", "3", "--json"))
    assert [i["id"] for i in first["items"]] == ids[:3] and first["next_cursor"]
    second = as_json(
        cli(
            "dead-letters",
            "list",
            "--type",
            "orders",
            "--limit",
            "3",
            "--after",
            first["next_cursor"],
            "--json",
        )
    )
    assert [i["id"] for i in second["items"]] == ids[3:] and second["next_cursor"] is None
    human = cli("dead-letters", "list", "--limit", "2")
    assert human.exit_code == 0 and "next page: --after" in human.output
    assert "orders:o-0" in human.output
    assert as_json(cli("dead-letters", "count", "--json"))["count"] == 6
    assert cli("dead-letters", "count", "--error", "keyerror").output.strip() == "1"
    assert cli("dead-letters", "count", "--id", "o-1", "--older-than", "1h").output.strip() == "0"
    assert cli("dead-letters", "count", "--kind", "timer").output.strip() == "0"


def test_show(cli, db):
    dead = insert_row(db, error="TimeoutError: gateway", payload={"type": "Charge", "n": 7})
    human = cli("dead-letters", "show", str(dead))
    assert human.exit_code == 0
    assert "TimeoutError: gateway" in human.output and '"n": 7' in human.output
    data = as_json(cli("dead-letters", "show", str(dead), "--json"))
    assert data["id"] == str(dead) and data["attempts"] == MAX_ATTEMPTS
    missing = cli("dead-letters", "show", str(uuid.uuid4()))
    assert missing.exit_code == EXIT_REFUSED and "no effect row with id" in missing.stderr
    healthy = insert_row(db, attempts=0, dead=False)
    refused = cli("dead-letters", "show", str(healthy), "--json")
    assert refused.exit_code == EXIT_REFUSED
    assert json.loads(refused.stdout)["reason"] == "not_dead_letter"
    bad = cli("dead-letters", "show", "not-a-uuid")
    assert bad.exit_code == EXIT_USAGE and "not a valid row id" in bad.stderr


def test_retry_and_refusals(cli, db):
    dead = insert_row(db)
    ok = cli("dead-letters", "retry", str(dead))
    assert ok.exit_code == 0 and "will run again" in ok.output
    assert row(db, dead).attempts == 0
    in_flight = insert_row(db, locked_by="r#9", lease_seconds=60)
    refused = cli("dead-letters", "retry", str(in_flight), "--json")
    assert refused.exit_code == EXIT_REFUSED
    assert json.loads(refused.stdout)["reason"] == "in_flight"
    again = cli("dead-letters", "retry", str(dead))
    assert again.exit_code == EXIT_REFUSED and "refused (not_dead_letter)" in again.stderr
    assert cli("dead-letters", "retry", "123").exit_code == EXIT_USAGE
    assert cli("dead-letters", "retry", str(dead), "--kind", "nope").exit_code == EXIT_USAGE


def test_retry_all_needs_confirmation(cli, db):
    ids = [insert_row(db, age_seconds=i) for i in range(3)]
    refused = cli("dead-letters", "retry-all")  # CliRunner's stdin is not a TTY
    assert refused.exit_code == EXIT_REFUSED and "--yes" in refused.stderr
    assert all(row(db, i).attempts == MAX_ATTEMPTS for i in ids)
    done = as_json(cli("dead-letters", "retry-all", "--yes", "--batch-size", "2", "--json"))
    assert done == {"kind": "effect", "retried": 3}
    none_left = cli("dead-letters", "retry-all", "-y")
    assert none_left.output.strip() == "retried 0 dead-lettered effect(s)"


def test_discard(cli, db):
    dead = insert_row(db)
    assert cli("dead-letters", "discard", str(dead)).exit_code == EXIT_USAGE  # --reason missing
    ok = as_json(cli("dead-letters", "discard", str(dead), "--reason", "refunded", "--json"))
    assert ok["reason"] == "discarded"
    assert row(db, dead).discard_reason == "refunded"
    twice = cli("dead-letters", "discard", str(dead), "--reason", "again")
    # issue 23: a discarded row says it was discarded (it said "already_processed")
    assert twice.exit_code == EXIT_REFUSED and "already_discarded" in twice.stderr
    assert "already discarded at" in twice.stderr and "(refunded)" in twice.stderr


def test_retention_purge(cli, db):
    old = insert_row(db, processed_seconds_ago=10 * 86400)
    recent = insert_row(db, processed_seconds_ago=60)
    counts = as_json(cli("retention", "purge", "--older-than", "7d", "--json"))
    assert counts["outbox"] == 1 and row(db, old) is None and row(db, recent) is not None
    human = cli("retention", "purge", "--older-than", "30s")
    assert human.exit_code == 0 and "deleted 1 outbox rows" in human.output
    assert cli("retention", "purge", "--older-than", "soonish").exit_code == EXIT_USAGE


def test_database_errors_exit_3():
    app = make_app("postgresql://postgres@127.0.0.1:1/nowhere")
    result = CliRunner().invoke(main, ["dead-letters", "count"], obj=SimpleNamespace(app=app))
    assert result.exit_code == EXIT_UNAVAILABLE and "unavailable" in result.stderr


@pytest.mark.parametrize(
    "url, says",
    [
        ("not a url", "not a valid database URL"),
        ("postgresql://postgres@127.0.0.1:notaport/x", "not a valid database URL"),
        ("mysql://root@127.0.0.1/app", "not a PostgreSQL URL"),
    ],
)
def test_a_malformed_database_url_is_a_configuration_error(url, says):
    result = subprocess.run(
        [str(BIN / "ironflow-celery"), "status"],
        env={**os.environ, "IRONFLOW_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "app, says",
    [
        ("no_such_module_xyz", "No module named 'no_such_module_xyz'"),
        ("ironflow_celery.storage.db", "has no attribute"),
        ("tests.e2e_apps.plain_app", "ironflow is not installed on this Celery app"),
    ],
)
def test_a_bad_app_is_a_configuration_error(app, says):
    result = CliRunner().invoke(main, ["-A", app, "status"])
    assert result.exit_code == EXIT_UNAVAILABLE, result.output
    assert says in result.stderr and "Traceback" not in result.output


def test_celery_subcommand_on_an_app_without_ironflow(database_url):
    result = subprocess.run(
        [str(BIN / "celery"), "-A", "tests.e2e_apps.plain_app", "ironflow", "status"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert "call install(app)" in result.stderr and "Traceback" not in result.stderr


def _run(args: list[str], database_url: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "IRONFLOW_DATABASE_URL": database_url,
        "IRONFLOW_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "PYTHONPATH": str(REPO),
        "CELERY_BROKER_URL": "memory://",
    }
    return subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_real_celery_subcommand(database_url, db):
    dead = insert_row(db, workflow_type="ops_demo", workflow_id="x-1")
    listed = _run(
        [
            str(BIN / "celery"),
            "-A",
            "tests.e2e_apps.ops_app",
            "ironflow",
            "dead-letters",
            "list",
            "--json",
        ],
        database_url,
    )
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert [i["id"] for i in data["items"]] == [str(dead)]
    assert data["items"][0]["workflow"] == "ops_demo:x-1"
    bad = _run(
        [
            str(BIN / "ironflow-celery"),
            "-A",
            "tests.e2e_apps.ops_app",
            "dead-letters",
            "retry",
            "oops",
        ],
        database_url,
    )
    assert bad.returncode == EXIT_USAGE and "not a valid row id" in bad.stderr
