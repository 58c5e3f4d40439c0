"""The Factory on a Ray cluster of three nodes on this machine (`ray start` head and two
workers, token authentication on, ports of their own): `factory submit` runs a workflow as a
Ray job whose steps go to the nodes they ask for, `factory jobs` lists it, a client without
the token gets a clear error, and a worker node killed mid-run costs no run.

The workflow's own module (steps.py) travels to the cluster in the job's working_dir."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.ray_nodes import LocalRayCluster, run_driver

REPO = Path(__file__).parent.parent.parent
FACTORY = [sys.executable, "-m", "factory.cli"]

STEPS_MODULE = textwrap.dedent(
    """
    import os
    import time

    import ray


    def where(label: str) -> dict:
        return {"label": label, "node": ray.get_runtime_context().get_node_id()}


    def greet_with_lib(name: str) -> str:
        import labtools  # shipped by the job's runtime_env (py_modules), from outside the working_dir

        return labtools.greet(name)


    def figlet_version() -> str:
        import pyfiglet  # installed on the node by the job's runtime_env (runtime.requirements)

        return pyfiglet.__version__


    def record(path: str, value: str, seconds: float) -> str:
        with open(path, "a") as fh:
            fh.write(value + "\\n")
        time.sleep(seconds)
        return value
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    nodes = LocalRayCluster()
    try:
        nodes.start_head(num_cpus=1)
        nodes.add_worker("a", num_cpus=1, resources={"node_a": 1})
        nodes.add_worker("b", num_cpus=1, resources={"node_b": 1})
        yield nodes
    finally:
        nodes.stop()


def factory(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FACTORY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def workflow_folder(tmp_path: Path, doc: dict[str, Any]) -> Path:
    folder = tmp_path / "wf"
    folder.mkdir()
    (folder / "steps.py").write_text(STEPS_MODULE)
    (folder / "workflow.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder / "workflow.yaml"


@pytest.fixture
def client_env(cluster: LocalRayCluster, postgres_url: str, tmp_path: Path) -> dict[str, str]:
    return {**cluster.env, "FACTORY_HOME": str(tmp_path / "client-home"), "FACTORY_STORE_URL": postgres_url}


def test_submit_runs_steps_on_the_nodes_they_ask_for(
    cluster: LocalRayCluster, client_env: dict[str, str], tmp_path: Path
) -> None:
    workflow = workflow_folder(
        tmp_path,
        {
            "name": "placed",
            "inputs": {"tag": "x"},
            "steps": [
                {"id": "on_a", "python": "steps:where", "with": {"label": "${inputs.tag}"}, "resources": {"node_a": 1}},
                {"id": "on_b", "python": "steps:where", "with": {"label": "b"}, "resources": {"node_b": 1}},
            ],
        },
    )
    started = time.monotonic()
    done = factory(
        client_env, "submit", str(workflow), "--address", cluster.jobs_address, "--follow", "--json", "-i", "tag=t1"
    )
    assert done.returncode == 0, done.stdout + done.stderr + cluster.logs("head")
    result = json.loads(done.stdout)
    print(f"\nfactory submit --follow: {time.monotonic() - started:.1f}s for a two-step workflow as a Ray job")
    assert result["status"] == "succeeded" and result["job_id"] == f"factory-{result['run_id']}"
    on_a, on_b = result["outputs"]["on_a"], result["outputs"]["on_b"]
    assert on_a["label"] == "t1" and on_b["label"] == "b"  # the input reached the job as given
    assert on_a["node"] != on_b["node"]  # each on the node holding its resource
    assert result["job_status"] == "SUCCEEDED"  # --follow returns once the job's process has exited too

    jobs = factory(client_env, "jobs", "--address", cluster.jobs_address, "--json")
    assert jobs.returncode == 0, jobs.stderr
    listed = {row["run_id"]: row for row in json.loads(jobs.stdout)}
    assert listed[result["run_id"]]["run_status"] == "succeeded"
    assert listed[result["run_id"]]["job_status"] == "SUCCEEDED"
    status = factory(client_env, "status", result["run_id"], "--json")
    assert json.loads(status.stdout)["status"] == "succeeded"  # the run is in the shared store


def test_submit_ships_the_py_modules_the_workflow_declares(
    cluster: LocalRayCluster, client_env: dict[str, str], tmp_path: Path
) -> None:
    """A package beside the workflow's folder (not in its working_dir), named in `runtime.py_modules`,
    is importable by the steps on the cluster; without it the same step fails to import it."""
    lib = tmp_path / "labtools"
    lib.mkdir()
    (lib / "__init__.py").write_text("def greet(name):\n    return 'hello ' + name + ' from labtools'\n")
    doc = {
        "name": "with-lib",
        "runtime": {"py_modules": ["../labtools"]},
        "steps": [
            {"id": "greet", "python": "steps:greet_with_lib", "with": {"name": "ada"}, "retry": {"max_attempts": 1}}
        ],
    }
    workflow = workflow_folder(tmp_path, doc)
    done = factory(client_env, "submit", str(workflow), "--address", cluster.jobs_address, "--follow", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["outputs"]["greet"] == "hello ada from labtools"

    del doc["runtime"]
    workflow.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = factory(client_env, "submit", str(workflow), "--address", cluster.jobs_address, "--follow", "--json")
    assert done.returncode == 1 and "labtools" in json.loads(done.stdout)["error"], done.stdout + done.stderr


def test_submit_installs_the_requirements_the_workflow_declares(
    cluster: LocalRayCluster, client_env: dict[str, str], tmp_path: Path
) -> None:
    """`runtime.requirements`: Ray pip-installs them for the job (from the package index this
    machine's pip uses); pyfiglet is in none of the project's dependencies."""
    import importlib.util

    assert importlib.util.find_spec("pyfiglet") is None, "the test needs a package the venv does not have"
    workflow = workflow_folder(
        tmp_path,
        {
            "name": "with-pip",
            "runtime": {"requirements": "requirements.txt"},
            "steps": [{"id": "v", "python": "steps:figlet_version", "retry": {"max_attempts": 1}}],
        },
    )
    (workflow.parent / "requirements.txt").write_text("pyfiglet==1.0.2  # small, pure Python\n")
    started = time.monotonic()
    done = factory(
        client_env, "submit", str(workflow), "--address", cluster.jobs_address, "--follow", "--json", timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["outputs"]["v"] == "1.0.2"
    print(f"\nfactory submit with a pip requirement: {time.monotonic() - started:.1f}s (the install included)")


def test_a_client_without_the_token_is_told_what_to_set(cluster: LocalRayCluster, client_env: dict[str, str]) -> None:
    env = {k: v for k, v in client_env.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN"] = "not-the-token"
    done = factory(env, "jobs", "--address", cluster.jobs_address, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "RAY_AUTH_MODE=token" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr


def test_a_remote_cluster_with_an_embedded_store_is_refused(tmp_path: Path) -> None:
    workflow = workflow_folder(tmp_path, {"name": "x", "steps": [{"id": "a", "python": "steps:where"}]})
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("FACTORY_STORE")}
    env["FACTORY_HOME"] = str(tmp_path / "home")
    done = factory(env, "submit", str(workflow), "--address", "http://10.9.8.7:8265", timeout=60)
    assert done.returncode == 2 and "FACTORY_STORE_URL=postgresql://" in done.stderr, done.stderr


def test_a_worker_node_killed_mid_run_costs_no_run(
    cluster: LocalRayCluster, client_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL of worker b's raylet while a fan-out runs on all three nodes: Ray retries its
    items elsewhere, the run succeeds, the step committed before the kill ran once."""
    log = tmp_path / "executions.txt"
    workflow = workflow_folder(
        tmp_path,
        {
            "name": "fan-out",
            "steps": [
                {"id": "first", "python": "steps:record", "with": {"path": str(log), "value": "first", "seconds": 0}},
                {
                    "id": "items",
                    "python": "steps:record",
                    "needs": ["first"],
                    "for_each": [f"item{i}" for i in range(12)],
                    "with": {"path": str(log), "value": "${item}", "seconds": 1.5},
                },
            ],
        },
    )
    submitted = factory(client_env, "submit", str(workflow), "--address", cluster.jobs_address, "--json")
    assert submitted.returncode == 0, submitted.stderr
    run_id = json.loads(submitted.stdout)["run_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(1 for line in _lines(log) if line.startswith("item")) < 4:
        time.sleep(0.1)
    assert sum(1 for line in _lines(log) if line.startswith("item")) >= 4, "the fan-out did not start"
    victim = next(n for n in cluster.nodes if n.name == "b")
    victim.kill_raylet()
    killed = time.monotonic()
    status: dict[str, Any] = {}
    while time.monotonic() < killed + 180:
        status = json.loads(factory(client_env, "status", run_id, "--json").stdout)
        if status["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    ended = time.monotonic()
    assert status.get("status") == "succeeded", status
    lines = _lines(log)
    assert lines.count("first") == 1  # committed before the kill: never again
    assert {line for line in lines if line.startswith("item")} == {f"item{i}" for i in range(12)}
    repeats = len([line for line in lines if line.startswith("item")]) - 12
    print(f"\nworker node killed mid-fan-out: run succeeded {ended - killed:.1f}s later; {repeats} item(s) ran twice")


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_an_agent_pool_spreads_over_the_nodes_and_survives_losing_one(cluster: LocalRayCluster) -> None:
    """Five replicas spread over the nodes; a worker holding one is killed while calls go on:
    no call fails, and the manager brings the pool back to five on the nodes that remain."""
    # Three live workers at least (the fan-out test killed b): the manager may sit on one and this
    # test's driver on another (Ray attaches a driver to any raylet of its host: all of them are on
    # this machine), and a third must still hold a replica to be killed
    live = {n.name for n in cluster.nodes if n.raylet_pids()} - {"head"}
    for name in ("c", "e"):  # (the runner test adds a "d" of its own)
        if len(live) < 3 and name not in live:
            cluster.add_worker(name, num_cpus=1, resources={f"node_{name}": 1})
            live.add(name)
    _settle(cluster)
    victims = {f"node_{n.name}": n.raylet_pids() for n in cluster.nodes if n.name != "head" and n.raylet_pids()}
    started = time.monotonic()
    report = run_driver(
        "cluster_pool_driver.py",
        cluster.gcs_address,
        cluster.jobs_address,
        json.dumps(victims),
        env=cluster.env,
        timeout=400,
    )
    before, after, victim = report["replica_nodes_before"], report["replica_nodes_after"], report["victim_node"]
    assert len(set(before)) >= 2, report  # spread: not all on one node
    assert report["relay_node"] == [report["own_node"]], report  # the caller's relay lives beside it
    assert victim in before and victim not in after and len(after) == report["replicas"], report
    assert report["calls_after_kill"] > 0 and report["failed_calls"] == 0, json.dumps(report, indent=1)
    print(
        f"\nagent pool over {len(set(before))} nodes, a worker killed: {report['replicas']} healthy replicas again "
        f"{report['replaced_after_s']:.1f}s later, {report['calls_before_kill'] + report['calls_after_kill']} "
        f"calls, none failed ({time.monotonic() - started:.0f}s in all)"
    )


def test_runs_of_a_runner_whose_node_dies_are_taken_over(
    cluster: LocalRayCluster, postgres_url: str, tmp_path: Path
) -> None:
    """The runner actor (coordinators of runs sent over HTTP) on a worker node that dies with
    three runs in flight: the supervisor hands them to a new runner, all three succeed, the
    step each committed before the kill does not run again."""
    node = cluster.add_worker("d", num_cpus=1, resources={"node_d": 1})
    _settle(cluster)
    report = run_driver(
        "cluster_runner_driver.py",
        cluster.gcs_address,
        cluster.jobs_address,
        "node_d",
        json.dumps(node.raylet_pids()),
        str(tmp_path),
        env={**cluster.env, "FACTORY_STORE_URL": postgres_url},
        timeout=400,
    )
    assert report["runner_node_before"] == report["victim_node"], report
    assert set(report["statuses"].values()) == {"succeeded"}, json.dumps(report, indent=1)
    assert all(report["adopted"].values()), report  # each taken over by the supervisor
    assert report["first_step_runs"] == [1, 1, 1], report
    assert report["runner_node_after"] not in ("", report["victim_node"]), report
    print(f"\nrunner's node killed with 3 runs in flight: all succeeded {report['ended_after_s']:.1f}s later")


def _settle(cluster: LocalRayCluster, timeout: float = 90) -> None:
    """Wait until Ray has declared dead the nodes an earlier test killed (about 12 s after
    the kill): until then it may still place a new actor on one of them."""
    live = sum(1 for n in cluster.nodes if n.raylet_pids())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cluster.alive_nodes() != live:
        time.sleep(1)
