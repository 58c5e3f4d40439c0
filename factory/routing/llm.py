"""The ``llm`` scorer: asks a language model to rate each agent for a task.

The prompt and the parsing of the reply are here. The model itself is a
completion function ``str -> str``: pass one as ``complete=``, or name a
fast-agent model (``haiku``, ``openai.gpt-4.1-mini``, ``generic.llama3.2:latest``,
...) with ``model=`` or ``FACTORY_ROUTER_LLM_MODEL``; the fast-agent binding
below then sends each prompt as one user message to an ``LlmAgent`` without MCP
servers or history, and returns its text reply. fast-agent is optional (the
``fast-agent`` extra) and imported only when a model is named.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from factory.catalog import Catalog
from factory.errors import RouterConfigError, ScorerError
from factory.fastagent.runtime import FastAgentExit, FastAgentRuntime, quiet_settings

Complete = Callable[[str], str]

ENV_MODEL = "FACTORY_ROUTER_LLM_MODEL"
TIMEOUT_SECONDS = 60.0

T = TypeVar("T")

_INSTRUCTIONS = (
    "You route tasks to agents. Rate how well each agent below fits the task, from 0 (cannot do it) "
    "to 1 (exactly its job). Answer with one JSON object mapping every agent name to its rating, and nothing else."
)


def _configured_model() -> str | None:
    from factory.settings import get_settings

    return get_settings().router_llm_model


def catalog_prompt(catalog: Catalog) -> str:
    lines = [_INSTRUCTIONS, "", "Agents:"]
    for agent in catalog.agents:
        lines.append(f"- {agent.name} (capabilities: {', '.join(agent.capabilities) or 'none'}): {agent.description}")
        lines.extend(f"    e.g. {example}" for example in agent.examples)
    return "\n".join(lines)


def parse_scores(reply: str, agents: list[str]) -> dict[str, float]:
    """Ratings from a model's reply: the first JSON object in it; unknown names dropped, missing ones 0."""
    match = re.search(r"\{.*\}", reply, flags=re.DOTALL)
    if match is None:
        raise ScorerError(f"the llm scorer's model did not answer with a JSON object: {reply[:200]!r}")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise ScorerError(f"the llm scorer's model answered malformed JSON ({exc}): {reply[:200]!r}") from None
    if not isinstance(data, dict):
        raise ScorerError(f"the llm scorer's model answered {type(data).__name__}, not an object")
    scores: dict[str, float] = {}
    for name in agents:
        value = data.get(name, 0.0)
        try:
            scores[name] = min(max(float(value), 0.0), 1.0)
        except (TypeError, ValueError):
            scores[name] = 0.0
    return scores


def _fast_agent_completion(model: str, timeout: float = TIMEOUT_SECONDS) -> Complete:
    """A completion function that sends each prompt to the fast-agent model ``model`` (e.g. ``haiku``).

    The model string is checked here (unknown model, missing API key: ``RouterConfigError``);
    each call then makes one request, waits at most ``timeout`` seconds, and raises
    ``ScorerError`` when the model fails or is too slow.
    """
    if importlib.util.find_spec("fast_agent") is None:
        raise RouterConfigError(
            f"the llm scorer is set to use model {model!r} through fast-agent, which is not installed: "
            "install the Factory's fast-agent extra, or use --scorer lexical or embedding"
        )
    return _FastAgentCompletion(model, timeout)


class _FastAgentRuntime:
    """The process's fast-agent loop (see :mod:`factory.fastagent.runtime`), with the scorer's errors."""

    def __init__(self, runtime: FastAgentRuntime) -> None:
        self._runtime = runtime
        self.loop = runtime.loop
        self.thread = runtime.thread

    @classmethod
    def get(cls) -> _FastAgentRuntime:
        return cls(FastAgentRuntime.get())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        try:
            return self._runtime.run(coro, timeout, lambda: ScorerError(f"{what} did not finish within {timeout:g} s"))
        except FastAgentExit as exc:
            raise ScorerError(f"{what} stopped with a fast-agent configuration error (exit code {exc.code})") from None

    async def context(self) -> Any:
        """fast-agent's context for the router: no MCP servers, one attempt per task (fail fast, no back-offs)."""
        return await self._runtime.context("router", lambda: quiet_settings(llm_retries=0))


class _FastAgentCompletion:
    """``str -> str`` through one fast-agent agent (no MCP servers, no history between calls)."""

    def __init__(self, model: str, timeout: float) -> None:
        from fast_agent.core.exceptions import FastAgentError, ModelConfigError, ProviderKeyError
        from fast_agent.llm.model_factory import ModelFactory

        self.model = model
        self.timeout = timeout
        try:
            spec = ModelFactory.resolve_model_spec(model)
            self._factory = ModelFactory.create_factory(model)
        except SystemExit as exc:  # fast-agent's way of reporting some configuration errors
            raise RouterConfigError(
                f"the llm scorer's model {model!r} was refused by fast-agent's configuration (exit code {exc.code}); "
                f"set {ENV_MODEL} to a fast-agent model string such as haiku or openai.gpt-4.1-mini"
            ) from None
        except ModelConfigError as exc:
            raise RouterConfigError(
                f"the llm scorer's model {model!r} is not a fast-agent model ({_one_line(exc)}); "
                f"set {ENV_MODEL} to a fast-agent model string such as haiku or openai.gpt-4.1-mini"
            ) from None
        self.provider = spec.provider.display_name
        self._env_key = _env_key_name(spec.provider.config_name)
        self._runtime = _FastAgentRuntime.get()
        self._lock = asyncio.Lock()
        try:
            self._agent = self._runtime.run(self._open(), timeout, f"starting the llm scorer's model {model!r}")
        except ProviderKeyError as exc:
            where = f"set {self._env_key}" if self._env_key else "configure its credentials"
            raise RouterConfigError(
                f"the llm scorer's model {model!r} uses the {self.provider} provider, which needs an API key: "
                f"{where} ({exc.message})"
            ) from None
        except FastAgentError as exc:
            raise RouterConfigError(f"the llm scorer's model {model!r} cannot start: {_one_line(exc)}") from None
        except ScorerError as exc:
            raise RouterConfigError(str(exc)) from None

    async def _open(self) -> Any:
        from fast_agent import LlmAgent
        from fast_agent.agents.agent_types import AgentConfig
        from fast_agent.llm.fastagent_llm import FastAgentLLM

        context = await self._runtime.context()
        config = AgentConfig(name="factory-router", instruction="You answer with JSON only.", use_history=False)
        agent = LlmAgent(config, context)
        await agent.attach_llm(self._factory)
        if isinstance(agent.llm, FastAgentLLM):
            agent.llm.validate_provider_credentials()  # raises ProviderKeyError now rather than at the first task
        return agent

    async def _send(self, prompt: str) -> str:
        from fast_agent.constants import FAST_AGENT_ERROR_CHANNEL
        from fast_agent.types import LlmStopReason

        async with self._lock:  # one request at a time per agent
            reply = await self._agent.generate(prompt)
        if reply.stop_reason == LlmStopReason.ERROR or FAST_AGENT_ERROR_CHANNEL in (reply.channels or {}):
            errors = (reply.channels or {}).get(FAST_AGENT_ERROR_CHANNEL) or []
            detail = " ".join(getattr(block, "text", "") for block in errors) or reply.last_text() or "no detail"
            raise ScorerError(f"the llm scorer's model {self.model!r} failed: {_one_line(detail)}")
        text: str = reply.last_text() or ""
        return text

    def __call__(self, prompt: str) -> str:
        from fast_agent.core.exceptions import ProviderKeyError

        try:
            return self._runtime.run(self._send(prompt), self.timeout, f"the llm scorer's model {self.model!r}")
        except ScorerError:
            raise
        except ProviderKeyError as exc:
            where = f" (set {self._env_key})" if self._env_key else ""
            raise ScorerError(
                f"the llm scorer's model {self.model!r} was refused by the {self.provider} provider's "
                f"credential check{where}: {_one_line(exc)}"
            ) from None
        except Exception as exc:  # any provider failure is the scorer's failure
            raise ScorerError(
                f"the llm scorer's model {self.model!r} failed: {type(exc).__name__}: {_one_line(exc)}"
            ) from exc


def _env_key_name(provider: str) -> str | None:
    from fast_agent.llm.provider_key_manager import ProviderKeyManager

    return ProviderKeyManager.get_env_key_name(provider)


def _one_line(error: object, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LLMScorer:
    """Ratings from a language model (one call per task: slow, for when the other scorers disagree)."""

    name = "llm"

    def __init__(self, catalog: Catalog, complete: Complete | None = None, model: str | None = None) -> None:
        self.agents = [a.name for a in catalog.agents]
        self.prompt = catalog_prompt(catalog)
        if complete is None:
            model = model or _configured_model()
            if model is None:
                raise RouterConfigError(
                    f"the llm scorer has no model configured: set {ENV_MODEL} to a fast-agent model name, "
                    "or use --scorer lexical (the default) or --scorer embedding"
                )
            complete = _fast_agent_completion(model)
        self.complete = complete

    def fit(self, text: str) -> dict[str, float]:
        reply = self.complete(f"{self.prompt}\n\nTask: {text}\n\nJSON:")
        return parse_scores(reply, self.agents)
