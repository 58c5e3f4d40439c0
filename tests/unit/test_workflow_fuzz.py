"""Property tests: whatever the text or data, the parser returns a Workflow or raises
WorkflowValidationError, never anything else (no RecursionError, no TypeError, no hang)."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.dag import build_graph, validate_data, workflow_from_text
from factory.errors import WorkflowValidationError
from factory.limits import DocumentLimits, check_inputs
from factory.spec import Workflow

# small limits, so that the bounds are reached by generated examples too
LIMITS = DocumentLimits(max_bytes=20_000, max_depth=8, max_aliases=5, max_nodes=500, max_steps=20)
FUZZ = settings(
    max_examples=200,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

pytestmark = pytest.mark.timeout(120)

FRAGMENTS = [
    "name: w\n",
    "steps:\n",
    "inputs: {n: 1}\n",
    "  - id: a\n",
    "  - id: b\n",
    "    python: m:f\n",
    "    with: {x: '${steps.a.output}'}\n",
    "    needs: [a]\n",
    "    for_each: ${inputs.n}\n",
    "    route: {text: '${item}'}\n",
    "    container: {image: i, command: [echo, '${steps.}']}\n",
    "    retry: {on: [ValueError], max_attempts: 2}\n",
    "- ",
    "  ",
    "\n",
    "\t",
    ": ",
    ", ",
    "{",
    "}",
    "[",
    "]",
    "&a ",
    "*a",
    "&b [*a, *a, *a]",
    "<<: *a\n",
    "? ",
    "!!binary aGk=",
    "!!set {a}",
    "!!omap [a: 1]",
    "!!python/tuple [1]",
    "!!int x",
    "!!float",
    "!foo ",
    "2024-01-01",
    "2024-01-01 10:00:00",
    ".nan",
    ".inf",
    "1e999",
    "9" * 50,
    "~",
    "null",
    "yes",
    "on",
    "'",
    '"',
    "\\u00e9",
    "é",
    "${",
    "${${x}}",
    "${steps..output}",
    "${steps.a.output[99999999999999999999]}",
    "---\n",
    "...\n",
    "#",
    "%YAML 1.1\n",
    "|\n",
    ">-\n",
    "\x00",
    "\ufeff",
]


def _ok_or_validation_error(call: Any) -> None:
    try:
        result = call()
    except WorkflowValidationError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    if isinstance(result, Workflow):
        build_graph(result)  # a valid workflow has a graph


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_yaml_fragments(text: str) -> None:
    _ok_or_validation_error(lambda: workflow_from_text(text, limits=LIMITS, check_imports=False))


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("abn:-[]{}&*!?|>'\"\\ \n\t,.#$%~01<")), max_size=200))
def test_yaml_characters(text: str) -> None:
    _ok_or_validation_error(lambda: workflow_from_text(text, limits=LIMITS, check_imports=False))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw: bytes) -> None:
    _ok_or_validation_error(lambda: workflow_from_text(raw, limits=LIMITS, check_imports=False))


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["${steps.a.output}", "${inputs.n}", "${item}", "${}", "${steps..output}", "${${x}}", "${"]),
    st.dates(),
    st.binary(max_size=5),
    st.just(datetime.datetime(2024, 1, 1)),
)
KEYS = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans())
DATA = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(KEYS, children, max_size=5),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=60,
)
STEP_KEYS = ["id", "python", "with", "needs", "for_each", "route", "container", "agent", "retry", "timeout", "cache"]
STEP = st.dictionaries(
    st.sampled_from(STEP_KEYS),
    st.one_of(
        DATA,
        st.sampled_from(["a", "b", "m:f", "${steps.a.output}", "${item}"]),
        st.just({"text": "${inputs.n}"}),
        st.just({"image": "i", "command": ["echo", "${steps.b.output}"]}),
        st.just(["a", "b"]),
    ),
    max_size=8,
)


@FUZZ
@given(DATA)
def test_arbitrary_data(data: Any) -> None:
    _ok_or_validation_error(lambda: validate_data(data, None, "fuzz", check_imports=False, limits=LIMITS))
    _ok_or_validation_error(lambda: validate_data(data, None, "fuzz", check_imports=False))


@FUZZ
@given(st.lists(STEP, max_size=25), st.dictionaries(KEYS, DATA, max_size=3))
def test_arbitrary_steps(steps: list[dict[str, Any]], inputs: dict[Any, Any]) -> None:
    data = {"name": "fuzz", "inputs": inputs, "steps": steps}
    _ok_or_validation_error(lambda: validate_data(data, None, "fuzz", check_imports=False, limits=LIMITS))


@FUZZ
@given(DATA)
def test_arbitrary_inputs(inputs: Any) -> None:
    try:
        checked = check_inputs(inputs, LIMITS)
    except WorkflowValidationError:
        return
    # what passes is JSON data: no NaN, no dates, string keys
    stack = [checked]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            assert all(isinstance(k, str) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            assert item is None or isinstance(item, str | int | float)
            assert not isinstance(item, float) or math.isfinite(item)


IDS = ["a", "b", "c", "d", "e"]
REFS = st.one_of(
    st.sampled_from(IDS).map(lambda i: f"${{steps.{i}.output}}"),
    st.sampled_from(IDS).map(lambda i: f"text ${{steps.{i}.output[0].x}} more"),
    st.just("${inputs.n}"),
    st.just("${item}"),
    st.integers(-5, 5),
    st.lists(st.integers(0, 3), max_size=3),
)


@st.composite
def plausible_workflows(draw: st.DrawFn) -> str:
    """Mostly valid workflows (so the valid path is exercised too), some with a fragment spliced in."""
    ids = draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=5, unique=True))
    steps = []
    for step_id in ids:
        step: dict[str, Any] = {"id": step_id, "python": "m:f"}
        step["with"] = draw(st.dictionaries(st.sampled_from(["x", "y"]), REFS, max_size=2))
        if draw(st.booleans()):
            step["needs"] = draw(st.lists(st.sampled_from(IDS), max_size=2))
        if draw(st.integers(0, 4)) == 0:
            step["for_each"] = draw(st.sampled_from(["${inputs.items}", [1, 2], "${steps.a.output}"]))
        steps.append(step)
    text = yaml.safe_dump({"name": "w", "inputs": {"n": 1, "items": [1, 2]}, "steps": steps}, sort_keys=False)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(FRAGMENTS)) + text[at:]
    return text


@FUZZ
@given(plausible_workflows())
def test_plausible_workflows(text: str) -> None:
    _ok_or_validation_error(lambda: workflow_from_text(text, limits=LIMITS, check_imports=False))
