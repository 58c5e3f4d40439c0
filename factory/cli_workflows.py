"""``factory workflows``: register workflows (operators) and start them by name (keys).

``factory.cli`` calls ``register(app)`` at import. Every command works on the local
store, or on the HTTP API with ``factory --api URL --api-key KEY workflows ...``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from factory.cli_output import EXIT_FAILED, api_client, err, out
from factory.cli_output import fail as _fail
from factory.errors import FactoryError


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


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
            help="With --api: the folder on the cluster its modules are imported from (default: none, "
            "the modules must be installed there). Locally the YAML's own folder is used.",
        ),
    ] = None,
) -> None:
    """Register a workflow (operators): keys with the submit scope then start it by name, with inputs
    only. Its python steps, its folder and the secrets granted here are yours to vouch for."""
    from factory import registry
    from factory.api import store_for
    from factory.dag import load_workflow

    client = api_client()
    try:
        if client is not None:
            view = client.register_workflow(workflow, name, secret or [], base_dir)
            version, registered_name = view["version"], view["name"]
        else:
            loaded = load_workflow(workflow)  # the operator's machine: modules are imported and checked
            store = store_for()
            try:
                record = registry.register(store, loaded, name=name, secrets=secret or [], created_by="local")
            finally:
                store.close()
            version, registered_name = record.version, record.name
    except FactoryError as exc:
        raise _fail(str(exc)) from None
    out.print(
        escape(f"registered {registered_name} version {version}")
        + f"; start it with `factory workflows start {escape(registered_name)}`"
    )


def _list() -> None:
    """Registered workflows, latest version of each."""
    from factory.api import store_for

    client = api_client()
    try:
        if client is not None:
            rows = client.list_workflows()
        else:
            store = store_for()
            try:
                records = store.list_registered_workflows()
            finally:
                store.close()
            rows = [
                {
                    "name": r.name,
                    "version": r.version,
                    "secrets": r.secrets,
                    "created_at": r.created_at,
                    "created_by": r.created_by,
                    "inputs": json.loads(r.spec_json).get("inputs") or {},
                }
                for r in records
            ]
    except FactoryError as exc:
        raise _fail(str(exc)) from None
    table = Table("name", "version", "inputs", "secrets", "registered", "by")
    for row in rows:
        table.add_row(
            escape(row["name"]),
            str(row["version"]),
            escape(", ".join(row["inputs"])),
            escape(", ".join(row["secrets"])),
            _when(row["created_at"]),
            escape(row["created_by"]),
        )
    out.print(table)


def _start(
    name: Annotated[str, typer.Argument(help="The registered workflow's name (`factory workflows list`).")],
    input_: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="key=value (a YAML scalar). Repeatable.")
    ] = None,
    version: Annotated[int | None, typer.Option(help="A version (default: the latest).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the run to its end.")] = True,
) -> None:
    """Start a run of a registered workflow and (by default) wait for it; exits 1 if it fails."""
    from factory import registry
    from factory.api import resume, store_for
    from factory.cli import parse_inputs
    from factory.policy import Submitter

    inputs = parse_inputs(input_ or [])
    client = api_client()
    try:
        if client is not None:
            run_id = client.start(name, inputs, version)
            err.print(f"run [bold]{escape(run_id)}[/bold] started")
            if not wait:
                out.print(run_id, markup=False)
                return
            run = client.wait(run_id)
            status, error = run["status"], run.get("error")
        else:
            store = store_for()
            try:
                run_id = registry.start(store, _settings(), name, inputs, Submitter(principal="local"), version)
                err.print(f"run [bold]{escape(run_id)}[/bold] created")
                if not wait:
                    out.print(run_id, markup=False)
                    return
                result = resume(run_id, store=store, pending_only=True)
                status, error = result.status.value, result.error
            finally:
                store.close()
    except FactoryError as exc:
        raise _fail(str(exc)) from None
    out.print(f"run {escape(run_id)} {status}" + (f": {escape(error)}" if error else ""))
    if status != "succeeded":
        raise typer.Exit(EXIT_FAILED)


def _settings() -> Any:
    from factory.settings import get_settings

    return get_settings()


def register(app: typer.Typer) -> None:
    """Add ``factory workflows`` to the ``factory`` app."""
    workflows = typer.Typer(
        help="Registered workflows: operators register them, keys start them by name.", no_args_is_help=True
    )
    workflows.command("register")(_register)
    workflows.command("list")(_list)
    workflows.command("start")(_start)
    app.add_typer(workflows, name="workflows")
