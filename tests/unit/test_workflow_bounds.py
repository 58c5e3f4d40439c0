"""Every bad or oversized workflow input is a WorkflowValidationError naming the place, and quick."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from factory.api import merge_inputs
from factory.cli import app, parse_inputs
from factory.dag import (
    build_graph,
    load_workflow,
    parse_workflow_text,
    validate_data,
    validate_workflow,
    workflow_from_text,
)
from factory.errors import OutputTooLargeError, WorkflowValidationError
from factory.limits import DocumentLimits, check_data_bounds, check_inputs
from factory.refs import find_references
from factory.retry import is_retryable
from factory.runtime import Outcome, StepCall, encode_output, limit_outcome, run_attempt
from factory.settings import Settings
from factory.spec import RetryPolicy, Step, Workflow

FIXTURES = str(Path(__file__).parent.parent / "fixtures")
LIMITS = DocumentLimits()

pytestmark = pytest.mark.timeout(10)


def problems_of(data: Any, limits: DocumentLimits | None = LIMITS) -> list[str]:
    with pytest.raises(WorkflowValidationError) as info:
        validate_data(data, FIXTURES, "test", check_imports=False, limits=limits)
    return info.value.problems


def text_problems(text: str | bytes, limits: DocumentLimits = LIMITS) -> list[str]:
    with pytest.raises(WorkflowValidationError) as info:
        workflow_from_text(text, limits=limits, source="wf.yaml", check_imports=False)
    return info.value.problems


def two_steps(**second: Any) -> dict[str, Any]:
    return {
        "name": "w",
        "inputs": {"n": 1},
        "steps": [{"id": "a", "python": "m:f"}, {"id": "b", "python": "m:f", **second}],
    }


# -- 1. malformed references ------------------------------------------------------------------

BAD_REFERENCES = [
    "${steps..output}",
    "${}",
    "${steps.}",
    "${steps.a.output[}",
    "${steps.a.output[99999999999999999999]}",
    "${steps.a.output[" + "9" * 5000 + "]}",
    "${inputs}",
    "${inputs.}",
    "${${x}}",
    "${steps.a.output",
    "text ${steps.a.output} then ${",
    "${item.}",
    "${steps.a}",
    "${steps.a.outputs}",
    "${nothing.at.all}",
    "${inputs.n[1e5]}",
]


@pytest.mark.parametrize("ref", BAD_REFERENCES)
@pytest.mark.parametrize(
    ("field", "step", "where"),
    [
        ("with", lambda r: {"with": {"x": r}}, "field with.x"),
        ("nested with", lambda r: {"with": {"x": [{"y": r}]}}, "field with.x[0].y"),
        ("for_each", lambda r: {"for_each": r, "with": {"x": "${item}"}}, "field for_each"),
        ("route", lambda r: {"python": None, "route": {"text": r}}, "field route.text"),
        (
            "container",
            lambda r: {"python": None, "container": {"image": "i", "command": ["echo", r]}},
            "field container.command[1]",
        ),
    ],
)
def test_malformed_references_are_problems_naming_the_field(ref: str, field: str, step: Any, where: str) -> None:
    found = problems_of(two_steps(**step(ref)))
    assert any(p.startswith(f"step 'b' {where}: ") for p in found), found


@pytest.mark.parametrize("ref", ["${steps.a.output}", "${steps..output}", "${}"])
def test_references_in_needs_say_to_write_step_ids(ref: str) -> None:
    found = problems_of(two_steps(needs=[ref]))
    assert any("step 'b' field needs: unknown step" in p and "step ids" in p for p in found), found


def test_malformed_reference_in_yaml_text() -> None:
    found = text_problems("name: w\nsteps:\n  - id: a\n    python: m:f\n    with: {x: '${steps..output}'}\n")
    assert found == ["step 'a' field with.x: ${steps..output}: write steps.NAME"]


def test_non_string_keys_in_data_are_refused() -> None:
    found = problems_of(two_steps(**{"with": {1: "x", None: "y"}}))
    assert any("step 'b' field with: the key 1 (number) is not a string" in p for p in found), found
    assert any("the key None (null) is not a string" in p for p in found), found
    found = problems_of({"name": "w", 7: "x", "steps": [{"id": "a", "python": "m:f"}]})
    assert any(p.startswith("the workflow: the key 7") for p in found), found


def test_a_huge_reference_message_is_cut_short() -> None:
    found = problems_of(two_steps(**{"with": {"x": "${steps.a.output" + ".x" * 100_000 + "[}"}}))
    assert all(len(p) < 1000 for p in found), [len(p) for p in found]


# -- 2. long chains and deep values: no recursion -------------------------------------------------


def _chain(n: int) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [{"id": "s0", "python": "m:f"}]
    steps += [{"id": f"s{i}", "python": "m:f", "with": {"x": f"${{steps.s{i - 1}.output}}"}} for i in range(1, n)]
    return steps


def test_a_5000_step_chain_in_reverse_order_is_valid() -> None:
    wf = validate_data({"name": "chain", "steps": _chain(5000)[::-1]}, check_imports=False, limits=LIMITS)
    graph = build_graph(wf)
    assert graph.order[0] == "s0" and graph.order[-1] == "s4999"


def test_a_5000_step_cycle_is_named_shortly() -> None:
    steps = _chain(5000)[::-1]
    steps[-1]["needs"] = ["s4999"]  # s0 needs the last one
    found = problems_of({"name": "cycle", "steps": steps})
    cycle = [p for p in found if p.startswith("cycle: ")]
    assert len(cycle) == 1 and "steps) ->" in cycle[0] and len(cycle[0]) < 600


def _deep(levels: int) -> Any:
    value: Any = "${inputs.n}"
    for _ in range(levels):
        value = [value]
    return value


def test_find_references_is_iterative() -> None:
    assert [str(r) for r in find_references({"x": _deep(20_000)})] == ["${inputs.n}"]


def test_deep_with_value_is_a_problem() -> None:
    found = problems_of(two_steps(**{"with": {"x": _deep(10_000)}}))
    assert len(found) == 1
    assert found[0].startswith("step 'b' field with.x[0]") and "nested deeper than 64 levels" in found[0]
    assert "workflow_max_depth" in found[0]


def test_deep_value_in_a_python_built_workflow() -> None:
    wf = Workflow(name="w", steps=[Step(id="a", python="m:f", with_={"x": _deep(5000)})])
    with pytest.raises(WorkflowValidationError, match="nested deeper than"):
        validate_workflow(wf, check_imports=False)


def test_deep_json_data_is_refused() -> None:
    data: Any = {}
    for _ in range(10_000):
        data = {"a": data}
    with pytest.raises(WorkflowValidationError, match=r"workflow field a\.a\.a.*nested deeper than 64 levels"):
        check_data_bounds(data, LIMITS)


# -- 3. deep YAML --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "name: w\nx: " + "[" * 10_000 + "]" * 10_000,
        "name: w\nx: " + "{a: " * 10_000 + "1" + "}" * 10_000,
        "name: w\nx:\n" + "".join(" " * i + "- \n" for i in range(1, 1000)),
        "name: w\nx:\n" + "- " * 10_000 + "1\n",
    ],
    ids=["flow lists", "flow mappings", "block lists", "compact block lists"],
)
def test_deep_yaml_is_refused_before_composing(text: str) -> None:
    found = text_problems(text)
    assert len(found) == 1 and "nested deeper than 64 levels" in found[0] and "line " in found[0], found


def test_depth_limit_is_a_setting() -> None:
    text = "name: w\nsteps: [{id: a, python: 'm:f', with: {x: " + "[" * 10 + "]" * 10 + "}}]\n"
    assert workflow_from_text(text, limits=LIMITS, check_imports=False).steps[0].id == "a"
    limits = DocumentLimits.from_settings(Settings(workflow_max_depth=8))
    assert "workflow_max_depth" in text_problems(text, limits)[0]


# -- 4. JSON data only ---------------------------------------------------------------------------


def test_timestamps_stay_strings() -> None:
    data = parse_workflow_text(
        "name: w\ninputs: {day: 2024-01-01, at: 2024-01-01 10:00:00, t: 2024-01-01T10:00:00Z}\n", limits=LIMITS
    )
    assert data["inputs"] == {"day": "2024-01-01", "at": "2024-01-01 10:00:00", "t": "2024-01-01T10:00:00Z"}


def test_cli_input_dates_stay_strings() -> None:
    assert parse_inputs(["x=2024-01-01", "n=6", "l=[1, 2]", "s=a: b: c", "e="]) == {
        "x": "2024-01-01",
        "n": 6,
        "l": [1, 2],
        "s": "a: b: c",
        "e": "",
    }


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("!!binary aGVsbG8=", "!!binary"),
        ("!!set {a, b}", "!!set"),
        ("!!omap [a: 1]", "!!omap"),
        ("!!pairs [a: 1]", "!!pairs"),
        ("!!timestamp 2024-01-01", "!!timestamp"),
        ("!!python/object/apply:os.system [ls]", "!!python/object/apply:os.system"),
        ("!!python/tuple [1, 2]", "!!python/tuple"),
        ("!local 1", "!local"),
    ],
)
def test_non_json_tags_are_refused_with_the_place(value: str, tag: str) -> None:
    found = text_problems(f"name: w\ninputs:\n  x: {value}\nsteps: [{{id: a, python: 'm:f'}}]\n")
    assert found == [
        f"line 3, column 6: the tag {tag} is not allowed: a workflow holds plain JSON data: "
        "strings, numbers, true/false, null, lists and mappings"
    ]


def test_cli_refuses_non_json_inputs(tmp_path: Path) -> None:
    with pytest.raises(typer.BadParameter, match="x: line 1, column 1: the tag !!binary"):
        parse_inputs(["x=!!binary aGVsbG8="])
    with pytest.raises(typer.BadParameter, match="not a JSON number"):
        parse_inputs(["x=.nan"])
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: w\ninputs: {x: 1}\nsteps: [{id: a, python: 'm:f'}]\n")
    result = CliRunner().invoke(app, ["run", str(wf), "--input", "x=!!set {a}"])
    assert result.exit_code == 2 and "!!set" in result.output


@pytest.mark.parametrize(
    ("value", "why"),
    [(".nan", "not a JSON number"), ("-.inf", "not a JSON number"), ("1" * 5000, "cannot read"), ("!!int x", "!!int")],
)
def test_numbers_must_be_json_numbers(value: str, why: str) -> None:
    found = text_problems(f"name: w\ninputs: {{x: {value}}}\nsteps: [{{id: a, python: 'm:f'}}]\n")
    assert len(found) == 1 and found[0].startswith("line 2, column ") and why in found[0], found


def test_keys_are_strings_as_written() -> None:
    data = parse_workflow_text("1: a\nnull: b\n~: c\non: d\nyes: e\n2024-01-01: f\n", limits=LIMITS)
    assert data == {"1": "a", "null": "b", "~": "c", "on": "d", "yes": "e", "2024-01-01": "f"}


def test_retry_on_works_in_yaml() -> None:
    text = "name: w\nsteps:\n  - id: a\n    python: m:f\n    retry: {max_attempts: 2, on: [ConnectionError]}\n"
    wf = workflow_from_text(text, limits=LIMITS, check_imports=False)
    assert wf.steps[0].retry.on == ["ConnectionError"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("? [1, 2]\n: x\n", "line 1, column 3: a mapping key must be a string, not a list"),
        ("? {a: 1}\n: x\n", "line 1, column 3: a mapping key must be a string, not a mapping"),
        ("a: 1\na: 2\n", "line 2, column 1: the key 'a' is given twice in this mapping"),
        ("1: x\n'1': y\n", "line 2, column 1: the key '1' is given twice in this mapping"),
    ],
)
def test_bad_keys_are_refused(text: str, problem: str) -> None:
    assert text_problems(text) == [problem]


def test_merge_keys_still_work() -> None:
    text = (
        "name: w\ndefaults: &d {python: 'm:f', retry: {max_attempts: 2}}\n"
        "steps:\n  - {<<: *d, id: a}\n  - {<<: *d, id: b, needs: [a]}\n"
    )
    data = parse_workflow_text(text, limits=LIMITS)
    assert data["steps"][1] == {"python": "m:f", "retry": {"max_attempts": 2}, "id": "b", "needs": ["a"]}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (datetime.date(2024, 1, 1), "(date)"),
        (b"bytes", "(bytes)"),
        ({1, 2}, "(set)"),
        (float("nan"), "not a JSON number"),
        (object(), "(object)"),
    ],
)
def test_non_json_python_values_are_refused(value: Any, shown: str) -> None:
    found = problems_of(two_steps(**{"with": {"x": value}}))
    assert len(found) == 1 and found[0].startswith("step 'b' field with.x: ") and shown in found[0], found
    with pytest.raises(WorkflowValidationError) as info:
        check_inputs({"when": {"x": [value]}}, LIMITS)
    assert info.value.problems[0].startswith("input 'when' field x[0]: ") and shown in info.value.problems[0]


# -- 5. size limits --------------------------------------------------------------------------------

BILLION_LAUGHS = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join(["*" + chr(97 + i)] * 9) + "]\n" for i in range(8)
)


def test_billion_laughs_is_refused_without_expanding() -> None:
    assert len(BILLION_LAUGHS.encode()) < 500
    found = text_problems(BILLION_LAUGHS)
    assert len(found) == 1 and "more than 100000 values once its aliases are expanded" in found[0]
    assert "workflow_max_nodes" in found[0]


def test_too_many_aliases() -> None:
    text = "a: &a x\nb: [" + ", ".join(["*a"] * 101) + "]\n"
    assert "more than 100 aliases" in text_problems(text)[0]
    limits = DocumentLimits.from_settings(Settings(workflow_max_aliases=2))
    assert "workflow_max_aliases" in text_problems("a: &a x\nb: [*a, *a, *a]\n", limits)[0]


def test_aliases_that_expand_to_much_text() -> None:
    text = "a: &a '" + "x" * 300_000 + "'\nb: [*a, *a, *a, *a]\n"
    assert "bytes of text once its aliases are expanded" in text_problems(text)[0]


def test_recursive_alias() -> None:
    assert "recursive alias" in text_problems("a: &a [1, *a]\n")[0]
    assert "recursive alias" in text_problems("a: &a {<<: *a}\n")[0]


def test_aliases_that_nest_too_deep() -> None:
    text = "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n"
    assert "aliases nest this deeper than 64 levels" in text_problems(text)[0]


def test_document_size(tmp_path: Path) -> None:
    big = "name: w\ndescription: '" + "x" * (1024 * 1024) + "'\n"
    assert "larger than 1048576 bytes" in text_problems(big)[0]
    assert "larger than 1048576 bytes" in text_problems(big.encode())[0]
    path = tmp_path / "big.yaml"
    path.write_text(big)
    with pytest.raises(WorkflowValidationError, match="workflow_max_bytes"):
        load_workflow(path)


def test_reading_a_device_is_bounded() -> None:
    with pytest.raises(WorkflowValidationError, match="larger than"):
        load_workflow("/dev/zero")


def test_not_utf8() -> None:
    assert "not UTF-8" in text_problems(b"name: \xff\xfe\n")[0]


def test_step_count() -> None:
    found = problems_of({"name": "w", "steps": [{"id": f"s{i}", "python": "m:f"} for i in range(10_001)]})
    assert found == [
        "workflow field steps: 10001 steps, more than 10000 (setting workflow_max_steps, "
        "FACTORY_WORKFLOW_MAX_STEPS); split the workflow"
    ]


def test_ten_thousand_steps_are_allowed() -> None:
    steps = [
        Step(id=f"b{k}", python="m:f", with_={"x": f"${{steps.b{k - 100}.output}}"} if k >= 100 else {"x": k})
        for k in range(10_000)
    ]
    limits = DocumentLimits.from_settings(Settings())
    assert len(validate_workflow(Workflow(name="big", steps=steps), check_imports=False, limits=limits).steps) == 10_000


def test_json_data_sizes() -> None:
    many = two_steps(**{"with": {"x": list(range(200_000))}})
    assert "more than 100000 values" in problems_of(many)[0]
    long_text = two_steps(**{"with": {"x": "é" * 600_000}})
    assert "more than 1048576 bytes of text" in problems_of(long_text)[0]


def test_inputs_are_bounded() -> None:
    with pytest.raises(WorkflowValidationError, match="inputs: a mapping of input names"):
        check_inputs([1, 2], LIMITS)
    with pytest.raises(WorkflowValidationError, match=r"input 'x' field .*nested deeper than 64"):
        check_inputs({"x": _deep(100)}, LIMITS)
    with pytest.raises(WorkflowValidationError, match=r"the inputs holds more than \d+ bytes of text"):
        check_inputs({"x": "y" * (2 * 1024 * 1024)}, LIMITS)
    wf = Workflow(name="w", inputs={"day": "x"}, steps=[Step(id="a", python="m:f")])
    with pytest.raises(WorkflowValidationError, match=r"input 'day'.*date"):
        merge_inputs(wf, {"day": datetime.date(2024, 1, 1)}, LIMITS)
    assert merge_inputs(wf, {"day": "2024-01-01"}, LIMITS) == {"day": "2024-01-01"}


def test_cli_validate_alias_bomb_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "workflow_max_nodes" in result.output


# -- 7. step outputs ---------------------------------------------------------------------------------


def _call(value: Any, max_output_bytes: int) -> StepCall:
    return StepCall(
        step_id="s",
        target="teststeps:echo",
        arguments={"value": value},
        resolved=True,
        inputs={},
        dep_ids=(),
        search_path=(FIXTURES,),
        timeout=None,
        retry=RetryPolicy(max_attempts=3),
        max_output_bytes=max_output_bytes,
    )


def test_an_output_over_the_limit_fails_the_attempt_without_retry() -> None:
    outcome = run_attempt(_call("x" * 5000, 4096), ())
    assert not outcome.ok and not outcome.retryable
    assert outcome.error_type == "factory.errors.OutputTooLargeError"
    assert outcome.error is not None
    for part in ("5002 bytes", "4096 bytes", "max_output_bytes", "FACTORY_MAX_OUTPUT_BYTES", "file", "outputs:"):
        assert part in outcome.error
    ok = run_attempt(_call("x" * 4000, 4096), ())
    assert ok.ok and ok.output_json == json.dumps("x" * 4000)


def test_output_size_counts_utf8_bytes() -> None:
    assert encode_output("é" * 1000, 2003) == json.dumps("é" * 1000, ensure_ascii=False)
    with pytest.raises(OutputTooLargeError) as info:
        encode_output("é" * 1000, 2001)
    assert info.value.size == 2002 and info.value.limit == 2001
    assert not is_retryable(info.value, RetryPolicy(max_attempts=5))


def test_the_default_limit_reaches_the_worker() -> None:
    call = StepCall("s", "teststeps:echo", {}, True, {}, (), (), None, RetryPolicy())
    assert call.max_output_bytes == Settings().max_output_bytes == 4 * 1024 * 1024


def test_agent_outcomes_are_limited_by_the_coordinator() -> None:
    big = Outcome(ok=True, output_json=json.dumps({"result": "x" * 5000}), extra={"agent": "a"})
    limited = limit_outcome(big, 4096)
    assert not limited.ok and not limited.retryable and limited.extra == {"agent": "a"}
    assert limited.error is not None and "max_output_bytes" in limited.error
    small = Outcome(ok=True, output_json='"ok"')
    assert limit_outcome(small, 4096) is small
