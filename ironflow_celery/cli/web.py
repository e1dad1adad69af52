"""``ironflow-celery web``: serve the read-only web view (the ``web`` extra) with uvicorn,
or print a password hash for ``ironflow_web_password_hash``."""

from __future__ import annotations

import sys
from typing import Any

import click

from ironflow_celery.cli._common import EXIT_UNAVAILABLE, LOGLEVEL, Context, fail, guarded

__all__ = ["add_web_command"]

MISSING_EXTRA = "the web view needs the web extra: pip install 'ironflow-celery[web]' ({})"


def add_web_command(group: click.Group) -> None:
    @group.command("web")
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
    @click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
    @click.option(
        "--root-path",
        default="",
        help="URL prefix the pages are served under behind a proxy (e.g. /ironflow).",
    )
    @click.option(
        "--hash-password",
        is_flag=True,
        help="Read a password (prompt, or stdin when piped), print its "
        "ironflow_web_password_hash value, and exit.",
    )
    @click.option("-l", "--loglevel", type=LOGLEVEL, default="INFO", show_default=True)
    @click.pass_obj
    @guarded
    def web(
        obj: Context, host: str, port: int, root_path: str, hash_password: bool, loglevel: str
    ) -> None:
        """Serve the web view: instances by type and state, one instance's timeline and
        state machine, dead letters (retry/discard only with ironflow_web_actions)."""
        if hash_password:
            from ironflow_celery.operations.web.auth import hash_password as make_hash

            if sys.stdin.isatty():
                password = click.prompt("password", hide_input=True, confirmation_prompt=True)
            else:
                password = sys.stdin.readline().rstrip("\r\n")
            click.echo(make_hash(password))
            return
        try:
            import uvicorn

            from ironflow_celery.operations.web.app import create_app
        except ImportError as exc:
            fail(MISSING_EXTRA.format(exc), EXIT_UNAVAILABLE)
            return
        app: Any = create_app(obj.app)
        obj.runtime  # noqa: B018 - load the workflows and check the database settings now
        click.echo(f"ironflow web view on http://{host}:{port}{root_path}/", err=True)
        uvicorn.run(app, host=host, port=port, root_path=root_path, log_level=loglevel.lower())
