"""The head node dies and comes back: with Ray's GCS fault tolerance (an external Redis), a run
whose coordinator sits in the runner actor on a worker node goes on through the head's
restart and succeeds, each committed step run once.

The cluster is its own (a head with no CPUs and one worker, `ray start` processes), with a
redis-server of its own on a free port for the GCS tables (the machine's Redis on 6379 is the
Factory's event bus in other tests)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from factory.store import RunStatus, open_store
from tests.fixtures.ports import free_port
from tests.fixtures.ray_nodes import LocalRayCluster, run_driver

REPO = Path(__file__).parent.parent.parent


@pytest.fixture
def gcs_redis() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: the GCS fault tolerance test needs one of its own")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "the GCS's redis-server did not start"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait(10)


def test_a_run_survives_the_head_restarting(gcs_redis: str, postgres_url: str, tmp_path: Path) -> None:
    cluster = LocalRayCluster(
        head_env={"RAY_REDIS_ADDRESS": gcs_redis, "RAY_external_storage_namespace": f"factory-{free_port()}"}
    )
    try:
        cluster.start_head(num_cpus=0)
        worker = cluster.add_worker("w", num_cpus=2, resources={"node_w": 1})
        report = run_driver(
            "cluster_head_driver.py",
            cluster.gcs_address,
            "node_w",
            str(tmp_path),
            env={**cluster.env, "FACTORY_STORE_URL": postgres_url},
            timeout=300,
        )
        run_id = report["run_id"]

        killed = time.monotonic()
        cluster.restart_head()  # SIGKILL to every process of the head, then a new head on the port
        cluster.wait_for_nodes(2, 120)
        back = time.monotonic() - killed
        assert worker.process.poll() is None, "the worker node left the cluster:\n" + cluster.logs("w")

        store = open_store(postgres_url)
        try:
            deadline = time.monotonic() + 180
            while store.get_run(run_id).status in (RunStatus.PENDING, RunStatus.RUNNING):
                assert time.monotonic() < deadline, [(s.id, s.status) for s in store.get_steps(run_id)]
                time.sleep(0.5)
            run = store.get_run(run_id)
            ended = time.monotonic() - killed
            assert run.status == RunStatus.SUCCEEDED, (run.status, run.error)
            events = [e.type for e in store.events(0, run_id, 10_000)]
            assert "run.adopted" not in events  # the same coordinator finished it, nobody took over
        finally:
            store.close()
        assert (tmp_path / "first.count").read_text() == "x"  # committed before the kill: not run again
        assert (tmp_path / "last.count").read_text() == "x"
        print(f"\nhead killed mid-run: back with the worker after {back:.1f}s, the run succeeded {ended:.1f}s after")
    finally:
        cluster.stop()
