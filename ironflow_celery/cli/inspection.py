"""Inspection commands of the CLI: ``effects list/show``, ``timers list/show``,
``workflows show TYPE ID`` and ``workflows list TYPE``, over
`ironflow_celery.operations.inspection` (the same functions a web view reads through).

Exit codes as everywhere: 0 ok, 1 not found or refused (an unknown workflow type), 2 bad
input (state, time, cursor, id), 3 database or configuration. ``--json`` for scripts.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click

from ironflow_celery.cli._common import EXIT_REFUSED, Context, fail
from ironflow_celery.cli.operations import console, emit_json, human_seconds, json_option
from ironflow_celery.cli.operations import ops_guarded as guarded
from ironflow_celery.model.tasknames import KIND_NAMES
from ironflow_celery.operations import inspection as ins

__all__ = ["add_inspection_commands", "print_instances"]


def _when(value: datetime | None, now: datetime | None = None) -> str:
    """``3.2m ago`` / ``in 12.0s``: relative to now (the database's clock for `show`)."""
    if value is None:
        return "-"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    if seconds >= 0:
        return f"{human_seconds(seconds)} ago"
    return f"in {human_seconds(-seconds)}"


def _stamp(value: datetime | None, now: datetime | None = None) -> str:
    return "-" if value is None else f"{value.isoformat()} ({_when(value, now)})"


def _short(text: str | None, width: int = 80) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _row_list_command(kind: str) -> click.Command:
    plural = f"{kind}s"

    @click.command("list")
    @click.option("--type", "workflow_type", help="Only this workflow type.")
    @click.option("--id", "workflow_id", help="Only this workflow instance id.")
    @click.option(
        "--effect-type",
        help="Only this effect type (payload tag)"
        if kind == "effect"
        else "Only timers of this input type (payload tag).",
    )
    @click.option(
        "--state",
        help="pending, scheduled (timers), in-flight, waiting-to-retry (backing_off), dead, "
        "cancelled, processed.",
    )
    @click.option("--due-before", help="Due before this time: ISO 8601, 'now', -2h, +30m.")
    @click.option("--due-after", help="Due at or after this time (same forms).")
    @click.option("--limit", type=click.IntRange(1, ins.MAX_LIMIT), default=50, show_default=True)
    @click.option("--after", help="Cursor of the next page (printed by a list).")
    @click.option("--oldest", is_flag=True, help="Oldest first (default: newest first).")
    @json_option
    @click.pass_obj
    @guarded
    def row_list(
        obj: Context,
        workflow_type: str | None,
        workflow_id: str | None,
        effect_type: str | None,
        state: str | None,
        due_before: str | None,
        due_after: str | None,
        limit: int,
        after: str | None,
        oldest: bool,
        as_json: bool,
    ) -> None:
        query = ins.InspectQuery.of(
            kind,
            workflow_type=workflow_type,
            workflow_id=workflow_id,
            effect_type=effect_type,
            state=state,
            due_before=due_before,
            due_after=due_after,
            limit=limit,
            order="oldest" if oldest else "newest",
            after=after,
        )
        page = ins.list_rows(obj.runtime, query)
        if as_json:
            emit_json(page.to_json())
            return
        if not page.items:
            click.echo(f"no {plural} match" + (" on this page" if after else ""))
            return
        from rich.table import Table

        table = Table(title=f"{plural} ({'oldest' if oldest else 'newest'} first)")
        table.add_column("id", no_wrap=True)
        table.add_column("workflow", no_wrap=True)
        table.add_column("type", no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("attempts", justify="right")
        table.add_column("due", justify="right")
        table.add_column("held by", no_wrap=True)
        table.add_column("last error", overflow="fold")
        for r in page.items:
            table.add_row(
                str(r.id),
                str(r.workflow),
                r.effect_type or "-",
                _state_text(r),
                f"{r.attempts}/{r.max_attempts}",
                _when(r.due_at),
                r.held_by or "-",
                _short(r.last_error),
            )
        out = console()
        out.print(table)
        if page.next_cursor:
            out.print(f"next page: --after {page.next_cursor}")

    row_list.help = (
        f"Find {plural}: filter by workflow type and id, "
        f"{'effect' if kind == 'effect' else 'input'} type, state and due time; "
        "newest first (--oldest), one page at a time (--limit, --after)."
    )
    return row_list


def _state_text(r: ins.RowInfo) -> str:
    colours = {"dead": "red", "in_flight": "cyan", "backing_off": "yellow", "cancelled": "dim"}
    colour = colours.get(r.state)
    return f"[{colour}]{r.state}[/{colour}]" if colour else r.state


def _row_show_command(kind: str) -> click.Command:
    @click.command("show")
    @click.argument("row_id")
    @json_option
    @click.pass_obj
    @guarded
    def row_show(obj: Context, row_id: str, as_json: bool) -> None:
        info = ins.get_row(obj.runtime, row_id, kind=kind)
        if info is None:
            message = f"no {kind} row with id {row_id}"
            if as_json:
                emit_json({"ok": False, "reason": "not_found", "kind": kind, "message": message})
                sys.exit(EXIT_REFUSED)
            fail(message, EXIT_REFUSED)
            return
        if as_json:
            emit_json(info.to_json())
            return
        _print_row(info)

    row_show.help = (
        f"One {kind}: state, attempts, last error, lease and who holds it (relay or worker, "
        "since when), payload, and its attempt history (who ran each attempt, when, outcome, "
        "error)."
    )
    return row_show


def _print_row(r: ins.RowInfo) -> None:
    from rich.table import Table

    now = r.read_at
    table = Table(show_header=False, title=f"{r.kind} {r.id}")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("workflow", str(r.workflow))
    table.add_row("effect type" if r.kind == "effect" else "input type", r.effect_type or "-")
    table.add_row("state", _state_text(r))
    table.add_row("attempts", f"{r.attempts} (max {r.max_attempts})")
    table.add_row("created", _stamp(r.created_at, now))
    if r.fire_at is not None:
        table.add_row("fire at", _stamp(r.fire_at, now))
    if r.key is not None:
        table.add_row("key", r.key)
    if r.processed_at is None:
        table.add_row("due", _stamp(r.due_at, now))
    if r.state == "in_flight":
        holder = (
            f"a worker: handler running since {_stamp(r.run_started_at, now)}"
            if r.run_started_at is not None
            else "the relay that claimed it: published, waiting for a worker to start it"
        )
        table.add_row("held by", holder)
        table.add_row("lease", f"{r.locked_by} until {_stamp(r.locked_until, now)}")
    elif r.state == "backing_off":
        table.add_row("retry at", _stamp(r.locked_until, now))
    if r.last_error:
        table.add_row("last error", r.last_error)
    if r.dead_lettered_at is not None:
        table.add_row("dead-lettered", _stamp(r.dead_lettered_at, now))
    if r.discarded_at is not None:
        table.add_row("cancelled", f"{_stamp(r.discarded_at, now)}: {r.discard_reason or '-'}")
    elif r.processed_at is not None:
        table.add_row("processed", _stamp(r.processed_at, now))
    table.add_row("payload", json.dumps(r.payload, indent=2, ensure_ascii=False, default=str))
    out = console()
    out.print(table)
    _print_attempts(r)


def _print_attempts(r: ins.RowInfo) -> None:
    """The row's attempt history, one line per attempt: who ran it, when, how it ended."""
    out = console()
    if not r.attempt_history:
        out.print("attempt history: none recorded (no worker of ours has started it)")
        return
    from rich.table import Table

    now = r.read_at
    table = Table(title="attempts (oldest first)")
    for column in ("n", "worker", "started", "finished", "outcome", "error"):
        table.add_column(column, overflow="fold" if column == "error" else "ellipsis")
    for a in r.attempt_history:
        table.add_row(
            "-" if a.n is None else str(a.n),
            a.runner,
            _stamp(a.started_at, now),
            _stamp(a.finished_at, now),
            a.outcome or ("running" if r.running and a is r.attempt_history[-1] else "open"),
            _short(a.error, 200),
        )
    out.print(table)


def _print_instance(d: ins.InstanceDetail) -> None:
    from rich.table import Table

    out = console()
    table = Table(show_header=False, title=f"workflow {d.workflow}")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("created", _stamp(d.created_at))
    table.add_row("events", f"{d.event_count} (last {_when(d.last_event_at)})")
    table.add_row("completed", _stamp(d.completed_at) if d.completed else "no")
    table.add_row("terminal", "?" if d.terminal is None else "yes" if d.terminal else "no")
    if d.position is not None:
        p = d.position
        where = p.status or "(the type does not report its status)"
        if p.status and p.next_inputs:
            where += f" -> next: {', '.join(p.next_inputs)}"
        elif p.status in p.terminal_states:
            where += " (terminal)"
        table.add_row("state machine", where)
    if d.state_error:
        table.add_row("state", f"[red]cannot replay: {d.state_error}[/red]")
    else:
        table.add_row("state", json.dumps(d.state, indent=2, ensure_ascii=False, default=str))
    out.print(table)

    history = Table(title="history")
    for column in ("seq", "event", "at", "payload"):
        history.add_column(column, overflow="fold" if column == "payload" else "ellipsis")
    for e in d.events:
        history.add_row(str(e.sequence), e.type, e.created_at.isoformat(), e.summary)
    out.print(history)

    rows = Table(title="effects and timers")
    for column in ("kind", "id", "type", "state", "attempts", "due", "last error"):
        rows.add_column(column, overflow="fold" if column == "last error" else "ellipsis")
    for r in (*d.effects, *d.timers):
        rows.add_row(
            r.kind,
            str(r.id),
            r.effect_type or "-",
            _state_text(r),
            f"{r.attempts}/{r.max_attempts}",
            _when(r.due_at) if r.processed_at is None else "-",
            _short(r.last_error, 60),
        )
    if d.effects or d.timers:
        out.print(rows)
    else:
        out.print("no effects or timers")
    out.print(
        f"pending: {len(d.open_effects)} effect(s), {len(d.open_timers)} timer(s); "
        f"dead letters: {len(d.dead_letters)}"
    )


def print_instances(
    obj: Context, workflow_type: str, state: str | None, limit: int, offset: int, as_json: bool
) -> None:
    """``workflows list TYPE``: the type's instances (by state), with counts."""
    runtime = obj.runtime
    page = ins.list_instances(runtime, workflow_type, state=state, limit=limit, offset=offset)
    counts = ins.instance_counts(runtime, workflow_type)
    if as_json:
        emit_json({**page.to_json(), "active": counts.active, "completed": counts.completed})
        return
    click.echo(
        f"{workflow_type}: {counts.active} active, {counts.completed} completed"
        + (f"; state {state}" if state else "")
    )
    if not page.items:
        click.echo("no instances" + (" on this page" if offset else ""))
        return
    click.echo("workflow id\tstatus\tevents\tlast event\tcompleted")
    for i in page.items:
        click.echo(
            f"{i.workflow.workflow_id}\t{i.status or '-'}\t{i.event_count}\t"
            f"{_when(i.last_event_at)}\t{'yes' if i.completed else 'no'}"
        )
    if page.next_offset is not None:
        click.echo(f"next page: --offset {page.next_offset}")


def add_inspection_commands(group: click.Group) -> None:
    """Add ``list``/``show`` to ``effects`` and ``timers`` and ``show`` to ``workflows``
    (after those groups exist: `add_cancel_commands`)."""
    for kind in KIND_NAMES:
        sub = group.commands[f"{kind}s"]
        sub.add_command(_row_list_command(kind))  # type: ignore[attr-defined]
        sub.add_command(_row_show_command(kind))  # type: ignore[attr-defined]
        sub.help = f"Find, inspect and cancel {kind}s."

    workflows = group.commands["workflows"]
    assert isinstance(workflows, click.Group)  # made by add_cancel_commands

    @workflows.command("show")
    @click.argument("workflow_type")
    @click.argument("workflow_id")
    @json_option
    @click.pass_obj
    @guarded
    def workflows_show(obj: Context, workflow_type: str, workflow_id: str, as_json: bool) -> None:
        """One instance: current state (replayed), terminal or not, event history, its
        effects and timers (pending and dead), and its state-machine position."""
        detail = ins.show_workflow(obj.runtime, workflow_type, workflow_id)
        if detail is None:
            message = f"no workflow instance {workflow_type}:{workflow_id}"
            if as_json:
                emit_json({"ok": False, "reason": "not_found", "message": message})
                sys.exit(EXIT_REFUSED)
            fail(message, EXIT_REFUSED)
            return
        if as_json:
            emit_json(detail.to_json())
            return
        _print_instance(detail)
