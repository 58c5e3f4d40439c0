"""A code runner: hands a snippet to the isolated executor (factory.sandbox) and reports what it printed.

The snippet runs as a container step would: no network, a read-only root, a
scratch working directory, CPU, memory and time limits (the local executor
uses bubblewrap and rlimits; Dagger runs it in the image). A program that
fails is a result, not an agent error: ``ok`` is false and ``stderr`` says why.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from factory.agent import Agent
from factory.errors import AgentError, ContainerStepError, ContainerTimeoutError

_COMMANDS = {"python": ["python3", "-I", "-c"], "sh": ["sh", "-c"]}


class CodeRunnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    executor: str = Field(default="local", description="local (bubblewrap) or dagger.")
    image: str = Field(default="python:3.12-slim", description="Image (Dagger) or rootfs name (local executor).")
    timeout: float = Field(default=10.0, gt=0, description="Seconds a snippet may run.")
    memory: str = Field(default="256MB", description="Memory limit of the snippet.")
    cpus: float = Field(default=1.0, gt=0)
    home: str | None = Field(default=None, description="Where artifacts go; default: a temporary directory.")


class RunTask(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str = Field(min_length=1, description="The program text.")
    language: Literal["python", "sh"] = "python"
    timeout: float | None = Field(default=None, gt=0, description="Seconds; at most the config's timeout.")


class RunResult(BaseModel):
    ok: bool
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    duration: float = 0.0
    executor: str
    error: str = ""


class CodeRunner(Agent):
    """Run a snippet of Python or shell code in an isolated sandbox and return its output."""

    name = "code_runner"
    capabilities = ("run_code",)
    description = (
        "Execute a Python or shell code snippet in an isolated sandbox (no network, limited CPU, memory and "
        "time) and return its exit code, standard output and errors: compute, test or check code."
    )
    examples = (
        "Run this Python script and tell me what it prints.",
        "Execute the code and report the result.",
        "Compute this with a short program.",
    )
    config_model = CodeRunnerConfig
    task_model = RunTask
    config: CodeRunnerConfig

    def handle(self, task: RunTask) -> RunResult:
        try:
            from factory.sandbox import get_executor, run_spec
            from factory.spec import ContainerSpec
        except ImportError as exc:
            raise AgentError(
                f"the code runner needs the isolated executor (factory.sandbox), which cannot be imported: {exc}"
            ) from None
        timeout = min(task.timeout or self.config.timeout, self.config.timeout)
        spec = ContainerSpec.model_validate(
            {
                "image": self.config.image,
                "command": [*_COMMANDS[task.language], task.code],
                "network": False,
                "timeout": timeout,
                "resources": {"cpus": self.config.cpus, "memory": self.config.memory},
            }
        )
        executor = get_executor(self.config.executor)
        with tempfile.TemporaryDirectory(prefix="factory-code-runner-") as scratch:
            home = Path(self.config.home) if self.config.home else Path(scratch)
            try:
                out = run_spec(spec, executor, home=home, step_id="code_runner", timeout=timeout)
            except ContainerTimeoutError as exc:
                return RunResult(
                    ok=False,
                    exit_code=exc.exit_code,
                    stdout="",
                    stderr=str(exc),
                    timed_out=True,
                    executor=executor.name,
                    error=f"the snippet ran past {timeout:g}s and was stopped",
                )
            except ContainerStepError as exc:
                return RunResult(
                    ok=False,
                    exit_code=exc.exit_code,
                    stdout="",
                    stderr=str(exc),
                    executor=executor.name,
                    error=f"the snippet exited with code {exc.exit_code}",
                )
        return RunResult(
            ok=True,
            exit_code=int(out["exit_code"]),
            stdout=str(out["stdout"]),
            stderr=str(out["stderr"]),
            duration=float(out["duration"]),
            executor=str(out["executor"]),
        )
