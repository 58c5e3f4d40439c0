"""Container steps through the engine on the session's real Ray: artifacts between steps, resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import factory
from factory.settings import Settings
from factory.spec import ContainerSpec, Step, Workflow
from factory.store import RunStatus
from factory.store.sqlite import SQLiteStore

REPO = Path(__file__).parent.parent.parent

pytestmark = [
    pytest.mark.usefixtures("ray_cluster"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap: apt-get install -y bubblewrap"),
]


def test_the_isolated_stats_example_passes_artifacts_between_container_steps(
    store: SQLiteStore, settings: Settings
) -> None:
    result = factory.run(
        REPO / "examples/isolated_stats/workflow.yaml", {"count": 300, "seed": 11}, store=store, settings=settings
    )
    assert result.ok, result.error
    generate, stats = result.outputs["generate"], result.outputs["stats"]
    assert generate["exit_code"] == 0 and generate["stdout"].startswith("wrote 300 rows")
    (csv_ref,) = generate["artifacts"].values()
    (report_ref,) = stats["artifacts"].values()
    assert list(stats["artifacts"]) == ["report.json"]
    report = json.loads(stats["stdout"])
    assert report["count"] == 300 and report["min"] <= report["median"] <= report["max"]
    assert 85 < report["mean"] < 115  # gauss(100, 15) over 300 draws
    # The report artifact is content-addressed: its digest is the sha256 of the report the step printed.
    text = json.dumps(report, indent=2) + "\n"
    assert report_ref == {"digest": "sha256:" + hashlib.sha256(text.encode()).hexdigest(), "size": len(text)}
    assert csv_ref["size"] > 300 * 5


def test_a_failed_container_step_resumes_and_mounts_the_committed_artifacts(
    store: SQLiteStore, settings: Settings, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    first = Step(
        id="make",
        container=ContainerSpec(
            image="host",
            command=["sh", "-c", "mkdir -p out && echo 'made once' > out/data.txt && echo run >> /dev/stderr"],
            outputs=["/work/out/data.txt"],
        ),
    )
    second = Step(
        id="use",
        container=ContainerSpec(
            image="host",
            command=["sh", "-c", "test -f /gate/open || { echo 'gate closed' >&2; exit 3; }; cat /work/in/data.txt"],
            mounts={"/gate": str(gate), "/work/in": "${steps.make.artifacts}"},
        ),
    )
    wf = Workflow(name="resume-artifacts", steps=[first, second], base_dir=str(tmp_path))
    failed = factory.run(wf, store=store, settings=settings)
    assert failed.status == RunStatus.FAILED
    assert "exited with code 3" in (failed.error or "") and "gate closed" in (failed.error or "")
    (gate / "open").write_text("")
    resumed = factory.resume(failed.run_id, store=store, settings=settings)
    assert resumed.ok, resumed.error
    assert resumed.outputs["use"]["stdout"] == "made once\n"
    assert [a.status.value for a in store.get_attempts(failed.run_id, "make")] == ["succeeded"]  # not re-run
    logs = "".join(a.logs or "" for a in store.get_attempts(failed.run_id, "use"))
    assert "gate closed" in logs and "made once" in logs


def test_container_log_lines_are_events_while_the_step_runs(store: SQLiteStore, settings: Settings) -> None:
    """Lines come out as step.log events during the step (not only when it ends), secrets redacted."""
    import threading
    import time

    secrets = Path(settings.home) / "secrets"  # the run's secrets folder (the default secret source)
    secrets.mkdir(parents=True, mode=0o700, exist_ok=True)
    (secrets / "LIVE_TOKEN").write_text("s3cr3t-live-value")
    step = Step(
        id="talk",
        container=ContainerSpec(
            image="host",
            command=["sh", "-c", "echo first line; cat /run/secrets/LIVE_TOKEN; echo; sleep 3; echo last line"],
            secrets=["LIVE_TOKEN"],
        ),
    )
    results: list[factory.RunResult] = []
    started: list[str] = []
    runner = threading.Thread(
        target=lambda: results.append(
            factory.run(Workflow(name="live", steps=[step]), store=store, settings=settings, on_start=started.append)
        )
    )
    runner.start()
    seen_while_running: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not seen_while_running:
        if started:
            step_status = {s.step_id: s.status.value for s in store.get_steps(started[0])}["talk"]
            logs = [e for e in store.events(0, started[0]) if e.type == "step.log"]
            if logs and step_status == "running":
                seen_while_running = [line for e in logs for line in e.data["lines"]]
        time.sleep(0.1)
    runner.join(60)
    assert results and results[0].ok, results and results[0].error
    assert "first line" in seen_while_running and "last line" not in seen_while_running
    lines = [line for e in store.events(0, started[0]) if e.type == "step.log" for line in e.data["lines"]]
    assert "last line" in lines
    everything = json.dumps([e.model_dump() for e in store.events(0, started[0])])
    assert "s3cr3t-live-value" not in everything and "***" in lines
