"""`factory route` and `factory models pull` as a user runs them, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.routing_support import CATALOG_DATA, model_cache_dir

# Like the `factory` script. (`python -m factory.cli` runs main() before the command modules register.)
FACTORY = [sys.executable, "-c", "from factory.cli import main; main()"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environ = dict(os.environ)
    environ["FACTORY_HOME"] = str(tmp_path / "home")
    environ["COLUMNS"] = "200"
    environ.pop("FACTORY_EMBEDDING_MODEL_PATH", None)
    environ.pop("FACTORY_ROUTER_SCORER", None)
    return environ


@pytest.fixture
def agents(tmp_path: Path) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(CATALOG_DATA), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return model_cache_dir()


def factory(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FACTORY, *args], env=env, capture_output=True, text=True, timeout=120)


def test_route_prints_the_decision(env: dict[str, str], agents: Path) -> None:
    result = factory(env, "route", "Please summarise these long reports", "--agents", str(agents))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("summarizer") and "lexical" in lines[0]
    assert "summarizer fits the task best" in result.stdout
    # Every agent appears with its scores: the winner and the runners-up.
    for name in ("translator", "coder", "sql"):
        assert any(line.split()[:1] == [name] for line in lines), result.stdout


def test_route_json_with_capabilities(env: dict[str, str], agents: Path) -> None:
    result = factory(env, "route", "Summarize this", "--agents", str(agents), "-c", "code", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["agent"] in {"coder", "sql"} and data["scorer"] == "lexical"
    assert set(data["filtered_out"]) == {"summarizer", "translator"}
    assert {"semantic", "load", "total"} <= set(data["breakdown"])
    assert [r["agent"] for r in data["runners_up"]] == [({"coder", "sql"} - {data["agent"]}).pop()]


def test_route_with_no_eligible_agent_exits_1(env: dict[str, str], agents: Path) -> None:
    result = factory(env, "route", "anything", "--agents", str(agents), "-c", "gpu")
    assert result.returncode == 1
    assert "no agent can take this task" in result.stderr and "coder: missing capabilities: gpu" in result.stderr
    as_json = factory(env, "route", "anything", "--agents", str(agents), "-c", "gpu", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["filtered_out"]["sql"] == "missing capabilities: gpu"


def test_route_with_resources(env: dict[str, str], agents: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(agents.read_text(encoding="utf-8"))
    data["agents"][1]["pool"] = {"num_gpus": 1}  # the translator's replicas hold a GPU
    gpu_agents = tmp_path / "gpu_agents.yaml"
    gpu_agents.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = factory(env, "route", "Summarize this", "--agents", str(gpu_agents), "-r", "GPU=1", "--json")
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["agent"] == "translator"  # the only one with a GPU, however the text reads
    assert decision["filtered_out"]["summarizer"] == "lacks resources: GPU 1 (a replica holds GPU 0)"
    bad = factory(env, "route", "x", "--agents", str(agents), "--resource", "GPU")
    assert bad.returncode == 2 and "write NAME=AMOUNT" in bad.stderr


def test_route_reports_unusable_input(env: dict[str, str], agents: Path, tmp_path: Path) -> None:
    bad = factory(env, "route", "x", "--agents", str(agents), "--scorer", "nope")
    assert bad.returncode == 2 and "unknown scorer 'nope'" in bad.stderr
    missing = factory(env, "route", "x", "--agents", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "cannot read the catalogue" in missing.stderr
    no_model = factory(env, "route", "x", "--agents", str(agents), "--scorer", "embedding")
    assert no_model.returncode == 2 and "factory models pull" in no_model.stderr


def test_embedding_route_and_models_pull(env: dict[str, str], agents: Path, minilm_dir: Path) -> None:
    pulled = factory(env, "models", "pull", "--path", str(minilm_dir))
    assert pulled.returncode == 0, pulled.stderr
    assert str(minilm_dir) in pulled.stdout.replace("\n", "")
    env["FACTORY_EMBEDDING_MODEL_PATH"] = str(minilm_dir)
    result = factory(
        env, "route", "Turn this paragraph into French", "--agents", str(agents), "-s", "embedding", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["agent"] == "translator" and data["scorer"] == "embedding"
    # The default scorer comes from the settings.
    env["FACTORY_ROUTER_SCORER"] = "embedding"
    by_setting = factory(env, "route", "Fix the crash in my Python script", "--agents", str(agents), "--json")
    assert by_setting.returncode == 0, by_setting.stderr
    assert json.loads(by_setting.stdout)["scorer"] == "embedding"


def test_route_correct_then_explain(env: dict[str, str], agents: Path) -> None:
    text = "Please tidy up the wording of our onboarding handbook"
    first = json.loads(factory(env, "route", text, "--agents", str(agents), "--json").stdout)
    right = "translator" if first["agent"] != "translator" else "sql"
    bad = factory(env, "route", text, "--agents", str(agents), "--correct", "astronaut")
    assert bad.returncode == 2 and "no such agent" in bad.stderr
    corrected = factory(env, "route", text, "--agents", str(agents), "--correct", right)
    assert corrected.returncode == 0, corrected.stderr
    assert f"go to {right} from now on" in corrected.stderr
    explained = factory(env, "route", text, "--agents", str(agents), "--explain")
    assert explained.stdout.startswith(right), explained.stdout
    assert f"correction {right} (similarity 1.00): {text}" in explained.stdout
