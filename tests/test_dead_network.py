"""A host whose packets to PostgreSQL vanish (issue 20 §4): the store call fails within
seconds and the log says so, naming the server.

The disposable PostgreSQL runs in a network namespace of its own ("the database host"),
reached over a veth pair from a second namespace ("the worker host") that runs the
client; taking the database side's link down drops every packet silently, as a
blackhole route or a pulled cable does (no RST, no ICMP). Only namespaces and addresses
this test creates are touched. At 6964a2b connections set only ``connect_timeout``: the
call waited for the kernel's retransmissions (~15 minutes) and logged nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import REPO, DisposablePostgres, wait_until

pytestmark = pytest.mark.e2e

BOUND = 60.0
"""Seconds the failing call may take: defaults give ~10 s (tcp_user_timeout) + 5 s
(connect_timeout of the replacement connection); generous for a loaded machine."""

CLIENT = """
import logging, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                    format="%(levelname)s %(name)s %(message)s")
from ironflow_celery.errors import DatabaseUnavailable
from ironflow_celery.storage.store import PostgresStore
store = PostgresStore.from_url(sys.argv[1])
store.upgrade_schema()
store.claim("effect", "tok", ["t"], lease_seconds=30, max_attempts=5)
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
try:
    store.claim("effect", "tok", ["t"], lease_seconds=30, max_attempts=5)
    print("no error", flush=True)
except DatabaseUnavailable as error:
    print(f"failed after {time.monotonic() - started:.1f}s: {error}", flush=True)
"""


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str, str, str]]:
    """(worker namespace, database namespace, database address, database-side link)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    tag = f"{os.getpid() % 100000}"
    host, db = f"ifw{tag}", f"ifd{tag}"
    link_host, link_db = f"ifw{tag}v", f"ifd{tag}v"
    subnet = os.getpid() % 250 + 1
    host_ip, db_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    try:
        try:
            _ip("netns", "add", host)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"network namespaces are refused here: {exc.stderr.decode().strip()}")
        _ip("netns", "add", db)
        _ip("link", "add", link_host, "netns", host, "type", "veth", "peer", "name", link_db,
            "netns", db)  # fmt: skip
        _ip("-n", host, "addr", "add", f"{host_ip}/30", "dev", link_host)
        _ip("-n", db, "addr", "add", f"{db_ip}/30", "dev", link_db)
        for ns, link in ((host, link_host), (db, link_db)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", link, "up")
        yield host, db, db_ip, link_db
    finally:
        for ns in (host, db):
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip("netns", "del", ns)


class NamespacedPostgres(DisposablePostgres):
    """A disposable PostgreSQL listening on `address` inside namespace `ns`."""

    def __init__(self, ns: str, address: str) -> None:
        super().__init__()
        self.ns, self.address = ns, address

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.address}:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        # `ip netns exec` first (it needs root), then the service account inside it
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run(
            ["ip", "netns", "exec", self.ns, *prefix, *argv],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        hba = self.data / "pg_hba.conf"
        line = f"host all all {self.address.rsplit('.', 1)[0]}.0/24 trust\n"
        if line not in hba.read_text():
            with hba.open("a") as f:  # the worker host's address, over the veth pair
                f.write(line)
        super().start()

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -c listen_addresses={self.address} -c fsync=off -k {self.dir}"
        self._run(
            str(_pg_ctl()), action, "-D", str(self.data), "-l", str(self.logfile),
            "-o", options, "-w", "-t", "30", *extra,
        )  # fmt: skip


def _pg_ctl() -> Path:
    from tests.e2e import PG_BIN

    return PG_BIN / "pg_ctl"


def test_silently_dropped_packets_fail_the_store_call_within_seconds_and_warn() -> None:
    with two_hosts() as (host, db, db_ip, db_link):
        pg = NamespacedPostgres(db, db_ip)
        pg.init()
        try:
            client = subprocess.Popen(
                ["ip", "netns", "exec", host, sys.executable, "-c", CLIENT, pg.url],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert client.stdout is not None and client.stdin is not None
                ready = client.stdout.readline()
                assert ready.strip() == "ready", client.stderr.read() if client.stderr else ""
                _ip("-n", db, "link", "set", db_link, "down")  # packets now vanish
                cut = time.monotonic()
                client.stdin.write("go\n")
                client.stdin.flush()
                wait_until(
                    lambda: client.poll() is not None or time.monotonic() - cut > BOUND,
                    BOUND + 30,
                    "the client to finish",
                    interval=0.5,
                )
                if client.poll() is None:
                    client.kill()
                    pytest.fail(f"the store call still hangs {BOUND:.0f}s after the cut")
                out, err = client.communicate(timeout=30)
                print(out, err)  # the figures, with -s
                assert out.startswith("failed after"), (out, err)
                assert float(out.split()[2].rstrip("s:")) < BOUND
                warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
                assert any(db_ip in line for line in warnings), err
            finally:
                if client.poll() is None:
                    client.kill()
        finally:
            pg.destroy()
