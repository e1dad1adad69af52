"""docker-compose.yml and the Dockerfile, checked structurally (no Docker engine here).

Issue 13 §2: the compose file must reach a working system on its own — a one-shot
migration the others wait for, one built image (no `pip install` racing at start-up),
ports reachable only from the host, and a login in front of Flower. These tests parse the
files and assert those invariants; the migration's command is also run as written against
a test database.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import (
    BIN,
    REDIS_URL,
    Processes,
    redis_queue_cleanup,
    sql,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
#: The services built from ./Dockerfile (the ironflow image).
IRONFLOW_SERVICES = {"migrate", "worker", "flower"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as Docker Compose reads it (YAML merge keys resolved)."""
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def command_line(service: dict[str, Any]) -> str:
    """The service's command as one string, whatever form it is written in."""
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def test_every_published_port_is_bound_to_localhost(compose: dict[str, Any]) -> None:
    """PostgreSQL trusts every connection: nothing may listen on all interfaces."""
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert {"postgres", "redis", "flower"} <= {n for n, p in published.items() if p}
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str), f"{name}: write ports as 'ip:host:container'"
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_a_one_shot_migration_runs_before_the_worker_and_flower(compose: dict[str, Any]) -> None:
    """The schema exists before anything that needs it starts."""
    services = compose["services"]
    migrate = services["migrate"]
    assert command_line(migrate) == "ironflow-celery db upgrade"
    assert migrate.get("restart", "no") == "no"  # one shot, not a restart loop
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in IRONFLOW_SERVICES - {"migrate"}:
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }, name


def test_one_built_image_and_no_install_at_start(compose: dict[str, Any]) -> None:
    """worker, flower and migrate share the image built from ./Dockerfile; none runs pip."""
    services = compose["services"]
    images = {(services[n].get("build"), services[n].get("image")) for n in IRONFLOW_SERVICES}
    assert len(images) == 1, images
    ((build, _image),) = images
    assert build == "."
    for name, service in services.items():
        assert "pip install" not in command_line(service), name
        assert not any(str(v).split(":")[0] in (".", "./") for v in service.get("volumes", [])), (
            f"{name} mounts the checkout"
        )
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install \. ", dockerfile, re.M), "the image installs the package"
    assert "-e " not in dockerfile
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M), "the containers run unprivileged"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".ironflow" in ignored  # the build context stays small


def test_flower_requires_a_login(compose: dict[str, Any]) -> None:
    """Flower's basic auth comes from the environment; without it Flower does not start."""
    flower = compose["services"]["flower"]
    assert "celery -A ironflow_celery flower" in command_line(flower)
    # Passed through from the host; empty when unset, so other services still start.
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"
    # Merged with the shared settings, not replacing them.
    assert flower["environment"]["IRONFLOW_DATABASE_URL"].startswith("postgresql://")
    # The command as the container runs it (compose turns $$ into $), with no login set.
    argv = [part.replace("$$", "$") for part in flower["command"]]
    assert argv[:2] == ["sh", "-c"]
    refused = subprocess.run(
        argv, env={"PATH": os.environ["PATH"], "FLOWER_BASIC_AUTH": ""},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "set FLOWER_BASIC_AUTH=user:password" in refused.stderr


def test_the_worker_runs_the_package_app_with_the_example(compose: dict[str, Any]) -> None:
    """The worker's app and workflows exist in the image as the compose file names them."""
    worker = compose["services"]["worker"]
    assert command_line(worker).startswith("celery -A ironflow_celery worker")
    env = worker["environment"]
    assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    module = env["IRONFLOW_WORKFLOWS"]
    assert (REPO / (module.replace(".", "/") + ".py")).exists()
    assert "COPY examples" in (REPO / "Dockerfile").read_text()


def test_the_migration_command_works_as_written(
    compose: dict[str, Any], empty_database_url: str
) -> None:
    """`migrate`'s command, with its environment (the database pointed at a test one)."""
    migrate = compose["services"]["migrate"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IRONFLOW_", "CELERY_"))}
    env.update(migrate["environment"])
    env["IRONFLOW_DATABASE_URL"] = empty_database_url
    env["PYTHONPATH"] = str(REPO)  # the image's PYTHONPATH=/app
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(
        migrate["command"], env=env, cwd="/", capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert "applied migrations" in done.stdout


# -- issue 24 §3 -----------------------------------------------------------------------------

#: The ports a PostgreSQL, Redis or RabbitMQ already running on the host listens on.
USUAL_PORTS = {"5432", "6379", "5672"}


def test_the_image_holds_every_package_the_wheel_declares() -> None:
    """Each ``ironflow_celery*`` package (the pytest plugin too: an entry point names it) is
    copied before ``pip install .``, so the installed distribution is complete."""
    dockerfile = (REPO / "Dockerfile").read_text()
    before_install = dockerfile.split("\nRUN pip install .", 1)[0]
    copied = {
        path.rstrip("/")
        for source in re.findall(r"^COPY (.+) \S+$", before_install, re.M)
        for path in source.split()
    }
    packages = {p.parent.name for p in REPO.glob("ironflow_celery*/__init__.py")}
    assert "ironflow_celery_pytest" in packages
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"


def test_no_service_takes_the_hosts_usual_ports(compose: dict[str, Any]) -> None:
    """A local PostgreSQL or Redis keeps its port: compose publishes its own elsewhere."""
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_port = port.split(":")[-2]
            assert host_port not in USUAL_PORTS, f"{name} publishes {port} on a usual port"


def readme_docker_commands() -> list[list[str]]:
    """The README's commands run inside the worker container (``docker compose exec
    worker …``), continuation lines joined, as argv."""
    section = (REPO / "README.md").read_text().split("### With Docker", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("docker compose exec worker "):
                commands.append(shlex.split(line)[4:])
    return commands


@pytest.mark.e2e
def test_the_readme_submits_an_order_to_the_compose_worker(
    compose: dict[str, Any],
    database_url: str,
    procs: Processes,
) -> None:
    """The worker's command, in the compose environment (database and broker pointed at
    test ones, a queue of its own): the README's submit command takes an order to its end,
    and its status command runs."""
    commands = readme_docker_commands()
    submit = next(c for c in commands if c[:4] == ["celery", "-A", "ironflow_celery", "call"])
    status = next(c for c in commands if c[0] == "ironflow-celery")
    (args,) = [a.split("=", 1)[1] for a in submit if a.startswith("--args=")]
    order_id = json.loads(args)[0]["id"]
    worker = compose["services"]["worker"]
    queue = f"compose-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IRONFLOW_", "CELERY_"))}
    env.update(worker["environment"])
    env.update(
        IRONFLOW_DATABASE_URL=database_url.replace("postgresql+psycopg://", "postgresql://"),
        CELERY_BROKER_URL=REDIS_URL,
        CELERY_TASK_DEFAULT_QUEUE=queue,
        PYTHONPATH=str(REPO),  # the image's PYTHONPATH=/app
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )

    def in_container(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], env=env, cwd="/", capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip

    with redis_queue_cleanup(queue):
        argv = worker["command"]
        proc = procs.spawn("compose-worker", [str(BIN / argv[0]), *argv[1:]], env)
        sent = in_container(submit)
        assert sent.returncode == 0, sent.stderr
        wait_until(
            lambda: sql(
                database_url,
                "SELECT 1 FROM ironflow.workflow_instances WHERE workflow_type = 'orders' "
                "AND workflow_id = %s AND completed_at IS NOT NULL",
                [order_id],
            ),
            180,  # a loaded machine boots a worker slowly
            lambda: f"{order_id} did not finish:\n{proc.output()[-4000:]}",
        )
        shown = in_container(status)
        assert shown.returncode == 0, shown.stderr
        assert order_id in proc.output()  # what `docker compose logs worker | grep` finds
