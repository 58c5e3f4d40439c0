"""What every ``factory`` command module prints with, and how it exits on an error."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True, soft_wrap=True)

if TYPE_CHECKING:
    from factory.client import FactoryClient

EXIT_FAILED = 1  # the command ran and the thing it did failed (a run failed, no agent fits)
EXIT_INVALID = 2  # the command could not run: bad input, missing file, unusable settings


def fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    """Print ``error: message`` on stderr; ``raise fail(...)`` exits with ``code``."""
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


# --api and --api-key as the `factory` callback read them (shared by every command module)
API_OPTIONS: dict[str, str | None] = {"url": None, "key": None}


def api_client() -> FactoryClient | None:
    """A client of the HTTP API when --api (or FACTORY_API_URL) is given, else None (local state)."""
    from factory.client import FactoryClient
    from factory.errors import FactoryError
    from factory.settings import get_settings

    url, key = API_OPTIONS["url"], API_OPTIONS["key"]
    if url is None or key is None:
        try:
            settings = get_settings()
        except FactoryError as exc:
            raise fail(str(exc)) from None
        url, key = url or settings.api_url, key or settings.api_key
    if not url:
        return None
    return FactoryClient(url, key)
