"""Hints printed with errors: commands a user can paste as written, built from this process
(its ``sys.argv`` and environment). `ironflow_celery.integration.app` hands
`schema_missing_hint` to storage, whose schema-missing `StorageError` carries it."""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence

__all__ = [
    "DEFAULT_APP",
    "celery_app_argument",
    "schema_missing_hint",
    "upgrade_command",
]

DEFAULT_APP = "ironflow_celery"


def celery_app_argument(argv: Sequence[str] | None = None) -> str | None:
    """The ``-A``/``--app`` value this process was started with (``celery -A x worker``), if any."""
    args = list(sys.argv if argv is None else argv)
    for i, arg in enumerate(args):
        if arg in ("-A", "--app") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
        if arg.startswith("-A") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:]
    return os.environ.get("IRONFLOW_CELERY_APP") or None


def upgrade_command(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> str:
    """``ironflow-celery -A <app> db upgrade`` for this process's app, runnable as printed.

    The package's own app reads its database from IRONFLOW_DATABASE_URL, so the command
    carries that variable too (unless the URL holds a password, which is never printed).
    """
    env = os.environ if environ is None else environ
    given = celery_app_argument(argv)
    app = given or DEFAULT_APP
    command = f"ironflow-celery -A {shlex.quote(app)} db upgrade"
    if app.split(":")[0] != DEFAULT_APP:
        return command
    url = env.get("IRONFLOW_DATABASE_URL", "")
    if url and not re.search(r"://[^/@]*:[^/@]*@", url):
        return f"IRONFLOW_DATABASE_URL={shlex.quote(url)} {command}"
    if url:
        return f"{command} (with IRONFLOW_DATABASE_URL set as for this process)"
    if given:
        return f"{command} (with IRONFLOW_DATABASE_URL set to the database)"
    # Neither an app nor the variable: this process configured its app in code, which
    # only its user can name.
    return "ironflow-celery -A <your Celery app> db upgrade"


def schema_missing_hint() -> str:
    """What to do when the ironflow schema is missing or older than this version."""
    return (
        "the ironflow schema is missing or older than this version of ironflow_celery: "
        f"run `{upgrade_command()}`"
    )
