"""Secret sources and redaction.

A container step names its secrets (``secrets: [API_TOKEN]``); the values come
from a :class:`SecretSource` of the Factory process, never from the workflow:

- :class:`EnvSecretSource`: the environment variable ``FACTORY_SECRET_<NAME>``;
- :class:`DirSecretSource`: a file ``<NAME>`` in a secrets directory
  (default ``$FACTORY_HOME/secrets``; keep it ``0700``).

The first source holding the name wins. Values reach the command as files under
``/run/secrets/<NAME>`` (never on the host disk for the local executor) and are
replaced by ``***`` in everything the Factory keeps: stdout, stderr, logs, errors
(:mod:`factory.sandbox.redaction`: also their encodings, and across cuts).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from factory.errors import SecretNotFoundError, StepInputError
from factory.sandbox.redaction import MIN_SECRET_CHARS, REDACTED, Redactor

__all__ = [
    "ENV_PREFIX",
    "MIN_SECRET_CHARS",
    "REDACTED",
    "ChainSecretSource",
    "DirSecretSource",
    "EnvSecretSource",
    "Redactor",
    "SecretSource",
    "check_name",
    "default_source",
    "resolve_secrets",
]

SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_PREFIX = "FACTORY_SECRET_"


class SecretSource(Protocol):
    """Looks a secret up by name."""

    def get(self, name: str) -> str | None:
        """The value, or None if this source does not hold the name."""
        ...


class EnvSecretSource:
    """``FACTORY_SECRET_<NAME>`` environment variables of the Factory process."""

    def __init__(self, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> None:
        self.environ = os.environ if environ is None else environ
        self.prefix = prefix

    def get(self, name: str) -> str | None:
        return self.environ.get(self.prefix + name)

    def describe(self) -> str:
        return f"the environment variable {self.prefix}<NAME>"


class DirSecretSource:
    """One file per secret in a directory; the file's content (without a final newline) is the value."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def get(self, name: str) -> str | None:
        path = self.directory / name
        try:
            return path.read_text(encoding="utf-8").removesuffix("\n")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def describe(self) -> str:
        return f"a file <NAME> in {self.directory}"


class ChainSecretSource:
    """The first source that holds the name wins."""

    def __init__(self, *sources: SecretSource) -> None:
        self.sources = sources

    def get(self, name: str) -> str | None:
        for source in self.sources:
            value = source.get(name)
            if value is not None:
                return value
        return None

    def describe(self) -> str:
        return " or ".join(_describe(source) for source in self.sources)


def _describe(source: SecretSource) -> str:
    describe = getattr(source, "describe", None)
    return str(describe()) if callable(describe) else type(source).__name__


def default_source(home: Path, directory: Path | None = None) -> ChainSecretSource:
    """Environment first, then the secrets folder (default ``$FACTORY_HOME/secrets``)."""
    return ChainSecretSource(EnvSecretSource(), DirSecretSource(directory or home / "secrets"))


def check_name(name: str) -> str:
    if not SECRET_NAME_RE.match(name):
        raise StepInputError(f"{name!r} is not a valid secret name: use letters, digits and '_' (like API_TOKEN)")
    return name


def resolve_secrets(names: Iterable[str], source: SecretSource) -> dict[str, SecretStr]:
    """The values of ``names``; every missing or too short one is reported at once."""
    values: dict[str, SecretStr] = {}
    missing: list[str] = []
    short: list[str] = []
    for name in names:
        value = source.get(check_name(name))
        if value is None:
            missing.append(name)
        elif len(value) < MIN_SECRET_CHARS:
            short.append(name)
        else:
            values[name] = SecretStr(value)
    problems = []
    if missing:
        where = _describe(source)
        problems.append(f"secret(s) {', '.join(missing)} not found: set {where}")
    if short:
        problems.append(
            f"secret(s) {', '.join(short)} shorter than {MIN_SECRET_CHARS} characters cannot be redacted from logs; "
            "use a real secret"
        )
    if problems:
        raise SecretNotFoundError("; ".join(problems))
    return values
