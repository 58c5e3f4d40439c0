"""``factory schedules``: registered workflows that start on a cron schedule (operators add
them), on this machine's store or with ``factory --api URL --api-key KEY schedules ...``.
The scheduler of ``factory up`` starts their runs."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo

import typer
from rich.markup import escape
from rich.table import Table

from factory.cli.output import out
from factory.cli.runs import using_backend
from factory.cli.runs import when as _when
from factory.schedules import ScheduleView

NAME_ARGUMENT = typer.Argument(help="The schedule's name (`factory schedules list`).")


def _local(tick: float, zone: str) -> str:
    return datetime.fromtimestamp(tick, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %Z")


def _describe(view: ScheduleView) -> str:
    state = "active" if view.state == "active" else f"paused: {view.paused_reason or ''}"
    nxt = _local(view.next_ticks[0], view.timezone) if view.next_ticks else "-"
    return escape(f"schedule {view.name} ({view.workflow_ref}, {view.cron!r} {view.timezone}) {state}; next {nxt}")


def _add(
    workflow: Annotated[
        Path, typer.Argument(help="The workflow's YAML file, with a schedule: section.", exists=True, dir_okay=False)
    ],
    name: Annotated[str | None, typer.Option(help="The schedule's name (default: the workflow's name).")] = None,
    secret: Annotated[
        list[str] | None, typer.Option("--secret", help="Grant a secret to its container steps. Repeatable.")
    ] = None,
    base_dir: Annotated[
        str | None,
        typer.Option(
            "--base-dir",
            help="The folder its python steps' modules are imported from: with --api a folder on the "
            "API's host; locally a folder here (default: the YAML's own folder).",
        ),
    ] = None,
) -> None:
    """Register a workflow and run it on its `schedule:` (cron, timezone, inputs, catchup, overlap).

    Operators only (an admin key with --api): its runs carry your grants, and the schedule pauses
    itself if your key is revoked or expires. The scheduler of `factory up` starts each due tick once."""
    with using_backend() as backend:
        view = backend.add_schedule(workflow, name, secret or [], base_dir)
    out.print("added " + _describe(view))


def _list(
    ticks: Annotated[int, typer.Option("--next", min=0, max=3, help="Next fire times to show (0-3).")] = 2,
) -> None:
    """Schedules: their cron in their time zone, state, next fire times and last decided tick."""
    with using_backend() as backend:
        views = backend.list_schedules()
    table = Table("name", "workflow", "cron", "timezone", "state", "next", "last tick", "by")
    for v in views:
        state = "active" if v.state == "active" else f"[yellow]paused[/yellow]: {escape(v.paused_reason or '')}"
        last = "-"
        if v.last_tick is not None:
            what = v.last_tick.run_id if v.last_tick.action == "run" else f"skipped ({v.last_tick.reason})"
            last = escape(f"{_local(v.last_tick.tick, v.timezone)} {what}")
        table.add_row(
            escape(v.name),
            escape(v.workflow_ref),
            escape(v.cron),
            escape(v.timezone),
            state,
            escape(", ".join(_local(t, v.timezone) for t in v.next_ticks[:ticks])) or "-",
            last,
            escape(v.created_by),
        )
    out.print(table)


def _ticks(
    name: Annotated[str, NAME_ARGUMENT],
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many, the newest.")] = 20,
) -> None:
    """A schedule's decided ticks, newest first: the run each started, or why it was skipped."""
    with using_backend() as backend:
        ticks = backend.schedule_ticks(name, limit)
    table = Table("tick", "action", "run", "reason")
    for t in ticks:
        table.add_row(_when(t.tick), t.action, escape(t.run_id or "-"), escape(t.reason))
    out.print(table)


def _pause(name: Annotated[str, NAME_ARGUMENT]) -> None:
    """Pause a schedule: no tick runs until it is resumed."""
    with using_backend() as backend:
        view = backend.schedule_action(name, "pause")
    assert view is not None
    out.print(_describe(view))


def _resume(name: Annotated[str, NAME_ARGUMENT]) -> None:
    """Resume a schedule; the ticks of the paused time are not run."""
    with using_backend() as backend:
        view = backend.schedule_action(name, "resume")
    assert view is not None
    out.print(_describe(view))


def _remove(name: Annotated[str, NAME_ARGUMENT]) -> None:
    """Remove a schedule (its runs and its registered workflow are kept)."""
    with using_backend() as backend:
        backend.schedule_action(name, "remove")
    out.print(f"removed schedule {escape(name)}")


def register(app: typer.Typer) -> None:
    """Add ``factory schedules`` to the ``factory`` app."""
    schedules = typer.Typer(
        help="Workflows that run on a cron schedule: operators add them; `factory up` runs each tick once.",
        no_args_is_help=True,
    )
    schedules.command("add")(_add)
    schedules.command("list")(_list)
    schedules.command("ticks")(_ticks)
    schedules.command("pause")(_pause)
    schedules.command("resume")(_resume)
    schedules.command("remove")(_remove)
    app.add_typer(schedules, name="schedules")
