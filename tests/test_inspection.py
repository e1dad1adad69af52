"""Find and inspect without SQL (issue 23 §1): ``effects``/``timers`` ``list`` and ``show``,
``workflows show`` and ``workflows list TYPE`` as typed Python functions
(`ironflow_celery.inspection`), CLI commands (both forms, ``--json``, exit codes) and
``ironflow.inspect.*`` Celery tasks on a real worker; plus the dead-letter effect type,
``already_discarded`` and JSON refusals of ``workflows cancel``.

Rows in each state are written by SQL (`ops_helpers.insert_row`) where a state is hard to
reach on demand (a live lease); instances are written through the real service.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from click.testing import CliRunner
from ops_helpers import MAX_ATTEMPTS, insert_row
from runtime_helpers import BROKER_URL, TestApp, test_config

from ironflow_celery import inspection as ins
from ironflow_celery import install
from ironflow_celery.cli import EXIT_REFUSED, EXIT_USAGE, main
from ironflow_celery.errors import InvalidInspectionRequest, UnknownWorkflowType
from ironflow_celery.storage.store import PostgresStore
from tests.e2e_apps.ops_app import Delivered, OpsDemoWorkflow, Submit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "tests.e2e_apps.ops_app"
T = "ops_demo"


def make_app(database_url: str) -> Celery:
    app = Celery(f"ins-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(ironflow_max_attempts=MAX_ATTEMPTS, ironflow_relay_enabled=False)
    install(app, workflows=[OpsDemoWorkflow], database_url=database_url)
    return app


@pytest.fixture
def app(database_url: str) -> Celery:
    return make_app(database_url)


@pytest.fixture
def runtime(app: Celery) -> Any:
    from ironflow_celery.engine.runtime import runtime_of

    return runtime_of(app)


@pytest.fixture
def cli(app: Celery):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), obj=SimpleNamespace(app=app))

    return invoke


def sql(db: sa.Engine, statement: str, **params: Any) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(statement), params)


def rows_in_every_state(db: sa.Engine) -> dict[str, uuid.UUID]:
    """One effect per state (and two timers), oldest first."""
    ids = {
        "pending": insert_row(db, attempts=0, dead=False, age_seconds=70),
        "in_flight": insert_row(
            db, attempts=0, dead=False, locked_by="relay-1#7", lease_seconds=60, age_seconds=60
        ),
        "running": insert_row(
            db, attempts=1, dead=False, locked_by="relay-1#7>d1", lease_seconds=60, age_seconds=50
        ),
        "backing_off": insert_row(db, attempts=1, dead=False, lease_seconds=30, age_seconds=40),
        "dead": insert_row(db, age_seconds=30, payload={"type": "Refund", "amount": 2}),
        "cancelled": insert_row(db, processed_seconds_ago=5, discarded=True, age_seconds=20),
        "processed": insert_row(db, processed_seconds_ago=5, dead=False, age_seconds=10),
        "timer_scheduled": insert_row(db, "timer", attempts=0, dead=False, fire_in_seconds=600),
        "timer_due": insert_row(db, "timer", attempts=0, dead=False, fire_in_seconds=-5),
    }
    sql(
        db,
        "UPDATE ironflow.outbox SET run_started_at = now() - interval '3 seconds' WHERE id = :id",
        id=ids["running"],
    )
    return ids


def test_every_state_filter_and_page(runtime: Any, db: sa.Engine) -> None:
    ids = rows_in_every_state(db)

    def listed(kind: str = "effect", **filters: Any) -> list[uuid.UUID]:
        return [r.id for r in ins.list_rows(runtime, ins.InspectQuery.of(kind, **filters)).items]

    assert listed(state="pending") == [ids["pending"]]
    assert listed(state="in-flight") == [ids["running"], ids["in_flight"]]  # newest first
    assert listed(state="waiting-to-retry") == [ids["backing_off"]]  # the words
    assert listed(state="dead") == [ids["dead"]]
    assert listed(state="cancelled") == [ids["cancelled"]]
    assert listed(state="processed") == [ids["processed"]]
    assert listed("timer", state="scheduled") == [ids["timer_scheduled"]]
    assert listed("timer", state="pending") == [ids["timer_due"]]
    assert listed(effect_type="Refund") == [ids["dead"]]
    assert listed(workflow_type="nope") == [] and len(listed(workflow_id="o-1")) == 7
    # due: effects by creation (the backoff's end while backing off), timers by fire time
    assert listed("timer", due_after="+1m") == [ids["timer_scheduled"]]
    assert listed("timer", due_before="now") == [ids["timer_due"]]
    assert ids["backing_off"] in listed(due_after="+10s") and ids["pending"] not in listed(
        due_after="-65s"
    )

    # pages: newest first by default, oldest first on request, the cursor loses nothing
    effects = [v for k, v in ids.items() if not k.startswith("timer")]
    seen: list[uuid.UUID] = []
    query = ins.InspectQuery.of("effect", limit=3)
    while True:
        page = ins.list_rows(runtime, query)
        seen += [r.id for r in page.items]
        if page.next_cursor is None:
            break
        query = query.after(page.next_cursor)
    assert seen == effects[::-1]
    assert listed(order="oldest", limit=2) == effects[:2]

    with pytest.raises(InvalidInspectionRequest, match="unknown state 'sleeping'"):
        ins.InspectQuery.of(state="sleeping")
    with pytest.raises(InvalidInspectionRequest, match="not a time"):
        ins.InspectQuery.of(due_before="yesterday-ish")
    with pytest.raises(InvalidInspectionRequest, match="out of range"):
        ins.InspectQuery.of(due_after="+99999999999999d")
    with pytest.raises(InvalidInspectionRequest, match="NUL"):
        ins.InspectQuery.of(workflow_type="or\x00ders")
    with pytest.raises(InvalidInspectionRequest, match="not a page cursor"):
        ins.InspectQuery.of(after="%%%")


def test_show_says_who_holds_the_lease_and_since_when(runtime: Any, db: sa.Engine) -> None:
    ids = rows_in_every_state(db)
    claimed = ins.get_row(runtime, ids["in_flight"])
    assert claimed is not None and claimed.state == "in_flight" and claimed.held_by == "relay"
    assert claimed.locked_by == "relay-1#7" and claimed.locked_until > claimed.read_at
    running = ins.get_row(runtime, str(ids["running"]))
    assert running is not None and running.held_by == "worker" and running.running
    assert running.run_started_at < running.read_at and running.payload == {
        "type": "Charge",
        "amount": 1,
    }
    dead = ins.get_row(runtime, ids["dead"])
    assert dead is not None and dead.state == "dead" and dead.last_error == "RuntimeError: boom"
    assert (dead.attempts, dead.max_attempts, dead.effect_type) == (
        MAX_ATTEMPTS,
        MAX_ATTEMPTS,
        "Refund",
    )
    timer = ins.get_row(runtime, ids["timer_scheduled"], kind="timer")
    assert timer is not None and timer.state == "scheduled" and timer.fire_at is not None
    assert ins.get_row(runtime, uuid.uuid4()) is None
    assert ins.get_row(runtime, ids["dead"], kind="timer") is None  # an effect's id
    json.dumps(running.to_json())  # JSON-serialisable as is


def test_workflows_show_replays_state_history_rows_and_position(
    runtime: Any, db: sa.Engine
) -> None:
    runtime.service.execute(Submit(id="order-1"))
    [effect] = ins.list_rows(runtime, ins.InspectQuery.of(workflow_id="order-1")).items
    sql(
        db,
        "UPDATE ironflow.outbox SET attempts = :n, dead_lettered_at = now(), "
        "last_error = 'PermanentEffectError: unreachable' WHERE id = :id",
        n=MAX_ATTEMPTS,
        id=effect.id,
    )
    detail = ins.show_workflow(runtime, T, "order-1")
    assert detail is not None
    assert detail.state == {"submitted": True, "delivered": False} and detail.terminal is False
    assert not detail.completed and detail.event_count == 1
    assert [(e.sequence, e.type, e.summary) for e in detail.events] == [
        (1, "Submitted", '{"type":"Submitted"}')
    ]
    assert [r.id for r in detail.dead_letters] == [effect.id] and detail.open_effects == ()
    assert detail.position is not None and detail.position.status == "submitted"
    assert detail.position.next_inputs == ("Delivered",)
    assert detail.position.terminal_states == ("delivered",)
    as_json = detail.to_json()
    assert as_json["dead_letters"] == [str(effect.id)] and json.dumps(as_json)

    runtime.service.execute(Delivered(id="order-1"))
    done = ins.show_workflow(runtime, T, "order-1")
    assert done is not None and done.position is not None and done.position.status == "delivered"
    assert done.position.next_inputs == () and [e.type for e in done.events] == [
        "Submitted",
        "Delivered",
    ]

    assert ins.show_workflow(runtime, T, "nobody") is None
    with pytest.raises(UnknownWorkflowType):
        ins.show_workflow(runtime, "no_such_type", "x")


def test_workflows_list_by_state(runtime: Any) -> None:
    for i in range(4):
        runtime.service.execute(Submit(id=f"order-{i}"))
    runtime.service.execute(Delivered(id="order-2"))

    def ids(**kw: Any) -> list[str]:
        return sorted(i.workflow.workflow_id for i in ins.list_instances(runtime, T, **kw).items)

    assert ids(state="delivered") == ["order-2"]
    assert ids(state="submitted") == ["order-0", "order-1", "order-3"]
    assert ids(state="active") == ["order-0", "order-1", "order-2", "order-3"]
    assert ids(state="completed") == []
    first = ins.list_instances(runtime, T, state="submitted", limit=2)
    rest = ins.list_instances(runtime, T, state="submitted", limit=2, offset=first.next_offset or 0)
    assert len(first.items) == 2 and len(rest.items) == 1 and rest.next_offset is None
    assert {i.status for i in first.items} == {"submitted"}
    counts = ins.instance_counts(runtime, T)
    assert (counts.active, counts.completed) == (4, 0)
    with pytest.raises(InvalidInspectionRequest, match="one of active, completed, new"):
        ins.list_instances(runtime, T, state="lost")


def test_cli_json_and_exit_codes(cli, runtime: Any, db: sa.Engine) -> None:
    ids = rows_in_every_state(db)
    ok = cli("effects", "list", "--state", "dead", "--json")
    assert ok.exit_code == 0, ok.output
    [item] = json.loads(ok.stdout)["items"]
    assert item["id"] == str(ids["dead"]) and item["effect_type"] == "Refund"
    shown = cli("effects", "show", str(ids["running"]), "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["held_by"] == "worker"
    table = cli("effects", "show", str(ids["in_flight"]))
    assert table.exit_code == 0 and "the relay that claimed it" in table.stdout
    assert "relay-1#7" in table.stdout
    listed = cli("timers", "list", "--oldest")
    assert listed.exit_code == 0 and str(ids["timer_scheduled"]) in listed.stdout

    missing = cli("timers", "show", str(uuid.uuid4()), "--json")
    assert missing.exit_code == EXIT_REFUSED and json.loads(missing.stdout)["reason"] == "not_found"
    assert cli("effects", "list", "--state", "sleeping").exit_code == EXIT_USAGE
    bad_time = cli("effects", "list", "--due-before", "soonish", "--json")
    assert (
        bad_time.exit_code == EXIT_USAGE and "not a time" in json.loads(bad_time.stdout)["message"]
    )
    assert cli("effects", "show", "not-a-uuid").exit_code == EXIT_USAGE

    runtime.service.execute(Submit(id="order-9"))
    wf = cli("workflows", "show", T, "order-9", "--json")
    assert wf.exit_code == 0 and json.loads(wf.stdout)["position"]["status"] == "submitted"
    text = cli("workflows", "show", T, "order-9")
    assert "submitted -> next: Delivered" in text.stdout and "Submitted" in text.stdout
    insts = cli("workflows", "list", T, "--state", "submitted", "--json")
    assert [i["workflow_id"] for i in json.loads(insts.stdout)["items"]] == ["order-9"]
    assert "ops_demo" in cli("workflows", "list").stdout  # without TYPE: the types, as before

    # refusals of every kind print JSON with --json, with the text form's exit code
    for args in (
        ["workflows", "show", "no_such_type", "x", "--json"],
        ["workflows", "cancel", "no_such_type", "x", "--reason", "r", "--json"],
        ["workflows", "list", "no_such_type", "--json"],
    ):
        refused = cli(*args)
        assert refused.exit_code == EXIT_REFUSED, (args, refused.output)
        body = json.loads(refused.stdout)
        assert body["ok"] is False and body["reason"] == "unknown_workflow_type", body
        assert "no_such_type" in body["message"]


def test_dead_letters_list_has_the_effect_type(cli, db: sa.Engine) -> None:
    insert_row(db, workflow_type=T, payload={"type": "Deliver", "recipient": "x"})
    table = cli("dead-letters", "list")
    assert table.exit_code == 0 and "effect type" in table.stdout and "Deliver" in table.stdout
    [item] = json.loads(cli("dead-letters", "list", "--json").stdout)["items"]
    assert item["effect_type"] == "Deliver"


def _run(args: list[bytes | str], database_url: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "IRONFLOW_DATABASE_URL": database_url,
        "IRONFLOW_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "PYTHONPATH": str(REPO),
        "CELERY_BROKER_URL": "memory://",
    }
    return subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def test_both_command_forms_as_real_processes(database_url: str, db: sa.Engine) -> None:
    dead = insert_row(
        db, workflow_type=T, workflow_id="x-1", payload={"type": "Deliver", "recipient": "x"}
    )
    shown = _run(
        [str(BIN / "ironflow-celery"), "-A", APP, "effects", "show", str(dead), "--json"],
        database_url,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "dead"
    listed = _run(
        [str(BIN / "celery"), "-A", APP, "ironflow", "effects", "list", "--type", T, "--json"],
        database_url,
    )
    assert listed.returncode == 0, listed.stderr
    assert [i["id"] for i in json.loads(listed.stdout)["items"]] == [str(dead)]
    bad = subprocess.run(
        [str(BIN / "ironflow-celery"), "-A", APP, "effects", "list", "--type", b"\xff"],
        cwd=REPO,
        env={**os.environ, "IRONFLOW_DATABASE_URL": database_url, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert bad.returncode == EXIT_USAGE and b"Traceback" not in bad.stderr
    assert b"is not valid UTF-8" in bad.stderr


def test_inspect_tasks_on_a_real_worker(store: PostgresStore, db: sa.Engine) -> None:
    app = TestApp(store, config=test_config())
    app.app.conf.result_backend = BROKER_URL
    try:
        app.start(relays=False, worker=True)
        dead = insert_row(db, workflow_type="test_workflow", workflow_id="w-1")

        def call(name: str, *args: Any, **kwargs: Any) -> Any:
            result = app.app.send_task(f"ironflow.inspect.{name}", args=args, kwargs=kwargs)
            return result.get(timeout=120)

        page = call("rows", state="dead")
        assert [i["id"] for i in page["items"]] == [str(dead)]
        assert call("row", str(dead))["state"] == "dead"
        assert call("row", str(uuid.uuid4()))["found"] is False
        app.service.execute_dynamic("test_workflow", {"type": "Ping", "id": "w-2"})
        shown = call("workflow", "test_workflow", "w-2")
        assert shown["found"] and shown["event_count"] >= 1
        listed = call("workflows", "test_workflow")
        assert "w-2" in [i["workflow_id"] for i in listed["items"]]
        with pytest.raises(InvalidInspectionRequest):
            call("rows", state="sleeping")
    finally:
        app.stop()
