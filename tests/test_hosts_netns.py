"""Issue 20 §6: hosts as hosts — the order saga across a database host, a broker host and
three worker hosts built as network namespaces (tests/netns.py), with one worker host cut
off the network mid-handler.

Each test builds its own hosts: a disposable PostgreSQL 15 on ``db``, a disposable
redis-server on ``broker``, and ``w1``…``w3`` each running a real ``celery worker`` (prefork,
its ironflow relay child included, node name ``wN@hostN``) of `tests.e2e_apps.hosts_app`,
whose handler records every successful side effect by idempotency key in a file no cut
reaches. Leases are short (`LEASE` seconds). After a warm-up that runs orders on every
host, ``w1`` is made to hold its handlers after recording, orders are placed, and once
``w1`` is mid-handler it is cut off (a) the database and the broker, (b) the broker only,
(c) the database only, for at least two leases and until the others finish. Then, for each:

- every order completes while ``w1`` is away (a host's outage costs the others about a
  lease: else `WorkHeld`, checked last) and after it returns,
  with exactly its saga's events and effects (no extra events, no row processed twice:
  the late acknowledgements of the cut host change nothing);
- the recorder holds every processed effect's idempotency key and no other; a key
  delivered more than once was delivered on the cut host (handlers are at-least-once with
  idempotency keys: "the delivery guarantee, precisely" in README.md);
- ``w1`` resumes by itself: it records new work after the link returns.

Marked ``hosts`` (``pytest -m hosts``): 1.5-3.5 minutes per scenario. Skipped, with the
reason, only where namespaces are refused (not root, no `ip`, `ip netns add` fails).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from examples.orders.__main__ import make_orders
from ironflow_celery.examples.orders import OrderSaga, PlaceOrder, expected_status
from ironflow_celery.service.workflow_service import Registry, WorkflowService
from ironflow_celery.storage import schema
from ironflow_celery.storage.db import create_engine
from ironflow_celery.storage.store import PostgresStore
from tests.e2e import BIN, Proc, Processes, make_env, sql, wait_until
from tests.netns import HostNetwork, NetnsPostgres, NetnsRedis, refused
from tests.waiting import wait_for_progress

pytestmark = [pytest.mark.e2e, pytest.mark.hosts, pytest.mark.timeout(900)]


APP = "tests.e2e_apps.hosts_app"
QUEUE = "hosts"
WORKERS = ("w1", "w2", "w3")
CUT = "w1"
#: The lease of a claimed row (``ironflow_effect_lock_duration``): short, so a cut outlives
#: it in seconds; long enough that a busy 2-core machine renews it in time (every third).
LEASE = 10.0
BATCH = 12
#: How long the others may make no progress while the host is away: 6 leases, far from
#: the ~1 lease a host's outage should cost and from the 30-60 minutes it costs today.
AWAY_STALL = 60.0

SHIPPED = ["OrderPlaced", "StockWasReserved", "PaymentCaptured", "Shipped"]
CANCELLED = ["OrderPlaced", "StockWasReserved", "PaymentDeclined", "OrderCancelled"]
EFFECTS = {
    "shipped": ["ChargePayment", "ReserveStock", "ShipOrder"],
    "cancelled": ["ChargePayment", "ReleaseStock", "ReserveStock"],
}


class WorkHeld(AssertionError):
    """Orders stalled because of the cut host: the others could not finish them while it
    was away (rows it ran or had prefetched stayed leased), or not even after it returned.
    While the host is away it is raised last, after every other check, so the books are
    checked either way."""


@dataclass(frozen=True)
class Delivery:
    """One line of the recorder: a handler's side effect done on `node`."""

    at: float
    node: str
    pid: int
    effect: str
    attempt: int
    key: str


@dataclass
class Cluster:
    net: HostNetwork
    pg: NetnsPostgres
    broker: NetnsRedis
    recorder: Path
    workers: dict[str, Proc]
    service: WorkflowService
    size: int | None = None
    """``ironflow_effect_batch_size`` of the workers (None: the default, groups)."""
    orders: list[PlaceOrder] = field(default_factory=list)
    batches: int = 0

    @property
    def db(self) -> str:
        return self.pg.socket_url("hosts")

    def deliveries(self) -> list[Delivery]:
        log = self.recorder / "deliveries.log"
        if not log.exists():
            return []
        rows = []
        for line in log.read_text().splitlines():
            at, node, pid, effect, attempt, key = line.split(" ")
            rows.append(Delivery(float(at), node, int(pid), effect, int(attempt), key))
        return rows

    def submit(self, n: int) -> list[PlaceOrder]:
        self.batches += 1
        batch = make_orders(f"b{self.batches}", n)
        for order in batch:
            assert self.service.execute(order).is_accepted
        self.orders.extend(batch)
        return batch

    def completed(self) -> int:
        return int(
            sql(
                self.db,
                "SELECT count(*) FROM ironflow.events WHERE workflow_type = 'orders' "
                "AND payload->>'type' IN ('Shipped', 'OrderCancelled')",
            )[0][0]
        )

    def diagnose(self) -> str:
        rows = sql(
            self.db,
            "SELECT payload->>'type', processed_at IS NOT NULL, dead_lettered_at IS NOT NULL, "
            "locked_by IS NOT NULL, count(*) FROM ironflow.outbox GROUP BY 1, 2, 3, 4 "
            "ORDER BY 1, 2, 3, 4",
        )
        lines = ["outbox (type, processed, dead, leased, rows): " + repr(rows)]
        stuck = sql(
            self.db,
            "SELECT id, workflow_id, payload->>'type', locked_by, "
            "round(extract(epoch FROM locked_until - now())::numeric, 1), "
            "run_started_at IS NOT NULL, attempts, "
            "round(extract(epoch FROM celery_claim_after - now())::numeric, 1) "
            "FROM ironflow.outbox WHERE processed_at IS NULL AND dead_lettered_at IS NULL",
        )
        lines += [
            f"  open row {row_id} {wf} {kind}: locked_by={by} locked_until=now{until:+} "
            f"run_started={started} attempts={attempts} claim_after=now{after:+}"
            for row_id, wf, kind, by, until, started, attempts, after in (
                (r[0], r[1], r[2], r[3], r[4] or 0, r[5], r[6], r[7] or 0) for r in stuck
            )
        ]
        lines.append(self.broker_contents())
        return "\n".join(lines)

    def broker_contents(self) -> str:
        """The hosts queue's messages and kombu's unacked entries (their task ids)."""
        try:
            client = self.broker.client()
            try:
                queued = [_task_id(m) for m in client.lrange(QUEUE, 0, -1)]
                unacked = {
                    tag.decode(): _task_id(raw, entry=True)
                    for tag, raw in client.hgetall("unacked").items()
                }
                index = {
                    t.decode(): round(time.time() - s, 1)
                    for t, s in client.zrange("unacked_index", 0, -1, withscores=True)
                }
            finally:
                client.close()
        except Exception as exc:  # the diagnosis must not hide the failure it explains
            return f"broker: unreadable ({exc})"
        return (
            f"broker: queue {QUEUE} holds {queued}; unacked "
            f"{ {t: (i, index.get(t)) for t, i in unacked.items()} }"
        )

    def wait_all_complete(self, what: str) -> None:
        wait_for_progress(
            self.completed, len(self.orders), f"every order to complete {what}",
            diagnose=self.diagnose,
        )  # fmt: skip

    def host_works_after(self, node: str, since: float, bound: float = 240) -> float:
        """Place small batches until `node` records a delivery after `since` (it consumes
        and acknowledges work); returns that delivery's time."""
        deadline = time.monotonic() + bound
        while True:
            mine = [d.at for d in self.deliveries() if d.node == node and d.at > since]
            if mine:
                return min(mine)
            assert time.monotonic() < deadline, (
                f"{node} recorded no work in {bound:.0f}s after {since:.0f}; {self.diagnose()}"
            )
            if self.completed() == len(self.orders):
                self.submit(3)
            time.sleep(0.5)


def _task_id(raw: bytes, *, entry: bool = False) -> str:
    """The task id of a kombu Redis message (`entry`: an ``unacked`` hash value)."""
    try:
        message = json.loads(raw)
        message = message[0] if entry else message
        return str((message.get("headers") or {}).get("id"))
    except (ValueError, TypeError, IndexError, AttributeError):
        return "?"


def _start_worker(
    procs: Processes,
    net: HostNetwork,
    node: str,
    db_url: str,
    broker_url: str,
    recorder: Path,
    size: int | None,
) -> Proc:
    batch = {} if size is None else {"effect_batch_size": size}
    env = make_env(
        db_url, broker_url, QUEUE,
        effect_lock_duration=LEASE, max_attempts=3, backoff_base=0.2, backoff_max=1, **batch,
    )  # fmt: skip
    env.update(HOSTS_NODE=node, HOSTS_RECORDER_DIR=str(recorder))
    host = net.hosts[node]
    argv = [
        *host.exec_prefix(),
        str(BIN / "celery"), "-A", APP, "worker", "-l", "info", "-P", "prefork", "-c", "2",
        "-Q", QUEUE, "-n", f"{node}@host{node[1:]}",
        "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    return procs.spawn(node, argv, env)


# Both delivery modes: rows claimed together in one message (the default) and one row per
# message (``ironflow_effect_batch_size = 1``).
@pytest.fixture(params=[None, 1], ids=["grouped", "single-row"])
def cluster(tmp_path: Path, procs: Processes, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    size: int | None = request.param
    reason = refused()
    if reason is not None:
        pytest.skip(reason)
    net = HostNetwork()
    pg: NetnsPostgres | None = None
    broker: NetnsRedis | None = None
    store: PostgresStore | None = None
    try:
        pg = NetnsPostgres(net.add_host("db", ["dbnet"], last_octet=1))
        broker = NetnsRedis(net.add_host("broker", ["brnet"], last_octet=2), tmp_path)
        for node in WORKERS:
            net.add_host(node, ["dbnet", "brnet"])
        pg.init()
        sql(pg.socket_url("postgres"), "CREATE DATABASE hosts")
        engine = create_engine(pg.socket_url("hosts"), pool_size=1)
        schema.upgrade(engine)
        engine.dispose()
        broker.start()
        recorder = tmp_path / "recorder"
        recorder.mkdir()
        workers = {
            node: _start_worker(procs, net, node, pg.tcp_url("hosts"), broker.url, recorder, size)
            for node in WORKERS
        }
        for worker in workers.values():
            worker.wait_for_output("ironflow relay started (process)", 120)
            worker.wait_for_output(" ready.", 120)
        store = PostgresStore.from_url(pg.socket_url("hosts"))
        service = WorkflowService(store, Registry([(OrderSaga, OrderSaga.handle_effect)]))
        yield Cluster(net, pg, broker, recorder, workers, service, size)
    finally:
        if store is not None:
            store.dispose()
        procs.kill_all()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.destroy()
        net.destroy()


# -- the scenario ------------------------------------------------------------------------


def cut_mid_handler(cluster: Cluster, networks: tuple[str, ...]) -> None:
    """Warm up on every host, cut `CUT` off `networks` while it holds a handler, for longer
    than a lease, bring it back, and check the books."""
    cluster.submit(BATCH)
    cluster.wait_all_complete("in the warm-up")
    for node in WORKERS:  # the saga ran across the three hosts
        cluster.host_works_after(node, 0)
    cluster.wait_all_complete("after the warm-up")

    hold = cluster.recorder / f"hold-{CUT}"
    hold.touch()
    placed = time.time()
    cluster.submit(BATCH)
    wait_until(
        lambda: any(d.node == CUT and d.at > placed for d in cluster.deliveries()),
        120,
        f"{CUT} to be mid-handler",
    )
    cut_at = time.time()
    cluster.net.cut(CUT, *networks)
    away: str | None = None  # why the others could not finish while CUT was away
    try:
        # The held handlers return while the host is cut: their acknowledgements (and
        # whatever else it does) meet the cut link.
        hold.unlink()
        # A host away costs the others about a lease, not its whole outage: the rows it
        # ran or had prefetched come back and every order completes while it is away.
        try:
            wait_for_progress(
                cluster.completed, len(cluster.orders),
                f"every order to complete while {CUT} is cut off {networks}",
                stall=AWAY_STALL, diagnose=cluster.diagnose,
            )  # fmt: skip
            print(f"every order completed {time.time() - cut_at:.1f}s after the cut")
        except AssertionError as exc:
            away = str(exc)
            print(f"held while away ({time.time() - cut_at:.1f}s after the cut): {away}")
        time.sleep(max(0.0, cut_at + 2 * LEASE - time.time()))  # the outage outlasts a lease
    finally:
        hold.unlink(missing_ok=True)
        restored_at = time.time()
        cluster.net.restore(CUT, *networks)
    print(f"{CUT} cut off {networks} for {restored_at - cut_at:.1f}s")
    held = {d.key for d in cluster.deliveries() if d.node == CUT and placed < d.at < restored_at}

    try:
        cluster.wait_all_complete("after the link returned")
    except AssertionError as exc:
        raise WorkHeld(f"{away}\n{exc}") from None
    print(f"every order completed {time.time() - restored_at:.1f}s after the link returned")
    resumed = cluster.host_works_after(CUT, restored_at)
    print(f"{CUT} recorded new work {resumed - restored_at:.1f}s after the link returned")
    cluster.wait_all_complete("after the cut host resumed")
    check_books(cluster, held)
    check_mode(cluster)
    if away is not None:
        raise WorkHeld(away)


def check_mode(cluster: Cluster) -> None:
    """The delivery mode ran as asked: a message whose task id is no row id carried a
    group of rows (the default), and with a batch size of 1 there is none."""
    rows = {str(r[0]) for r in sql(cluster.db, "SELECT id FROM ironflow.outbox")}
    received = re.compile(r"Task ironflow\.orders\.effect\[([0-9a-f-]+)\] received")
    task_ids = {t for w in cluster.workers.values() for t in received.findall(w.output())}
    groups = task_ids - rows
    assert task_ids and bool(groups) == (cluster.size != 1), (len(groups), cluster.size)


def check_books(cluster: Cluster, held: set[str]) -> None:
    """Every order ended as its saga says, with exactly its events and effects; the recorder
    has each processed effect's key; duplicates only where the cut host ran it."""
    events: dict[str, list[str]] = defaultdict(list)
    for workflow_id, kind in sql(
        cluster.db,
        "SELECT workflow_id, payload->>'type' FROM ironflow.events "
        "WHERE workflow_type = 'orders' ORDER BY workflow_id, sequence",
    ):
        events[workflow_id].append(kind)
    effects: dict[str, list[str]] = defaultdict(list)
    for workflow_id, kind in sql(
        cluster.db,
        "SELECT workflow_id, payload->>'type' FROM ironflow.outbox "
        "WHERE workflow_type = 'orders' ORDER BY workflow_id, payload->>'type'",
    ):
        effects[workflow_id].append(kind)
    for order in cluster.orders:
        status = expected_status(order)
        assert events[order.id] == (SHIPPED if status == "shipped" else CANCELLED), order.id
        assert effects[order.id] == EFFECTS[status], order.id
    assert len(events) == len(cluster.orders)

    rows = sql(
        cluster.db,
        "SELECT workflow_type || ':' || workflow_id || ':' || id, payload->>'type', "
        "processed_at IS NOT NULL, dead_lettered_at IS NOT NULL FROM ironflow.outbox",
    )
    unfinished = [r for r in rows if not r[2] and not r[3]]
    assert not unfinished, unfinished
    dead = [r for r in rows if r[3]]
    assert all(r[1] == "ChargePayment" for r in dead), dead  # only the declined cards
    expected = {r[0] for r in rows if r[2] and not r[3]}

    deliveries = cluster.deliveries()
    per_key = Counter(d.key for d in deliveries)
    assert set(per_key) == expected, (
        f"missing: {sorted(expected - set(per_key))[:5]}, unknown: "
        f"{sorted(set(per_key) - expected)[:5]}"
    )
    nodes: dict[str, set[str]] = defaultdict(set)
    for d in deliveries:
        nodes[d.key].add(d.node)
    duplicates = {key: n for key, n in per_key.items() if n > 1}
    unexplained = {key: n for key, n in duplicates.items() if CUT not in nodes[key]}
    assert not unexplained, f"delivered twice without the cut host: {unexplained}"
    print(
        f"{len(expected)} keys, {len(deliveries)} deliveries, {len(duplicates)} delivered "
        f"twice (held on {CUT}: {len(held)})"
    )


# -- (a), (b), (c) -----------------------------------------------------------------------


def test_worker_host_cut_off_database_and_broker_mid_handler(cluster: Cluster) -> None:
    """(a) both links down for longer than a lease, mid-handler."""
    cut_mid_handler(cluster, ("dbnet", "brnet"))


def test_worker_host_cut_off_broker_mid_handler(cluster: Cluster) -> None:
    """(b) the broker's link only: its handlers still reach PostgreSQL."""
    cut_mid_handler(cluster, ("brnet",))


def test_worker_host_cut_off_database_mid_handler(cluster: Cluster) -> None:
    """(c) the database's link only: the broker keeps delivering to it."""
    cut_mid_handler(cluster, ("dbnet",))
