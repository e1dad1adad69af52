"""The command line: ``ironflow-celery …`` and, identically, ``celery -A app ironflow …``.

Commands find the Celery app with ``-A/--app`` (default: the package's own app, configured
from ``IRONFLOW_*`` / ``CELERY_*`` environment variables) and its ironflow runtime.
Exit codes: 0 success, 1 operation refused or nothing found, 2 usage error, 3 database
or configuration error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from ironflow_celery.cli._common import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    LOGLEVEL,
    Context,
    fail,
    guarded,
)
from ironflow_celery.cli.inspection import add_inspection_commands, print_instances
from ironflow_celery.cli.operations import (
    add_cancel_commands,
    add_operations_commands,
    ops_guarded,
)
from ironflow_celery.cli.projections import add_projection_commands
from ironflow_celery.cli.web import add_web_command
from ironflow_celery.errors import IronflowError
from ironflow_celery.integration.queue_check import task_names_of
from ironflow_celery.model.storable import text_problem
from ironflow_celery.model.views import FORMATS, Format, describe

__all__ = [
    "celery_command",
    "main",
]


class _TextCheckingGroup(click.Group):
    """Refuses, before any command runs, an argument that is not valid text.

    Python decodes a non-UTF-8 argument with surrogateescape (``$'\\xff'`` becomes
    ``'\\udcff'``); no id, type, filter, name or reason can hold it, and left alone it ends
    as a traceback deep in the driver. One check here covers every option of every command.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for arg in args:
            problem = text_problem(arg)
            if problem is None:
                continue
            try:  # show the bytes as typed, when they came from the command line
                shown = repr(os.fsencode(arg))
            except UnicodeEncodeError:
                shown = repr(arg)
            if "\x00" not in arg:
                problem = "is not valid UTF-8"
            fail(f"argument {shown} {problem}", EXIT_USAGE)
        return super().parse_args(ctx, args)


def _build_group(name: str, *, with_app_option: bool) -> click.Group:
    @click.group(
        cls=_TextCheckingGroup,
        name=name,
        help="Durable workflows on PostgreSQL with Celery: schema, relays, dead letters, "
        "status, projections. The same commands run as `ironflow-celery …` and "
        "`celery -A app ironflow …`; exit codes 0 ok, 1 refused or not found, 2 bad input, "
        "3 database or configuration error.",
    )
    @click.pass_context
    def group(ctx: click.Context, /, app: str | None = None, **_: Any) -> None:
        # Like `celery -A`, find the app and workflow modules from the current directory.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        celery_ctx = ctx.obj
        celery_app = getattr(celery_ctx, "app", None) if celery_ctx is not None else None
        ctx.obj = Context(app=celery_app, app_path=app)

    if with_app_option:
        group = click.option(
            "-A",
            "--app",
            default=None,
            envvar="IRONFLOW_CELERY_APP",
            help="Celery app (module or module:attr). Default: ironflow_celery's own app.",
        )(group)
    _add_commands(group)
    _add_more_commands(group)
    return group


def _add_commands(group: click.Group) -> None:
    @group.group("db")
    def db() -> None:
        """Database schema."""

    @db.command("upgrade")
    @click.pass_obj
    @guarded
    def db_upgrade(obj: Context) -> None:
        """Create or upgrade the ironflow schema (idempotent; safe to run concurrently)."""
        applied = obj.runtime.upgrade_schema()
        if applied:
            click.echo(f"applied migrations: {', '.join(f'{v:04d}' for v in applied)}")
        else:
            click.echo("schema is up to date")

    @group.command("relay")
    @click.option("--effects/--no-effects", default=True, help="Run the effect relay.")
    @click.option("--timers/--no-timers", default=True, help="Run the timer relay.")
    @click.option("-l", "--loglevel", type=LOGLEVEL, default="INFO", show_default=True)
    @click.pass_obj
    @guarded
    def relay(obj: Context, effects: bool, timers: bool, loglevel: str) -> None:
        """Run the effect and timer relays in this process until SIGINT/SIGTERM."""
        logging.basicConfig(
            level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
        )
        runtime = obj.runtime
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        click.echo(
            f"ironflow relay {runtime.worker_id}: {', '.join(runtime.registry.types) or 'none'}"
        )
        clean = runtime.run(stop, effects=effects, timers=timers)
        sys.exit(EXIT_OK if clean else EXIT_REFUSED)

    add_operations_commands(group)


def _add_workflow_commands(group: click.Group) -> None:
    @group.group("workflows")
    def workflows() -> None:
        """Registered workflow types and their state machines."""

    @workflows.command("list")
    @click.argument("workflow_type", required=False)
    @click.option(
        "--state",
        help="With WORKFLOW_TYPE: active, completed, or a state of its state machine.",
    )
    @click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
    @click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    @ops_guarded
    def workflows_list(
        obj: Context,
        workflow_type: str | None,
        state: str | None,
        limit: int,
        offset: int,
        as_json: bool,
    ) -> None:
        """Each registered workflow type: its inputs, effects, state machine and tasks.
        With WORKFLOW_TYPE: its instances (by --state), most recently active first."""
        import json

        if workflow_type is not None:
            print_instances(obj, workflow_type, state, limit, offset, as_json)
            return
        if state is not None:
            fail("--state needs a WORKFLOW_TYPE", EXIT_USAGE)
        rows: list[dict[str, Any]] = []
        for registration in obj.runtime.registry:
            wf = registration.workflow
            try:
                describe(wf)
                graph = True
            except IronflowError:
                graph = False
            rows.append(
                {
                    "workflow_type": wf.type,
                    "inputs": list(wf.inputs.tags()),
                    "effects": list(wf.effects.tags()) if wf.has_effects() else [],
                    "state_machine": graph,
                    "tasks": list(task_names_of(wf).values()),
                }
            )
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        # Tab-separated with a header: readable, and still `cut`/`awk 'NR>1'` friendly.
        click.echo("workflow type\teffects\tstate machine\tinputs")
        for row in rows:
            click.echo(
                f"{row['workflow_type']}\t{', '.join(row['effects']) or '-'}\t"
                f"{'yes' if row['state_machine'] else 'no'}\t{', '.join(row['inputs'])}"
            )

    @workflows.command("graph")
    @click.argument("workflow_type")
    @click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="mermaid",
        show_default=True,
    )
    @click.pass_obj
    @guarded
    def workflows_graph(obj: Context, workflow_type: str, fmt: Format) -> None:
        """Print WORKFLOW_TYPE's state machine as Mermaid or Graphviz DOT."""
        registry = obj.runtime.registry
        if workflow_type not in registry:
            fail(
                f"unknown workflow type {workflow_type!r} "
                f"(registered: {', '.join(registry.types) or 'none'})"
            )
        click.echo(describe(registry.get(workflow_type).workflow).render(fmt), nl=False)


def _add_more_commands(group: click.Group) -> None:
    _add_workflow_commands(group)
    add_projection_commands(group)
    add_cancel_commands(group)  # after `workflows`: adds its `cancel`
    add_inspection_commands(group)  # effects/timers list and show, workflows show
    add_web_command(group)


main = _build_group("ironflow-celery", with_app_option=True)
"""The ``ironflow-celery`` console script."""

celery_command = _build_group("ironflow", with_app_option=False)
"""``celery -A app ironflow …`` (registered under the ``celery.commands`` entry point)."""


if __name__ == "__main__":  # pragma: no cover
    main()
