"""The Factory's one exception hierarchy.

Every message says what went wrong and what to change. The CLI prints them as
they are; later the HTTP API maps them onto problem+json responses.
"""

from __future__ import annotations


class FactoryError(Exception):
    """Base class of every error the Factory raises on purpose."""


class WorkflowValidationError(FactoryError):
    """A workflow definition is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class StepInputError(FactoryError):
    """A step's inputs could not be resolved or do not fit its function (not retried)."""


class OutputNotSerializableError(FactoryError):
    """A step returned a value that cannot be stored as JSON (not retried)."""


class StepTimeoutError(FactoryError):
    """An attempt ran past the step's timeout and was stopped."""


class RunNotFoundError(FactoryError):
    """No run with this id exists in the store."""


class RunStateError(FactoryError):
    """The run is not in a state that allows the requested action."""


class CircuitOpenError(FactoryError):
    """A circuit breaker is open: calls are refused until its cool-down ends."""

    def __init__(self, name: str, retry_after: float) -> None:
        self.name = name
        self.retry_after = retry_after
        super().__init__(
            f"circuit breaker {name!r} is open after repeated failures; "
            f"it will let a trial call through in {retry_after:.1f}s"
        )


# Errors that are never retried unless a retry policy names them explicitly:
# retrying cannot fix input that is wrong.
VALIDATION_ERRORS: tuple[type[BaseException], ...] = (
    WorkflowValidationError,
    StepInputError,
    OutputNotSerializableError,
)
