"""The executor boundary: what a container step asks for and what comes back.

An :class:`Executor` runs one :class:`~factory.spec.ContainerSpec` with a :class:`Job`
(the spec's secrets resolved, its mounts prepared as host paths, the effective
timeout, a callback for log lines) and returns an :class:`ExecResult`. The local
executor and the Dagger executor take the same inputs and return the same shape.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from factory.spec import ContainerSpec

# "notice": a line from the executor itself about the step (a refused network destination, ...).
Stream = Literal["stdout", "stderr", "notice"]
LineSink = Callable[[Stream, str], None]

# How much of stdout / stderr a result keeps (the tail).
STDOUT_TAIL_CHARS = 64_000
STDERR_TAIL_CHARS = 16_000


class Job(BaseModel):
    """Everything an executor needs besides the spec; built by :func:`factory.sandbox.run_container_step`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    step_id: str = "step"
    secrets: dict[str, SecretStr] = Field(default_factory=dict, description="Secret name -> value; never logged.")
    mounts: dict[str, Path] = Field(
        default_factory=dict, description="Container path -> host path (file or directory), mounted read-only."
    )
    caches: dict[str, str] = Field(
        default_factory=dict, description="Container path -> cache name: a folder kept between runs, writable."
    )
    timeout: float | None = Field(default=None, gt=0, description="Seconds; the effective timeout of the step.")
    outputs_dir: Path | None = Field(default=None, description="Where the executor puts the output files.")
    on_line: LineSink | None = Field(
        default=None, exclude=True, description="Called with each line as it comes, already redacted of secrets."
    )


class ExecResult(BaseModel):
    """What one execution produced. ``artifacts`` maps an output's name to the host file collected."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    artifacts: dict[str, Path] = Field(default_factory=dict)
    duration: float = 0.0
    timed_out: bool = False
    reason: str | None = Field(default=None, description="Which limit stopped the command, if one did.")
    enforced: list[str] = Field(default_factory=list, description="The guards that were in force.")


class Executor(Protocol):
    """Runs a container spec in isolation."""

    name: str

    def run(self, spec: ContainerSpec, job: Job | None = None) -> ExecResult:
        """Run the command to its end (or its timeout) and collect the declared outputs."""
        ...


def effective_timeout(*timeouts: float | None) -> float | None:
    """The smallest of the given timeouts, None if none is set."""
    given = [t for t in timeouts if t is not None]
    return min(given) if given else None


class TailBuffer:
    """Keeps the last ``limit`` characters written to it; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: collections.deque[str] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._chunks.append(text)
            self._size += len(text)
            while self._size - len(self._chunks[0]) >= self.limit and len(self._chunks) > 1:
                self._size -= len(self._chunks.popleft())

    def getvalue(self) -> str:
        with self._lock:
            return "".join(self._chunks)[-self.limit :]


def tail_lines(text: str, lines: int = 20, chars: int = 2_000) -> str:
    """The last lines of a text, bounded in characters, for error messages."""
    kept = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return kept[-chars:]
