"""A circuit breaker: closed, open, half-open.

Closed: calls pass; ``failure_threshold`` consecutive failures open it. Open: calls
are refused until ``cooldown`` seconds have passed; then it is half-open and lets
``half_open_max_calls`` trial calls through. A trial success closes it, a trial
failure opens it again for another cool-down.

It does not wrap calls itself (``allow()``, then ``record_success()`` or
``record_failure()``), so the router can read its state and async dispatchers can
use it around calls they do not block on. ``call()`` is there for the simple case.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, Field

from factory.errors import CircuitOpenError

if TYPE_CHECKING:
    from factory.settings import Settings

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerConfig(BaseModel):
    failure_threshold: int = Field(default=5, ge=1, description="Consecutive failures that open the breaker.")
    cooldown: float = Field(default=30.0, gt=0, description="Seconds the breaker stays open before a trial call.")
    half_open_max_calls: int = Field(default=1, ge=1, description="Trial calls let through while half-open.")

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        return cls(failure_threshold=settings.breaker_failure_threshold, cooldown=settings.breaker_cooldown_seconds)


class CircuitBreaker:
    """Thread-safe circuit breaker with an injectable clock."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0

    def _set(self, state: BreakerState) -> None:
        old, self._state = self._state, state
        if old != state and self._on_change is not None:
            self._on_change(self.name, old, state)

    def _refresh(self) -> None:
        if self._state == BreakerState.OPEN and self._clock() - self._opened_at >= self.config.cooldown:
            self._trials = 0
            self._set(BreakerState.HALF_OPEN)

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._refresh()
            return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        with self._lock:
            if self._state != BreakerState.OPEN:
                return 0.0
            return max(0.0, self.config.cooldown - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """May a call go through now? While half-open this reserves one trial slot."""
        with self._lock:
            self._refresh()
            if self._state == BreakerState.CLOSED:
                return True
            if self._state == BreakerState.HALF_OPEN and self._trials < self.config.half_open_max_calls:
                self._trials += 1
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            if self._state != BreakerState.CLOSED:
                self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self._refresh()
            self._failures += 1
            if self._state == BreakerState.HALF_OPEN or (
                self._state == BreakerState.CLOSED and self._failures >= self.config.failure_threshold
            ):
                self._opened_at = self._clock()
                self._set(BreakerState.OPEN)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` through the breaker; raises CircuitOpenError while open."""
        if not self.allow():
            raise CircuitOpenError(self.name, self.retry_after())
        try:
            result = fn()
        except Exception:
            self.record_failure()
            raise
        self.record_success()
        return result
