"""The Dagger executor: a container spec mapped onto the dagger-io SDK (pinned: 0.21.11).

The pipeline for a spec (built lazily by :func:`build_pipeline`, nothing runs
until a value is awaited)::

    container().from_(image)
      .with_mounted_directory / with_mounted_file     (mounts, read-only inputs)
      .with_mounted_cache(path, cache_volume(name))    (caches, kept between runs)
      .with_env_variable                               (env)
      .with_secret_variable + with_mounted_secret      (set_secret: env var and /run/secrets/NAME)
      .with_workdir(workdir)
      .with_exec(["timeout", "-k", GRACE, T, *argv], expect=ReturnType.ANY)
    then exit_code(), stdout(), stderr(), and the outputs exported from the workdir.

The SDK has no per-exec timeout, so the step's timeout is enforced twice: by
``timeout`` inside the container (the image needs coreutils or busybox) and by
``anyio.fail_after`` around the whole call. How the SDK finds an engine: an
existing session (``DAGGER_SESSION_PORT`` + ``DAGGER_SESSION_TOKEN``, set by
``dagger run``), else a CLI (``_EXPERIMENTAL_DAGGER_CLI_BIN``, else it downloads
one) that it starts as ``dagger session``. Every way of failing to reach an
engine becomes one :class:`~factory.errors.ExecutorUnavailableError`.

Dagger gives every exec the engine's network: ``network: false`` cannot be
enforced, so such a spec is refused unless the config allows it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from factory.errors import ExecutorUnavailableError
from factory.sandbox.artifacts import collect_outputs, output_name
from factory.sandbox.base import STDERR_TAIL_CHARS, STDOUT_TAIL_CHARS, ExecResult, Job
from factory.sandbox.redaction import Redactor
from factory.sandbox.slots import SlotPool
from factory.spec import ContainerSpec

if TYPE_CHECKING:
    import dagger as dagger_sdk

SDK_VERSION = "0.21.11"
UNREACHABLE = "no Dagger engine reachable: run under `dagger run`, set the CLI path, or use executor: local"
CLI_ENV = "_EXPERIMENTAL_DAGGER_CLI_BIN"
TIMEOUT_EXIT_CODE = 124  # what `timeout` returns when it stopped the command


class DaggerConfig(BaseModel):
    """Settings of the Dagger executor (see docs/isolation.md)."""

    cli_bin: str | None = Field(default=None, description="Dagger CLI to start sessions with (no download).")
    max_concurrency: int = Field(default=4, ge=1, description="Dagger executions at once on this machine.")
    slot_dir: Path = Field(default=Path(tempfile.gettempdir()) / "factory-dagger-slots")
    connect_timeout: float = Field(default=30.0, gt=0, description="Seconds to wait for the engine connection.")
    default_timeout: float = Field(default=3600.0, gt=0)
    kill_grace: float = Field(default=5.0, ge=0, description="`timeout -k`: SIGKILL this long after SIGTERM.")
    allow_network_when_off: bool = Field(
        default=False, description="Run `network: false` specs anyway (Dagger cannot turn the network off)."
    )


def _sdk() -> Any:
    try:
        import dagger
    except ImportError:
        raise ExecutorUnavailableError(
            f"the Dagger executor needs dagger-io=={SDK_VERSION} (pip install dagger-io=={SDK_VERSION}), "
            "or use executor: local"
        ) from None
    return dagger


def connection_error(exc: BaseException) -> ExecutorUnavailableError | None:
    """The one clear error for every way of not reaching an engine; None for other errors."""
    dagger = _sdk()
    unreachable = (dagger.DownloadError, dagger.ClientConnectionError, dagger.SessionError, dagger.ProvisionError)
    if isinstance(exc, unreachable):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ExecutorUnavailableError(f"{UNREACHABLE} ({type(exc).__name__}: {first})")
    return None


def timeout_argv(command: list[str], timeout: float, grace: float) -> list[str]:
    return ["timeout", "-k", f"{grace:g}", f"{timeout:g}", *command]


def build_pipeline(
    client: dagger_sdk.Client, spec: ContainerSpec, job: Job, timeout: float, grace: float = 5.0
) -> dagger_sdk.Container:
    """The lazy container pipeline for a spec; nothing is sent to an engine until a value is awaited."""
    dagger = _sdk()
    ctr = client.container().from_(spec.image)
    for target, host in sorted(job.mounts.items()):
        if host.is_dir():
            ctr = ctr.with_mounted_directory(target, client.host().directory(str(host)))
        else:
            ctr = ctr.with_mounted_file(target, client.host().file(str(host)))
    for target, name in sorted(job.caches.items()):  # names as run_spec resolved them (per key)
        ctr = ctr.with_mounted_cache(target, client.cache_volume(f"factory-{name}"))
    for key, value in spec.env.items():
        ctr = ctr.with_env_variable(key, value)
    for name, secret_value in sorted(job.secrets.items()):
        secret = client.set_secret(f"factory-{job.step_id}-{name}", secret_value.get_secret_value())
        ctr = ctr.with_secret_variable(name, secret).with_mounted_secret(f"/run/secrets/{name}", secret)
    ctr = ctr.with_workdir(spec.workdir)
    return ctr.with_exec(timeout_argv(spec.command, timeout, grace), expect=dagger.ReturnType.ANY)


def outputs_include(spec: ContainerSpec) -> list[str]:
    """Include patterns (relative to the workdir) that select the declared outputs."""
    patterns: list[str] = []
    for output in spec.outputs:
        rel = output_name(output, spec.workdir)
        patterns += [rel, f"{rel}/**"]
    return patterns


class DaggerExecutor:
    """Runs a container spec on a Dagger engine."""

    name = "dagger"

    def __init__(self, config: DaggerConfig | None = None) -> None:
        self.config = config or DaggerConfig()
        self._slots = SlotPool(self.config.slot_dir, self.config.max_concurrency)

    def run(self, spec: ContainerSpec, job: Job | None = None) -> ExecResult:
        import anyio

        job = job or Job()
        if not spec.network and not self.config.allow_network_when_off:
            raise ExecutorUnavailableError(
                "the Dagger executor cannot turn the network off: set network: true for this step, "
                "or use executor: local (which runs with no network)"
            )
        for output in spec.outputs:
            output_name(output, spec.workdir)
        if self.config.cli_bin and not os.environ.get(CLI_ENV):
            os.environ[CLI_ENV] = self.config.cli_bin
        timeout = job.timeout or spec.timeout or self.config.default_timeout
        with self._slots.acquire():
            result: ExecResult = anyio.run(self._run, spec, job, timeout)
        return result

    async def _run(self, spec: ContainerSpec, job: Job, timeout: float) -> ExecResult:
        import anyio

        dagger = _sdk()
        started = time.perf_counter()
        outer = timeout + self.config.kill_grace + self.config.connect_timeout
        try:
            with anyio.fail_after(outer):
                async with dagger.Connection(dagger.Config(timeout=int(self.config.connect_timeout))) as client:
                    ctr = build_pipeline(client, spec, job, timeout, self.config.kill_grace)
                    exit_code = await ctr.exit_code()
                    stdout = await ctr.stdout()
                    stderr = await ctr.stderr()
                    artifacts: dict[str, Path] = {}
                    if exit_code == 0 and spec.outputs:
                        artifacts = await self._export(client, ctr, spec, job)
        except TimeoutError:
            return ExecResult(
                exit_code=TIMEOUT_EXIT_CODE,
                duration=time.perf_counter() - started,
                timed_out=True,
                reason=f"it ran past its timeout of {timeout:g}s (the Dagger call was abandoned)",
            )
        except dagger.ExecError as exc:  # only when a later call fails on the exec
            exit_code, stdout, stderr, artifacts = int(exc.exit_code), exc.stdout, exc.stderr, {}
        except Exception as exc:
            mapped = connection_error(exc)
            if mapped is not None:
                raise mapped from exc
            raise
        # The engine hands the whole text over at the end: redact it whole, before it is split or cut.
        redact = Redactor(job.secrets)
        stdout, stderr = redact(stdout), redact(stderr)
        for stream, text in (("stdout", stdout), ("stderr", stderr)):
            if job.on_line is not None:
                for line in text.splitlines(keepends=True):
                    job.on_line(stream, line)  # type: ignore[arg-type]
        timed_out = exit_code == TIMEOUT_EXIT_CODE
        return ExecResult(
            exit_code=exit_code,
            stdout=stdout[-STDOUT_TAIL_CHARS:],
            stderr=stderr[-STDERR_TAIL_CHARS:],
            artifacts=artifacts,
            duration=time.perf_counter() - started,
            timed_out=timed_out,
            reason=f"it ran past its timeout of {timeout:g}s and was stopped by `timeout`" if timed_out else None,
            enforced=[f"container image {spec.image}", f"timeout {timeout:g}s (inside and around the call)"],
        )

    async def _export(
        self, client: dagger_sdk.Client, ctr: dagger_sdk.Container, spec: ContainerSpec, job: Job
    ) -> dict[str, Path]:
        outputs_dir = job.outputs_dir or Path(tempfile.mkdtemp(prefix="factory-outputs-"))
        with tempfile.TemporaryDirectory(prefix="factory-dagger-export-") as tmp:
            selected = client.directory().with_directory(
                ".", ctr.directory(spec.workdir), include=outputs_include(spec)
            )
            await selected.export(tmp)
            found: dict[str, Path] = {}
            for name, path in collect_outputs(Path(tmp), spec.outputs, spec.workdir).items():
                dest = outputs_dir / PurePosixPath(name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(path.read_bytes())
                found[name] = dest
            return found
