"""The Factory: durable AI workflows on Ray."""

from factory.agent import Agent, HealthReport, agent
from factory.api import approve, cancel, resume, run
from factory.approvals import Decision
from factory.breaker import BreakerConfig, BreakerState, CircuitBreaker
from factory.dag import load_workflow, validate_workflow
from factory.engine import Progress, RunResult
from factory.errors import FactoryError, WorkflowValidationError
from factory.settings import Settings
from factory.spec import Resources, RetryPolicy, Step, Workflow

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "Decision",
    "FactoryError",
    "HealthReport",
    "Progress",
    "Resources",
    "RetryPolicy",
    "RunResult",
    "Settings",
    "Step",
    "Workflow",
    "WorkflowValidationError",
    "agent",
    "approve",
    "cancel",
    "load_workflow",
    "resume",
    "run",
    "validate_workflow",
]
