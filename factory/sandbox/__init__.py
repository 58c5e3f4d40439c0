"""Isolated container steps: one spec, two executors (local bubblewrap, Dagger).

:func:`run_container_step` is what the runtime calls for a ``container:`` step:
it validates the resolved spec, resolves its secrets, prepares its mounts (host
paths and artifacts of earlier steps), runs it on the chosen executor while
streaming its lines into the step's log, stores its outputs as content-addressed
artifacts and returns the step's output. A non-zero exit raises
:class:`~factory.errors.ContainerStepError` (the tail of stderr in the message),
a timeout :class:`~factory.errors.ContainerTimeoutError`. Secret values are
replaced by ``***`` in everything returned or logged, in their common encodings
too, and wherever text is cut (:mod:`factory.sandbox.redaction`).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from factory.errors import ContainerStepError, ContainerTimeoutError, ExecutorUnavailableError, StepInputError
from factory.policy import cache_name, check_secret_grants, owner_namespace
from factory.sandbox.artifacts import ArtifactStore, prepare_mount, store_outputs
from factory.sandbox.base import (
    STDERR_TAIL_CHARS,
    STDOUT_TAIL_CHARS,
    ExecResult,
    Executor,
    Job,
    Stream,
    effective_timeout,
    tail_lines,
)
from factory.sandbox.redaction import LineRedactor
from factory.sandbox.secrets import Redactor, SecretSource, default_source, resolve_secrets
from factory.settings import Settings, settings_from
from factory.spec import ContainerSpec
from factory.store import RunGrants


class ContainerCall(Protocol):
    """What run_container_step reads of :class:`factory.runtime.StepCall`."""

    @property
    def step_id(self) -> str: ...
    @property
    def executor(self) -> str | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def search_path(self) -> tuple[str, ...]: ...
    @property
    def container_settings(self) -> dict[str, Any] | None: ...


__all__ = [
    "DEFAULT_EXECUTOR",
    "EXECUTORS",
    "ExecResult",
    "Executor",
    "Job",
    "get_executor",
    "run_container_step",
    "run_spec",
]

DEFAULT_EXECUTOR = "local"  # used when a step has no `executor:`; to move into Settings
EXECUTORS = ("local", "dagger")


def _prefixed(settings: Settings | None, prefix: str) -> dict[str, Any]:
    """Settings fields named ``<prefix>NAME`` that are set, as ``{NAME: value}``."""
    if settings is None:
        return {}
    return {
        key.removeprefix(prefix): value
        for key, value in settings
        if key.startswith(prefix) and value is not None and value != {}
    }


def get_executor(name: str | None, settings: Settings | None = None) -> Executor:
    """The executor called ``name`` (default: :data:`DEFAULT_EXECUTOR`), configured from ``settings``.

    Settings fields ``sandbox_*`` configure the local executor (``sandbox_rootfs``,
    ``sandbox_scratch_root``, ...) and ``dagger_*`` the Dagger executor
    (``dagger_cli_bin``, ``dagger_max_concurrency``, ...); see docs/isolation.md.
    """
    name = name or getattr(settings, "container_executor", None) or DEFAULT_EXECUTOR
    if name == "local":
        from factory.sandbox.local import LocalConfig, LocalExecutor

        return LocalExecutor(LocalConfig.model_validate(_prefixed(settings, "sandbox_")))
    if name == "dagger":
        from factory.sandbox.dagger import DaggerConfig, DaggerExecutor

        return DaggerExecutor(DaggerConfig.model_validate(_prefixed(settings, "dagger_")))
    raise ExecutorUnavailableError(f"unknown executor {name!r}: use one of {', '.join(EXECUTORS)}")


def run_spec(
    spec: ContainerSpec,
    executor: Executor,
    *,
    home: Path,
    step_id: str = "step",
    timeout: float | None = None,
    base_dir: Path | None = None,
    secret_source: SecretSource | None = None,
    logs: io.StringIO | None = None,
    grants: RunGrants | None = None,
) -> dict[str, Any]:
    """Run one container spec and return the step's output (JSON-serialisable).

    With ``grants`` (a run submitted over the API): only the secrets granted to it resolve,
    no host path is mounted, and its artifacts and caches live in its key's namespace."""
    store = ArtifactStore(home / "artifacts")
    owner = owner_namespace(grants)
    if grants is not None:
        check_secret_grants(grants, spec.secrets)
        if not grants.host_mounts:
            base_dir = None
    secrets = resolve_secrets(spec.secrets, secret_source or default_source(home))
    redact = Redactor(secrets)
    # Whatever the executor does, the log gets each stream through a streaming redactor of its own,
    # so a secret split across the executor's lines or pieces is still masked.
    streams: dict[Stream, LineRedactor] = {name: LineRedactor(redact) for name in ("stdout", "stderr", "notice")}
    lock = threading.Lock()  # lines come from the executor's reader and, for notices, other threads

    def write_lines(stream: Stream, lines: list[str]) -> None:
        if logs is not None:
            logs.write("".join(f"[stderr] {line}" if stream == "stderr" else line for line in lines))

    def on_line(stream: Stream, line: str) -> None:
        with lock:
            write_lines(stream, streams[stream].feed(line))

    def flush_lines() -> None:
        with lock:
            for stream, lines in streams.items():
                write_lines(stream, lines.flush())

    with tempfile.TemporaryDirectory(prefix="factory-step-") as tmp:
        os.chmod(tmp, 0o711)  # the sandbox's uid reaches the staged mounts, nothing else here
        staging, outputs_dir = Path(tmp) / "mounts", Path(tmp) / "outputs"
        staging.mkdir(mode=0o755)
        outputs_dir.mkdir(mode=0o700)
        mounts = {
            target: prepare_mount(store, target, value, staging, base_dir, owner)[0]
            for target, value in spec.mounts.items()
        }
        job = Job(
            step_id=step_id,
            secrets=secrets,
            mounts=mounts,
            caches={target: cache_name(name, owner) for target, name in spec.caches.items()},
            timeout=effective_timeout(spec.timeout, timeout),
            outputs_dir=outputs_dir,
            on_line=on_line,
        )
        if logs is not None:
            logs.write(redact(f"[{executor.name}] {spec.image}: {shlex.join(spec.command)}\n"))
        try:
            result = executor.run(spec, job)
        finally:
            flush_lines()
        # The tails were cut from longer text: a fragment of a secret at the cut is masked too.
        stdout = redact.redact_cut(result.stdout, head=len(result.stdout) >= STDOUT_TAIL_CHARS)
        stderr = redact.redact_cut(result.stderr, head=len(result.stderr) >= STDERR_TAIL_CHARS)
        if result.timed_out or result.exit_code != 0:
            _raise_failure(result, spec, stderr)
        artifacts = store_outputs(store, result.artifacts, owner)
    return {
        "exit_code": result.exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "duration": round(result.duration, 6),
        "artifacts": artifacts,
        "executor": executor.name,
    }


def _raise_failure(result: ExecResult, spec: ContainerSpec, stderr: str) -> None:
    because = f": {result.reason}" if result.reason else ""
    tail = tail_lines(stderr)
    detail = f"\n--- last lines of stderr ---\n{tail}" if tail else " (stderr was empty)"
    if result.timed_out:
        raise ContainerTimeoutError(
            f"{spec.command[0]} was stopped{because}; raise `timeout` or make the command faster{detail}",
            exit_code=result.exit_code,
            reason=result.reason,
        )
    raise ContainerStepError(
        f"{spec.command[0]} exited with code {result.exit_code}{because}{detail}",
        exit_code=result.exit_code,
        reason=result.reason,
    )


def _text(value: Any) -> Any:
    """A scalar that a whole ``${...}`` reference made non-text (``${inputs.n}`` -> 3) becomes text."""
    if isinstance(value, str) or (not isinstance(value, int | float | bool) and value is not None):
        return value
    return json.dumps(value)


def _argv_as_text(spec: dict[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    if isinstance(spec.get("command"), list):
        spec["command"] = [_text(item) for item in spec["command"]]
    if isinstance(spec.get("env"), dict):
        spec["env"] = {key: _text(value) for key, value in spec["env"].items()}
    return spec


def run_container_step(call: ContainerCall, spec: dict[str, Any], logs: io.StringIO) -> dict[str, Any]:
    """Entry point from :mod:`factory.runtime` for a container step with resolved references."""
    try:
        container = ContainerSpec.model_validate(_argv_as_text(spec))
    except ValidationError as exc:
        raise StepInputError(f"step {call.step_id!r}: invalid container spec: {exc}") from None
    if call.container_settings is None:
        raise StepInputError(f"step {call.step_id!r}: the coordinator sent no executor settings with the call")
    settings = settings_from(call.container_settings)  # the coordinator's, not this worker's environment
    home = Path(getattr(call, "home", None) or settings.home)
    workflow_dir = getattr(call, "base_dir", None)  # the workflow's own folder, if it came from a file
    base_dir = Path(workflow_dir) if workflow_dir else None
    secrets_dir = getattr(settings, "secrets_dir", None)
    return run_spec(
        container,
        get_executor(call.executor, settings),
        home=home,
        step_id=call.step_id,
        timeout=call.timeout,
        base_dir=base_dir,
        secret_source=default_source(home, Path(secrets_dir) if secrets_dir else None),
        logs=logs,
        grants=getattr(call, "grants", None),
    )
