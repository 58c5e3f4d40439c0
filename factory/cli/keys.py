"""``factory keys``: API keys, on this machine's store or over the API (admin key)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from factory.auth import Scope
from factory.cli.output import err, fail, out
from factory.cli.runs import using_backend, when
from factory.errors import FactoryError


def create(
    scope: Annotated[
        list[Scope], typer.Option("--scope", help="read, submit (includes read) or admin (includes all). Repeatable.")
    ],
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
    expires_in: Annotated[
        str | None, typer.Option("--expires-in", help="The key stops working after this long: 90s, 15m, 12h, 30d, 2w.")
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option("--secret", help="Grant a secret to the container steps of this key's workflows. Repeatable."),
    ] = None,
) -> None:
    """Create an API key and print it once (to stdout; everything else goes to stderr)."""
    from factory.auth import parse_duration
    from factory.sandbox.secrets import check_name

    try:
        seconds = parse_duration(expires_in) if expires_in else None
        granted = [check_name(s) for s in secret or []]
    except (ValueError, FactoryError) as exc:
        raise fail(str(exc)) from None
    with using_backend() as backend:
        key, record = backend.create_key(scope, name, seconds, granted)
    expiry = f", expires {when(record.expires_at)}" if record.expires_at else ""
    grants = f", secrets {', '.join(record.secrets)}" if record.secrets else ""
    err.print(
        escape(f"created key {record.id} ({record.name}) with scopes [{', '.join(record.scopes)}]{expiry}{grants}")
        + "; it is shown once:"
    )
    out.print(key, highlight=False, markup=False)


def list_keys() -> None:
    """The API keys: ids, names, scopes, expiry, last use, granted secrets (never the keys)."""
    with using_backend() as backend:
        records = backend.list_keys()
    now = time.time()
    table = Table("id", "name", "scopes", "created", "expires", "last used", "secrets", "state")
    for r in records:
        state = "revoked" if r.revoked else ("expired" if r.expired(now) else "active")
        table.add_row(
            escape(r.id),
            escape(r.name),
            escape(",".join(r.scopes)),
            when(r.created_at),
            when(r.expires_at) if r.expires_at else "never",
            when(r.last_used_at) if r.last_used_at else "never",
            escape(",".join(r.secrets)),
            state,
        )
    out.print(table)


def revoke(key_id: Annotated[str, typer.Argument(help="The key's id (`factory keys list`).")]) -> None:
    """Revoke an API key: the API refuses it from its next request on."""
    with using_backend() as backend:
        found = backend.revoke_key(key_id)
    if not found:
        raise fail(f"no API key with id {key_id!r}; `factory keys list` shows them")
    out.print(f"revoked key {escape(key_id)}")


def register(app: typer.Typer) -> None:
    keys = typer.Typer(help="API keys for the HTTP API: stored hashed, shown once.", no_args_is_help=True)
    keys.command("create")(create)
    keys.command("list")(list_keys)
    keys.command("revoke")(revoke)
    app.add_typer(keys, name="keys")
