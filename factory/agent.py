"""Agents: the Factory's workers.

An agent is a class with a name, capabilities, a description and example tasks
(what the router matches a task against), built with a config, whose
``handle(task)`` (sync or async) returns a pydantic model or a JSON-able value::

    class Shouter(Agent):
        name = "shouter"
        capabilities = ["text"]
        description = "Turn text into upper case."
        examples = ["Shout this sentence."]

        def handle(self, task: dict[str, Any]) -> dict[str, str]:
            return {"text": str(task["text"]).upper()}

or, for a plain function, the decorator form::

    @agent(name="shouter", capabilities=["text"])
    def shouter(task: dict[str, Any]) -> dict[str, str]:
        return {"text": str(task["text"]).upper()}

A class may declare ``config_model`` and ``task_model`` (pydantic models): the
config is validated when a replica starts, each task before ``handle`` sees it,
and a task that does not fit is reported as a ``StepInputError`` (not retried).
Agents run inside pool replicas (Ray actors, see :mod:`factory.pools`); a sync
``handle`` of a pool with ``max_concurrency > 1`` runs on several threads at once.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from factory.callables import add_search_path
from factory.catalog import AgentSpec, PoolConfig
from factory.errors import AgentError, StepInputError

A = TypeVar("A", bound="type[Agent]")


class HealthReport(BaseModel):
    """What ``Agent.health()`` may return instead of a plain bool."""

    healthy: bool = True
    detail: str = ""


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors())


class Agent:
    """Base class of agents. Override ``handle`` (sync or async) and, if useful, ``health``."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Sequence[str]] = ()
    description: ClassVar[str] = ""
    examples: ClassVar[Sequence[str]] = ()
    config_model: ClassVar[type[BaseModel] | None] = None
    task_model: ClassVar[type[BaseModel] | None] = None

    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            cls.name = cls.__name__.lower()
        if not cls.description and cls.__doc__:
            cls.description = inspect.cleandoc(cls.__doc__).split("\n\n")[0].replace("\n", " ")

    def __init__(self, config: Mapping[str, Any] | BaseModel | None = None) -> None:
        self.config = self.parse_config(config)

    @classmethod
    def parse_config(cls, config: Mapping[str, Any] | BaseModel | None) -> Any:
        """The config as the agent sees it: a ``config_model`` instance, or a plain dict."""
        if cls.config_model is None:
            if isinstance(config, BaseModel):
                return config.model_dump()
            return dict(config or {})
        if isinstance(config, cls.config_model):
            return config
        raw = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
        try:
            return cls.config_model.model_validate(raw)
        except ValidationError as exc:
            raise AgentError(
                f"agent {cls.name!r} has an invalid config ({_problems(exc)}); fix `config:` in the catalogue"
            ) from None

    def prepare_task(self, task: Any) -> Any:
        """Validate a task against ``task_model`` (if any) before ``handle`` sees it."""
        model = self.task_model
        if model is None or isinstance(task, model):
            return task
        if isinstance(task, BaseModel):
            task = task.model_dump()
        try:
            return model.model_validate(task)
        except ValidationError as exc:
            fields = ", ".join(model.model_fields)
            raise StepInputError(
                f"agent {self.name!r} cannot take this task ({_problems(exc)}); it takes the fields: {fields}"
            ) from None

    def handle(self, task: Any) -> Any:
        """Do the work. May be ``async def``. Return a pydantic model or a JSON-able value."""
        raise NotImplementedError(f"agent {self.name!r} ({type(self).__name__}) does not implement handle(task)")

    def health(self) -> bool | HealthReport | Awaitable[bool | HealthReport]:
        """Is this replica fit to serve? The agent manager asks every few seconds; override to check resources."""
        return True

    @classmethod
    def is_async(cls) -> bool:
        return inspect.iscoroutinefunction(cls.handle)

    @classmethod
    def class_path(cls) -> str:
        return f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def spec(
        cls,
        *,
        name: str | None = None,
        pool: PoolConfig | Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> AgentSpec:
        """A catalogue entry for this class (what ``agents.yaml`` would say)."""
        return AgentSpec.model_validate(
            {
                "name": name or cls.name,
                "class": cls.class_path(),
                "capabilities": list(cls.capabilities),
                "description": cls.description,
                "examples": list(cls.examples),
                "pool": pool if pool is not None else PoolConfig(),
                "config": dict(config or {}),
            }
        )


def _task_model_of(fn: Callable[..., Any]) -> type[BaseModel] | None:
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        return None
    hint = hints.get(params[0].name)
    if inspect.isclass(hint) and issubclass(hint, BaseModel):
        return hint
    return None


def agent(
    name: str | None = None,
    *,
    capabilities: Sequence[str] = (),
    description: str = "",
    examples: Sequence[str] = (),
    config_model: type[BaseModel] | None = None,
) -> Callable[[Callable[..., Any]], type[Agent]]:
    """Make an Agent class of a plain function ``fn(task)`` or ``fn(task, config)`` (sync or async).

    The decorated name becomes the class, so ``module:function`` works as ``class:`` in
    ``agents.yaml``. A pydantic annotation on the first parameter becomes the ``task_model``.
    """

    def wrap(fn: Callable[..., Any]) -> type[Agent]:
        params = inspect.signature(fn).parameters
        if not params:
            raise TypeError(f"@agent function {fn.__qualname__} must take the task as its first parameter")
        wants_config = "config" in params or len(params) >= 2
        namespace: dict[str, Any] = {
            "name": name or fn.__name__,
            "capabilities": tuple(capabilities),
            "description": description or inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].replace("\n", " "),
            "examples": tuple(examples),
            "config_model": config_model,
            "task_model": _task_model_of(fn),
            "__module__": fn.__module__,
            "__qualname__": fn.__qualname__,
            "__doc__": fn.__doc__,
            "function": staticmethod(fn),
        }
        if inspect.iscoroutinefunction(fn):

            async def handle_async(self: Agent, task: Any) -> Any:
                return await (fn(task, self.config) if wants_config else fn(task))

            namespace["handle"] = handle_async
        else:

            def handle_sync(self: Agent, task: Any) -> Any:
                return fn(task, self.config) if wants_config else fn(task)

            namespace["handle"] = handle_sync
        return type(fn.__name__, (Agent,), namespace)

    return wrap


def load_agent_class(target: str, search_path: Sequence[str] = ()) -> type[Agent]:
    """Import ``module:Class`` and check that it is an Agent; errors say what to fix."""
    import importlib

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise AgentError(f"{target!r} is not 'module:Class' (for example agents.text:Summarizer)")
    add_search_path(search_path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AgentError(f"cannot import module {module_name!r} for agent class {target}: {exc}") from None
    found: Any = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise AgentError(f"module {module_name!r} has no attribute {attr!r} (agent class {target})")
    if not (inspect.isclass(found) and issubclass(found, Agent)):
        raise AgentError(f"{target} is not a factory.Agent subclass (or an @agent function)")
    return found
