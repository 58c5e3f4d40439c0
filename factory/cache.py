"""Where cached step results live: the store (default) or Redis with a TTL."""

from __future__ import annotations

from typing import Any, Protocol


class ResultCache(Protocol):
    def cache_get(self, key: str) -> str | None: ...

    def cache_put(self, key: str, output_json: str) -> None: ...


class RedisResultCache:
    """Step results in Redis under ``factory:cache:<key>``, expiring after ``ttl`` seconds."""

    def __init__(self, url: str, ttl: int) -> None:
        from factory.redisbus import _client

        self.redis: Any = _client(url)
        self.ttl = ttl

    def cache_get(self, key: str) -> str | None:
        value = self.redis.get(f"factory:cache:{key}")
        return None if value is None else str(value)

    def cache_put(self, key: str, output_json: str) -> None:
        self.redis.set(f"factory:cache:{key}", output_json, ex=self.ttl)
