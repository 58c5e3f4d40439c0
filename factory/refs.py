"""``${...}`` references in step arguments: parsing, dependency discovery, resolution.

Forms: ``${inputs.NAME}``, ``${steps.ID.output}``, ``${item}``, each optionally
followed by a path of ``.field`` and ``[index]`` parts. A string that is exactly
one reference resolves to the referenced value with its type; a reference inside
a longer string is interpolated as text (JSON for lists and dicts).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from factory.errors import StepInputError

_REF_RE = re.compile(r"\$\{([^{}]*)\}")
_PATH_PART_RE = re.compile(r"\.([A-Za-z_][\w-]*)|\[(-?\d+)\]|\[\"([^\"]*)\"\]|\['([^']*)'\]")
_HEAD_RE = re.compile(r"^\s*(inputs|steps|item)\b")

PathPart = str | int
MAX_INDEX_DIGITS = 9  # [index] in a reference; no list that fits in a step's output is longer


@dataclass(frozen=True)
class Reference:
    """One parsed ``${...}`` expression."""

    root: str  # "inputs", "steps" or "item"
    name: str | None  # input name or step id; None for item
    path: tuple[PathPart, ...]  # after inputs.NAME / steps.ID.output / item
    text: str  # the expression as written, without ${ }

    def __str__(self) -> str:
        return "${" + self.text + "}"


class ReferenceSyntaxError(ValueError):
    pass


def _show(text: str) -> str:
    """A reference as written, cut short for messages."""
    return "${" + (text if len(text) <= 80 else text[:79] + "…") + "}"


def _parse_path(rest: str, text: str) -> tuple[PathPart, ...]:
    parts: list[PathPart] = []
    pos = 0
    while pos < len(rest):
        match = _PATH_PART_RE.match(rest, pos)
        if not match:
            raise ReferenceSyntaxError(
                f"{_show(text)}: cannot read {rest[pos:][:40]!r}; write .field or [index] after the reference"
            )
        field, index, dq, sq = match.groups()
        if field is not None:
            parts.append(field)
        elif index is not None:
            if len(index.lstrip("-")) > MAX_INDEX_DIGITS:
                raise ReferenceSyntaxError(
                    f"{_show(text)}: the index [{index[:20]}{'…' if len(index) > 20 else ''}] is too large "
                    f"(at most {MAX_INDEX_DIGITS} digits)"
                )
            parts.append(int(index))
        else:
            parts.append(dq if dq is not None else sq)
        pos = match.end()
    return tuple(parts)


@functools.lru_cache(maxsize=4096)  # the same few texts, at every attempt of a step
def parse_reference(text: str) -> Reference:
    expr = text.strip()
    head = _HEAD_RE.match(expr)
    if not head:
        raise ReferenceSyntaxError(f"{_show(text)}: a reference starts with inputs.NAME, steps.ID.output or item")
    root = head.group(1)
    rest = expr[head.end() :]
    if root == "item":
        return Reference("item", None, _parse_path(rest, text), expr)
    match = re.match(r"^\.([A-Za-z_][\w-]*)", rest)
    if not match:
        raise ReferenceSyntaxError(f"{_show(text)}: write {root}.NAME")
    name = match.group(1)
    rest = rest[match.end() :]
    if root == "inputs":
        return Reference("inputs", name, _parse_path(rest, text), expr)
    out = re.match(r"^\.(output|artifacts)\b", rest)
    if not out:
        raise ReferenceSyntaxError(
            f"{_show(text)}: a step reference reads its output: write steps.{name}.output (or .artifacts)"
        )
    # ${steps.ID.artifacts} is short for ${steps.ID.output.artifacts} (container steps' files)
    prefix: tuple[PathPart, ...] = ("artifacts",) if out.group(1) == "artifacts" else ()
    return Reference("steps", name, prefix + _parse_path(rest[out.end() :], text), expr)


def iter_strings_at(value: Any) -> Iterator[tuple[tuple[PathPart, ...], str]]:
    """Every string inside a nested structure of dicts and lists, with its path, in order.

    Iterative: a deeply nested value cannot exhaust the stack (but each path is a copy: use
    :func:`iter_strings` on values whose depth is not bounded yet).
    """
    stack: list[tuple[tuple[PathPart, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            yield path, item
        elif isinstance(item, Mapping):
            stack.extend(((*path, str(key)), child) for key, child in reversed(list(item.items())))
        elif isinstance(item, list | tuple):
            stack.extend(((*path, index), child) for index, child in reversed(list(enumerate(item))))


def iter_strings(value: Any) -> Iterator[str]:
    """Every string inside a nested structure of dicts and lists, in order (iteratively)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list | tuple):
            stack.extend(reversed(item))


def references_in(text: str) -> list[Reference]:
    """The references in one string. Raises ReferenceSyntaxError for a malformed one, including
    a ``${`` that does not close or that holds another ``${``."""
    refs: list[Reference] = []
    start = text.find("${")
    while start != -1:
        match = _REF_RE.match(text, start)
        if match is None:
            # [^{}]* stopped at a "{" before any "}", or there is no "}" at all
            shown = text[start : start + 60] + ("…" if len(text) > start + 60 else "")
            if text.find("}", start) == -1:
                raise ReferenceSyntaxError(
                    f"{shown!r}: a ${{ without its closing }}; "
                    "write ${inputs.NAME}, ${steps.ID.output} or ${item}"
                )
            raise ReferenceSyntaxError(f"{shown!r}: a reference cannot hold another ${{...}} or braces")
        refs.append(parse_reference(match.group(1)))
        start = text.find("${", match.end())
    return refs


def find_references(value: Any) -> list[Reference]:
    """All references inside a value. Raises ReferenceSyntaxError for a malformed one."""
    refs: list[Reference] = []
    for text in iter_strings(value):
        if "${" in text:
            refs.extend(references_in(text))
    return refs


@dataclass
class Context:
    """What references resolve against."""

    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]
    item: Any = None
    has_item: bool = False


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        keys = ", ".join(sorted(map(str, value))[:10])
        return f"an object with fields: {keys}" if keys else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    return f"a {type(value).__name__}"


def _walk(ref: Reference, value: Any) -> Any:
    for part in ref.path:
        if isinstance(part, int):
            if not isinstance(value, list):
                raise StepInputError(f"{ref}: [{part}] needs a list, found {_describe(value)}")
            if not -len(value) <= part < len(value):
                raise StepInputError(f"{ref}: index {part} is out of range for {_describe(value)}")
            value = value[part]
        else:
            if not isinstance(value, Mapping):
                raise StepInputError(f"{ref}: .{part} needs an object, found {_describe(value)}")
            if part not in value:
                raise StepInputError(f"{ref}: no field {part!r} in {_describe(value)}")
            value = value[part]
    return value


def lookup(ref: Reference, ctx: Context) -> Any:
    if ref.root == "item":
        if not ctx.has_item:
            raise StepInputError(f"{ref}: ${{item}} is only defined in a step with for_each")
        return _walk(ref, ctx.item)
    assert ref.name is not None
    if ref.root == "inputs":
        if ref.name not in ctx.inputs:
            raise StepInputError(f"{ref}: no input named {ref.name!r}")
        return _walk(ref, ctx.inputs[ref.name])
    if ref.name not in ctx.outputs:
        raise StepInputError(f"{ref}: the output of step {ref.name!r} is not available")
    return _walk(ref, ctx.outputs[ref.name])


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def resolve(value: Any, ctx: Context) -> Any:
    """Replace every reference inside a nested value."""
    if isinstance(value, str):
        whole = _REF_RE.fullmatch(value)
        if whole:
            return lookup(parse_reference(whole.group(1)), ctx)
        if "${" not in value:
            return value
        return _REF_RE.sub(lambda m: _as_text(lookup(parse_reference(m.group(1)), ctx)), value)
    if isinstance(value, Mapping):
        return {key: resolve(item, ctx) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, ctx) for item in value]
    return value
