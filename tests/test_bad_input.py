"""Bad input, bad data, bad workflows and a missing database: clear errors, nothing written.

Every failing call here is wrapped in `unchanged(db)`, which compares the full content of
every ironflow table before and after: a failed execute leaves the database as it was.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from workflows import Increment, Ping, TestWorkflow, test_handler

from ironflow_celery import (
    Accepted,
    DatabaseUnavailable,
    Decision,
    EventDeserializationError,
    InvalidPayload,
    InvalidWorkflowDefinition,
    Message,
    PostgresStore,
    Registry,
    StorageError,
    Timer,
    UniqueKeyConflict,
    UnknownWorkflowType,
    Workflow,
    WorkflowService,
    WorkflowServiceConfig,
)
from ironflow_celery.storage.store import TimerSpec

T = TestWorkflow.type
TABLES = (
    "workflow_instances",
    "events",
    "outbox",
    "timers",
    "input_observations",
    "projection_positions",
)


def snapshot(db: sa.Engine) -> dict[str, list[str]]:
    """Every row of every ironflow table, as sorted JSON text."""
    with db.connect() as conn:
        return {
            table: list(
                conn.execute(
                    sa.text(f"SELECT to_jsonb(t)::text FROM ironflow.{table} AS t ORDER BY 1")
                ).scalars()
            )
            for table in TABLES
        }


@contextmanager
def unchanged(db: sa.Engine) -> Iterator[None]:
    before = snapshot(db)
    yield
    after = snapshot(db)
    counts = {t: (len(before[t]), len(after[t])) for t in TABLES}
    assert after == before, f"database changed (rows before, after): {counts}"


def q(db: sa.Engine, statement: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


# -- a workflow that misbehaves on demand --------------------------------------------------


class Poke(Message):
    id: str
    how: str = "ok"


class Poked(Message):
    how: str


class NotAnEvent(Message):
    pass


class PokeState(BaseModel):
    pokes: int = 0
    last: str | None = None


class FaultyWorkflow(Workflow):
    type = "faulty"
    State = PokeState
    Input = Poke
    Event = Poked

    @staticmethod
    def evolve(state: PokeState, event: Poked) -> PokeState:
        if event.how == "evolve-raises":
            raise ValueError("evolve exploded")
        return PokeState(pokes=state.pokes + 1, last=event.how)

    @staticmethod
    def decide(now: datetime, state: PokeState, input: Poke) -> Any:
        match input.how:
            case "decide-raises":
                raise RuntimeError("decide exploded")
            case "returns-none":
                return None
            case "returns-list":
                return [Poked(how="x")]
            case "foreign-event":
                return Decision.accept(NotAnEvent())
            case "foreign-effect":
                return Decision.accept(Poked(how="x")).with_effect(NotAnEvent())
            case "foreign-timer":
                return Decision.accept(Poked(how="x")).with_timer(Timer.after(5, NotAnEvent()))
            case "raw-dict-event":
                return Decision.accept({"type": "Poked", "how": "x"})
        return Decision.accept(Poked(how=input.how))

    @staticmethod
    def is_terminal(state: PokeState) -> bool:
        if state.last == "terminal-raises":
            raise RuntimeError("is_terminal exploded")
        return False


@pytest.fixture
def service(store: PostgresStore) -> WorkflowService:
    """Observations on, so that a failed execute has one more thing it must not write."""
    return WorkflowService(
        store,
        Registry([(TestWorkflow, test_handler), FaultyWorkflow]),
        WorkflowServiceConfig(record_input_observations=True),
    )


@pytest.fixture
def seeded(service: WorkflowService) -> WorkflowService:
    """Some rows in every table, so 'unchanged' means something."""
    service.execute(Ping(id="wf-1"))
    service.execute(Increment(id="wf-1", with_effect=True))
    service.execute(Poke(id="f-1"))
    service.store.store_projection_position("p", 1)
    with service.store.begin(T, "wf-1") as uow:
        uow.append_events([{"type": "Pinged"}])
        uow.schedule_timers([TimerSpec(60, {"type": "Ping", "id": "wf-1"}, "k")])
        uow.commit()
    return service


# -- bad JSON input ------------------------------------------------------------------------


def test_unknown_workflow_type(seeded: WorkflowService, db: sa.Engine) -> None:
    with unchanged(db), pytest.raises(UnknownWorkflowType) as info:
        seeded.execute_dynamic("no_such_workflow", {"type": "Ping", "id": "wf-1"})
    registered = ", ".join(seeded.registry.types)
    assert str(info.value) == f"unknown workflow type: no_such_workflow (registered: {registered})"
    assert "test_workflow" in seeded.registry.types


def test_a_dict_passed_to_execute_points_at_execute_dynamic(
    seeded: WorkflowService, db: sa.Engine
) -> None:
    with unchanged(db), pytest.raises(UnknownWorkflowType, match="use execute_dynamic"):
        seeded.execute({"type": "Ping", "id": "wf-1"})  # type: ignore[arg-type]


def test_missing_type_tag(seeded: WorkflowService, db: sa.Engine) -> None:
    with unchanged(db), pytest.raises(InvalidPayload) as info:
        seeded.execute_dynamic(T, {"id": "wf-1"})
    message = str(info.value)
    assert "test_workflow" in message
    assert "missing 'type' tag" in message
    assert "Ping" in message and "Increment" in message  # what would have been valid
    assert info.value.kind == "input"


def test_unknown_variant(seeded: WorkflowService, db: sa.Engine) -> None:
    with unchanged(db), pytest.raises(InvalidPayload) as info:
        seeded.execute_dynamic(T, {"type": "Explode", "id": "wf-1"})
    assert "unknown variant 'Explode'" in str(info.value)
    assert "test_workflow" in str(info.value)

    with unchanged(db), pytest.raises(InvalidPayload, match="unknown variant 5"):
        seeded.execute_dynamic(T, {"type": 5, "id": "wf-1"})
    # An event tag is not an input tag.
    with unchanged(db), pytest.raises(InvalidPayload, match="unknown variant 'Pinged'"):
        seeded.execute_dynamic(T, {"type": "Pinged", "id": "wf-1"})


WRONG_FIELDS = [
    ({"type": "Increment", "id": "wf-1", "with_effect": [1, 2]}, "with_effect"),
    ({"type": "Increment", "id": 123, "with_effect": False}, "id"),
    ({"type": "Ping"}, "id"),  # missing
    ({"type": "Start", "id": "wf-1", "mode": {"mode": "Sideways"}}, "mode.mode"),
    ({"type": "Start", "id": "wf-1", "mode": "RouteResult"}, "mode"),
]


def test_wrong_field_types(seeded: WorkflowService, db: sa.Engine) -> None:
    # One database for all cases (a loop, not parametrize: database setup dominates).
    for payload, field in WRONG_FIELDS:
        with unchanged(db), pytest.raises(InvalidPayload) as info:
            seeded.execute_dynamic(T, payload)
        message = str(info.value)
        assert message.startswith("invalid input for workflow type 'test_workflow': "), payload
        assert f"{payload['type']}: {field}:" in message, (payload, message)


def test_non_object_payload(seeded: WorkflowService, db: sa.Engine) -> None:
    for payload in ([], ["Ping"], "Ping", 42, None, True):
        with unchanged(db), pytest.raises(InvalidPayload) as info:
            seeded.execute_dynamic(T, payload)
        assert "expected a JSON object" in str(info.value), payload
        assert "test_workflow" in str(info.value), payload


# -- text PostgreSQL cannot store: NUL and lone surrogates ----------------------------------

UNSTORABLE = {"nul": ("a\x00b", "NUL character"), "surrogate": ("a\ud800b", "lone surrogate")}


def test_unstorable_text_in_an_input_is_invalid_payload_naming_the_field(
    seeded: WorkflowService, db: sa.Engine
) -> None:
    """Once a bare UnicodeEncodeError or a StorageError from the driver."""
    for label, (bad, says) in UNSTORABLE.items():
        cases = [
            (lambda bad=bad: seeded.execute(Ping(id=bad)), "Ping: id: "),
            (
                lambda bad=bad: seeded.execute_dynamic(T, {"type": "Ping", "id": bad}),
                "Ping: id: ",
            ),
            (
                lambda bad=bad: seeded.execute_dynamic(
                    T, {"type": "Completed", "id": "wf-1", "result": bad}
                ),
                "Completed: result: ",
            ),
            (lambda bad=bad: seeded.execute(Poke(id="f-1", how=bad)), "Poke: how: "),
        ]
        for call, field in cases:
            with unchanged(db), pytest.raises(InvalidPayload) as info:
                call()
            assert info.value.kind == "input", label
            assert info.value.detail.startswith(field), (label, str(info.value))
            assert says in str(info.value), label
            str(info.value).encode()  # the message itself is printable text


def test_unstorable_text_made_by_workflow_code_is_invalid_payload(
    store: PostgresStore, db: sa.Engine
) -> None:
    """An event or effect that decide builds itself is checked too, before any write."""

    class Shout(Message):
        id: str

    class Shouted(Message):
        text: str

    class Tell(Message):
        text: str

    class ShoutWorkflow(Workflow):
        type = "shout"
        State = PokeState
        Input = Shout
        Event = Shouted
        Effect = Tell

        @staticmethod
        def evolve(state: PokeState, event: Shouted) -> PokeState:
            return state

        @staticmethod
        def decide(now: datetime, state: PokeState, input: Shout) -> Decision:
            if input.id == "event":
                return Decision.accept(Shouted(text="\x00"))
            return Decision.accept(Shouted(text="ok")).with_effect(Tell(text="\udcff"))

    service = WorkflowService(store, Registry([(ShoutWorkflow, test_handler)]))
    with unchanged(db), pytest.raises(InvalidPayload) as info:
        service.execute(Shout(id="event"))
    assert info.value.kind == "event" and info.value.detail.startswith("Shouted: text: ")
    with unchanged(db), pytest.raises(InvalidPayload) as info:
        service.execute(Shout(id="effect"))
    assert info.value.kind == "effect" and info.value.detail.startswith("Tell: text: ")


def test_unstorable_ids_filters_and_names_are_clear_value_errors(
    seeded: WorkflowService, db: sa.Engine
) -> None:
    from ironflow_celery import InvalidText
    from ironflow_celery.operations.projections import reset_projection
    from ironflow_celery.service import dead_letters as dl

    store = seeded.store
    for bad, _ in UNSTORABLE.values():
        calls = [
            lambda bad=bad: seeded.fetch_latest_state(TestWorkflow, bad),
            lambda bad=bad: seeded.fetch_latest_state_dynamic(T, bad),
            lambda bad=bad: seeded.fetch_workflow_events(T, bad),
            lambda bad=bad: seeded.list_workflows(bad),
            lambda bad=bad: reset_projection(store, bad),
        ]
        for call in calls:
            with unchanged(db), pytest.raises(InvalidText) as info:
                call()
            assert isinstance(info.value, ValueError)
        dl_calls = [
            lambda bad=bad: dl.fetch_dead_letters(
                store, dl.DeadLetterQuery.of(workflow_type=bad), max_attempts=3
            ),
            lambda bad=bad: dl.count_dead_letters(
                store, dl.DeadLetterQuery.new().workflow_id(bad), max_attempts=3
            ),
            lambda bad=bad: dl.DeadLetterQuery.new().error_contains(bad),
            lambda bad=bad: dl.discard_dead_letter(
                store, "00000000-0000-0000-0000-000000000001", bad, max_attempts=3
            ),
        ]
        for call in dl_calls:
            with unchanged(db), pytest.raises(dl.InvalidDeadLetterRequest) as dl_info:
                call()
            assert isinstance(dl_info.value, ValueError)


def test_the_store_turns_driver_text_errors_into_invalid_text(
    store: PostgresStore, db: sa.Engine
) -> None:
    """The last line of defence, for callers that reach the store directly."""
    from ironflow_celery import InvalidText

    for bad in ("x\x00", "x\udcff"):
        with unchanged(db), pytest.raises(InvalidText):
            store.fetch_workflow_events(T, bad)
        with unchanged(db), pytest.raises(InvalidText), store.begin(T, bad) as uow:
            uow.commit()


# -- corrupt stored data -------------------------------------------------------------------

CORRUPT_EVENTS = {
    "unknown-variant": {"type": "NoSuchEvent"},
    "wrong-field-type": {"type": "Incremented", "value": "many"},
    "no-tag": {"value": 1},
    "not-an-object": [1, 2],
    "json-null": None,  # jsonb 'null': an event all the same, not "no events"
}


def test_corrupt_stored_event(seeded: WorkflowService, db: sa.Engine) -> None:
    for name, bad in CORRUPT_EVENTS.items():
        wid = f"corrupt-{name}"
        seeded.execute(Ping(id=wid))
        seeded.execute(Ping(id=wid))
        with db.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)"
                    " VALUES (:t, :wid, 3, CAST(:p AS jsonb))"
                ),
                {"t": T, "wid": wid, "p": json.dumps(bad)},
            )

        for call in (
            lambda wid=wid: seeded.execute(Increment(id=wid, with_effect=True)),
            lambda wid=wid: seeded.execute_dynamic(T, {"type": "Ping", "id": wid}),
            lambda wid=wid: seeded.fetch_latest_state(TestWorkflow, wid),
            lambda wid=wid: seeded.fetch_latest_state_dynamic(T, wid),
        ):
            with unchanged(db), pytest.raises(EventDeserializationError) as info:
                call()
            err = info.value
            assert (err.workflow_type, err.workflow_id, err.sequence) == (T, wid, 3), name
            assert str(err).startswith(
                f"failed to deserialize event at sequence 3 for test_workflow:{wid}: "
            ), name

    # Other instances are unaffected.
    assert seeded.execute(Ping(id="wf-2")) == Accepted(1)


def test_an_only_event_with_a_json_null_payload_is_not_mistaken_for_no_events(
    seeded: WorkflowService, db: sa.Engine
) -> None:
    """The lock-and-load path once read a JSON null payload as its "no events" marker:
    decide ran on an empty state and the write failed on the events primary key."""
    with db.begin() as conn:
        for statement in (
            "INSERT INTO ironflow.workflow_instances (workflow_type, workflow_id, event_count)"
            " VALUES (:t, 'null-only', 1)",
            "INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)"
            " VALUES (:t, 'null-only', 1, 'null'::jsonb)",
        ):
            conn.execute(sa.text(statement), {"t": T})
    for call in (
        lambda: seeded.execute(Ping(id="null-only")),
        lambda: seeded.execute_dynamic(T, {"type": "Ping", "id": "null-only"}),
    ):
        with unchanged(db), pytest.raises(EventDeserializationError) as info:
            call()
        assert (info.value.workflow_id, info.value.sequence) == ("null-only", 1)


# -- misbehaving workflow code -------------------------------------------------------------

EXISTING_AND_NEW = ("f-1", "f-new")  # f-1 exists (seeded); f-new would be created


def test_decide_that_raises_writes_nothing(seeded: WorkflowService, db: sa.Engine) -> None:
    for wid in EXISTING_AND_NEW:
        with unchanged(db), pytest.raises(RuntimeError, match="decide exploded"):
            seeded.execute(Poke(id=wid, how="decide-raises"))
        with unchanged(db), pytest.raises(RuntimeError, match="decide exploded"):
            seeded.execute_dynamic("faulty", {"type": "Poke", "id": wid, "how": "decide-raises"})
    # The instance locks were released: the next inputs go through.
    for wid in EXISTING_AND_NEW:
        assert seeded.execute(Poke(id=wid)) == Accepted(1)


def test_decide_returning_a_non_decision(seeded: WorkflowService, db: sa.Engine) -> None:
    for wid in EXISTING_AND_NEW:
        for how in ("returns-none", "returns-list"):
            with unchanged(db), pytest.raises(InvalidWorkflowDefinition) as info:
                seeded.execute(Poke(id=wid, how=how))
            assert "faulty.decide returned" in str(info.value)
            assert "not a Decision" in str(info.value)


def test_decision_with_values_of_the_wrong_type(seeded: WorkflowService, db: sa.Engine) -> None:
    cases = [
        ("foreign-event", "event"),
        ("raw-dict-event", "event"),
        ("foreign-effect", "effect"),
        ("foreign-timer", "input"),
    ]
    for wid in EXISTING_AND_NEW:
        for how, kind in cases:
            with unchanged(db), pytest.raises(InvalidPayload) as info:
                seeded.execute(Poke(id=wid, how=how))
            assert info.value.workflow_type == "faulty", how
            assert info.value.kind == kind, how


def test_evolve_or_is_terminal_that_raises_writes_nothing(
    seeded: WorkflowService, db: sa.Engine
) -> None:
    for wid in EXISTING_AND_NEW:
        for how, raised, message in (
            ("evolve-raises", ValueError, "evolve exploded"),
            ("terminal-raises", RuntimeError, "is_terminal exploded"),
        ):
            with unchanged(db), pytest.raises(raised, match=message):
                seeded.execute(Poke(id=wid, how=how))


def test_unique_key_conflict_writes_nothing(store: PostgresStore, db: sa.Engine) -> None:
    class Keyed(FaultyWorkflow):
        type = "keyed"

        @staticmethod
        def unique_key(input: Poke) -> str | None:
            return "one"

    service = WorkflowService(
        store, Registry([Keyed]), WorkflowServiceConfig(record_input_observations=True)
    )
    service.execute(Poke(id="k-1"))
    with unchanged(db), pytest.raises(UniqueKeyConflict):
        service.execute(Poke(id="k-2"))


# -- the database itself -------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("port", [1, None], ids=["port-1", "stopped-port"])
def test_database_down_when_execute_is_called(port: int | None) -> None:
    port = port or _closed_port()
    store = PostgresStore.from_url(f"postgresql://postgres@127.0.0.1:{port}/ironflow")
    service = WorkflowService(store, Registry([(TestWorkflow, test_handler)]))
    try:
        for call in (
            lambda: service.execute(Ping(id="wf-1")),
            lambda: service.execute_dynamic(T, {"type": "Ping", "id": "wf-1"}),
            lambda: service.list_workflows(),
            lambda: service.fetch_latest_state(TestWorkflow, "wf-1"),
            lambda: store.claim("effect", "w", [T], lease_seconds=30, max_attempts=3),
        ):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as info:
                call()
            assert time.monotonic() - started < 5
            assert isinstance(info.value, StorageError)
            message = str(info.value)
            assert message.startswith("PostgreSQL is unavailable: ")
            assert f"port {port}" in message and "127.0.0.1" in message
    finally:
        store.dispose()


def test_connection_lost_inside_a_unit_of_work(
    store: PostgresStore, db: sa.Engine, pg_admin_engine: sa.Engine
) -> None:
    service = WorkflowService(store, Registry([(TestWorkflow, test_handler)]))
    service.execute(Ping(id="wf-1"))

    with unchanged(db):
        uow = store.begin(T, "wf-1")
        pid = uow.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        uow.append_events([{"type": "Pinged"}])
        with pg_admin_engine.connect() as admin:
            assert admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        with pytest.raises(DatabaseUnavailable):
            uow.commit()
        uow.rollback()  # leaving it is safe too

    # The pool recovers: the next execute works on a fresh connection.
    assert service.execute(Ping(id="wf-1")) == Accepted(1)


def test_lock_timeout_is_a_storage_error_not_unavailability(
    seeded: WorkflowService, database_url: str, db: sa.Engine
) -> None:
    """A live server's refusal (here a lock timeout) is not reported as 'unavailable'."""
    impatient = PostgresStore.from_url(
        database_url, pool_size=1, connect_args={"options": "-c lock_timeout=100"}
    )
    other = WorkflowService(impatient, seeded.registry, seeded.config)
    holder = seeded.store.begin(T, "wf-1")
    try:
        with unchanged(db), pytest.raises(StorageError) as info:
            other.execute(Ping(id="wf-1"))
        assert not isinstance(info.value, DatabaseUnavailable)
        assert str(info.value).startswith("postgres error: ")
        assert "lock timeout" in str(info.value)
    finally:
        holder.rollback()
        impatient.dispose()
    assert other.execute(Ping(id="wf-1")) == Accepted(1)


def test_database_without_the_schema(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error names a command that, pasted into a shell as written, creates the schema."""
    monkeypatch.setenv("IRONFLOW_DATABASE_URL", empty_database_url)  # as a worker has it
    store = PostgresStore.from_url(empty_database_url)
    service = WorkflowService(store, Registry([(TestWorkflow, test_handler)]))
    try:
        with pytest.raises(StorageError) as info:
            service.execute(Ping(id="wf-1"))
        assert not isinstance(info.value, DatabaseUnavailable)
        assert 'schema "ironflow" does not exist' in str(info.value)
        command = re.search(r"run `([^`]+)`", str(info.value))
        assert command, str(info.value)
        assert "ironflow-celery -A ironflow_celery db upgrade" in command[1]
        # A user's shell: no IRONFLOW_* variables, the venv's scripts on PATH.
        env = {k: v for k, v in os.environ.items() if not k.startswith("IRONFLOW_")}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        done = subprocess.run(
            command[1], shell=True, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert "applied migrations" in done.stdout
        assert service.execute(Ping(id="wf-1")) == Accepted(1)
    finally:
        store.dispose()


@pytest.mark.parametrize(
    "function",
    [
        "celery_lock_and_load(text, text)",
        "celery_lock_and_load_or_create(text, text, text)",
        "celery_create_with_decision(text, text, text, jsonb, jsonb, text, boolean)",
    ],
)
def test_database_with_an_older_schema_says_to_upgrade(database_url: str, function: str) -> None:
    """A database migrated by an older ironflow_celery (here: without migration 0006,
    without 0012, or without 0013). A new instance's first input needs 0013's function, an
    existing instance's the others."""
    store = PostgresStore.from_url(database_url)
    service = WorkflowService(store, Registry([(TestWorkflow, test_handler)]))
    try:
        assert service.execute(Ping(id="wf-1")) == Accepted(1)
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP FUNCTION ironflow.{function}"))
        new = "celery_create_with_decision" in function
        with pytest.raises(StorageError) as info:
            service.execute(Ping(id="wf-2" if new else "wf-1"))
        assert function.split("(")[0] in str(info.value)
        assert re.search(r"run `[^`]*ironflow-celery -A [^`]+ db upgrade", str(info.value))
        # nothing half-written
        assert [(w.workflow_id, w.event_count) for w in service.list_workflows()] == [("wf-1", 1)]
    finally:
        store.dispose()


@pytest.mark.parametrize("kind", ["effect", "timer"])
def test_a_relay_on_a_database_without_the_claim_functions_says_to_upgrade(
    database_url: str, kind: str
) -> None:
    """A database migrated by an ironflow_celery before migration 0014: the claim names
    the missing function and the command that adds it, and claims nothing."""
    store = PostgresStore.from_url(database_url)
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP FUNCTION ironflow.celery_claim_{kind}s"))
        with pytest.raises(StorageError) as info:
            store.claim(kind, "relay", ["t"], lease_seconds=30, max_attempts=3)
        assert f"celery_claim_{kind}s" in str(info.value)
        assert re.search(r"run `[^`]*ironflow-celery -A [^`]+ db upgrade", str(info.value))
    finally:
        store.dispose()
