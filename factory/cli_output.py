"""What every ``factory`` command module prints with, and how it exits on an error."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True, soft_wrap=True)

EXIT_FAILED = 1  # the command ran and the thing it did failed (a run failed, no agent fits)
EXIT_INVALID = 2  # the command could not run: bad input, missing file, unusable settings


def fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    """Print ``error: message`` on stderr; ``raise fail(...)`` exits with ``code``."""
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)
