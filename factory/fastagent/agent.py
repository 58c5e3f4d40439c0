"""``FastAgent``: a fast-agent agent as a Factory agent, served by a pool of Ray actor replicas.

A catalogue entry names the adapter class and gives the agent's fast-agent settings as its
``config`` (validated by :class:`FastAgentConfig`)::

    agents:
      - name: writer
        class: factory.fastagent:FastAgent
        capabilities: [write]
        description: Write short texts on request.
        pool: {min_replicas: 1, max_replicas: 2, max_concurrency: 8}
        config:
          instruction: You write short, plain answers.
          model: passthrough                # any fast-agent model string: haiku, openai.gpt-4.1-mini, generic.llama3.2
          use_history: true                 # within one job (its tool loop); jobs never share a conversation
          request_params: {max_tokens: 1024, temperature: 0.2}
          servers: {fetch: {command: uvx, args: [mcp-server-fetch]}}   # MCP servers it may call
          outputs: {invoice: mypkg.models:Invoice}                     # structured outputs steps may ask for
          timeout_seconds: 120

Each replica opens fast-agent once, when it starts (its Core: settings, MCP server registry,
model factory), on the process's private fast-agent loop (:mod:`factory.fastagent.runtime`),
and checks the model and the MCP servers then. Each job gets an agent instance of its own
on that Core, so jobs served at once by one replica never share a conversation, and each
job's token usage is its own. A replica whose fast-agent cannot start stays up, reports
itself unhealthy with the reason (``factory agents`` shows it), and fails its jobs with that
reason; the agent manager replaces it.

A job (the step's ``with``) is ``{text: ...}``, or ``{messages: [...]}``, or any mapping that
``config.template`` is formatted with (or, without a template, that is sent as JSON);
``output: NAME`` asks for the structured output ``config.outputs[NAME]``. The result is
``{text, usage}``, plus ``data`` (the validated structured output) when one was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory.agent import Agent, HealthReport
from factory.callables import import_callable
from factory.errors import (
    AgentError,
    McpServerError,
    ModelCallError,
    ModelConfigError,
    ModelOutputError,
    ModelProviderError,
    ModelRateLimitError,
    ModelTimeoutError,
    StepContextError,
    StepInputError,
)
from factory.fastagent.runtime import FastAgentExit, FastAgentRuntime, quiet_settings
from factory.safetext import one_line
from factory.stepcontext import StepContext, ToolCall, ToolResult, step_context

MAX_TEXT = 1_000_000
HEALTH_SECONDS = 2.0


class ServerConfig(BaseModel):
    """An MCP server the agent may call (fast-agent's ``mcp.servers`` entry, the fields the Factory allows)."""

    model_config = ConfigDict(extra="forbid")

    transport: Literal["stdio", "http", "sse"] = "stdio"
    command: str | None = Field(default=None, max_length=1000)
    args: list[str] = Field(default_factory=list, max_length=100)
    env: dict[str, str] = Field(default_factory=dict, max_length=100)
    cwd: str | None = Field(default=None, max_length=4096)
    url: str | None = Field(default=None, max_length=4096)
    read_timeout_seconds: int | None = Field(default=None, gt=0, le=3600)

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if self.transport == "stdio" and not self.command:
            raise ValueError("a stdio MCP server needs `command`")
        if self.transport != "stdio" and not self.url:
            raise ValueError(f"an {self.transport} MCP server needs `url`")
        return self


class RequestParamsConfig(BaseModel):
    """fast-agent request parameters a catalogue entry may set."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_iterations: int | None = Field(default=None, ge=1, le=100, description="Tool-call rounds per job.")
    parallel_tool_calls: bool | None = None


class FastAgentConfig(BaseModel):
    """The ``config:`` of a catalogue entry whose class is ``factory.fastagent:FastAgent``."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(default="You are a helpful agent.", max_length=50_000)
    model: str = Field(default="passthrough", min_length=1, max_length=200, description="A fast-agent model string.")
    base_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="The model provider's endpoint (Ollama, vLLM, a proxy); its API key stays in the environment.",
    )
    servers: dict[str, ServerConfig] = Field(default_factory=dict, max_length=16)
    use_history: bool = Field(default=True, description="Keep the conversation within one job (not across jobs).")
    request_params: RequestParamsConfig = Field(default_factory=RequestParamsConfig)
    outputs: dict[str, str] = Field(
        default_factory=dict, max_length=32, description="Structured outputs by name: 'module:PydanticModel'."
    )
    template: str | None = Field(default=None, max_length=50_000, description="str.format template of the message.")
    timeout_seconds: float = Field(default=300.0, gt=0, le=3600, description="Longest wait for one job's answer.")
    start_timeout_seconds: float = Field(default=60.0, gt=0, le=600)
    llm_retries: int = Field(default=0, ge=0, le=5, description="fast-agent's own retries; the step's retry follows.")
    max_input_chars: int = Field(default=200_000, ge=1, le=MAX_TEXT)
    stream: bool = Field(
        default=True,
        description="Publish the answer's text as it streams in, as step.emitted events ({delta}) of the step.",
    )

    @model_validator(mode="after")
    def _check(self) -> FastAgentConfig:
        for name, target in self.outputs.items():
            module, sep, attr = target.partition(":")
            if not sep or not module or not attr:
                raise ValueError(f"outputs.{name}: {target!r} is not 'module:Model'")
        return self


class FastAgentTask(BaseModel):
    """A job: ``text`` or ``messages``, or fields for the template; ``output`` names a structured output."""

    model_config = ConfigDict(extra="allow")

    text: str | None = Field(default=None, max_length=MAX_TEXT)
    messages: list[str] | None = Field(default=None, min_length=1, max_length=100)
    output: str | None = Field(default=None, max_length=100)


def _emit(events: StepContext, data: dict[str, Any]) -> None:
    """Publish ``data``; a piece too large for one event is left out (the answer is committed whole)."""
    with contextlib.suppress(StepContextError):
        events.emit(data)


def _tool_event(events: StepContext, event: ToolCall | ToolResult) -> None:
    """Publish a tool call or result (its text already on one line, cut and redacted by the model)."""
    with contextlib.suppress(StepContextError):
        events.tool_event(event)


def _usage(agent: Any) -> dict[str, Any] | None:
    """Token usage of one job's agent, from fast-agent's usage accumulator."""
    accumulator = getattr(agent, "usage_accumulator", None)
    if accumulator is None or not accumulator.turns:
        return None
    summary = accumulator.summary
    by_model: dict[str, dict[str, int]] = {}
    for turn in accumulator.turns:
        row = by_model.setdefault(turn.model, {"input_tokens": 0, "output_tokens": 0, "requests": 0})
        row["input_tokens"] += turn.prompt.total or 0
        row["output_tokens"] += turn.completion.total or 0
        row["requests"] += 1
    return {
        "input_tokens": summary.prompt.total or 0,
        "output_tokens": summary.completion.total or 0,
        "total_tokens": (summary.prompt.total or 0) + (summary.completion.total or 0),
        "requests": len(accumulator.turns),
        "tool_calls": summary.tool_calls,
        "models": by_model,
    }


def classify_failure(detail: str, model: str, usage: dict[str, Any] | None = None) -> ModelCallError:
    """The Factory error for a provider's failure message (rate limit, timeout, or another provider error)."""
    text = one_line(detail)
    low = text.lower()
    if "429" in low or "rate limit" in low or "rate_limit" in low or "ratelimit" in low or "too many requests" in low:
        return ModelRateLimitError(f"model {model!r} is rate-limited by its provider: {text}", usage=usage)
    if "timed out" in low or "timeout" in low:
        return ModelTimeoutError(f"model {model!r} timed out at its provider: {text}", usage=usage)
    return ModelProviderError(f"model {model!r} failed: {text}", usage=usage)


def classify_exception(exc: BaseException, model: str) -> ModelCallError:
    """The Factory error for an exception fast-agent (or its provider's SDK) raised."""
    from fast_agent.core.exceptions import ModelConfigError as FastModelConfigError
    from fast_agent.core.exceptions import ProviderKeyError, ServerInitializationError

    if isinstance(exc, ModelCallError):
        return exc
    if isinstance(exc, FastAgentExit):
        return ModelConfigError(f"model {model!r}: {exc}; check the agent's `config:` in the catalogue")
    if isinstance(exc, ProviderKeyError):
        return ModelConfigError(
            f"model {model!r} needs an API key that is not set: {one_line(getattr(exc, 'message', exc))}"
        )
    if isinstance(exc, FastModelConfigError):
        return ModelConfigError(f"model {model!r} is not a fast-agent model: {one_line(exc)}")
    if isinstance(exc, ServerInitializationError):
        return McpServerError(f"an MCP server of the agent could not start: {one_line(exc)}")
    if isinstance(exc, TimeoutError):
        return ModelTimeoutError(f"model {model!r} did not answer in time")
    names = " ".join(cls.__name__ for cls in type(exc).__mro__)
    if "RateLimit" in names:
        return ModelRateLimitError(f"model {model!r} is rate-limited by its provider: {one_line(exc)}")
    if "Timeout" in names:
        return ModelTimeoutError(f"model {model!r} timed out at its provider: {one_line(exc)}")
    return classify_failure(f"{type(exc).__name__}: {exc}", model)


class FastAgent(Agent):
    """An agent that thinks with a language model through fast-agent (and may call MCP servers)."""

    name = "fast_agent"
    capabilities = ()
    config_model = FastAgentConfig
    task_model = FastAgentTask

    config: FastAgentConfig
    settings_key: ClassVar[str] = "agent"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.model = self.config.model
        self.problem: str | None = None
        self._start_error: ModelCallError | None = None
        self._runtime = FastAgentRuntime.get()
        self._factory: Any = None
        self._context: Any = None
        self._tool_host: Any = None
        self._outputs: dict[str, type[BaseModel]] = {}
        try:
            self._outputs = self._load_outputs()
            self._runtime.run(
                self._start(),
                self.config.start_timeout_seconds,
                lambda: McpServerError(
                    f"fast-agent did not start within {self.config.start_timeout_seconds:g}s "
                    "(an MCP server that does not answer?)"
                ),
            )
        except Exception as exc:  # noqa: BLE001 - the replica stays up and says why it cannot serve
            error = exc if isinstance(exc, AgentError) else classify_exception(exc, self.model)
            self._start_error = error if isinstance(error, ModelCallError) else ModelConfigError(str(error))
            self.problem = f"fast-agent cannot start: {self._start_error}"

    def _load_outputs(self) -> dict[str, type[BaseModel]]:
        outputs: dict[str, type[BaseModel]] = {}
        for name, target in self.config.outputs.items():
            try:
                found = import_callable(target)
            except Exception as exc:  # noqa: BLE001 - reported as a config error
                raise ModelConfigError(f"outputs.{name}: cannot import {target}: {exc}") from None
            if not (isinstance(found, type) and issubclass(found, BaseModel)):
                raise ModelConfigError(f"outputs.{name}: {target} is not a pydantic model class")
            outputs[name] = found
        return outputs

    def _settings(self) -> Any:
        from fast_agent.config import MCPServerSettings, MCPSettings

        servers = {
            name: MCPServerSettings(name=name, **server.model_dump(exclude_none=True))
            for name, server in self.config.servers.items()
        }
        fields: dict[str, Any] = {"mcp": MCPSettings(servers=servers), "llm_retries": self.config.llm_retries}
        if self.config.base_url is not None:
            from fast_agent.llm.model_factory import ModelFactory

            provider = ModelFactory.resolve_model_spec(self.model).provider.config_name
            fields[provider] = {"base_url": self.config.base_url}
        return quiet_settings(**fields)

    async def _start(self) -> None:
        from fast_agent.llm.model_factory import ModelFactory

        config_json = json.dumps(self.config.model_dump(mode="json"), sort_keys=True)
        key = f"{self.settings_key}-{hashlib.sha256(config_json.encode()).hexdigest()[:12]}"
        self._context = await self._runtime.context(key, self._settings)
        self._factory = ModelFactory.create_factory(self.model)
        if self.config.servers:
            # The replica's MCP connections: opened once here, shared by every job's agent.
            self._tool_host = await self._new_agent(host=True)
        await self._new_agent()  # checks the model and its credentials now rather than at the first job

    async def _new_agent(self, host: bool = False) -> Any:
        """A job's agent; with ``host``, the replica's one agent that owns the MCP connections."""
        from fast_agent.agents.agent_types import AgentConfig
        from fast_agent.llm.fastagent_llm import FastAgentLLM
        from fast_agent.types import RequestParams

        wanted = self.config.request_params.model_dump(exclude_none=True)
        params = RequestParams(use_history=self.config.use_history, systemPrompt=self.config.instruction, **wanted)
        config = AgentConfig(
            name="factory-agent",
            instruction=self.config.instruction,
            servers=list(self.config.servers),
            model=self.model,
            use_history=self.config.use_history,
            default_request_params=params,
        )
        if self.config.servers:
            from fast_agent import McpAgent

            agent: Any = McpAgent(config, context=self._context)
            if not host:
                # fast-agent gives each McpAgent an aggregator of its own (its own server processes and
                # sessions); a job's agent uses the host's, already connected, instead.
                agent._aggregator = self._tool_host._aggregator
            try:
                await agent.initialize()
            except BaseException as exc:
                if host:
                    with contextlib.suppress(Exception):
                        await agent.shutdown()
                if isinstance(exc, Exception | SystemExit):
                    raise McpServerError(f"an MCP server of the agent is not available: {one_line(exc)}") from None
                raise
        else:
            from fast_agent import LlmAgent

            agent = LlmAgent(config, self._context)
        await agent.attach_llm(self._factory)
        if isinstance(agent.llm, FastAgentLLM):
            agent.llm.validate_provider_credentials()
        return agent

    def message(self, task: FastAgentTask) -> str | list[str]:
        """The agent's message(s) for a job."""
        fields = {k: v for k, v in task.model_dump(exclude_none=True).items() if k not in ("output", "messages")}
        if task.messages is not None:
            messages: str | list[str] = list(task.messages)
        elif self.config.template is not None:
            try:
                messages = self.config.template.format_map(fields)
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise StepInputError(
                    f"the agent's template needs a field this task lacks or cannot use ({type(exc).__name__}: "
                    f"{exc}); the task has: {', '.join(sorted(fields)) or 'no fields'}"
                ) from None
        else:
            extra = {k: v for k, v in fields.items() if k != "text"}
            parts = [task.text] if task.text is not None else []
            if extra:
                parts.append(json.dumps(extra, ensure_ascii=False, indent=1, default=str))
            if not parts:
                raise StepInputError("a fast-agent task needs `text`, `messages` or fields for the agent's template")
            messages = "\n\n".join(parts)
        size = sum(len(m) for m in messages) if isinstance(messages, list) else len(messages)
        if size > self.config.max_input_chars:
            raise StepInputError(
                f"the message is {size} characters, more than the agent's "
                f"max_input_chars ({self.config.max_input_chars})"
            )
        return messages

    async def handle(self, task: FastAgentTask) -> dict[str, Any]:
        if self._start_error is not None:
            raise self._start_error
        output_model: type[BaseModel] | None = None
        if task.output is not None:
            output_model = self._outputs.get(task.output)
            if output_model is None:
                known = ", ".join(sorted(self._outputs)) or "none"
                raise StepInputError(f"this agent has no structured output {task.output!r} (it has: {known})")
        messages = self.message(task)
        ctx = step_context()  # the step's context (set by the replica for this job), or a detached one
        events = None if ctx.detached else ctx
        try:
            return await asyncio.wait_for(
                self._runtime.arun(self._job(messages, output_model, events)), self.config.timeout_seconds
            )
        except TimeoutError:
            raise ModelTimeoutError(
                f"model {self.model!r} did not answer within the agent's timeout_seconds "
                f"({self.config.timeout_seconds:g}s)"
            ) from None
        except ModelCallError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a Factory error
            raise classify_exception(exc, self.model) from None

    def _publish(self, agent: Any, events: StepContext) -> None:
        """The job's answer as it streams (``{delta}`` items of ``step.emitted`` events, unless ``stream:
        false``) and its tool calls and results (``step.tool_call`` and ``step.tool_result`` events)."""
        if self.config.stream and hasattr(agent.llm, "add_stream_listener"):

            def streamed(chunk: Any) -> None:  # the provider's text as it comes (not its reasoning)
                if chunk.text and not chunk.is_reasoning and chunk.event == "delta":
                    _emit(events, {"delta": chunk.text})

            agent.llm.add_stream_listener(streamed)
        if not hasattr(agent, "tool_runner_hooks"):
            return
        from fast_agent.agents.tool_runner import ToolRunnerHooks

        hooks = agent.tool_runner_hooks or ToolRunnerHooks()

        async def before_tool_call(runner: Any, message: Any) -> None:
            if hooks.before_tool_call is not None:
                await hooks.before_tool_call(runner, message)
            for call_id, request in (getattr(message, "tool_calls", None) or {}).items():
                arguments = json.dumps(request.params.arguments or {}, default=str)
                _tool_event(events, ToolCall(id=str(call_id), name=str(request.params.name), arguments=arguments))

        async def after_tool_call(runner: Any, message: Any) -> None:
            if hooks.after_tool_call is not None:
                await hooks.after_tool_call(runner, message)
            for call_id, result in (getattr(message, "tool_results", None) or {}).items():
                text = " ".join(getattr(block, "text", "") for block in result.content or [])
                _tool_event(events, ToolResult(id=str(call_id), error=bool(result.isError), text=text))

        agent.tool_runner_hooks = dataclasses.replace(
            hooks, before_tool_call=before_tool_call, after_tool_call=after_tool_call
        )

    async def _job(
        self, messages: str | list[str], output_model: type[BaseModel] | None, events: StepContext | None = None
    ) -> dict[str, Any]:
        from fast_agent.constants import FAST_AGENT_ERROR_CHANNEL
        from fast_agent.types import LlmStopReason

        agent = await self._new_agent()  # nothing to close afterwards: its MCP connections are the replica's
        if events is not None:
            self._publish(agent, events)
        parsed: BaseModel | None = None
        try:
            if output_model is not None:
                parsed, reply = await agent.structured(messages, output_model)
            else:
                reply = await agent.generate(messages)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a Factory error
            error = classify_exception(exc, self.model)
            error.usage = _usage(agent)
            raise error from None
        usage = _usage(agent)
        channels = reply.channels or {}
        if reply.stop_reason == LlmStopReason.ERROR or FAST_AGENT_ERROR_CHANNEL in channels:
            blocks = channels.get(FAST_AGENT_ERROR_CHANNEL) or []
            detail = " ".join(getattr(b, "text", "") for b in blocks) or reply.last_text() or "no detail"
            raise classify_failure(detail, self.model, usage)
        text: str = reply.last_text() or ""
        result: dict[str, Any] = {"text": text, "usage": usage}
        if output_model is not None:
            if parsed is None:
                try:
                    parsed = output_model.model_validate_json(text)
                except ValidationError as exc:
                    raise ModelOutputError(
                        f"model {self.model!r} did not answer the structured output {output_model.__name__} "
                        f"({exc.error_count()} problem(s)): {one_line(text, 200)!r}",
                        usage=usage,
                    ) from None
            result["data"] = parsed.model_dump(mode="json")
        return result

    async def health(self) -> bool | HealthReport:
        """Unhealthy when fast-agent could not start here, or when one of the replica's MCP servers no
        longer answers a ping (fast-agent does not restart a dead server by itself: the agent manager
        replaces the replica, and a new replica starts new servers). The reason is the detail."""
        if self.problem is not None:
            return HealthReport(healthy=False, detail=self.problem)
        if self._tool_host is None:
            return True
        try:
            down = await asyncio.wait_for(self._runtime.arun(self._servers_down()), HEALTH_SECONDS + 1)
        except TimeoutError:
            down = ["(status check timed out)"]
        if down:
            return HealthReport(healthy=False, detail=f"MCP server(s) not answering: {', '.join(down)}")
        return True

    async def _servers_down(self) -> list[str]:
        """The replica's MCP servers that are not connected or do not answer a ping (on fast-agent's loop)."""
        manager = getattr(self._tool_host._aggregator, "_persistent_connection_manager", None)
        running = getattr(manager, "running_servers", {}) if manager is not None else {}
        down: list[str] = []
        for name in self.config.servers:
            connection = running.get(name)
            client = getattr(connection, "client", None)
            if connection is None or client is None or not connection.is_healthy():
                down.append(name)
                continue
            try:
                await asyncio.wait_for(client.ping(), HEALTH_SECONDS)
            except Exception:  # noqa: BLE001 - any failure to answer is a server down
                down.append(name)
        return down
