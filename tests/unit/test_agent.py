"""factory.Agent and the @agent decorator."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

import factory
from factory.agent import Agent, HealthReport, agent, load_agent_class
from factory.catalog import Catalog
from factory.errors import AgentError, StepInputError


class Settings_(BaseModel):
    factor: int = 2


class Doubler(Agent):
    """Doubles numbers. Second paragraph is not part of the description."""

    capabilities = ("math",)
    examples = ("Double 21.",)
    config_model = Settings_

    def handle(self, task: dict[str, Any]) -> dict[str, int]:
        return {"value": task["value"] * self.config.factor}


class Ask(BaseModel):
    question: str


@agent(name="asker", capabilities=["qa"])
async def asker(task: Ask) -> str:
    """Answers questions politely."""
    await asyncio.sleep(0)
    return f"you asked: {task.question}"


@agent()
def configured(task: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {"prefix": config.get("prefix", ""), **task}


def test_class_attributes_defaults_and_config_model() -> None:
    assert Doubler.name == "doubler"  # from the class name
    assert Doubler.description == "Doubles numbers. Second paragraph is not part of the description."
    assert Doubler({"factor": 3}).handle({"value": 7}) == {"value": 21}
    assert Doubler().config.factor == 2
    assert not Doubler.is_async() and Doubler().health() is True
    with pytest.raises(AgentError, match=r"invalid config.*factor"):
        Doubler({"factor": "many"})


def test_spec_is_a_catalogue_entry() -> None:
    spec = Doubler.spec(pool={"min_replicas": 2, "max_replicas": 3}, config={"factor": 5})
    assert spec.class_ == "tests.unit.test_agent:Doubler"
    assert spec.capabilities == ["math"] and spec.examples == ["Double 21."]
    assert spec.pool.min_replicas == 2 and spec.config == {"factor": 5}
    assert Catalog(agents=[spec]).get("doubler") == spec


def test_decorator_makes_an_agent_class_with_a_task_model() -> None:
    assert isinstance(asker, type) and issubclass(asker, factory.Agent)
    assert asker.name == "asker" and asker.capabilities == ("qa",) and asker.is_async()
    assert asker.description == "Answers questions politely."
    instance = asker()
    task = instance.prepare_task({"question": "why?"})
    assert isinstance(task, Ask)
    assert asyncio.run(instance.handle(task)) == "you asked: why?"
    with pytest.raises(StepInputError, match="question"):
        instance.prepare_task({"query": "why?"})
    assert configured({"prefix": ">"}).handle({"a": 1}) == {"prefix": ">", "a": 1}
    assert configured.name == "configured" and configured.class_path() == "tests.unit.test_agent:configured"


def test_load_agent_class_errors_say_what_to_fix() -> None:
    assert load_agent_class("tests.unit.test_agent:Doubler") is Doubler
    assert load_agent_class("agents.text:Summarizer").name == "summarizer"
    with pytest.raises(AgentError, match="not 'module:Class'"):
        load_agent_class("agents.text.Summarizer")
    with pytest.raises(AgentError, match="cannot import module 'no_such_module'"):
        load_agent_class("no_such_module:Thing")
    with pytest.raises(AgentError, match=r"not a factory\.Agent subclass"):
        load_agent_class("tests.unit.test_agent:Ask")


def test_health_report_model() -> None:
    class Tired(Agent):
        def health(self) -> HealthReport:
            return HealthReport(healthy=False, detail="out of memory soon")

    assert Tired().health() == HealthReport(healthy=False, detail="out of memory soon")
