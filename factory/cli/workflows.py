"""``factory workflows``: register workflows (operators) and start them by name (keys), on
this machine's store or with ``factory --api URL --api-key KEY workflows ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from factory.cli.output import EXIT_FAILED, out
from factory.cli.runs import TIMEOUT_OPTION, ProgressBar, document_limits, parse_inputs, using_backend, watch_with
from factory.cli.runs import when as _when


def _register(
    workflow: Annotated[Path, typer.Argument(help="The workflow's YAML file.", exists=True, dir_okay=False)],
    name: Annotated[str | None, typer.Option(help="Register under this name (default: the workflow's name).")] = None,
    secret: Annotated[
        list[str] | None, typer.Option("--secret", help="Grant a secret to its container steps. Repeatable.")
    ] = None,
    base_dir: Annotated[
        str | None,
        typer.Option(
            "--base-dir",
            help="The folder its python steps' modules are imported from: with --api a folder on the "
            "API's host (default: none, the modules must be installed there); locally a folder here "
            "(default: the YAML's own folder).",
        ),
    ] = None,
) -> None:
    """Register a workflow (operators): keys with the submit scope then start it by name, with inputs
    only. Its python steps, its folder and the secrets granted here are yours to vouch for."""
    with using_backend() as backend:
        registered = backend.register_workflow(workflow, name, secret or [], base_dir)
    out.print(
        escape(f"registered {registered.name} version {registered.version}")
        + f"; start it with `factory workflows start {escape(registered.name)}`"
    )


def _list() -> None:
    """Registered workflows, latest version of each."""
    with using_backend() as backend:
        rows = backend.list_workflows()
    table = Table("name", "version", "inputs", "secrets", "registered", "by")
    for row in rows:
        table.add_row(
            escape(row.name),
            str(row.version),
            escape(", ".join(row.inputs)),
            escape(", ".join(row.secrets)),
            _when(row.created_at),
            escape(row.created_by),
        )
    out.print(table)


def _start(
    name: Annotated[str, typer.Argument(help="The registered workflow's name (`factory workflows list`).")],
    input_: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="key=value (a YAML scalar). Repeatable.")
    ] = None,
    version: Annotated[int | None, typer.Option(help="A version (default: the latest).")] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait/--no-wait", help="Follow the run to its end; --no-wait (with --api) prints its id only."),
    ] = True,
    timeout: Annotated[float | None, TIMEOUT_OPTION] = None,
) -> None:
    """Start a run of a registered workflow and (by default) follow it; exits 1 if it fails, 3 at --timeout."""
    inputs = parse_inputs(input_ or [], document_limits())
    bar = ProgressBar(enabled=wait)
    with using_backend() as backend, bar:
        run_id, result = backend.start_workflow(
            name, inputs, version, watch_with(bar, False, "started", timeout) if wait else None
        )
    if result is None:
        out.print(run_id, markup=False)
        return
    out.print(f"run {escape(run_id)} {result.status.value}" + (f": {escape(result.error)}" if result.error else ""))
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add ``factory workflows`` to the ``factory`` app."""
    workflows = typer.Typer(
        help="Registered workflows: operators register them, keys start them by name.", no_args_is_help=True
    )
    workflows.command("register")(_register)
    workflows.command("list")(_list)
    workflows.command("start")(_start)
    app.add_typer(workflows, name="workflows")
