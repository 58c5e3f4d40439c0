from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from factory.cli import app
from factory.dag import build_graph, load_workflow, validate_data
from factory.errors import WorkflowValidationError
from factory.spec import Step, Workflow, parse_size

FIXTURES = Path(__file__).parent.parent / "fixtures"
REPO = Path(__file__).parent.parent.parent


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def problems(data: object) -> list[str]:
    with pytest.raises(WorkflowValidationError) as info:
        validate_data(data, str(FIXTURES))
    return info.value.problems


def test_examples_are_valid() -> None:
    for path in (REPO / "examples").glob("*/workflow.yaml"):
        wf = load_workflow(path)
        assert wf.steps and wf.base_dir == str(path.parent.resolve())


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        {
            "name": "bad",
            "inputs": {"n": 1},
            "steps": [
                {"id": "a", "python": "teststeps:echo", "with": {"value": "${steps.ghost.output}"}},
                {"id": "a", "python": "teststeps:echo", "with": {"value": 1}},
                {"id": "b", "python": "nosuchmodule:f", "with": {}},
                {"id": "c", "python": "teststeps:echo", "with": {"value": "${inputs.missing}"}},
                {"id": "d", "python": "teststeps:nosuchfunction"},
                {"id": "e", "python": "teststeps:add", "with": {"a": 1, "c": 2}},
                {"id": "f", "python": "teststeps:echo", "retry": {"max_attempts": 0}, "with": {"value": 1}},
                {"id": "g", "python": "teststeps:echo", "with": {"value": 1}, "colour": "red"},
                {"id": "h", "python": "not a function"},
                {"id": "i", "python": "teststeps:echo", "needs": ["nobody"], "with": {"value": "${item}"}},
            ],
        }
    )
    text = "\n".join(found)
    assert "step 'a' references unknown step 'ghost'" in text
    assert "step 'a' field id: duplicate id" in text
    assert "step 'b' field python: cannot import module 'nosuchmodule'" in text
    assert "step 'c' references unknown input 'missing'" in text
    assert "step 'd' field python: module 'teststeps' has no attribute 'nosuchfunction'" in text
    assert "step 'e' field with: teststeps:add() has no parameter 'c'" in text
    assert "step 'e' field with: teststeps:add() needs argument 'b'" in text
    assert "step 'f' field retry.max_attempts: Input should be greater than or equal to 1" in text
    assert "step 'g' field colour: unknown field" in text
    assert "step 'h' field python: 'not a function' is not 'module:function'" in text
    assert "step 'i' field needs: unknown step 'nobody'" in text
    assert "step 'i' uses ${item} but has no for_each" in text
    assert len(found) >= 12


def test_cycle_is_named() -> None:
    found = problems(
        {
            "name": "cyclic",
            "steps": [
                {"id": "a", "python": "teststeps:echo", "with": {"value": "${steps.c.output}"}},
                {"id": "b", "python": "teststeps:echo", "with": {"value": "${steps.a.output}"}},
                {"id": "c", "python": "teststeps:echo", "with": {"value": 1}, "needs": ["b"]},
            ],
        }
    )
    assert len(found) == 1
    assert found[0].startswith("cycle: ")
    cycle = found[0].split(": ", 1)[1].split(" (")[0].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}


def test_references_imply_dependencies() -> None:
    wf = Workflow(
        name="w",
        steps=[
            Step(id="report", python="m:f", with_={"x": "total: ${steps.count.output.n}"}),
            Step(id="count", python="m:f", needs=["load"]),
            Step(id="load", python="m:f"),
        ],
    )
    graph = build_graph(wf)
    assert graph.order == ["load", "count", "report"]
    assert graph.deps["report"] == ["count"]
    assert graph.descendants("load") == {"count", "report"}


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nsteps:\n  - id: a\n    python: [unclosed\n")
    with pytest.raises(WorkflowValidationError) as info:
        load_workflow(path)
    assert "malformed YAML: line" in info.value.problems[0]


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(WorkflowValidationError, match="a workflow is a mapping"):
        load_workflow(write(tmp_path, "- just\n- a list\n"))


def test_sizes() -> None:
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 1024**3
    assert parse_size(2048) == 2048
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("lots")


def test_yaml_is_a_serialisation_of_the_models(tmp_path: Path) -> None:
    wf = load_workflow(REPO / "examples" / "doc_report" / "workflow.yaml")
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(wf.model_dump(by_alias=True, exclude_none=True, exclude={"base_dir"})))
    again = validate_data(yaml.safe_load(path.read_text()), wf.base_dir)
    assert again == wf


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(REPO / "examples" / "sales_stats" / "workflow.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "valid" in ok.output
    bad = write(
        tmp_path,
        {"name": "x", "steps": [{"id": "a", "python": "nope:f"}, {"id": "a", "python": "nope:g"}]},
    )
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "duplicate id" in result.output and "cannot import module 'nope'" in result.output


def test_route_resources_must_not_be_negative() -> None:
    from factory.dag import validate_data

    with pytest.raises(WorkflowValidationError, match="cannot be negative: GPU"):
        validate_data({"name": "w", "steps": [{"id": "a", "route": {"text": "t", "resources": {"GPU": -1}}}]})
