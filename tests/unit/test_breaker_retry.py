from __future__ import annotations

import random

import pytest

from factory.breaker import BreakerConfig, BreakerState, CircuitBreaker
from factory.errors import CircuitOpenError, StepInputError
from factory.retry import backoff_delay, is_retryable
from factory.spec import RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_recovers_through_half_open() -> None:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "pool", BreakerConfig(failure_threshold=3, cooldown=10), clock, lambda n, a, b: changes.append((a, b))
    )
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state == BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(10)
    clock.now += 10
    assert breaker.state == BreakerState.HALF_OPEN
    assert breaker.allow()  # the one trial call
    assert not breaker.allow()  # no second trial while the first is out
    breaker.record_failure()  # trial failed: open again for a full cool-down
    assert breaker.state == BreakerState.OPEN
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == BreakerState.CLOSED
    assert changes == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker("x", BreakerConfig(failure_threshold=2, cooldown=1), Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == BreakerState.CLOSED


def test_breaker_call_refuses_while_open() -> None:
    breaker = CircuitBreaker("svc", BreakerConfig(failure_threshold=1, cooldown=5), Clock())

    def boom() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        breaker.call(boom)
    with pytest.raises(CircuitOpenError, match="'svc' is open"):
        breaker.call(lambda: 1)


def test_breaker_config_from_settings() -> None:
    from factory.breaker import BreakerConfig
    from factory.settings import Settings

    config = BreakerConfig.from_settings(Settings(breaker_failure_threshold=7, breaker_cooldown_seconds=2.5))
    assert config.failure_threshold == 7 and config.cooldown == 2.5
    assert CircuitBreaker("exec", config).config is config


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=10, backoff=0.5, max_backoff=3, jitter=False)
    assert [backoff_delay(policy, n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_stays_within_half_and_full_delay() -> None:
    policy = RetryPolicy(max_attempts=5, backoff=1, max_backoff=10, jitter=True)
    rng = random.Random(1)
    delays = [backoff_delay(policy, 3, rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 100


def test_which_errors_are_retried() -> None:
    default = RetryPolicy()
    assert is_retryable(ConnectionError(), default)
    assert is_retryable(ValueError(), default)
    assert not is_retryable(StepInputError("bad"), default)
    named = RetryPolicy(on=["ConnectionError", "builtins.KeyError"])
    assert is_retryable(ConnectionResetError(), named)  # a subclass matches
    assert is_retryable(KeyError("k"), named)
    assert not is_retryable(ValueError(), named)


def test_an_error_that_says_whether_it_is_retryable_is_believed() -> None:
    from factory.errors import ModelConfigError, ModelProviderError, ModelRateLimitError

    default = RetryPolicy()
    assert is_retryable(ModelRateLimitError("429"), default)
    assert not is_retryable(ModelConfigError("no key"), default)
    assert not is_retryable(ModelProviderError("bad request", retryable=False), default)
    # A policy's `on` list still decides alone.
    assert is_retryable(ModelConfigError("no key"), RetryPolicy(on=["ModelConfigError"]))
    assert not is_retryable(ModelRateLimitError("429"), RetryPolicy(on=["ConnectionError"]))
