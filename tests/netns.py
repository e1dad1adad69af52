"""Hosts as Linux network namespaces: a database, a broker and worker hosts on one machine.

Each host is a namespace of its own (``ip netns add``); a hub namespace holds two bridges,
``dbnet`` (10.231.1.0/24, the database host's network) and ``brnet`` (10.231.2.0/24, the
broker host's network). A worker host has one veth pair into each bridge, so it can be cut
off the database, the broker or both by setting the hub's end of a pair down — the switch
port going dark: the host's interface loses carrier, its routes stay, and its packets are
dropped silently, as on a real network partition.

Addresses exist only inside the namespaces created here; nothing is routed to or from the
machine's own namespace. The test process reaches the database and the broker through
their Unix sockets (in a temp dir), never over this network. Names carry a per-run id, so
parallel runs do not collide; `HostNetwork.destroy` kills every process left in the
namespaces and deletes them (the veth pairs go with them), and runs even when the test
failed. Needs root and a kernel that lets it create namespaces: `refused` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.e2e import PG_BIN, DisposablePostgres, redis_server_bin, wait_until

#: The two networks of the hub: the database host's and the broker host's.
NETWORKS = {"dbnet": "10.231.1", "brnet": "10.231.2"}


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGV`; with `check`, a failure raises naming the command and ip's message."""
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(argv)}` failed: {done.stderr.strip()}")
    return done


def refused() -> str | None:
    """Why namespaces cannot be built here (not root, no `ip`, `ip netns add` refused), or
    None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (`ip netns add`); this run is not root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"ifw-probe-{uuid.uuid4().hex[:8]}"
    try:
        done = _ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"`ip netns add` is refused here: {done.stderr.strip()}"
        bridge = _ip("-n", probe, "link", "add", "probe0", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"a bridge cannot be created in a namespace: {bridge.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


@dataclass
class Host:
    """One namespace and its address on each network it is attached to."""

    name: str
    netns: str
    addresses: dict[str, str] = field(default_factory=dict)

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside this host (`ip netns exec`, which execs:
        the process keeps the pid and process group it was started with)."""
        return ["ip", "netns", "exec", self.netns]


class HostNetwork:
    """The hub and its hosts for one test run; `destroy` removes all of it."""

    def __init__(self) -> None:
        self.run = f"ifw-{uuid.uuid4().hex[:8]}"
        self.hub = f"{self.run}-hub"
        self.hosts: dict[str, Host] = {}
        self._next = 10  # worker hosts take .10, .11, …; service hosts pick their own
        self.namespaces: list[str] = []
        try:
            self._add_namespace(self.hub)
            for bridge in NETWORKS:
                _ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
                _ip("-n", self.hub, "link", "set", bridge, "up")
        except BaseException:
            self.destroy()
            raise

    def _add_namespace(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self.namespaces.append(netns)  # from now on destroy() removes it
        _ip("-n", netns, "link", "set", "lo", "up")

    def add_host(self, name: str, networks: list[str], last_octet: int | None = None) -> Host:
        """A namespace attached to each of `networks` (``dbnet``/``brnet``) by a veth pair:
        ``eth-<network>`` inside the host, ``<name>-<network>`` on the hub's bridge."""
        netns = f"{self.run}-{name}"
        self._add_namespace(netns)
        host = Host(name, netns)
        if last_octet is None:
            last_octet, self._next = self._next, self._next + 1
        for network in networks:
            inside, port = f"eth-{network}", self.port(name, network)
            _ip("-n", netns, "link", "add", inside, "type", "veth", "peer", "name", port,
                "netns", self.hub)  # fmt: skip
            _ip("-n", self.hub, "link", "set", port, "master", network, "up")
            address = f"{NETWORKS[network]}.{last_octet}"
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", netns, "link", "set", inside, "up")
            host.addresses[network] = address
        self.hosts[name] = host
        return host

    @staticmethod
    def port(host: str, network: str) -> str:
        """The hub's end of `host`'s veth pair on `network` (interface names: 15 chars)."""
        name = f"{host}-{network}"
        assert len(name) <= 15, name
        return name

    def cut(self, host: str, *networks: str) -> None:
        """Take `host` off `networks`: its switch ports go down, its packets are dropped."""
        for network in networks:
            _ip("-n", self.hub, "link", "set", self.port(host, network), "down")

    def restore(self, host: str, *networks: str) -> None:
        for network in networks:
            _ip("-n", self.hub, "link", "set", self.port(host, network), "up")

    def destroy(self) -> None:
        """Kill whatever still runs in our namespaces, then delete them (with their veths)."""
        for netns in reversed(self.namespaces):
            pids = _ip("netns", "pids", netns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", netns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


# -- services on hosts -------------------------------------------------------------------


class NetnsPostgres(DisposablePostgres):
    """A disposable PostgreSQL on `host`: it listens on the host's ``dbnet`` address (the
    workers' way in) and on a Unix socket in its temp dir (the test's way in)."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.host = host
        self.address = host.addresses["dbnet"]

    def _run(self, *argv: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run(
            [*self.host.exec_prefix(), *prefix, *argv],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -c listen_addresses={self.address} -c fsync=off -k {self.dir}"
        self._run(
            str(PG_BIN / "pg_ctl"), action, "-D", str(self.data), "-l", str(self.logfile),
            "-o", options, "-w", "-t", "30", *extra,
        )  # fmt: skip

    def start(self) -> None:
        hba = self.data / "pg_hba.conf"
        line = f"host all all {NETWORKS['dbnet']}.0/24 trust\n"
        if line not in hba.read_text():
            with open(hba, "a") as out:  # initdb trusts only 127.0.0.1 and ::1
                out.write(line)
        super().start()

    def tcp_url(self, database: str) -> str:
        """The URL a worker host uses (over the ``dbnet`` network)."""
        return f"postgresql://postgres@{self.address}:{self.port}/{database}"

    def socket_url(self, database: str) -> str:
        """The URL the test process uses (the Unix socket: it has no route to ``dbnet``)."""
        return f"postgresql://postgres@/{database}?host={self.dir}&port={self.port}"


class NetnsRedis:
    """A disposable redis-server on `host`'s ``brnet`` address and a Unix socket."""

    def __init__(self, host: Host, workdir: Path) -> None:
        self.host = host
        self.address = host.addresses["brnet"]
        self.workdir = workdir
        self.socket = workdir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.address}:6379/0"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=2)

    def start(self) -> None:
        argv = [
            *self.host.exec_prefix(), redis_server_bin(),
            "--bind", self.address, "--port", "6379", "--protected-mode", "no",
            "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = self.client()
        try:
            wait_until(client.ping, 30, f"redis-server on {self.host.name}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None
