"""Retry decisions: which errors are retried, and how long to wait before the next attempt."""

from __future__ import annotations

import random

from factory.errors import VALIDATION_ERRORS
from factory.spec import RetryPolicy


def _is_validation_error(exc: BaseException) -> bool:
    if isinstance(exc, VALIDATION_ERRORS):
        return True
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic is a dependency
        return False
    return isinstance(exc, ValidationError)


def error_matches(exc: BaseException, names: list[str]) -> bool:
    """True when the exception's class or one of its bases is named (``Name`` or ``module.Name``)."""
    return any(cls.__name__ in names or f"{cls.__module__}.{cls.__qualname__}" in names for cls in type(exc).__mro__)


def is_retryable(exc: BaseException, policy: RetryPolicy) -> bool:
    """Default: what the error says of itself (a bool ``retryable`` attribute), else every error but
    validation errors. A policy's ``on`` list replaces the default."""
    if policy.on is not None:
        return error_matches(exc, policy.on)
    flag = getattr(exc, "retryable", None)
    if isinstance(flag, bool):
        return flag
    return not _is_validation_error(exc)


def backoff_delay(policy: RetryPolicy, failed_attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed.

    Exponential: backoff * 2**(n-1), capped at max_backoff. With jitter the delay is
    drawn uniformly from [delay/2, delay] ("equal jitter"): retries spread out but
    never collapse to zero.
    """
    delay: float = min(policy.max_backoff, policy.backoff * (2 ** (failed_attempt - 1)))
    if policy.jitter and delay > 0:
        delay = float((rng or random).uniform(delay / 2, delay))
    return delay
