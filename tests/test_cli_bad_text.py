"""Command-line arguments that are not valid text (non-UTF-8 bytes) are usage errors: exit 2
with a one-line message, no traceback, nothing written.

Run as real subprocesses with bytes arguments, exactly as a shell passes ``$'\\xff\\xfe'``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from ops_helpers import MAX_ATTEMPTS, insert_row, row

from ironflow_celery.cli import EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "tests.e2e_apps.ops_app"


def run(args: list[bytes | str], database_url: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "IRONFLOW_DATABASE_URL": database_url,
        "IRONFLOW_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "PYTHONPATH": str(REPO),
        "CELERY_BROKER_URL": "memory://",
    }
    # generous: a loaded machine can take many seconds just to import Celery
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=180, check=False)


def test_non_utf8_arguments_exit_2_with_one_line_and_change_nothing(
    database_url: str, db: sa.Engine
) -> None:
    dead = insert_row(db, workflow_type="ops_demo", workflow_id="x-1")
    before = row(db, dead)
    cli = [str(BIN / "ironflow-celery"), "-A", APP]
    cases: list[list[bytes | str]] = [
        [*cli, "dead-letters", "list", "--type", b"\xff\xfe", "--json"],  # the case
        [*cli, "dead-letters", "count", "--id", b"o-\xff", "--error", "x"],
        [*cli, "dead-letters", "discard", str(dead), "--reason", b"gone \xff"],
        [*cli, "projections", "reset", b"\xfe"],
        [str(BIN / "ironflow-celery"), "-A", b"app\xff", "status"],
        [str(BIN / "celery"), "-A", APP, "ironflow", "dead-letters", "list", "--type", b"\xff"],
    ]
    for args in cases:
        result = run(args, database_url)
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == EXIT_USAGE, (args, stderr)
        assert "Traceback" not in stderr, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: argument b'"), (args, stderr)
        assert "is not valid UTF-8" in lines[0], (args, stderr)
    assert row(db, dead) == before  # the discard did not happen


def test_an_unknown_log_level_is_a_usage_error_not_a_traceback(database_url: str) -> None:
    """``-l nonsense`` reached logging.basicConfig: a ValueError traceback and exit 1."""
    cli = [str(BIN / "ironflow-celery"), "-A", APP]
    for args in ([*cli, "relay", "-l", "nonsense"], [*cli, "projections", "run", "-l", "nonsense"]):
        result = run(args, database_url)
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == EXIT_USAGE, (args, stderr)
        assert "Invalid value for '-l' / '--loglevel'" in stderr, stderr
        assert "Traceback" not in stderr, stderr
