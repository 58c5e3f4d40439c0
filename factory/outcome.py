"""What one attempt produced, as the coordinator records it: plain data, no Ray.

Workers build an :class:`Outcome`; the scheduler (factory.scheduler) decides on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from factory.errors import OutputTooLargeError


@dataclass(slots=True)
class Outcome:
    """The result of one attempt, as the coordinator records it."""

    ok: bool
    output_json: str | None = None
    error: str | None = None
    error_type: str | None = None
    retryable: bool = False
    skipped: bool = False  # a dependency failed: nothing ran
    logs: str = ""
    duration: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def json_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def limit_outcome(outcome: Outcome, max_bytes: int, what: str = "the step's output") -> Outcome:
    """The outcome, or a failed one (not retried) when its output is larger than ``max_bytes``:
    for outputs that did not pass through :func:`encode_output` with the limit (agent steps)."""
    text = outcome.output_json
    if not outcome.ok or text is None or len(text) * 4 <= max_bytes or json_size(text) <= max_bytes:
        return outcome
    exc = OutputTooLargeError(json_size(text), max_bytes, what)
    return Outcome(
        ok=False,
        error=f"{type(exc).__name__}: {exc}",
        error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        retryable=False,
        logs=outcome.logs,
        duration=outcome.duration,
        extra=outcome.extra,
    )
