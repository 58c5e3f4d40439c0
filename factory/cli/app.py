"""The ``factory`` app: global options, ``config`` and ``publish-events``; the other commands
live in their modules beside it and register themselves."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from factory.cli.output import EXIT_FAILED, CliOptions, cli_settings, fail, out, set_options
from factory.errors import FactoryError
from factory.settings import use_config_file

app = typer.Typer(
    help=(
        "The Factory: durable AI workflows on Ray.\n\n"
        "State lives in SQLite under $FACTORY_HOME (default ~/.factory), or where FACTORY_STORE_URL says "
        "(postgresql://...). Ray: the cluster in RAY_ADDRESS, else a running local one, else a new local Ray. "
        "With --api URL (or FACTORY_API_URL) every command works on that Factory's HTTP API instead, "
        "the same way. `factory config` shows the effective settings."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global_options(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML settings file (else FACTORY_CONFIG); FACTORY_* variables override it."),
    ] = None,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api", help="Use the Factory's HTTP API at this URL instead of local state (else FACTORY_API_URL)."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="API key for --api (else FACTORY_API_KEY).", show_default=False)
    ] = None,
) -> None:
    if config is not None:
        try:
            use_config_file(config)
        except FactoryError as exc:
            raise fail(str(exc)) from None
    set_options(CliOptions(config, api_url, api_key))


@app.command("config")
def config_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The effective settings (environment, --config file, defaults), with secrets masked."""
    data = cli_settings().masked()
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    table = Table("setting", "environment variable", "value")
    for name, value in data.items():
        table.add_row(name, f"FACTORY_{name.upper()}", escape(str(value)))
    out.print(table)


@app.command("publish-events")
def publish_events() -> None:
    """Publish to Redis (FACTORY_EVENTS_URL) the events it has not received yet, e.g. after an outage."""
    from factory.api import store_for
    from factory.redisbus import RedisEventPublisher

    settings = cli_settings()
    if not settings.events_url:
        raise fail("FACTORY_EVENTS_URL is not set: events stay in the store (the embedded bus)")
    store = store_for(settings)
    try:
        publisher = RedisEventPublisher(store, settings.events_url, settings.events_stream_maxlen)
        count = publisher.publish_pending()
    except Exception as exc:  # noqa: BLE001 - redis errors of every kind end here
        raise fail(f"cannot publish to Redis: {exc}", EXIT_FAILED) from None
    finally:
        store.close()
    out.print(f"published {count} event(s); Redis has everything up to event {publisher.cursor()}")


COMMAND_MODULES = (
    "factory.cli.runs",
    "factory.cli.keys",
    "factory.cli.workflows",
    "factory.cli.schedules",
    "factory.cli.agents",
    "factory.cli.sandbox",
    "factory.cli.jobs",
    "factory.cli.ui",
    "deployments.cli",  # `factory up` / `factory down`, when the deployments package is installed
)


def _register_command_modules() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


_register_command_modules()


def main() -> None:
    app()
