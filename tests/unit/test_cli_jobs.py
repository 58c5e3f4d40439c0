"""factory submit's pure parts: the job's entrypoint, environment, address and store checks."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import typer

from factory.cli.jobs import (
    check_store_reachable,
    entrypoint,
    job_env,
    job_runtime_env,
    jobs_address,
    wait_for_job_end,
)
from factory.cli.runs import parse_inputs
from factory.errors import FactoryError
from factory.settings import Settings
from factory.spec import Workflow


def test_the_entrypoint_gives_the_job_the_inputs_back_as_they_were() -> None:
    inputs = {"n": 3, "name": 'it\'s a "test"; rm -rf /', "date": "2024-01-01", "items": [1, {"a": None}], "flag": True}
    command = entrypoint(Path("/x/y/workflow.yaml"), "0123456789ab", inputs, "agents.yaml")
    argv = shlex.split(command)
    assert argv[:6] == ["factory", "run", "workflow.yaml", "--run-id", "0123456789ab", "--json"]
    assert argv[-2:] == ["--agents", "agents.yaml"]
    pairs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--input"]
    assert parse_inputs(pairs) == inputs  # what `factory run` on the cluster reads


def test_urls_with_a_password_are_not_put_in_the_job(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        store_url="postgresql://factory:hunter2@db:5432/factory",
        events_url="redis://cache:6379/0",
    )
    env, withheld = job_env(settings)
    assert env == {"FACTORY_EVENTS_URL": "redis://cache:6379/0"}
    assert withheld == ["FACTORY_STORE_URL"]
    assert "hunter2" not in repr(env)


def test_an_embedded_store_is_refused_for_a_remote_cluster_only(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    check_store_reachable(settings, "http://127.0.0.1:8265")  # the same machine: its nodes see the file
    with pytest.raises(FactoryError, match="FACTORY_STORE_URL=postgresql"):
        check_store_reachable(settings, "http://ray-head.example:8265")
    check_store_reachable(Settings(home=tmp_path, store_url="postgresql://db/f"), "http://ray-head.example:8265")


def test_the_jobs_address_comes_from_the_option_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not the Jobs API's
    with pytest.raises(typer.Exit):
        jobs_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265/")
    assert jobs_address(None) == "http://head:8265"
    assert jobs_address("https://other:443") == "https://other:443"


def _workflow(runtime: dict[str, object] | None) -> Workflow:
    data: dict[str, object] = {"name": "w", "steps": [{"id": "a", "python": "steps:f"}]}
    if runtime is not None:
        data["runtime"] = runtime
    return Workflow.model_validate(data)


def test_the_job_installs_what_the_workflow_declares(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "requirements.txt").write_text("# pinned\nrequests==2.32.3  # http\n\ntabulate\n")
    env = job_runtime_env(_workflow({"requirements": "requirements.txt", "py_modules": ["lib"]}), tmp_path, {"A": "1"})
    assert env == {
        "working_dir": str(tmp_path),
        "env_vars": {"A": "1"},
        "pip": ["requests==2.32.3", "tabulate"],
        "py_modules": [str((tmp_path / "lib").resolve())],
    }
    listed = job_runtime_env(_workflow({"requirements": ["tabulate>=0.9"]}), tmp_path, {})
    assert listed["pip"] == ["tabulate>=0.9"] and "py_modules" not in listed
    assert job_runtime_env(_workflow(None), tmp_path, {}) == {"working_dir": str(tmp_path), "env_vars": {}}


def test_a_runtime_file_that_is_not_there_is_named(tmp_path: Path) -> None:
    with pytest.raises(FactoryError, match=r"requirements\.txt is not a file"):
        job_runtime_env(_workflow({"requirements": "requirements.txt"}), tmp_path, {})
    with pytest.raises(FactoryError, match="shared_lib does not exist"):
        job_runtime_env(_workflow({"py_modules": ["../shared_lib"]}), tmp_path, {})


def test_a_runtime_is_bounded() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at most 200 requirements"):
        _workflow({"requirements": [f"p{i}" for i in range(201)]})
    with pytest.raises(ValidationError):
        _workflow({"py_modules": [f"m{i}" for i in range(21)]})
    with pytest.raises(ValidationError):
        _workflow({"pip": ["x"]})  # unknown field: a typo is an error, not ignored


class ScriptedJobs:
    """Stands in for Ray's JobSubmissionClient (unit tests have no cluster): answers
    get_job_status from a script, the last answer repeating."""

    def __init__(self, *answers: str | Exception) -> None:
        self.answers = list(answers)
        self.asked = 0

    def get_job_status(self, job_id: str) -> str:
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        if isinstance(answer, Exception):
            raise answer
        return f"JobStatus.{answer}"


def test_following_a_job_waits_for_its_process_to_exit_after_the_run_ended() -> None:
    # the run's end is in the store before the job's process has exited (ray.shutdown, the
    # job supervisor noticing): `factory submit --follow` reports the job's own end
    jobs = ScriptedJobs("RUNNING", "RUNNING", "SUCCEEDED")
    assert wait_for_job_end(jobs, "factory-x", grace=10) == "SUCCEEDED"
    assert jobs.asked == 3


def test_a_job_that_does_not_exit_is_reported_as_it_stands_after_the_grace() -> None:
    jobs = ScriptedJobs("RUNNING")
    assert wait_for_job_end(jobs, "factory-x", grace=0.3) == "RUNNING"
    assert 1 < jobs.asked < 10


def test_a_cluster_gone_after_the_run_ended_does_not_hide_the_runs_result() -> None:
    assert wait_for_job_end(ScriptedJobs(ConnectionError("refused")), "factory-x", grace=10) == "UNREACHABLE"
