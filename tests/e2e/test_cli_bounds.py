"""`factory validate` / `factory run` on hostile documents: exit 2 at once, no traceback (no Ray needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent.parent
FACTORY = [sys.executable, "-m", "factory.cli"]
BILLION_LAUGHS = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join(["*" + chr(97 + i)] * 9) + "]\n" for i in range(8)
)


def factory(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FACTORY_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    return subprocess.run([*FACTORY, *args], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.timeout(90)
def test_validate_an_alias_bomb_exits_2(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    result = factory(tmp_path, "validate", str(bomb))
    assert result.returncode == 2, result.stderr
    assert "workflow_max_nodes" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(90)
def test_run_refuses_a_deep_document_and_a_tagged_input(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: w\nx: " + "[" * 10_000 + "]" * 10_000 + "\n")
    result = factory(tmp_path, "run", str(deep))
    assert result.returncode == 2 and "nested deeper than" in result.stderr, result.stderr
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: w\ninputs: {x: 1}\nsteps: [{id: a, python: 'm:f'}]\n")
    result = factory(tmp_path, "run", str(wf), "--input", "x=!!binary aGk=")
    assert result.returncode == 2 and "!!binary" in result.stderr and "Traceback" not in result.stderr
