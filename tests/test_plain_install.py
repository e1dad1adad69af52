"""A plain install works: the built wheel, no extras, in a fresh venv, runs a real worker.

Issue 13 §1: ``pip install <checkout>`` without extras once gave a worker that crashed on
start with a Redis broker (kombu's Redis transport imports ``packaging``, which only its
``redis`` extra brings). Here the wheel is built from a clean copy of the sources with the
test venv's setuptools (no build isolation, so no index is needed), its runtime
dependencies (and nothing else) are collected into a wheelhouse with the test venv's pip
(from its cache or the index), and installed offline (``--no-index``) into a new
virtualenv. Without a reachable index (issue 24 §1: a machine in a network namespace)
the same dependencies are copied from the test venv's installed distributions instead,
and pip then installs the wheel with ``--no-index``, checking that they satisfy it. Then
``celery -A ironflow_celery worker`` from that venv, run outside the checkout, takes one
workflow from its input through an effect and the effect's follow-up to a terminal
state, over Redis and over RabbitMQ.

The build is done once per test session (shared by xdist workers through a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("IRONFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("IRONFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: Generous: building and installing on a loaded 2-core machine can take minutes.
BUILD_TIMEOUT = 600

WORKFLOW_MODULE = '''
"""A two-step workflow for the plain-install test: place, ship (an effect), delivered."""

from pydantic import BaseModel

from ironflow_celery import Decision, EffectContext, Message, Workflow


class Place(Message):
    id: str


class ShipDone(Message):
    id: str
    tracking: str


class Placed(Message):
    pass


class Delivered(Message):
    tracking: str


class Ship(Message):
    pass


class Parcel(BaseModel):
    placed: bool = False
    tracking: str | None = None


class PlainParcel(Workflow):
    type = "plain_parcel"
    State = Parcel
    Input = Place | ShipDone
    Event = Placed | Delivered
    Effect = Ship

    @staticmethod
    def evolve(state, event):
        if isinstance(event, Placed):
            return state.model_copy(update={"placed": True})
        return state.model_copy(update={"tracking": event.tracking})

    @staticmethod
    def decide(now, state, input):
        if isinstance(input, Place):
            return Decision.accept(Placed()).with_effect(Ship())
        return Decision.accept(Delivered(tracking=input.tracking))

    @staticmethod
    def is_terminal(state):
        return state.tracking is not None

    @staticmethod
    def handle_effect(effect, ctx: EffectContext):
        return ShipDone(id=ctx.workflow.workflow_id, tracking=f"T-{ctx.attempt}")
'''


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run `argv`, failing the test with its output when it fails."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False, **kwargs
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def build(root: Path) -> Path:
    """Build the wheel, collect its runtime wheelhouse, make a venv with it; its python."""
    source = root / "source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    # A clean copy: only what a release contains (no .venv, no egg-info, no build/).
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    # Every package pyproject's `packages.find` includes (`ironflow_celery*`).
    for package in sorted(REPO.glob("ironflow_celery*/__init__.py")):
        shutil.copytree(
            package.parent,
            source / package.parent.name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    dist, wheelhouse, venv = root / "dist", root / "wheelhouse", root / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # The backend from the dev extras (setuptools>=77), not a download: works offline.
    run([*pip, "wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", str(dist),
         str(source)])  # fmt: skip
    (wheel,) = dist.glob("ironflow_celery-*.whl")
    # No pip inside (ensurepip costs seconds): this pip installs into it with --python.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # Only what the wheel declares without extras; pip takes them from its cache when it can.
    collected = subprocess.run(
        [*pip, "wheel", "--timeout", "15", "--retries", "1", "--wheel-dir", str(wheelhouse),
         str(wheel)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
    )  # fmt: skip
    if collected.returncode != 0:
        copy_installed_requirements(wheel, python)
    run(
        [*pip, "--python", str(python), "install", "--no-index",
         "--find-links", str(wheelhouse), str(wheel)]
    )  # fmt: skip
    return python


def copy_installed_requirements(wheel: Path, python: Path) -> None:
    """Copy the wheel's runtime requirements (no extras), as installed here, into `python`'s venv.

    The offline stand-in for a wheelhouse: the closure of the wheel's ``Requires-Dist`` is
    followed through the installed distributions' own metadata, each copied file by file
    as its RECORD lists them; a declared dependency missing here fails the `pip install`.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.startswith("Requires-Dist:")]  # fmt: skip
    venv = python.parents[1]
    (site,) = venv.glob("lib/python*/site-packages")
    pending = [(Requirement(r), "") for r in requires]
    followed: set[tuple[str, str]] = set()
    copied: set[str] = set()
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            continue  # the later pip install names the missing requirement
        name = dist.metadata["Name"].lower()
        for wanted in ["", *requirement.extras]:
            if (name, wanted) not in followed:
                followed.add((name, wanted))
                pending.extend((Requirement(r), wanted) for r in dist.requires or [])
        if name in copied:
            continue
        copied.add(name)
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if file.suffix == ".pyc" or not source.is_file():
                continue
            if file.parts[0] == "..":  # a console script: point it at the new venv
                target = venv / "bin" / file.name
                content = source.read_bytes()
                if content.startswith(b"#!"):
                    content = b"#!" + bytes(python) + content[content.index(b"\n") :]
                target.write_bytes(content)
                target.chmod(0o755)
            else:
                target = site / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


@pytest.fixture(scope="session")
def plain_venv(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The python of a fresh venv holding the built wheel and its runtime deps only."""
    # Under xdist every worker has its own basetemp; its parent is shared by the session.
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent
    root = shared / "plain-install"
    root.mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker builds, the others wait
        done = root / "done"
        if not done.exists():
            python = build(root)
            done.write_text(str(python))
        return Path(done.read_text())


def test_the_wheel_ships_its_package_data(plain_venv: Path) -> None:
    """py.typed, the migrations and the license are in the wheel; the version is the metadata's."""
    (wheel,) = (plain_venv.parents[2] / "dist").glob("ironflow_celery-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "ironflow_celery/py.typed" in names
    # The order saga the docs import (issue 24 §4: a doc example needs no checkout).
    assert "ironflow_celery/examples/orders.py" in names
    assert any(n.startswith("ironflow_celery/storage/schema/migrations/") for n in names)
    # the development tooling (service finder, embedded servers) is not part of the package
    assert not any(n.startswith("devtools/") for n in names)
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    # The license the metadata declares is the one the file holds.
    assert "License-Expression: MIT\n" in archive.read(metadata).decode()
    assert archive.read(license_file).decode().startswith("MIT License\n")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the venv's
    out = run(
        [str(plain_venv), "-c",
         "import importlib.metadata as m, ironflow_celery as i; "
         "from ironflow_celery.examples.orders import OrderSaga; "
         "print(i.__version__, m.version('ironflow-celery'), i.__file__)"],
        cwd=plain_venv.parents[2], env=clean,
    ).stdout.split()  # fmt: skip
    assert out[0] == out[1]
    assert out[2].startswith(str(plain_venv.parents[1]))  # the venv's copy, not the checkout's


def broker_reachable(url: str) -> str | None:
    """None when the broker at `url` answers, else why not."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def worker(python: Path, env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    """``celery -A ironflow_celery worker`` from the plain venv; stopped (warm, then killed)."""
    celery = python.parent / "celery"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(celery), "-A", "ironflow_celery", "worker", "-l", "INFO", "-P", "threads",
             "-c", "2", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait(10)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_plain_install_runs_a_workflow_end_to_end(
    plain_venv: Path, empty_database_url: str, broker: str, tmp_path: Path
) -> None:
    """No extras: db upgrade, then a worker runs input → effect → follow-up → terminal."""
    url = {"redis": REDIS_URL, "amqp": AMQP_URL}[broker]
    unreachable = broker_reachable(url)
    if unreachable and broker == "amqp":
        pytest.skip(f"RabbitMQ is not reachable at {url}: {unreachable}")
    assert unreachable is None, unreachable
    (tmp_path / "plain_flow.py").write_text(textwrap.dedent(WORKFLOW_MODULE))
    database = empty_database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    queue = f"ironflow-plain-{uuid.uuid4().hex[:8]}"
    # A user's shell: the venv's scripts, the workflow module beside us, nothing of the
    # checkout or the test venv on the path.
    env = {
        "PATH": f"{plain_venv.parent}{os.pathsep}/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(tmp_path),
        "IRONFLOW_DATABASE_URL": database,
        "CELERY_BROKER_URL": url,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "IRONFLOW_WORKFLOWS": "plain_flow",
    }
    upgraded = run([str(plain_venv.parent / "ironflow-celery"), "db", "upgrade"],
                   env=env, cwd=tmp_path)  # fmt: skip
    assert "applied migrations" in upgraded.stdout
    submit = (
        "import ironflow_celery as i, plain_flow as f; "
        "print(i.app.ironflow.service.execute(f.Place(id='parcel-1')))"
    )
    log = tmp_path / "worker.log"
    try:
        with worker(plain_venv, env, tmp_path, log) as process:
            out = run([str(plain_venv), "-c", submit], env=env, cwd=tmp_path).stdout
            assert "Accepted" in out
            deadline = time.monotonic() + 180  # a loaded machine boots a worker slowly
            row = None
            while time.monotonic() < deadline and process.poll() is None:
                with psycopg.connect(database, autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT completed_at IS NOT NULL FROM ironflow.workflow_instances "
                        "WHERE workflow_type = 'plain_parcel' AND workflow_id = 'parcel-1'"
                    ).fetchone()
                if row and row[0]:
                    break
                time.sleep(0.2)
            output = log.read_text()
            assert process.poll() is None, f"the worker exited:\n{output[-4000:]}"
            assert row and row[0], f"parcel-1 did not finish:\n{output[-4000:]}"
        with psycopg.connect(database, autocommit=True) as conn:
            events = [
                r[0]
                for r in conn.execute(
                    "SELECT payload->>'type' FROM ironflow.events WHERE workflow_id = 'parcel-1' "
                    "ORDER BY sequence"
                )
            ]
            processed = conn.execute(
                "SELECT count(*) FROM ironflow.outbox WHERE processed_at IS NOT NULL"
            ).fetchone()
        assert events == ["Placed", "Delivered"]
        assert processed == (1,)
        assert "ironflow.plain_parcel.effect" in output  # run by the worker, not in-process
    finally:
        if broker == "amqp":
            from kombu import Connection

            with contextlib.suppress(Exception), Connection(url, connect_timeout=3) as conn:
                conn.default_channel.queue_delete(queue)
