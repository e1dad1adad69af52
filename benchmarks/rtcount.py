"""Count database round trips per process (benchmark row 8; off unless installed).

pg_stat_statements is not loaded on the benchmark server, so the count is taken on the
client, from SQLAlchemy's events, one round trip each:

- ``before_cursor_execute``: a statement;
- ``begin``: psycopg sends ``BEGIN`` before the transaction's first statement (not in
  autocommit mode);
- ``commit`` / ``rollback``: ``COMMIT`` / ``ROLLBACK`` when a transaction is open;
- pool ``checkout`` of a connection that sat idle for ``IDLE_PING_AFTER`` seconds: the
  engine pings it first (``ironflow_celery.storage.db``); a connection reused sooner is not pinged.

Each process writes ``{"pid", "role", counts}`` to ``<dir>/<pid>.json`` every 0.2 s.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter

import sqlalchemy as sa
from sqlalchemy.pool import Pool

_counts: Counter[str] = Counter()
# Statements by their first words (the SQL's opening, whitespace folded): which statements
# a relay spends its round trips on (row 11).
_labels: Counter[str] = Counter()
_pid = 0
_dir = ""
_installed = False


def _writer(pid: int) -> None:
    path = os.path.join(_dir, f"{pid}.json")
    import multiprocessing

    role = multiprocessing.current_process().name
    while os.getpid() == pid:
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(
                {"pid": pid, "role": role, "counts": dict(_counts), "labels": dict(_labels)}, fh
            )
        os.replace(tmp, path)
        threading.Event().wait(0.2)


def _bump(kind: str) -> None:
    global _pid
    pid = os.getpid()
    if pid != _pid:  # first event in this (possibly forked) process
        _pid = pid
        _counts.clear()
        _labels.clear()
        threading.Thread(target=_writer, args=(pid,), daemon=True).start()
    _counts[kind] += 1


def _dbapi(conn):
    return conn.connection.dbapi_connection


def _on_begin(conn) -> None:
    # psycopg sends BEGIN only outside autocommit (the store's one-statement path is not).
    if not _dbapi(conn).autocommit:
        _bump("begin")


def _on_end(conn, kind: str) -> None:
    # COMMIT/ROLLBACK reach the server only when a transaction is open.
    import psycopg

    if _dbapi(conn).info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        _bump(kind)


def install(directory: str) -> None:
    """Start counting in this process and every process forked from it."""
    global _dir, _installed
    if _installed:
        return
    _installed = True
    _dir = directory
    os.makedirs(directory, exist_ok=True)
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", _on_statement)
    sa.event.listen(sa.engine.Engine, "begin", _on_begin)
    sa.event.listen(sa.engine.Engine, "commit", lambda conn: _on_end(conn, "commit"))
    sa.event.listen(sa.engine.Engine, "rollback", lambda conn: _on_end(conn, "rollback"))
    sa.event.listen(Pool, "checkout", _on_checkout)


def _on_statement(conn, cursor, statement: str, *args) -> None:
    _bump("statement")
    _labels[" ".join(statement.split()[:6])[:60]] += 1


def _on_checkout(dbapi_connection, record, proxy) -> None:
    import time

    from ironflow_celery.storage.db import IDLE_PING_AFTER

    last = record.info.get("ironflow_checkin")
    if last is not None and time.monotonic() - last >= IDLE_PING_AFTER:
        _bump("ping")


def read(directory: str) -> dict[int, dict]:
    """The latest counts of every process that wrote to `directory`."""
    out: dict[int, dict] = {}
    for name in os.listdir(directory):
        if name.endswith(".json"):
            try:
                with open(os.path.join(directory, name)) as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                continue
            out[data["pid"]] = data
    return out


def labels(directory: str) -> Counter[str]:
    """Statements by label (their SQL's opening words), summed over every process."""
    summed: Counter[str] = Counter()
    for data in read(directory).values():
        summed.update(data.get("labels", {}))
    return summed


def total(directory: str) -> Counter[str]:
    """Counts summed over every process."""
    summed: Counter[str] = Counter()
    for data in read(directory).values():
        summed.update(data["counts"])
    return summed
