"""PgBouncer in front of PostgreSQL (issue 20 §2), session and transaction pooling.

A real PgBouncer (the Debian package; the set-up installs it with apt-get where it is
missing and we are root) runs on a free port with an ini of its defaults except the listen
address, trust authentication and the database mapping -- no ``ignore_startup_parameters``,
nothing tuned for ironflow. A real prefork ``celery worker`` (relay inside, a projection
runner) is given the PgBouncer URL as its only change, and effects, follow-ups, timers, a
dead letter and a projection all go through it. At 6964a2b session mode claimed nothing
(``unsupported startup parameter: options``) and transaction mode failed on psycopg's
prepared statements (``prepared statement "_pg3_0" already exists``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from devtools import local_services
from tests.e2e import (
    REDIS_URL,
    Processes,
    event_types,
    free_port,
    insert_effects,
    make_env,
    prepare_database,
    redis_queue_cleanup,
    scalar,
    service_for,
    service_user,
    sql,
    wait_until,
)
from tests.e2e_apps.workflows import Place

pytestmark = [pytest.mark.e2e, pytest.mark.pgbouncer]

INSTANCES = 20
POLLING = "the relays poll"


def pgbouncer_binary() -> str:
    """PgBouncer from PATH or /usr/sbin; installed from Debian's package where missing and
    we are root; else the test is skipped, saying why."""
    found = shutil.which("pgbouncer") or shutil.which("/usr/sbin/pgbouncer")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("pgbouncer is not installed and apt-get cannot install it (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "pgbouncer"]
    done = subprocess.run(install, env=env, capture_output=True, timeout=600, check=False)
    if done.returncode != 0:  # a machine whose package lists were never fetched
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, timeout=600, check=False)
    found = shutil.which("pgbouncer") or shutil.which("/usr/sbin/pgbouncer")
    if not found:
        pytest.skip(f"apt-get could not install pgbouncer: {done.stderr.decode()[-500:]}")
    return found


class PgBouncer:
    """A PgBouncer of our own in `mode` on a free port, in front of `server_url`'s server."""

    def __init__(self, server_url: str, mode: str) -> None:
        self.binary = pgbouncer_binary()
        self.server = sa.make_url(server_url)
        self.mode = mode
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ironflow-pgbouncer-"))
        self.user = service_user()  # PgBouncer refuses to run as root
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database_url: str) -> str:
        """`database_url` with PgBouncer's port in place of the server's: the only change."""
        return sa.make_url(database_url).set(port=self.port).render_as_string(False)

    def start(self) -> None:
        ini = self.dir / "pgbouncer.ini"
        (self.dir / "users.txt").write_text(f'"{self.server.username}" ""\n')
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server.host} port={self.server.port or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.dir}\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            f"pool_mode = {self.mode}\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        prefix: list[str] = []
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
            for path in self.dir.iterdir():
                shutil.chown(path, self.user, self.user)
            local_services._grant_traversal(self.dir, int(_uid(self.user)))
            prefix = ["runuser", "-u", self.user, "--"]
        self.proc = subprocess.Popen(
            [*prefix, self.binary, str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self._listening, 30, lambda: f"pgbouncer listening:\n{self.log()[-2000:]}")

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited ({self.proc.returncode}):\n{self.log()}")
        return f"listening on 127.0.0.1:{self.port}" in self.log()

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.dir / "pgbouncer.log").read_text(errors="replace")
        return ""

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


@pytest.fixture
def bouncer(request: pytest.FixtureRequest, database_url: str) -> Iterator[PgBouncer]:
    server = PgBouncer(database_url, request.param)
    try:
        server.start()
        yield server
    finally:
        print(f"----- pgbouncer ({server.mode}) -----\n{server.log()[-3000:]}")
        server.stop()


@pytest.mark.parametrize(
    ("bouncer", "direct_listen"),
    [("session", False), ("transaction", False), ("transaction", True)],
    indirect=["bouncer"],
    ids=["session", "transaction", "transaction-listen-url"],
)
def test_everything_runs_through_pgbouncer(
    bouncer: PgBouncer,
    direct_listen: bool,
    database_url: str,
    procs: Processes,
    queue: str,
) -> None:
    """Effects with follow-ups, timers, a dead letter (a payload its handler cannot read,
    two attempts) and a projection, with the database URL pointing at PgBouncer.

    Transaction pooling without ``ironflow_listen_url``: the relays say once that they
    poll; with it (the direct server) they LISTEN there and do not poll."""
    prepare_database(database_url)
    url = bouncer.url(database_url)
    extra = {"listen_url": database_url} if direct_listen else {}
    env = make_env(
        url,
        REDIS_URL,
        queue,
        max_attempts=2,
        backoff_base=0.2,
        projections="tests.e2e_apps.projections:ORDER_EVENTS",
        **extra,
    )
    with redis_queue_cleanup(queue):
        worker = procs.worker("worker", env, pool="prefork", concurrency=2)
        worker.wait_for_output("ironflow relay started (process)", 90)
        worker.wait_for_output("ready.", 90)
        service = service_for(url)
        try:
            for i in range(INSTANCES):
                service.execute(Place(id=f"pb-{i}", timer_secs=0.5))
        finally:
            service.store.dispose()
        insert_effects(url, 1, "bad-", sleep="not a number")  # dead-lettered after 2 attempts

        def done() -> bool:
            return all(
                sorted(event_types(database_url, f"pb-{i}")) == ["Charged", "Expired", "Placed"]
                for i in range(INSTANCES)
            )

        wait_until(done, 180, lambda: f"every order charged and expired\n{worker.output()[-3000:]}")
        dead = "SELECT count(*) FROM ironflow.outbox WHERE dead_lettered_at IS NOT NULL"
        wait_until(lambda: scalar(database_url, dead) == 1, 120, "the bad effect dead-lettered")
        last = scalar(database_url, "SELECT max(global_sequence) FROM ironflow.events")
        position = (
            "SELECT last_sequence FROM ironflow.projection_positions "
            "WHERE projection_name = 'e2e_order_events'"
        )
        wait_until(
            lambda: (scalar(database_url, position) or 0) >= last, 120, "the projection caught up"
        )
        runs = sql(
            database_url,
            "SELECT effect_id, array_agg(attempt ORDER BY at), array_agg(pid ORDER BY at) "
            "FROM e2e_calls GROUP BY effect_id HAVING count(*) > 1",
        )
        assert scalar(database_url, "SELECT count(*) FROM e2e_calls") == INSTANCES, runs
        timers = "SELECT count(*) FROM ironflow.timers WHERE processed_at IS NOT NULL"
        assert scalar(database_url, timers) == INSTANCES
        output = worker.output()
        for bad in ("unsupported startup parameter", "already exists", "does not exist"):
            assert bad not in output, f"{bad!r} in the worker's log"
        polls = output.count(POLLING)
        if bouncer.mode == "transaction" and not direct_listen:
            assert polls == 1, f"the relay says once that it polls ({polls} times)"
        else:
            assert polls == 0, "the relay LISTENs (session pooling, or a direct listen URL)"
