"""Projections against real PostgreSQL: ordering, no skipped events, single writer,
poison events, rebuilds, typed/raw payloads, SQL filtering, exactly-once read models, CLI."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from click.testing import CliRunner
from workflows import EffectlessIncremented, EffectlessWorkflow

from ironflow_celery import Decision, Message, Registry, Workflow
from ironflow_celery.celery_app import install
from ironflow_celery.cli import main
from ironflow_celery.model.views import StateMachineDefinition, describe
from ironflow_celery.operations.projections import (
    Projection,
    ProjectionConfig,
    ProjectionEvent,
    ProjectionRunner,
    projection,
    projection_status,
    reset_projection,
)
from ironflow_celery.storage.store import PostgresStore

# Transactions anywhere in the cluster (other tests' databases too) hold the fence back
# briefly; FAST waits for them, SHORT gives up quickly where the test expects a wait.
FAST = ProjectionConfig(poll_interval=0.02, fence_timeout=10.0)
SHORT = ProjectionConfig(poll_interval=0.02, fence_timeout=0.2)


def append(store: PostgresStore, wtype: str, wid: str, *values: int) -> None:
    """Commit events ``{"type": "Incremented", "value": v}`` on one instance."""
    uow = store.begin(wtype, wid)
    uow.append_events([{"type": "Incremented", "value": v} for v in values])
    uow.commit()


def position(store: PostgresStore, name: str) -> int:
    return store.load_projection_position(name)


class Collect(Projection):
    """Records every event it sees (checkpoint mode)."""

    def __init__(self, name: str = "collect", types: tuple[str, ...] | None = None) -> None:
        self.name = name
        self.workflow_types = types
        self.seen: list[ProjectionEvent] = []

    def handle(self, event: ProjectionEvent, conn: Any) -> None:
        self.seen.append(event)


# -- no skipped events --------------------------------------------------------------------


def test_out_of_order_commits_never_skip_an_event(store: PostgresStore) -> None:
    # T1 draws the lower global_sequence and stays open.
    t1 = store.begin("effectless", "t1")
    t1.append_events([{"type": "Incremented", "value": 1}])
    t1.flush()
    # T2 draws a higher one and commits first.
    append(store, "effectless", "t2", 2)

    # ironflow's naive reader sees only T2's event: it would checkpoint past T1's.
    naive = store.fetch_events_since(0)
    assert [e.workflow_id for e in naive] == ["t2"]
    g2 = naive[0].global_sequence

    proj = Collect()
    assert ProjectionRunner(store, proj, config=SHORT).run_once() == 0  # waits for T1
    assert proj.seen == []
    assert position(store, "collect") == 0

    t1._transaction.commit()
    t1.conn.close()
    # ...and indeed the naive checkpoint at g2 has lost T1's event forever:
    assert store.fetch_events_since(g2) == []

    assert ProjectionRunner(store, proj, config=FAST).run_once() == 2
    assert [e.workflow_id for e in proj.seen] == ["t1", "t2"]
    assert proj.seen[0].global_sequence < proj.seen[1].global_sequence == g2
    assert position(store, "collect") >= g2


# -- single writer ----------------------------------------------------------------------------


SEEN_TABLE = "CREATE TABLE public.seen (g bigint PRIMARY KEY, n int NOT NULL)"


class CountOnce(Projection):
    """Transactional: counts deliveries per event in a table of the same database."""

    name = "count_once"
    transactional = True

    def handle(self, event: ProjectionEvent, conn: Any) -> None:
        conn.execute(
            sa.text(
                "INSERT INTO public.seen (g, n) VALUES (:g, 1) "
                "ON CONFLICT (g) DO UPDATE SET n = public.seen.n + 1"
            ),
            {"g": event.global_sequence},
        )

    def reset(self, conn: Any) -> None:
        conn.execute(sa.text("DELETE FROM public.seen"))


def test_two_runners_of_one_projection_handle_each_event_once(
    store: PostgresStore, db: sa.Engine
) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(SEEN_TABLE))
    for i in range(50):
        append(store, "effectless", f"w{i}", *range(1, 11))
    config = ProjectionConfig(batch_size=20, poll_interval=0.01, fence_timeout=10.0)
    runners = [ProjectionRunner(store, CountOnce(), config=config) for _ in range(2)]
    positions: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            positions.append(position(store, "count_once"))
            time.sleep(0.005)

    def work(r: ProjectionRunner) -> None:
        for _ in range(200):
            r.run_once()
            if position(store, "count_once") >= 500:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    done.set()
    watcher.join()
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*), min(n), max(n) FROM public.seen")).one()
    assert tuple(rows) == (500, 1, 1)
    assert positions == sorted(positions)
    assert position(store, "count_once") == 500


# -- poison events, backoff ------------------------------------------------------------------


def test_poison_event_stops_the_projection_visibly_and_resumes_once_fixed(
    store: PostgresStore, db: sa.Engine
) -> None:
    append(store, "effectless", "ok1", 1)
    append(store, "effectless", "bad", 1)
    append(store, "effectless", "ok2", 1)
    broken = {"on": True}
    handled: list[str] = []

    @projection("fragile")
    def fragile(event: ProjectionEvent) -> None:
        if broken["on"] and event.workflow_id == "bad":
            raise RuntimeError("cannot project bad")
        handled.append(event.workflow_id)

    runner = ProjectionRunner(store, fragile, config=FAST)
    assert runner.run_once() == 1
    assert handled == ["ok1"]
    assert runner.last_error == "RuntimeError: cannot project bad"
    with db.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT last_sequence, last_error, failed_sequence, failed_at "
                "FROM ironflow.projection_positions WHERE projection_name = 'fragile'"
            )
        ).one()
    assert (row.last_sequence, row.last_error, row.failed_sequence) == (
        1,
        "RuntimeError: cannot project bad",
        2,
    )
    assert row.failed_at is not None
    [status] = projection_status(store)
    assert status["status"] == "failing" and status["failed_sequence"] == 2
    assert status["position"] == 1 and status["lag"] == 2

    assert runner.run_once() == 0  # still blocked, position kept
    assert position(store, "fragile") == 1
    with db.connect() as conn:  # failed_at says since when it is stuck, not the last retry
        again = conn.execute(
            sa.text(
                "SELECT failed_at, updated_at FROM ironflow.projection_positions "
                "WHERE projection_name = 'fragile'"
            )
        ).one()
    assert again.failed_at == row.failed_at and again.updated_at > row.failed_at

    broken["on"] = False
    assert runner.run_once() == 2
    assert handled == ["ok1", "bad", "ok2"]
    [status] = projection_status(store)
    assert (status["status"], status["last_error"], status["lag"]) == ("ok", None, 0)


def test_runner_retries_a_failing_handler_after_backoff(store: PostgresStore) -> None:
    append(store, "effectless", "x", 1)
    calls: list[float] = []

    @projection("flaky")
    def flaky(event: ProjectionEvent) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("first call fails")

    stop = threading.Event()
    runner = ProjectionRunner(store, flaky, config=ProjectionConfig(poll_interval=0.02))
    thread = threading.Thread(target=runner.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 60
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(30)
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.15
    assert projection_status(store)[0]["status"] == "ok"


# -- rebuild, typing, filtering, exactly-once ----------------------------------------------


def test_reset_rebuilds_the_read_model_from_zero(store: PostgresStore, db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(SEEN_TABLE))
    append(store, "effectless", "a", 1, 2, 3)
    runner = ProjectionRunner(store, CountOnce(), config=FAST)
    assert runner.run_once() == 3
    reset_projection(store, CountOnce())
    assert position(store, "count_once") == 0
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM public.seen")).scalar() == 0
    assert runner.run_once() == 3
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT sum(n) FROM public.seen")).scalar() == 3


def test_registered_types_arrive_typed_and_others_as_raw_json(store: PostgresStore) -> None:
    append(store, "effectless", "typed", 1)
    uow = store.begin("rust_only", "raw")
    uow.append_events([{"type": "Something", "x": [1, 2]}])
    uow.commit()
    proj = Collect()
    runner = ProjectionRunner(store, proj, Registry([EffectlessWorkflow]), config=FAST)
    assert runner.run_once() == 2
    typed, raw = proj.seen
    assert typed.typed and isinstance(typed.payload, EffectlessIncremented)
    assert typed.payload.value == 1 and typed.raw == {"type": "Incremented", "value": 1}
    assert not raw.typed and raw.payload == {"type": "Something", "x": [1, 2]}
    assert (raw.workflow_type, raw.workflow_id, raw.sequence) == ("rust_only", "raw", 1)


def test_workflow_type_filter_runs_in_sql(store: PostgresStore) -> None:
    append(store, "effectless", "a", 1)
    append(store, "other", "b", 1, 2)
    append(store, "effectless", "c", 1)
    proj = Collect("only_effectless", types=("effectless",))
    runner = ProjectionRunner(store, proj, config=FAST)
    assert runner.run_once() == 2
    assert [e.workflow_id for e in proj.seen] == ["a", "c"]
    # Every event up to the fence is final, so the position passes filtered-out events too.
    assert position(store, "only_effectless") == 4
    [status] = projection_status(store, [proj])
    assert status["lag"] == 0


class SimulatedCrash(BaseException):
    """Stands for the process dying mid-batch (not an ordinary handler error)."""


def test_transactional_handler_is_exactly_once_across_a_crash(
    store: PostgresStore, db: sa.Engine
) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(SEEN_TABLE))
    append(store, "effectless", "a", 1, 2, 3, 4, 5)
    crash_at = {"g": 3}

    class Crashy(CountOnce):
        def handle(self, event: ProjectionEvent, conn: Any) -> None:
            super().handle(event, conn)  # the read model is written, then the crash
            if event.global_sequence == crash_at["g"]:
                raise SimulatedCrash()

    runner = ProjectionRunner(store, Crashy(), config=FAST)
    with pytest.raises(SimulatedCrash):
        runner.run_once()
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM public.seen")).scalar() == 0
    assert position(store, "count_once") == 0

    crash_at["g"] = -1
    assert ProjectionRunner(store, Crashy(), config=FAST).run_once() == 5
    with db.connect() as conn:
        assert tuple(
            conn.execute(sa.text("SELECT count(*), min(n), max(n) FROM public.seen")).one()
        ) == (5, 1, 1)
    assert position(store, "count_once") == 5


def test_transactional_poison_event_keeps_the_events_before_it(
    store: PostgresStore, db: sa.Engine
) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(SEEN_TABLE))
    append(store, "effectless", "a", 1, 2, 3)

    class Poisoned(CountOnce):
        def handle(self, event: ProjectionEvent, conn: Any) -> None:
            super().handle(event, conn)
            if event.global_sequence == 3:
                raise ValueError("bad event")

    runner = ProjectionRunner(store, Poisoned(), config=FAST)
    assert runner.run_once() == 2
    with db.connect() as conn:
        assert conn.execute(
            sa.text("SELECT array_agg(g ORDER BY g) FROM public.seen")
        ).scalar() == [1, 2]
    assert position(store, "count_once") == 2
    assert projection_status(store)[0]["failed_sequence"] == 3


# -- command line ------------------------------------------------------------------------------


class Open(Message):
    id: str


class Close(Message):
    id: str


class Opened(Message):
    pass


class Closed(Message):
    pass


class Gate(Workflow):
    type = "gate"
    State = dict
    Input = Open | Close
    Event = Opened | Closed

    @staticmethod
    def evolve(state: dict, event: Message) -> dict:
        return state

    @staticmethod
    def decide(now: Any, state: dict, input: Message) -> Decision:
        return Decision.accept(Opened() if isinstance(input, Open) else Closed())

    @classmethod
    def state_machine(cls) -> StateMachineDefinition:
        return (
            StateMachineDefinition.builder("Shut")
            .state("Open")
            .terminal("Closed")
            .transition("Shut", "Open", "Open")
            .transition("Open", "Closed", "Close")
            .build()
        )


GATE_LOG = projection("gate_log", types=["gate"])(lambda event: None)


@pytest.fixture
def cli(database_url: str) -> Any:
    app = Celery("projections_cli", set_as_current=False)
    app.conf.ironflow_projections = "test_projections:GATE_LOG"
    install(app, [Gate, EffectlessWorkflow], database_url=database_url)
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(main, list(args), obj=SimpleNamespace(app=app))

    yield invoke
    app.ironflow.store.dispose()


def test_cli_projections_list_and_reset(cli: Any, store: PostgresStore) -> None:
    append(store, "gate", "g1", 1)
    result = cli("projections", "list")
    assert result.exit_code == 0, result.output
    assert "gate_log" in result.output and " new" in result.output
    assert ProjectionRunner(store, GATE_LOG, config=FAST).run_once() == 1
    lines = cli("projections", "list").output.splitlines()
    assert lines[1].split() == ["gate_log", "1", "0", "ok"]

    result = cli("projections", "reset", "gate_log")
    assert result.exit_code == 0 and "reset to position 0" in result.output
    assert position(store, "gate_log") == 0
    assert cli("projections", "list").output.splitlines()[1].split()[:3] == ["gate_log", "0", "1"]
    result = cli("projections", "reset", "nope")
    assert result.exit_code == 1 and "unknown projection 'nope'" in result.output


def test_cli_workflows_graph_and_list(cli: Any) -> None:
    result = cli("workflows", "graph", "gate", "--format", "mermaid")
    assert result.exit_code == 0, result.output
    assert result.output == describe(Gate).to_mermaid()
    result = cli("workflows", "graph", "gate", "--format", "dot")
    assert result.exit_code == 0 and result.output == describe(Gate).to_dot()

    result = cli("workflows", "graph", "nosuch")
    assert result.exit_code == 1
    assert "unknown workflow type 'nosuch'" in result.output
    result = cli("workflows", "graph", "effectless")
    assert result.exit_code == 1
    assert "does not describe a state machine" in result.output

    result = cli("workflows", "list")
    assert result.exit_code == 0
    gate_inputs = ", ".join(Gate.inputs.tags())
    assert result.output.splitlines()[:2] == [
        "workflow type\teffects\tstate machine\tinputs",
        f"gate\t-\tyes\t{gate_inputs}",
    ]
    assert result.output.splitlines()[2].startswith("effectless\t-\tno\t")
    result = cli("workflows", "list", "--json")
    assert result.exit_code == 0, result.output
    gate, effectless = json.loads(result.output)
    assert gate == {
        "workflow_type": "gate",
        "inputs": Gate.inputs.tags(),
        "effects": [],
        "state_machine": True,
        "tasks": ["ironflow.gate.execute", "ironflow.gate.effect", "ironflow.gate.timer"],
    }
    assert (effectless["workflow_type"], effectless["state_machine"]) == ("effectless", False)


def test_orders_example_state_machine_golden_files() -> None:
    import ironflow_celery.examples.orders as orders
    from tests.golden import assert_golden

    definition = describe(orders.OrderSaga)
    assert_golden("orders.mmd", definition.to_mermaid())
    assert_golden("orders.dot", definition.to_dot())
