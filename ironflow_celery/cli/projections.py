"""``ironflow-celery projections …``: list, run and reset the configured projections."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

import click

from ironflow_celery.cli._common import EXIT_OK, EXIT_REFUSED, LOGLEVEL, fail, guarded
from ironflow_celery.operations.projections import (
    Projection,
    configured_projections,
    projection_config_from,
    projection_status,
    reset_projection,
    run_projections,
)

__all__ = ["add_projection_commands"]


def add_projection_commands(group: click.Group) -> None:
    """Add the ``projections`` command group (list / run / reset) to a click group."""

    def configured(obj: Any) -> list[Projection]:
        return configured_projections(obj.app.conf)

    @group.group("projections")
    def projections_group() -> None:
        """Projections: positions, lag and errors; run and rebuild them."""

    @projections_group.command("list")
    @click.pass_obj
    @guarded
    def list_cmd(obj: Any) -> None:
        """Name, position, lag (newest event - position) and status of each projection."""
        rows = projection_status(obj.runtime.store, configured(obj))
        if not rows:
            click.echo("no projections")
            return
        width = max(len("NAME"), *(len(r["name"]) for r in rows))
        click.echo(f"{'NAME':<{width}}  {'POSITION':>10}  {'LAG':>8}  STATUS")
        for r in rows:
            status = r["status"]
            if r["last_error"]:
                status += f" at event {r['failed_sequence']}: {r['last_error']}"
            click.echo(f"{r['name']:<{width}}  {r['position']:>10}  {r['lag']:>8}  {status}")

    @projections_group.command("reset")
    @click.argument("name")
    @click.pass_obj
    @guarded
    def reset_cmd(obj: Any, name: str) -> None:
        """Rebuild NAME from the first event: position 0, error cleared, read model reset."""
        by_name = {p.name: p for p in configured(obj)}
        store = obj.runtime.store
        known = by_name.get(name)
        if known is None and name not in {r["name"] for r in projection_status(store)}:
            fail(f"unknown projection {name!r}", EXIT_REFUSED)
        reset_projection(store, known if known is not None else name)
        note = "" if known is not None else " (not configured here: read model not cleared)"
        click.echo(f"projection {name} reset to position 0{note}")

    @projections_group.command("run")
    @click.argument("names", nargs=-1)
    @click.option("-l", "--loglevel", type=LOGLEVEL, default="INFO", show_default=True)
    @click.pass_obj
    @guarded
    def run_cmd(obj: Any, names: tuple[str, ...], loglevel: str) -> None:
        """Run the configured projections (or only NAMES) until SIGINT/SIGTERM."""
        logging.basicConfig(
            level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
        )
        available = {p.name: p for p in configured(obj)}
        unknown = [n for n in names if n not in available]
        if unknown:
            fail(
                f"unknown projection(s): {', '.join(unknown)} "
                f"(configured: {', '.join(available) or 'none'})",
                EXIT_REFUSED,
            )
        chosen = [available[n] for n in names] if names else list(available.values())
        if not chosen:
            fail(
                "no projections configured (set ironflow_projections / IRONFLOW_PROJECTIONS)",
                EXIT_REFUSED,
            )
        runtime = obj.runtime
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        click.echo(f"running projections: {', '.join(p.name for p in chosen)}")
        run_projections(
            runtime.store,
            chosen,
            stop,
            registry=runtime.registry,
            config=projection_config_from(obj.app.conf),
        )
        sys.exit(EXIT_OK)
