"""CLI commands for isolated steps: ``factory sandbox check``.

``factory.cli`` calls :func:`register` at import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from factory.cli.output import out
from factory.errors import FactoryError


def _bwrap_version() -> str | None:
    path = shutil.which("bwrap")
    if path is None:
        return None
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or path


def _cgroups() -> list[str]:
    from factory.sandbox.cgroups import SandboxCgroups

    probe = SandboxCgroups(f"check-{os.getpid()}")
    try:
        return probe.create(memory=1 << 30, pids=64, cpus=1.0, owner_uid=None)
    finally:
        probe.remove()


def _dagger() -> tuple[str, str]:
    try:
        version = metadata.version("dagger-io")
    except metadata.PackageNotFoundError:
        return "not installed", "install dagger-io to use executor: dagger"
    if os.environ.get("DAGGER_SESSION_PORT"):
        return version, "a session is open (DAGGER_SESSION_PORT)"
    cli = os.environ.get("_EXPERIMENTAL_DAGGER_CLI_BIN")
    if cli:
        return version, f"sessions start with the CLI {cli}"
    return version, "no session and no CLI set: the SDK would try to download its CLI"


def register(app: typer.Typer) -> None:
    sandbox = typer.Typer(help="Isolated container steps: executors and their guards.", no_args_is_help=True)
    app.add_typer(sandbox, name="sandbox")

    @sandbox.command("check")
    def check(
        run: Annotated[bool, typer.Option("--run", help="Also run `true` in the local sandbox.")] = False,
    ) -> None:
        """What the local and Dagger executors can do on this machine."""
        table = Table("executor", "item", "state")
        bwrap = _bwrap_version()
        table.add_row("local", "bubblewrap", bwrap or "[red]missing[/red]: apt-get install -y bubblewrap")
        table.add_row(
            "local",
            "sandbox uid",
            "a dedicated host uid per step (running as root)" if os.geteuid() == 0 else f"this user ({os.geteuid()})",
        )
        table.add_row("local", "cgroup v1 limits", ", ".join(_cgroups()) or "none writable (rlimits only)")
        version, engine = _dagger()
        table.add_row("dagger", "dagger-io", version)
        table.add_row("dagger", "engine", engine)
        out.print(table)
        if run:
            from factory.sandbox.local import LocalExecutor
            from factory.spec import ContainerSpec

            try:
                result = LocalExecutor().run(ContainerSpec(image="host", command=["true"]))
            except FactoryError as exc:
                out.print(f"[red]the local sandbox failed:[/red] {escape(str(exc))}")
                raise typer.Exit(1) from None
            out.print(f"local sandbox ran `true` in {result.duration * 1e3:.1f} ms, exit {result.exit_code}")
            for guard in result.enforced:
                out.print(f"  - {escape(guard)}")
            if result.exit_code != 0:
                raise typer.Exit(1)
