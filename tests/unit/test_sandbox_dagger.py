"""The Dagger executor without an engine: the lazy pipeline it builds, and its error mapping.

No Dagger engine exists on this machine; nothing here pretends to be one except
where a test says "stand-in". The pipeline is inspected through the SDK's query
builder (``Container._ctx.selections``), which is not public API: dagger-io is
pinned (factory.sandbox.dagger.SDK_VERSION) for that reason.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import dagger
import gql
import pytest
from dagger._exceptions import QueryErrorValue
from pydantic import SecretStr

from factory.errors import ContainerStepError, ExecutorUnavailableError
from factory.sandbox import run_spec
from factory.sandbox.base import Job
from factory.sandbox.dagger import (
    SDK_VERSION,
    UNREACHABLE,
    DaggerConfig,
    DaggerExecutor,
    build_pipeline,
    connection_error,
    outputs_include,
)
from factory.sandbox.secrets import EnvSecretSource
from factory.spec import ContainerSpec


def selections(obj: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(field.name, dict(field.args)) for field in obj._ctx.selections]


def test_the_installed_sdk_is_the_pinned_one() -> None:
    assert metadata.version("dagger-io") == SDK_VERSION


def test_the_pipeline_maps_every_part_of_the_spec(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    single = tmp_path / "one.txt"
    single.write_text("x")
    spec = ContainerSpec(
        image="python:3.12-slim",
        command=["python", "/work/in/stats.py"],
        env={"MODE": "fast"},
        workdir="/work",
        network=True,
        caches={"/root/.cache/pip": "pip"},
    )
    job = Job(
        step_id="stats",
        secrets={"API_TOKEN": SecretStr("very-secret-value")},
        mounts={"/work/in": folder, "/etc/one.txt": single},
        caches=dict(spec.caches),
    )
    ctr = build_pipeline(dagger.Client(), spec, job, timeout=60, grace=5)
    steps = selections(ctr)
    assert [name for name, _ in steps] == [
        "container",
        "from",
        "withMountedFile",  # mounts in sorted order of their targets
        "withMountedDirectory",
        "withMountedCache",
        "withEnvVariable",
        "withSecretVariable",
        "withMountedSecret",
        "withWorkdir",
        "withExec",
    ]
    args = dict(steps[1:])
    assert args["from"] == {"address": "python:3.12-slim"}
    assert args["withMountedDirectory"]["path"] == "/work/in"
    assert selections(args["withMountedDirectory"]["source"])[-1] == ("directory", {"path": str(folder)})
    assert args["withEnvVariable"] == {"name": "MODE", "value": "fast"}
    assert args["withWorkdir"]["path"] == "/work"
    assert args["withExec"]["args"] == ["timeout", "-k", "5", "60", "python", "/work/in/stats.py"]
    assert args["withExec"]["expect"] == "ANY"
    secret = args["withSecretVariable"]["secret"]
    assert args["withSecretVariable"]["name"] == "API_TOKEN"
    assert args["withMountedSecret"]["path"] == "/run/secrets/API_TOKEN"
    assert selections(secret)[-1] == (
        "setSecret",
        {"name": "factory-stats-API_TOKEN", "plaintext": "very-secret-value"},
    )
    # The value travels only inside setSecret, never as a plain env variable.
    assert "very-secret-value" not in repr([s for s in steps if s[0] != "withSecretVariable"])


def test_outputs_are_selected_relative_to_the_workdir() -> None:
    spec = ContainerSpec(image="alpine", command=["true"], outputs=["/work/out/report.json", "/work/logs"])
    assert outputs_include(spec) == ["out/report.json", "out/report.json/**", "logs", "logs/**"]


@pytest.mark.parametrize(
    "error",
    [
        dagger.DownloadError("checksums: Name or service not known"),
        dagger.SessionError("exit status 1"),
        dagger.ClientConnectionError("connection refused"),
    ],
)
def test_every_way_of_not_reaching_an_engine_is_one_clear_error(error: Exception) -> None:
    mapped = connection_error(error)
    assert isinstance(mapped, ExecutorUnavailableError)
    assert str(mapped).startswith(UNREACHABLE)
    assert type(error).__name__ in str(mapped)


def test_other_errors_are_not_called_unreachable() -> None:
    assert connection_error(ValueError("bad")) is None
    assert connection_error(dagger.TransportError("broken response")) is None


def test_network_off_is_refused_rather_than_silently_ignored() -> None:
    with pytest.raises(ExecutorUnavailableError, match="cannot turn the network off"):
        DaggerExecutor().run(ContainerSpec(image="alpine", command=["true"]))


class _StandInExecFailure:
    """STAND-IN for an engine answering the exec with an EXEC_ERROR (what the SDK raises as ExecError)."""

    def __init__(self, *_: object) -> None:
        pass

    async def __aenter__(self) -> None:
        errors = [
            QueryErrorValue(
                message="process exited with 3",
                extensions={"_type": "EXEC_ERROR", "cmd": ["false"], "exitCode": 3, "stdout": "", "stderr": "boom"},
            )
        ]
        raise dagger.QueryError(errors, gql.GraphQLRequest(gql.gql("{ container { id } }")))

    async def __aexit__(self, *_: object) -> None:
        pass


def test_an_exec_error_becomes_a_step_failure_with_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dagger, "Connection", _StandInExecFailure)
    executor = DaggerExecutor(DaggerConfig(slot_dir=tmp_path / "slots"))
    with pytest.raises(ContainerStepError, match="exited with code 3") as caught:
        run_spec(
            ContainerSpec(image="alpine", command=["false"], network=True),
            executor,
            home=tmp_path,
            secret_source=EnvSecretSource({}),
        )
    assert str(caught.value).endswith("boom")
