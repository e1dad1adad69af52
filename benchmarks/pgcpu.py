"""CPU time of the PostgreSQL backends serving one database, split by client process
(benchmark row 11).

pg_stat_statements is not loaded on the benchmark server, so backend CPU is read where
the kernel keeps it: ``utime + stime`` of ``/proc/<backend pid>/stat``, for the backends
``pg_stat_activity`` lists on the database (the server runs on this machine). A sampler
thread re-reads them every 0.1 s, so a backend that exits mid-run still counts up to its
last sample. A backend belongs to a client process when its ``client_port`` is the local
port of one of that process's TCP sockets (``/proc/<pid>/fd`` → ``/proc/net/tcp``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def local_ports(pids: Iterable[int]) -> set[int]:
    """Local TCP ports of the sockets these processes hold open."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    cols = line.split()
                    if cols[9] in inodes:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


class BackendCpu:
    """Samples the CPU of every backend of `database` until stopped; `by_port` maps a
    backend pid to its client port, `cpu` to its latest CPU seconds."""

    def __init__(self, engine: sa.Engine, database: str, every: float = 0.1) -> None:
        self.engine = engine
        self.database = database
        self.every = every
        self.cpu: dict[int, float] = {}
        self.by_port: dict[int, int] = {}
        self.listeners: set[int] = set()
        """Backends whose last statement was a LISTEN (a relay's wake-up connection)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, conn: Any) -> None:
        rows = conn.execute(
            sa.text(
                "SELECT pid, client_port, query ILIKE 'LISTEN %' FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"
            ),
            {"db": self.database},
        ).all()
        with self._lock:
            for pid, port, listening in rows:
                if listening:
                    self.listeners.add(pid)
                seconds = cpu_seconds(pid)
                if seconds is not None:
                    self.cpu[pid] = seconds
                    if port is not None:
                        self.by_port[pid] = port

    def _run(self) -> None:
        with self.engine.connect() as conn:
            while not self._stop.is_set():
                self._sample(conn)
                self._stop.wait(self.every)
            self._sample(conn)

    def __enter__(self) -> BackendCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def snapshot(self) -> dict[int, float]:
        with self._lock:
            return dict(self.cpu)

    def spent(
        self,
        before: dict[int, float],
        after: dict[int, float],
        ports: set[int],
        *,
        listening: bool | None = None,
    ) -> float:
        """CPU seconds the backends of clients on `ports` spent between two snapshots
        (`listening`: only the LISTEN connections, or only the others)."""
        return sum(
            seconds - before.get(pid, 0.0)
            for pid, seconds in after.items()
            if self.by_port.get(pid) in ports
            and (listening is None or (pid in self.listeners) == listening)
        )
