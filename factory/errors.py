"""The Factory's one exception hierarchy.

Every message says what went wrong and what to change. The CLI prints them as
they are; the HTTP API maps them onto problem+json responses (deployments/http.py).
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


class OutputTooLargeError(FactoryError):
    """A step's output, as JSON, is larger than the ``max_output_bytes`` setting (not retried)."""

    def __init__(self, size: int, limit: int, what: str = "the step's output") -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"{what} is {size} bytes as JSON, more than the limit of {limit} bytes "
            "(setting max_output_bytes, FACTORY_MAX_OUTPUT_BYTES); write large results to a file and "
            "return its path, or declare the file in a container step's `outputs:` to keep it as an artifact"
        )


class StepContextError(FactoryError):
    """A step used its context wrongly (factory.step_context): a once() key or result, a progress
    fraction or emitted data out of bounds, or not JSON. Not retried: the step's code must change."""

    retryable = False


class StepTimeoutError(FactoryError):
    """An attempt ran past the step's timeout and was stopped."""


class NotFoundError(FactoryError):
    """The thing named does not exist (a run, a registered workflow, a key)."""


class RunNotFoundError(NotFoundError):
    """No run with this id exists in the store."""


class WorkflowNotFoundError(NotFoundError):
    """No registered workflow has this name (or version)."""


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
    OutputTooLargeError,
)


class LeaseLostError(RunStateError):
    """Another coordinator took over the run: this one must stop writing to it."""


class StoreUnavailableError(FactoryError):
    """The store's database could not be reached, or dropped the connection in a transaction.

    ``retryable`` is True when the transaction is known not to have committed, so running
    it again is safe; False when its outcome could not be established.
    """

    def __init__(self, message: str, retryable: bool) -> None:
        self.retryable = retryable
        super().__init__(message)


class PoolSaturated(FactoryError):
    """An agent pool's queue is full: every replica is busy and ``max_queued`` requests already wait."""

    def __init__(self, pool: str, in_flight: int, capacity: int, max_queued: int) -> None:
        self.pool = pool
        self.in_flight = in_flight
        self.capacity = capacity
        self.max_queued = max_queued
        super().__init__(
            f"agent pool {pool!r} is saturated: {in_flight} requests in flight for {capacity} slots "
            f"and {max_queued} queued places; retry later, raise pool.max_replicas or pool.max_queued "
            "in the catalogue, or send fewer requests at once"
        )


class AgentError(FactoryError):
    """An agent cannot be loaded, started or reached (wrong class path, bad config, no live replica)."""


class ModelCallError(AgentError):
    """A fast-agent agent's call to its model (or its MCP servers) failed.

    ``retryable`` is data on the error (the step's retry policy reads it): whether another
    attempt, perhaps on another replica, may succeed. Each subclass has its default;
    ``usage`` holds the tokens the failed attempt spent, when the provider reported them.
    """

    default_retryable = True

    def __init__(self, message: str, *, retryable: bool | None = None, usage: dict[str, object] | None = None) -> None:
        self.retryable = self.default_retryable if retryable is None else retryable
        self.usage = usage
        super().__init__(message)


class ModelConfigError(ModelCallError):
    """The agent's model or settings are wrong (unknown model, missing API key, fast-agent's SystemExit):
    fix the catalogue or the environment; not retried."""

    default_retryable = False


class ModelRateLimitError(ModelCallError):
    """The provider refused the request for its rate limit (HTTP 429): retried after the back-off."""


class ModelTimeoutError(ModelCallError, StepTimeoutError):
    """The model did not answer within the agent's ``timeout_seconds``: retried."""


class ModelProviderError(ModelCallError):
    """The provider answered with an error, or with something that is not a valid answer: retried."""


class ModelOutputError(ModelCallError):
    """The model's answer does not fit the structured output the step asked for: retried (models vary)."""


class McpServerError(ModelCallError):
    """An MCP server the agent uses could not be started or reached: retried (another replica may reach it)."""


class NoMajorityError(FactoryError):
    """A vote among an agent's samples (factory.patterns.maker) found no majority answer.

    Not retried: the samples are recorded, so another attempt would count the same votes."""

    retryable = False


class UncertainRouteError(FactoryError):
    """The router is not sure enough (below the catalogue's ``routing.min_confidence``) and the
    catalogue says a person decides (``when_uncertain: fail``). Not retried: the same text would
    get the same doubt; name the agent with ``agent:`` or correct the router."""

    retryable = False

    def __init__(self, text: str, candidates: list[str], confidence: float) -> None:
        self.candidates = list(candidates)
        self.confidence = confidence
        super().__init__(
            f"the router is unsure ({confidence:.2f}) whether {' or '.join(candidates)} should take this task: "
            "choose one with `agent:` in the step, or teach the router with `factory route TEXT --correct AGENT`"
        )


class NoEligibleAgentError(FactoryError):
    """The router found no agent that passes the hard filters (capabilities, resources, placement,
    health, breakers).

    ``filtered_out`` maps each agent of the catalogue to the reason it was removed.
    """

    # Reasons a retry cannot change: they follow from the catalogue and the request alone.
    LASTING = ("missing capabilit", "lacks resources")

    def __init__(self, filtered_out: dict[str, str], capabilities: list[str] | None = None) -> None:
        self.filtered_out = dict(filtered_out)
        self.capabilities = list(capabilities or [])
        if not self.filtered_out:
            message = "no agent can take this task: the agent catalogue is empty; add agents to agents.yaml"
        else:
            reasons = "; ".join(f"{agent}: {why}" for agent, why in self.filtered_out.items())
            hints: list[str] = []
            whys = self.filtered_out.values()
            if any(w.startswith("missing capabilit") for w in whys):
                wanted = ", ".join(self.capabilities)
                hints.append(
                    f"add an agent with capabilities [{wanted}] to the catalogue or ask for fewer capabilities"
                )
            if any(w.startswith("lacks resources") for w in whys):
                hints.append("ask for fewer resources, or give an agent's pool more (num_gpus, memory, resources)")
            if any(w.startswith("cannot be placed") for w in whys):
                hints.append("add Ray nodes that have those resources, or lower what the agent's pool asks for")
            if any(w.startswith("circuit breaker open") for w in whys):
                hints.append("retry once the open circuit breakers let a trial call through")
            if any(w.startswith("unhealthy") for w in whys):
                hints.append("check the unhealthy agents' pools (their replicas fail health checks)")
            message = f"no agent can take this task ({reasons})"
            if hints:
                message += "; to fix: " + "; or ".join(hints)
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        """Could a later attempt find an agent? Yes when some agent was passed over only for now
        (an open breaker, an unhealthy pool, a cluster that may grow)."""
        return any(not why.startswith(self.LASTING) for why in self.filtered_out.values())


class ModelNotFoundError(FactoryError):
    """Model files (weights, tokenizer) are not where the Factory looks for them."""


class RouterConfigError(FactoryError):
    """A routing scorer is unknown or not configured."""


class ContainerStepError(FactoryError):
    """A container step's command failed: non-zero exit, or stopped by one of its limits.

    ``reason`` says which limit stopped it (memory, processes, timeout) when one did;
    the message ends with the tail of the command's stderr.
    """

    def __init__(self, message: str, exit_code: int | None = None, reason: str | None = None) -> None:
        self.exit_code = exit_code
        self.reason = reason
        super().__init__(message)


class ContainerTimeoutError(ContainerStepError, StepTimeoutError):
    """A container step ran past its timeout; its whole process tree was killed."""


class ExecutorUnavailableError(FactoryError):
    """The chosen executor cannot run here (no bubblewrap, no Dagger engine, unknown name)."""


class SecretNotFoundError(StepInputError):
    """A container step names a secret that the secret source does not hold (not retried)."""


class ArtifactError(FactoryError):
    """An artifact could not be stored, found or mounted."""


class ScorerError(FactoryError):
    """A routing scorer could not score a task (for example an LLM reply that is not the JSON asked for)."""


class SettingsError(FactoryError):
    """A setting (environment variable or settings file) has an invalid value."""


class AuthenticationError(FactoryError):
    """No API key, or one that is unknown or revoked."""


class PermissionDeniedError(FactoryError):
    """The API key is valid but may not do this: it lacks the scope, or the workflow asks for
    code or secrets the operator did not allow. ``problems`` names each step and field."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class StepNotAllowedError(StepInputError):
    """A run asked its worker for a module or a secret its grants do not include (not retried)."""


class ScheduleNotFoundError(NotFoundError):
    """No schedule has this name."""


class ScheduleConflictError(FactoryError):
    """A schedule of this name exists already, or its creator holds as many as allowed."""
