"""The small runner shared by row 10's peers: fresh databases, worker processes, rounds.

`PeerRun` is one measurement of one system on one workload: it creates the peer's own fresh
database (``ironflow_bench_peers_<run>_<label>``) when asked, starts worker processes in new
sessions, and on exit (also on error) stops every process it started — SIGTERM to the PID,
then SIGKILL to the process group that PID leads — and drops the database. `row10` runs
the systems in interleaved rounds and builds the row: medians, ratios ironflow/peer.
"""

from __future__ import annotations

import importlib
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
#: The environment variable through which a peer's worker processes find their database.
DSN_ENV = "IRONFLOW_BENCH_PEER_DSN"
#: Seconds a system's workers get to start and run a first job before a cycle is timed: on
#: a busy shared 2-core machine a celery worker's start alone has taken over a minute.
WARM_UP_S = 180

SYSTEMS = ["ironflow", "procrastinate", "pgqueuer", "dbos", "outbox"]
MODULES = {
    "ironflow": "benchmarks.peers.ironflow_peer",
    "procrastinate": "benchmarks.peers.procrastinate_peer",
    "pgqueuer": "benchmarks.peers.pgqueuer_peer",
    "dbos": "benchmarks.peers.dbos_peer",
    "outbox": "benchmarks.peers.outbox_peer",
}
#: Peers that ironflow_celery must be ahead of on both workloads (issue 16); pgqueuer's
#: ratio is reported as measured.
MUST_LEAD = ("procrastinate", "dbos", "outbox")
WORKLOADS = ("drain", "cycle")


@dataclass
class Measure:
    """One system's figure on one workload in one round."""

    rate: float
    n: int
    completed: int
    span_s: float  # the interval the rate is taken over
    partial: bool = False  # the cap ran out before all n completed: rate over those done
    extra: dict[str, Any] = field(default_factory=dict)


class PeerRun:
    """One system on one workload: its database, its processes, cleaned up on exit."""

    def __init__(self, bench: Any, worker: dict[str, Any], label: str, cap: float):
        self.bench = bench
        self.worker = worker  # WORKER of benchmarks/__main__.py (pool, concurrency, prefetch)
        self.label = label
        self.cap = cap  # seconds a drain or cycle may take before it is cut (partial)
        self.stack = ExitStack()
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> PeerRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    # -- resources ---------------------------------------------------------------------
    def database(self) -> tuple[str, str]:
        """A fresh database for this run (dropped on exit): (SQLAlchemy URL, libpq DSN)."""
        name = f"ironflow_bench_peers_{self.bench.run_id}_{self.label}".replace("-", "_")
        with self.bench.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.stack.callback(self._drop, name)
        url = sa.engine.make_url(self.bench.database_url).set(database=name)
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return url.render_as_string(hide_password=False), dsn

    def _drop(self, name: str) -> None:
        with self.bench.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def engine(self, url: str) -> sa.Engine:
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        self.stack.callback(engine.dispose)
        return engine

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def script(self, name: str) -> str:
        """A console script installed beside this interpreter (`pgq`, `procrastinate`)."""
        return str(Path(sys.executable).parent / name)

    # -- processes ---------------------------------------------------------------------
    def start(self, label: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.bench.logs / f"r10-{self.label}-{label}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.stack.callback(log.close)
        self.stack.callback(self.stop, proc)
        self.procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen) -> None:
        """A process started elsewhere (the Bench's celery worker) that this run stops."""
        self.stack.callback(self.stop, proc)
        self.procs.append(proc)

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        # The process led its own session: whatever it forked and left behind goes too.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{Path(str(proc.args[0])).name} {' '.join(map(str, proc.args[1:4]))} "
                    f"exited with {proc.returncode} (log in .ironflow/bench-logs/r10-*)"
                )

    def wait(self, done: Callable[[], bool], deadline: float, every: float = 0.1) -> bool:
        """Poll `done` until it holds (True) or `deadline` (monotonic) passes (False)."""
        while True:
            self.check_alive()
            if done():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(every)

    def wait_until_true(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        if not self.wait(done, time.monotonic() + timeout):
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def epoch(value: Any) -> float | None:
    """A database's epoch-seconds value (numeric or NULL) as a float or None."""
    return None if value is None else float(value)


def completions(engine: sa.Engine, statement: str, **params: Any) -> tuple[int, Any, Any]:
    """``(count, first, last)`` from a peer's ``SELECT count(*), <first epoch>, <last epoch>``
    over its durable record of finished jobs: how every peer's progress is read."""
    with engine.connect() as conn:
        row = conn.execute(sa.text(statement), params).one()
    return int(row[0]), epoch(row[1]), epoch(row[2])


def drain_measure(n: int, completed: int, first: float | None, last: float | None) -> Measure:
    """Rate from the first to the last completion (epoch seconds) of `completed` jobs."""
    if completed < 2 or first is None or last is None:
        raise RuntimeError(f"only {completed} of {n} jobs completed within the cap")
    span = max(last - first, 1e-9)
    return Measure(
        rate=(completed - 1) / span,
        n=n,
        completed=completed,
        span_s=round(span, 3),
        partial=completed < n,
    )


def cycle_measure(n: int, completed: int, t0: float, last: float | None) -> Measure:
    """Cycles per second from the first submission to the last terminal completion."""
    if completed < 1 or last is None:
        raise RuntimeError(f"none of {n} cycles completed within the cap")
    span = max(last - t0, 1e-9)
    return Measure(
        rate=completed / span, n=n, completed=completed, span_s=round(span, 3),
        partial=completed < n,
    )  # fmt: skip


# -- the row ---------------------------------------------------------------------------


def _error(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 400 else text[:397] + "…"


def row10(
    bench: Any,
    worker: dict[str, Any],
    sizes: dict[str, float],
    log: Callable[[str], None] = print,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Both workloads on every system, `r10_rounds` interleaved rounds; the row 10 dict.

    `only`: measure just these systems (ironflow_celery is always measured); the others'
    cells say they were left out.
    """
    n_drain, n_cycle = int(sizes["r10_drain"]), int(sizes["r10_cycle"])
    rounds, cap = int(sizes["r10_rounds"]), float(sizes["r10_cap"])
    measures: dict[str, dict[str, list[Measure]]] = {s: {w: [] for w in WORKLOADS} for s in SYSTEMS}
    errors: dict[str, dict[str, str]] = {s: {} for s in SYSTEMS}
    for system in SYSTEMS[1:]:
        if only is not None and system not in only:
            errors[system] = {w: "not measured in this run (--peers)" for w in WORKLOADS}
    for r in range(rounds):
        for workload, n in (("drain", n_drain), ("cycle", n_cycle)):
            # Interleaved: each round starts with a different system, so a machine that gets
            # busier or quieter during the row does not favour one of them.
            order = SYSTEMS[r % len(SYSTEMS) :] + SYSTEMS[: r % len(SYSTEMS)]
            for system in order:
                if workload in errors[system]:
                    continue  # failed once (or not installed): not retried in later rounds
                label = f"{system}-{workload}-{r}"
                t0 = time.monotonic()
                try:
                    module = importlib.import_module(MODULES[system])
                    with PeerRun(bench, worker, label, cap) as run:
                        m = getattr(module, workload)(run, n)
                    measures[system][workload].append(m)
                    log(
                        f"row 10 {label}: {m.rate:.1f}/s ({m.completed}/{m.n}"
                        f"{', partial' if m.partial else ''}; {time.monotonic() - t0:.1f} s)"
                    )
                except Exception as exc:  # a peer's failure is its cell, never the row's
                    errors[system][workload] = _error(exc)
                    log(f"row 10 {label}: [error] {_error(exc)}")
                    tb = traceback.format_exc()
                    (bench.logs / f"r10-{label}-error.log").write_text(tb)
    cells: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        cells[system] = {}
        for workload in WORKLOADS:
            got = measures[system][workload]
            if workload in errors[system] and not got:
                cells[system][workload] = {"error": errors[system][workload]}
                continue
            cell: dict[str, Any] = {
                "rate": round(statistics.median(m.rate for m in got), 1),
                "rates": [round(m.rate, 1) for m in got],
                "n": got[0].n,
                "completed": [m.completed for m in got],
                "spans_s": [m.span_s for m in got],
            }
            if any(m.partial for m in got):
                cell["partial"] = True
            if workload in errors[system]:
                cell["error"] = errors[system][workload]  # a later round failed
            extras = [m.extra for m in got if m.extra]
            if extras:
                cell["extra"] = extras
            cells[system][workload] = cell
    ratios: dict[str, dict[str, float | None]] = {}
    for peer in SYSTEMS[1:]:
        ratios[peer] = {}
        for workload in WORKLOADS:
            ours = cells["ironflow"][workload].get("rate")
            theirs = cells[peer][workload].get("rate")
            ratios[peer][workload] = round(ours / theirs, 3) if ours and theirs else None
    ours_drain = cells["ironflow"]["drain"].get("rate")
    return dict(
        id=10,
        what=(
            f"peers: drain {n_drain:,} no-op jobs, {n_cycle:,} two-step cycles "
            f"({rounds} round{'s' if rounds > 1 else ''}, medians)"
        ),
        value=ours_drain if ours_drain is not None else float("nan"),
        unit="jobs/s",
        peers=cells,
        ratios=ratios,
        rounds=rounds,
        cap_s=cap,
        sizes={"drain": n_drain, "cycle": n_cycle},
        config={s: _describe(s, worker) for s in SYSTEMS},
    )


def _describe(system: str, worker: dict[str, Any]) -> str:
    """How `system` is configured in this run (its module's `describe`)."""
    try:
        return importlib.import_module(MODULES[system]).describe(worker)
    except Exception as exc:
        return f"not available: {_error(exc)}"
