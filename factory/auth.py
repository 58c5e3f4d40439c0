"""API keys: creation, hashing, verification and scopes. No HTTP here.

A key looks like ``fk_<id>_<secret>``; the store keeps only the SHA-256 of the
whole key (keys are long random strings, so a fast hash is the right one), and
the key itself is shown once, when it is created. Scopes nest:
``admin`` includes ``submit``, which includes ``read``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from enum import StrEnum

from factory.errors import AuthenticationError, PermissionDeniedError
from factory.store import ApiKeyRecord, Store


class Scope(StrEnum):
    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"


_RANK = {Scope.READ: 0, Scope.SUBMIT: 1, Scope.ADMIN: 2}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    store: Store,
    scopes: list[Scope],
    name: str = "",
    *,
    expires_in: float | None = None,
    secrets_granted: list[str] | None = None,
) -> tuple[str, ApiKeyRecord]:
    """Make a new key; returns the key (show it once) and what was stored.

    ``expires_in``: seconds until the key stops working (None: never). ``secrets_granted``:
    secrets the container steps of the key's inline workflows may use."""
    if not scopes:
        raise ValueError("a key needs at least one scope: read, submit or admin")
    if expires_in is not None and expires_in <= 0:
        raise ValueError("expires_in must be a positive number of seconds")
    key_id = secrets.token_hex(4)
    key = f"fk_{key_id}_{secrets.token_urlsafe(32)}"
    now = time.time()
    record = ApiKeyRecord(
        id=key_id,
        name=name or f"key-{key_id}",
        key_hash=hash_key(key),
        scopes=sorted({Scope(s).value for s in scopes}),
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        secrets=sorted(set(secrets_granted or [])),
    )
    store.create_api_key(record)
    return key, record


def verify_key(store: Store, key: str | None) -> ApiKeyRecord:
    """The stored record of a presented key; AuthenticationError if there is none that is valid."""
    return check_key(key, lambda digest: store.find_api_key(digest))


def check_key(key: str | None, find: Callable[[str], ApiKeyRecord | None]) -> ApiKeyRecord:
    """Like :func:`verify_key`, with the lookup by hash given (for example a cached one)."""
    if not key:
        raise AuthenticationError("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    record = find(hash_key(key))
    if record is None:
        raise AuthenticationError("unknown API key: check it, or create one with `factory keys create`")
    if record.revoked:
        raise AuthenticationError(f"API key {record.id} was revoked: create a new one with `factory keys create`")
    if record.expired(time.time()):
        raise AuthenticationError(f"API key {record.id} has expired: create a new one with `factory keys create`")
    return record


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``12h``, ``30d`` or ``2w`` (a plain number is seconds)."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else "s"
    number = value[:-1] if value[-1:] in _DURATION_UNITS else value
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration: write 90s, 15m, 12h, 30d or 2w") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def has_scope(record: ApiKeyRecord, needed: Scope) -> bool:
    return any(_RANK[Scope(s)] >= _RANK[needed] for s in record.scopes if s in Scope._value2member_map_)


def require_scope(record: ApiKeyRecord, needed: Scope) -> None:
    if not has_scope(record, needed):
        raise PermissionDeniedError(
            f"API key {record.id} has scopes [{', '.join(record.scopes)}] but this needs '{needed.value}': "
            f"create a key with `factory keys create --scope {needed.value}`"
        )
