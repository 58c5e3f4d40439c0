from __future__ import annotations

import pytest

from factory.errors import StepInputError
from factory.refs import Context, ReferenceSyntaxError, find_references, parse_reference, resolve

CTX = Context(
    inputs={"folder": "samples/", "n": 6},
    outputs={"load": [{"name": "a", "words": 3}, {"name": "b", "words": 5}], "stats": {"total": 8}},
)


def test_whole_reference_keeps_its_type() -> None:
    assert resolve("${steps.load.output}", CTX) == CTX.outputs["load"]
    assert resolve("${inputs.n}", CTX) == 6
    assert resolve(" ${inputs.n}", CTX) == " 6"


def test_deep_paths() -> None:
    assert resolve("${steps.load.output[1].name}", CTX) == "b"
    assert resolve("${steps.load.output[-1].words}", CTX) == 5
    assert resolve("${steps.stats.output.total}", CTX) == 8
    assert resolve("${steps.stats.output['total']}", CTX) == 8


def test_interpolation_inside_text() -> None:
    assert resolve("n=${inputs.n} in ${inputs.folder}", CTX) == "n=6 in samples/"
    assert resolve("first: ${steps.load.output[0]}", CTX) == 'first: {"name": "a", "words": 3}'


def test_nested_structures_are_resolved() -> None:
    value = {"a": ["${inputs.n}", {"b": "${steps.stats.output.total}"}], "c": 1}
    assert resolve(value, CTX) == {"a": [6, {"b": 8}], "c": 1}


def test_item() -> None:
    ctx = Context(inputs={}, outputs={}, item={"k": [1, 2]}, has_item=True)
    assert resolve("${item.k[1]}", ctx) == 2
    with pytest.raises(StepInputError, match="only defined in a step with for_each"):
        resolve("${item}", CTX)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${steps.load.output[5]}", "index 5 is out of range for a list of 2"),
        ("${steps.stats.output.missing}", "no field 'missing' in an object with fields: total"),
        ("${steps.stats.output[0]}", "needs a list"),
        ("${inputs.nope}", "no input named 'nope'"),
        ("${steps.other.output}", "output of step 'other' is not available"),
    ],
)
def test_resolution_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(StepInputError, match=message.replace("[", r"\[")):
        resolve(text, CTX)


@pytest.mark.parametrize("text", ["outputs.x", "steps.a", "steps.a.result", "inputs", "steps.a.output.[0]"])
def test_malformed_references(text: str) -> None:
    with pytest.raises(ReferenceSyntaxError):
        parse_reference(text)


def test_find_references() -> None:
    refs = find_references({"a": "${steps.x.output} and ${inputs.y}", "b": ["${item}"]})
    assert [(r.root, r.name) for r in refs] == [("steps", "x"), ("inputs", "y"), ("item", None)]
