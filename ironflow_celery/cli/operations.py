"""Operations commands of the CLI: ``status``, ``dead-letters …`` and ``retention purge``.

Added to both ``ironflow-celery`` and ``celery -A app ironflow`` by `ironflow_celery.cli.main`.
Human tables by default (rich), ``--json`` for scripts. Exit codes as in `cli`: 0 ok,
1 refused or not found, 2 usage error (bad id, age, cursor), 3 database or configuration.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from typing import Any

import click

from ironflow_celery.cli._common import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Context,
    fail,
    guarded,
)
from ironflow_celery.errors import (
    ConfigurationError,
    InvalidOperationRequest,
    InvalidText,
    IronflowError,
    StorageError,
)
from ironflow_celery.model.config import AttemptLimits
from ironflow_celery.model.tasknames import KIND_NAMES
from ironflow_celery.operations import cancel
from ironflow_celery.operations import dead_letters as dl
from ironflow_celery.operations.projections import projection_status
from ironflow_celery.operations.retention import purge
from ironflow_celery.operations.status import queue_status

__all__ = [
    "add_cancel_commands",
    "add_operations_commands",
    "console",
    "emit_json",
    "filter_options",
    "human_seconds",
    "json_option",
    "kind_option",
    "ops_guarded",
]


def console() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200, soft_wrap=True)
    return console


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _error_reason(exc: BaseException) -> str:
    """``UnknownWorkflowType`` -> ``unknown_workflow_type``: the JSON ``reason`` of an error."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def ops_guarded(fn: Any) -> Any:
    """`cli.guarded`, with malformed ids/ages/cursors reported as usage errors (exit 2).

    With ``--json`` every refusal is JSON on stdout, as a refused operation's result is:
    ``{"ok": false, "reason": "unknown_workflow_type", "error": …, "message": …}``, with
    the same exit code as the text form."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InvalidOperationRequest as exc:  # dead letters, cancel, inspection, purge
            if kwargs.get("as_json"):
                _emit_refusal(exc, EXIT_USAGE)
            fail(str(exc), EXIT_USAGE)
        except IronflowError as exc:
            if not kwargs.get("as_json"):
                raise  # `guarded` prints it and picks the exit code
            if isinstance(exc, InvalidText):
                _emit_refusal(exc, EXIT_USAGE)
            if isinstance(exc, (StorageError, ConfigurationError)):
                _emit_refusal(exc, EXIT_UNAVAILABLE)
            _emit_refusal(exc, EXIT_REFUSED)

    checked.__name__ = fn.__name__
    checked.__doc__ = fn.__doc__
    return guarded(checked)


def _emit_refusal(exc: BaseException, code: int) -> None:
    emit_json(
        {
            "ok": False,
            "reason": _error_reason(exc),
            "error": type(exc).__name__,
            "message": str(exc),
        }
    )
    sys.exit(code)


def _age(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = (datetime.now(UTC) - value).total_seconds()
    return human_seconds(seconds)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _max_attempts(obj: Context) -> AttemptLimits:
    return obj.runtime.attempt_limits


kind_option = click.option(
    "--kind",
    type=click.Choice(KIND_NAMES),
    default="effect",
    show_default=True,
    help="Dead-lettered effects (outbox) or timers.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def filter_options(fn: Any) -> Any:
    """--type, --id, --error, --older-than, --newer-than."""
    for option in reversed(
        [
            click.option("--type", "workflow_type", help="Only this workflow type."),
            click.option("--id", "workflow_id", help="Only this workflow instance id."),
            click.option("--error", help="last_error contains this text (case-insensitive)."),
            click.option("--older-than", help="Created more than this long ago (90s, 2h, 7d)."),
            click.option("--newer-than", help="Created at most this long ago (90s, 2h, 7d)."),
        ]
    ):
        fn = option(fn)
    return fn


def add_operations_commands(group: click.Group) -> None:
    """Add ``status``, ``dead-letters`` and ``retention`` to a CLI group."""

    @group.command("status")
    @json_option
    @click.pass_obj
    @ops_guarded
    def status(obj: Context, as_json: bool) -> None:
        """Effects and timers per workflow type: pending, in flight, backing off, dead."""
        runtime = obj.runtime
        rows = queue_status(
            runtime.store,
            max_attempts=runtime.attempt_limits,
            workflow_types=tuple(runtime.registry.types),
        )
        projections = projection_status(runtime.store)
        if as_json:
            emit_json(
                {
                    "max_attempts": runtime.config.retry_policy.max_attempts,
                    "workflow_types": [r.to_json() for r in rows],
                    "projections": projections,
                },
            )
            return
        from rich.table import Table

        table = Table(title="ironflow status")
        for column in (
            "workflow type",
            "effects pending",
            "in flight",
            "backing off",
            "dead",
            "oldest live",
            "timers due",
            "scheduled",
            "timers dead",
        ):
            table.add_column(column, justify="left" if column == "workflow type" else "right")
        for r in rows:
            e, t = r.effects, r.timers
            table.add_row(
                r.workflow_type,
                str(e.pending),
                str(e.in_flight),
                str(e.backing_off),
                f"[red]{e.dead}[/red]" if e.dead else "0",
                human_seconds(e.oldest_pending_age),
                str(t.due),
                str(t.pending),
                f"[red]{t.dead}[/red]" if t.dead else "0",
            )
        console().print(table)
        if projections:
            ptable = Table(title="projections")
            for column in ("projection", "position", "lag", "status"):
                ptable.add_column(column, justify="left" if column != "lag" else "right")
            for p in projections:
                state = str(p["status"])
                if p.get("last_error"):
                    state = f"[red]failing at event {p['failed_sequence']}: {p['last_error']}[/red]"
                ptable.add_row(p["name"], str(p["position"]), str(p["lag"]), state)
            console().print(ptable)

    @group.group("dead-letters")
    def dead_letters() -> None:
        """Find, inspect, retry and discard dead-lettered effects and timers."""

    @dead_letters.command("list")
    @kind_option
    @filter_options
    @click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
    @click.option("--after", "after", help="Cursor of the next page (printed by a list).")
    @json_option
    @click.pass_obj
    @ops_guarded
    def dl_list(
        obj: Context, kind: str, limit: int, after: str | None, as_json: bool, **filters: Any
    ) -> None:
        """Dead letters, newest first, one page at a time."""
        query = dl.DeadLetterQuery.of(**filters, limit=limit, after=after)
        letters = dl.fetch_dead_letters(
            obj.runtime.store,
            query,
            kind=kind,
            max_attempts=_max_attempts(obj),
        )
        cursor = dl.next_cursor(letters, query)
        if as_json:
            emit_json(
                {
                    "kind": kind,
                    "count": len(letters),
                    "items": [d.to_json() for d in letters],
                    "next_cursor": cursor,
                }
            )
            return
        if not letters:
            click.echo(f"no dead-lettered {kind}s" + (" on this page" if after else ""))
            return
        from rich.table import Table

        table = Table(title=f"dead-lettered {kind}s")
        table.add_column("id", no_wrap=True)
        table.add_column("workflow", no_wrap=True)
        table.add_column("effect type" if kind == "effect" else "input type", no_wrap=True)
        table.add_column("attempts", justify="right")
        table.add_column("age", justify="right")
        table.add_column("last error", overflow="fold")
        for d in letters:
            table.add_row(
                str(d.id),
                str(d.workflow),
                d.effect_type or "-",
                str(d.attempts),
                _age(d.created_at),
                (d.last_error or "")[:120],
            )
        out = console()
        out.print(table)
        if cursor:
            out.print(f"next page: --after {cursor}")

    @dead_letters.command("count")
    @kind_option
    @filter_options
    @json_option
    @click.pass_obj
    @ops_guarded
    def dl_count(obj: Context, kind: str, as_json: bool, **filters: Any) -> None:
        """How many dead letters match the filters."""
        query = dl.DeadLetterQuery.of(**filters)
        n = dl.count_dead_letters(
            obj.runtime.store,
            query,
            kind=kind,
            max_attempts=_max_attempts(obj),
        )
        if as_json:
            emit_json({"kind": kind, "count": n})
        else:
            click.echo(str(n))

    @dead_letters.command("show")
    @click.argument("row_id")
    @kind_option
    @json_option
    @click.pass_obj
    @ops_guarded
    def dl_show(obj: Context, row_id: str, kind: str, as_json: bool) -> None:
        """One dead letter: workflow, attempts, error and payload."""
        store, max_attempts = obj.runtime.store, _max_attempts(obj)
        letter = dl.get_dead_letter(store, row_id, kind=kind, max_attempts=max_attempts)
        if letter is None:
            why = dl.explain_row(store, row_id, kind=kind, max_attempts=max_attempts)
            if as_json:
                emit_json(why.to_json())
                sys.exit(EXIT_REFUSED)
            fail(why.message, EXIT_REFUSED)
            return
        if as_json:
            emit_json(letter.to_json())
            return
        from rich.table import Table

        table = Table(show_header=False, title=f"dead-lettered {kind} {letter.id}")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        table.add_row("workflow", str(letter.workflow))
        table.add_row(
            "effect type" if kind == "effect" else "input type", letter.effect_type or "-"
        )
        table.add_row(
            "attempts", f"{letter.attempts} (max {max_attempts.for_type(letter.workflow_type)})"
        )
        table.add_row("created", f"{letter.created_at.isoformat()} ({_age(letter.created_at)} ago)")
        if letter.dead_lettered_at is not None:
            table.add_row("dead-lettered", letter.dead_lettered_at.isoformat())
        if letter.fire_at is not None:
            table.add_row("fire at", letter.fire_at.isoformat())
        table.add_row("last error", letter.last_error or "-")
        table.add_row("payload", json.dumps(letter.payload, indent=2))
        console().print(table)

    @dead_letters.command("retry")
    @click.argument("row_id")
    @kind_option
    @json_option
    @click.pass_obj
    @ops_guarded
    def dl_retry(obj: Context, row_id: str, kind: str, as_json: bool) -> None:
        """Make one dead letter run again (refused for in-flight or healthy rows)."""
        result = dl.try_retry_dead_letter(
            obj.runtime.store,
            row_id,
            kind=kind,
            max_attempts=_max_attempts(obj),
        )
        _report(result, as_json)

    @dead_letters.command("retry-all")
    @kind_option
    @filter_options
    @click.option("--max", "max_rows", type=click.IntRange(min=1), help="Retry at most N.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True)
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    @json_option
    @click.pass_obj
    @ops_guarded
    def dl_retry_all(
        obj: Context,
        kind: str,
        max_rows: int | None,
        batch_size: int,
        yes: bool,
        as_json: bool,
        **filters: Any,
    ) -> None:
        """Retry every dead letter matching the filters, in batches."""
        store, max_attempts = obj.runtime.store, _max_attempts(obj)
        query = dl.DeadLetterQuery.of(**filters)
        if not yes:
            if not sys.stdin.isatty():
                fail("retry-all needs --yes when not run from a terminal", EXIT_REFUSED)
            n = dl.count_dead_letters(store, query, kind=kind, max_attempts=max_attempts)
            if n == 0:
                click.echo(f"no dead-lettered {kind}s match")
                return
            click.confirm(f"Retry {n} dead-lettered {kind}(s)?", abort=True)
        retried = dl.retry_dead_letters(
            store,
            query,
            kind=kind,
            max_attempts=max_attempts,
            batch_size=batch_size,
            max_rows=max_rows,
        )
        if as_json:
            emit_json({"kind": kind, "retried": retried})
        else:
            click.echo(f"retried {retried} dead-lettered {kind}(s)")

    @dead_letters.command("discard")
    @click.argument("row_id")
    @click.option("--reason", required=True, help="Why it is discarded (kept for audit).")
    @kind_option
    @json_option
    @click.pass_obj
    @ops_guarded
    def dl_discard(obj: Context, row_id: str, reason: str, kind: str, as_json: bool) -> None:
        """Mark a dead letter handled without running it; the row is kept for audit."""
        result = dl.try_discard_dead_letter(
            obj.runtime.store,
            row_id,
            reason,
            kind=kind,
            max_attempts=_max_attempts(obj),
        )
        _report(result, as_json)

    @group.group("retention")
    def retention() -> None:
        """Delete old processed outbox and timer rows."""

    @retention.command("purge")
    @click.option(
        "--older-than",
        default="7d",
        show_default=True,
        help="Processed more than this long ago (90s, 12h, 7d).",
    )
    @click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
    @click.option(
        "--include-observations",
        is_flag=True,
        help="Also input observations of instances completed that long ago.",
    )
    @click.option(
        "--include-discarded",
        is_flag=True,
        help="Also discarded dead letters (kept for audit otherwise).",
    )
    @json_option
    @click.pass_obj
    @ops_guarded
    def retention_purge(
        obj: Context,
        older_than: str,
        batch_size: int,
        include_observations: bool,
        include_discarded: bool,
        as_json: bool,
    ) -> None:
        """Delete processed rows in small batches (no long locks)."""
        counts = purge(
            obj.runtime.store,
            older_than,
            batch_size,
            include_observations,
            include_discarded=include_discarded,
        )
        if as_json:
            emit_json(counts)
        else:
            click.echo(
                f"deleted {counts['outbox']} outbox rows, {counts['timers']} timers, "
                f"{counts['observations']} observations in {counts['batches']} batches"
            )


def _report(result: dl.RetryResult | cancel.CancelResult, as_json: bool) -> None:
    if as_json:
        emit_json(result.to_json())
    elif result.ok:
        click.echo(result.message)
    if not result.ok:
        if not as_json:
            click.echo(f"refused ({result.reason}): {result.message}", err=True)
        sys.exit(EXIT_REFUSED)
    sys.exit(EXIT_OK)


def add_cancel_commands(group: click.Group) -> None:
    """Add ``effects cancel``, ``timers cancel`` and ``workflows cancel`` to a CLI group
    (after the ``workflows`` group exists)."""
    reason_option = click.option(
        "--reason", required=True, help="Why it is cancelled (kept for audit)."
    )

    def cancel_row_command(kind: str) -> Any:
        @click.command("cancel")
        @click.argument("row_id")
        @reason_option
        @json_option
        @click.pass_obj
        @ops_guarded
        def cancel_row(obj: Context, row_id: str, reason: str, as_json: bool) -> None:
            """Cancel a pending row: closed without running, kept for audit, the workflow's
            on_cancel input delivered. Refused for a missing, processed or running row."""
            _report(cancel.cancel_row(obj.runtime, row_id, reason, kind=kind), as_json)

        cancel_row.help = (cancel_row.help or "").replace("a pending row", f"a pending {kind}")
        return cancel_row

    for kind, plural in ((k, f"{k}s") for k in KIND_NAMES):
        sub = group.commands.get(plural)
        if sub is None:
            sub = click.Group(plural, help=f"Pending {plural}: cancel one.")
            group.add_command(sub)
        sub.add_command(cancel_row_command(kind))  # type: ignore[attr-defined]

    workflows = group.commands.get("workflows")
    if workflows is None:
        workflows = click.Group("workflows", help="Workflow instances.")
        group.add_command(workflows)
    assert isinstance(workflows, click.Group)

    @workflows.command("cancel")
    @click.argument("workflow_type")
    @click.argument("workflow_id")
    @reason_option
    @json_option
    @click.pass_obj
    @ops_guarded
    def cancel_workflow(
        obj: Context, workflow_type: str, workflow_id: str, reason: str, as_json: bool
    ) -> None:
        """Cancel an instance: its open effects and timers are closed (kept for audit) and
        its on_cancel input is executed, in one transaction. Refused while a row runs."""
        result = cancel.cancel_instance(obj.runtime, workflow_type, workflow_id, reason)
        _report(result, as_json)
