"""The Factory: durable AI workflows on Ray."""

from factory.agent import Agent, HealthReport, agent
from factory.api import cancel, resume, run
from factory.breaker import BreakerConfig, BreakerState, CircuitBreaker
from factory.dag import load_workflow, validate_workflow
from factory.engine import Progress, RunResult
from factory.errors import FactoryError, WorkflowValidationError
from factory.settings import Settings
from factory.spec import Resources, RetryPolicy, Step, Workflow
from factory.stepcontext import StepContext, step_context

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "FactoryError",
    "HealthReport",
    "Progress",
    "Resources",
    "RetryPolicy",
    "RunResult",
    "Settings",
    "Step",
    "StepContext",
    "Workflow",
    "WorkflowValidationError",
    "agent",
    "cancel",
    "load_workflow",
    "resume",
    "run",
    "step_context",
    "validate_workflow",
]
