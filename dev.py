#!/usr/bin/env python3
"""Developer entry point: one command to run the example or the tests, on a fresh machine.

    python3 dev.py example [ARGS...]    run `python -m examples.orders ARGS...`
    python3 dev.py test [ARGS...]       run `python -m pytest ARGS...`
    python3 dev.py bench [ARGS...]      run `python -m benchmarks ARGS...` (e.g. --quick)
    python3 dev.py services             start/find the services, print their env vars, wait

Needs only Python 3.11+. It creates `.venv` beside this file, installs `-e .[dev]` into it
(again only when pyproject.toml changed; `bench` also installs the `bench` extra, the peers
of benchmark row 10, which the other commands do not need), then re-runs itself inside the
venv, where it finds PostgreSQL and a broker (configured, local, or embedded — see
`devtools.local_services`), exports them as IRONFLOW_DATABASE_URL and
CELERY_BROKER_URL, runs the command, stops what it started and exits with the command's code.

Standard library only: this file runs before any dependency is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".ironflow-installed"
#: The extras each command needs beyond `dev`, each with its own stamp, so that `dev.py test`
#: never waits for the benchmark's peers (row 10) to install.
EXTRA_EXTRAS = {"bench": ["bench"]}
WORKDIR = ROOT / ".ironflow"  # embedded servers' data and logs
#: Packages the dev extras no longer list; removed from an existing .venv on reinstall because
#: pip never removes them, and pytest-celery's plugin clashes with celery.contrib.pytest.
DROPPED = ["pytest-celery"]
COMMANDS = {
    "example": "run the example workflow end to end (python -m examples.orders)",
    "test": "run the test suite (python -m pytest)",
    "bench": "run the benchmarks against plain Celery (python -m benchmarks)",
    "services": "start or find PostgreSQL and the broker, print their env vars, wait for Ctrl-C",
}


def main(argv: list[str]) -> int:
    """Parse the command line, make sure the venv is ready, and run the command inside it."""
    # Any system python3 may run this file; say so plainly rather than fail obscurely later.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"dev.py: Python 3.11 or newer is needed, this is {sys.version.split()[0]}")
    command, extra = parse_args(argv)
    python = ensure_venv(EXTRA_EXTRAS.get(command, []))
    if not running_in(VENV):
        return reexec(python, argv)
    return run(command, extra)


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """(command, arguments passed through to it); everything after the command is passed on."""
    parser = argparse.ArgumentParser(
        prog="dev.py",
        description="Run the ironflow_celery example or tests with services found or started.",
        epilog="Arguments after the command go to it unchanged, e.g. `dev.py test -k schema -x`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # argparse cannot pass options like `-k` through a sub-command, so split by hand: the
    # first word that is not an option is the command, and the rest belongs to the child.
    split = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    args = parser.parse_args(argv[: split + 1])
    return args.command, argv[split + 1 :]


# --------------------------------------------------------------------------- bootstrap


def venv_python() -> Path:
    """The venv's interpreter."""
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def running_in(env: Path) -> bool:
    """Whether this interpreter is the one of virtualenv `env`."""
    return Path(sys.prefix).resolve() == env.resolve()


def ensure_venv(extras: list[str] | None = None) -> Path:
    """Create .venv if missing and (re)install the project when pyproject.toml changed.

    `extras` (beyond `dev`) are installed too, each tracked by its own stamp file.
    """
    python = venv_python()
    if not python.exists():
        print(f"dev.py: creating virtualenv {VENV.relative_to(ROOT)}", flush=True)
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except (OSError, subprocess.CalledProcessError) as exc:
            shutil.rmtree(VENV, ignore_errors=True)  # a venv without pip would stick around
            sys.exit(
                f"dev.py: could not create {VENV}: {exc}\n"
                "On Debian/Ubuntu install the venv module first: apt install python3-venv"
            )
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamps = {"dev": STAMP, **{e: VENV / f".ironflow-installed-{e}" for e in extras or []}}
    stale = [
        extra
        for extra, path in stamps.items()
        if not path.exists() or path.read_text().strip() != wanted
    ]
    if stale:
        installed = STAMP.read_text().strip() if STAMP.exists() else None
        spec = f".[{','.join(stamps)}]"
        why = "first run" if installed is None else "pyproject.toml changed"
        if "dev" not in stale:
            why = f"{', '.join(stale)} extra not installed yet"
        print(f"dev.py: installing -e {spec} into .venv ({why}; takes a minute)", flush=True)
        log = VENV / "pip-install.log"  # pip and setuptools are chatty: show it on failure only
        with open(log, "w") as out:
            result = subprocess.run(
                [str(python), "-m", "pip", "install", "--disable-pip-version-check",
                 "-e", spec],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        if result.returncode != 0:
            print(log.read_text()[-5000:], file=sys.stderr)
            sys.exit(
                f"dev.py: pip install -e {spec} failed (exit code {result.returncode}), log: {log}"
            )
        if installed is not None and "dev" in stale:
            with open(log, "a") as out:
                subprocess.run(
                    [str(python), "-m", "pip", "uninstall", "--disable-pip-version-check",
                     "-y", *DROPPED],
                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False,
                )  # fmt: skip
        for path in stamps.values():
            path.write_text(wanted + "\n")
    return python


def reexec(python: Path, argv: list[str]) -> int:
    """Run this script again with the venv's interpreter (replacing this process on POSIX)."""
    args = [str(python), str(Path(__file__).resolve()), *argv]
    if os.name == "nt":
        return subprocess.call(args)
    os.execv(args[0], args)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- inside the venv


def run(command: str, extra: list[str]) -> int:
    """Resolve the services, run `command` with them in its environment, stop them, return."""
    from devtools.local_services import resolve_services
    from ironflow_celery.errors import IronflowError

    # SIGTERM (CI cancelling a job) must still stop the embedded servers: make it an exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        services = resolve_services(workdir=WORKDIR)
    except IronflowError as exc:
        print(f"dev.py: {exc}", file=sys.stderr)
        return 2
    with services:
        os.environ.update(services.env())
        if command == "services":
            return wait_for_ctrl_c(services.env())
        if command == "example":
            return run_child([sys.executable, "-m", "examples.orders", *extra])
        if command == "bench":
            return run_child([sys.executable, "-m", "benchmarks", *extra])
        return run_child([sys.executable, "-m", "pytest", *extra])


def run_child(argv: list[str]) -> int:
    """Run `argv` in the repository root; Ctrl-C goes to it, we wait for it to finish."""
    child = subprocess.Popen(argv, cwd=ROOT)

    def forward(signum: int, frame: object) -> None:
        # The terminal already sent SIGINT to the child (same process group); a SIGTERM
        # aimed at us is passed on. Either way we keep waiting, then clean up.
        if signum != signal.SIGINT:
            child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = child.wait()
    return 128 - code if code < 0 else code  # killed by signal N → 128+N, as shells do


def wait_for_ctrl_c(env: dict[str, str]) -> int:
    """Print `export` lines for the services and block until interrupted."""
    for name, value in env.items():
        print(f"export {name}={value}")
    print("Services are up; press Ctrl-C to stop them.", flush=True)
    # Even when started from a shell that ignores SIGINT (`&` in a script), Ctrl-C stops it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
