"""What every ``factory`` command prints with, how it exits on an error, and which backend
(this machine's state, or an HTTP API) it works on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from factory.cli.backend import Backend
    from factory.settings import Settings

out = Console()
err = Console(stderr=True, soft_wrap=True)

EXIT_FAILED = 1  # the command ran and the thing it did failed (a run failed, no agent fits)
EXIT_INVALID = 2  # the command could not run: bad input, missing file, unusable settings
EXIT_TIMEOUT = 3  # --timeout passed before the run ended
EXIT_WAITING = 4  # the run waits at approval gates (`factory approve RUN STEP` lets it go on)


def fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    """Print ``error: message`` on stderr; ``raise fail(...)`` exits with ``code``."""
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


@dataclass
class CliOptions:
    """The ``factory`` callback's global options, as every command module reads them."""

    config: Path | None = None
    api_url: str | None = None
    api_key: str | None = None


OPTIONS = CliOptions()
_settings: list[Settings] = []


def set_options(options: CliOptions) -> None:
    """The global options of the command being run (read again by the next cli_settings())."""
    global OPTIONS
    OPTIONS = options
    _settings.clear()


def cli_settings() -> Settings:
    """The settings of this command (environment, --config, defaults), read once; an invalid
    setting exits 2 naming it. Commands pass them on explicitly."""
    from factory.errors import FactoryError
    from factory.settings import get_settings

    if not _settings:
        try:
            _settings.append(get_settings())
        except FactoryError as exc:
            raise fail(str(exc)) from None
    return _settings[0]


def open_backend() -> Backend:
    """The HTTP API when --api (or FACTORY_API_URL) is given, else this machine's state."""
    settings = cli_settings()
    options = OPTIONS
    url = options.api_url or settings.api_url
    if url:
        from factory.cli.remote import ApiBackend
        from factory.client import FactoryClient

        return ApiBackend(FactoryClient(url, options.api_key or settings.api_key))
    from factory.cli.local import LocalBackend

    return LocalBackend(settings)
