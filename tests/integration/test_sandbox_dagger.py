"""The Dagger executor's connection path, as far as it goes without an engine.

The SDK starts a CLI as ``<cli> session``, reads one JSON line with a port and a
token, and talks GraphQL to that port. Here the CLI is a STAND-IN
(tests/fixtures/dagger_standin_cli.py) whose "engine" answers 503: the test
proves the SDK started it, spoke the session protocol and authenticated with the
token, and that the failure reaches the user as the one clear message.

The last test needs a live engine and is skipped unless one is reachable
(``DAGGER_SESSION_PORT``, as ``dagger run`` sets, or a runner host).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from factory.errors import ExecutorUnavailableError
from factory.sandbox import run_spec
from factory.sandbox.dagger import CLI_ENV, UNREACHABLE, DaggerConfig, DaggerExecutor
from factory.sandbox.secrets import EnvSecretSource
from factory.spec import ContainerSpec

STANDIN_CLI = Path(__file__).parent.parent / "fixtures" / "dagger_standin_cli.py"
LIVE_ENGINE = bool(os.environ.get("DAGGER_SESSION_PORT") or os.environ.get("_EXPERIMENTAL_DAGGER_RUNNER_HOST"))


@pytest.fixture
def no_session(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DAGGER_SESSION_PORT", "DAGGER_SESSION_TOKEN", CLI_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing lands in the real cache


def executor(tmp_path: Path) -> DaggerExecutor:
    return DaggerExecutor(DaggerConfig(slot_dir=tmp_path / "slots", connect_timeout=5))


@pytest.mark.usefixtures("no_session")
def test_a_standin_cli_is_started_and_its_session_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if shutil.which("python3") is None:
        pytest.skip("the stand-in CLI needs python3 on PATH")
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    monkeypatch.setenv(CLI_ENV, str(STANDIN_CLI))
    spec = ContainerSpec(image="alpine:3.20", command=["echo", "hi"], network=True)
    with pytest.raises(ExecutorUnavailableError) as caught:
        executor(tmp_path).run(spec)
    assert str(caught.value).startswith(UNREACHABLE)
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert entries[0]["argv"][0] == "session" and "dagger.io/sdk.name:python" in entries[0]["argv"]
    requests = [e for e in entries[1:] if "path" in e]
    assert requests, "the SDK never reached the stand-in engine's port"
    token = base64.b64encode(b"standin-session-token:").decode()
    assert all(r["path"] == "/query" and r["authorization"] == f"Basic {token}" for r in requests)


@pytest.mark.usefixtures("no_session")
def test_a_cli_path_that_does_not_exist_is_the_same_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CLI_ENV, str(tmp_path / "no-such-dagger"))
    with pytest.raises(ExecutorUnavailableError, match="no Dagger engine reachable") as caught:
        executor(tmp_path).run(ContainerSpec(image="alpine:3.20", command=["true"], network=True))
    assert "SessionError" in str(caught.value)


@pytest.mark.dagger
@pytest.mark.skipif(not LIVE_ENGINE, reason="needs a live Dagger engine (DAGGER_SESSION_PORT or a runner host)")
def test_on_a_live_engine_a_step_runs_and_brings_back_its_outputs(tmp_path: Path) -> None:  # pragma: no cover
    spec = ContainerSpec(
        image="alpine:3.20",
        command=["sh", "-c", "mkdir -p out && cat /run/secrets/TOKEN | wc -c > out/n.txt && echo done"],
        secrets=["TOKEN"],
        outputs=["/work/out/n.txt"],
        network=True,
        timeout=120,
    )
    out = run_spec(
        spec, executor(tmp_path), home=tmp_path, secret_source=EnvSecretSource({"FACTORY_SECRET_TOKEN": "abcdefgh"})
    )
    assert out["stdout"] == "done\n" and out["artifacts"]["n.txt"]["size"] > 0
    with pytest.raises(Exception, match="timeout"):
        run_spec(
            ContainerSpec(image="alpine:3.20", command=["sleep", "30"], network=True, timeout=2),
            executor(tmp_path),
            home=tmp_path,
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
