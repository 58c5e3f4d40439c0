"""Reading YAML text into plain JSON data, safely and within bounds.

What PyYAML's ``safe_load`` lets through and this loader does not:

- Size: the text is at most ``limits.max_bytes``; nesting is counted while the
  document is composed, which stops at ``limits.max_depth`` levels, before the
  composer's recursion could run out of stack; at most ``limits.max_aliases``
  aliases (``*name``); the size of the data once aliases are expanded (values
  and bytes of text) is computed on the node graph, memoised per node, without
  expanding anything, so a "billion laughs" document is refused in
  milliseconds. A recursive alias (an anchor that contains itself) is refused.
- Types: only JSON data. Tags other than the JSON ones (``!!str``, ``!!int``,
  ``!!float``, ``!!bool``, ``!!null``, ``!!seq``, ``!!map``) are refused:
  ``!!binary``, ``!!set``, ``!!omap``, ``!!pairs``, ``!!timestamp``,
  ``!!python/...`` and local tags. NaN and infinity are refused.
- Dates and times written plainly (``2024-01-01``, ``2024-01-01 10:00:00``) stay
  strings, exactly as written: a workflow never holds date objects.
- Mapping keys are strings, taken as written: ``1: x`` has the key ``"1"``,
  ``null: x`` the key ``"null"``, and ``on: [...]`` the key ``"on"`` (PyYAML
  would make those an int, None and True). A list or mapping used as a key, and
  a key given twice in one mapping, are refused.

Problems name the line and column. libyaml's parser is used when PyYAML has it
(about 5x faster); composition and construction are always PyYAML's Python code.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.events import AliasEvent, CollectionStartEvent, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader, ReaderError
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from factory.errors import WorkflowValidationError
from factory.limits import DocumentLimits, setting_hint

_YAML = "tag:yaml.org,2002:"
JSON_TAGS = frozenset(_YAML + name for name in ("str", "int", "float", "bool", "null", "seq", "map"))
_MERGE = _YAML + "merge"
_NOT_JSON = "a workflow holds plain JSON data: strings, numbers, true/false, null, lists and mappings"


class DocumentRefused(Exception):
    """The YAML is well-formed but not allowed (a bound passed, a non-JSON tag): ``problem`` says why."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


def _at(mark: Mark | Any | None) -> str:
    line, column = getattr(mark, "line", None), getattr(mark, "column", None)
    if line is None or column is None:
        return "the document"
    return f"line {line + 1}, column {column + 1}"


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix(_YAML) if tag.startswith(_YAML) else tag


class _JsonResolver(Resolver):
    """YAML 1.1 plain scalars, without timestamps (they stay strings) and the odd ``=`` value tag."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_YAML + "timestamp", _YAML + "value")]
        for first, resolvers in Resolver.yaml_implicit_resolvers.items()
    }


class _GuardedComposer(Composer):
    """PyYAML's composer, counting nesting and aliases as it goes and refusing non-JSON tags."""

    def __init__(self, limits: DocumentLimits) -> None:
        super().__init__()
        self.limits = limits
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[attr-defined]  # the parser's, mixed in
        if isinstance(event, AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                raise DocumentRefused(
                    f"{_at(event.start_mark)}: more than {self.limits.max_aliases} aliases (*name) in one "
                    f"document ({setting_hint('max_aliases')}); write the values out"
                )
            return super().compose_node(parent, index)
        tag = event.tag if isinstance(event, NodeEvent) else None  # type: ignore[attr-defined]
        if tag not in (None, "!") and tag not in JSON_TAGS:
            raise DocumentRefused(f"{_at(event.start_mark)}: the tag {_tag_name(tag)} is not allowed: {_NOT_JSON}")
        if not isinstance(event, CollectionStartEvent):
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > self.limits.max_depth:
                raise DocumentRefused(
                    f"{_at(event.start_mark)}: nested deeper than {self.limits.max_depth} levels of mappings "
                    f"and lists ({setting_hint('max_depth')}); flatten the data"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _JsonConstructor(SafeConstructor):
    """SafeConstructor for the JSON tags only; string keys as written; finite numbers."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (DocumentRefused, yaml.YAMLError):
            raise
        except Exception as exc:  # noqa: BLE001 - PyYAML's scalar constructors on odd text: !!int abc, !!float ""
            value = node.value if isinstance(node, ScalarNode) else type(node).__name__
            text = value if len(value) <= 40 else value[:39] + "…"
            raise DocumentRefused(
                f"{_at(node.start_mark)}: cannot read {text!r} as {_tag_name(node.tag)} ({exc})"
            ) from None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, MappingNode):
            raise DocumentRefused(f"{_at(node.start_mark)}: expected a mapping")
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            if not isinstance(key_node, ScalarNode):
                raise DocumentRefused(
                    f"{_at(key_node.start_mark)}: a mapping key must be a string, not a "
                    f"{'list' if isinstance(key_node, SequenceNode) else 'mapping'}"
                )
            if key_node.value in seen:
                raise DocumentRefused(
                    f"{_at(key_node.start_mark)}: the key {key_node.value!r} is given twice in this mapping"
                )
            seen.add(key_node.value)
        self.flatten_mapping(node)  # `<<: *defaults` merge keys
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise DocumentRefused(f"{_at(key_node.start_mark)}: a mapping key must be a string")
            # keys are taken as written: `1:` is "1", `null:` is "null", `on:` is "on"
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_yaml_float(self, node: ScalarNode) -> float:
        value = super().construct_yaml_float(node)
        if not math.isfinite(value):
            raise DocumentRefused(
                f"{_at(node.start_mark)}: {node.value!r} is not a JSON number (NaN and infinity are not allowed)"
            )
        return value

    def refuse_tag(self, node: Node) -> Any:
        raise DocumentRefused(f"{_at(node.start_mark)}: the tag {_tag_name(node.tag)} is not allowed: {_NOT_JSON}")


_JsonConstructor.yaml_constructors = {
    tag: getattr(_JsonConstructor, constructor.__name__)
    for tag, constructor in SafeConstructor.yaml_constructors.items()
    if tag in JSON_TAGS
}
_JsonConstructor.yaml_constructors[None] = _JsonConstructor.refuse_tag


class _PyLoader(Reader, Scanner, Parser, _GuardedComposer, _JsonConstructor, _JsonResolver):
    def __init__(self, text: str, limits: DocumentLimits) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        _GuardedComposer.__init__(self, limits)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)


_Loader: Any = _PyLoader
if yaml.__with_libyaml__:  # pragma: no branch - wheels of PyYAML ship libyaml
    from yaml._yaml import CParser

    class _CLoader(_GuardedComposer, CParser, _JsonConstructor, _JsonResolver):
        """libyaml's parser (events) under the Python composer and constructor above."""

        def __init__(self, text: str, limits: DocumentLimits) -> None:
            CParser.__init__(self, text)
            _GuardedComposer.__init__(self, limits)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _Loader = _CLoader


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [value for _, value in node.value]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def check_expansion(root: Node, limits: DocumentLimits) -> None:
    """Refuse a node graph whose data, aliases expanded, would pass the limits, or that contains itself.

    Values (one per mapping, list and scalar; keys are not counted), bytes of scalar text and
    depth are computed per node once (memoised by identity), so shared nodes cost nothing more.
    """
    memo: dict[int, tuple[int, int, int]] = {}  # id -> (values, bytes of text, depth)
    open_nodes: set[int] = set()  # entered, not yet finished: reaching one again is a cycle
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            parts = [memo[id(child)] for child in _children(node)]
            values = 1 + sum(p[0] for p in parts)
            size = sum(p[1] for p in parts)
            depth = 1 + max((p[2] for p in parts), default=0)
            memo[key] = (values, size, depth)
            where = _at(node.start_mark)
            if values > limits.max_nodes:
                raise DocumentRefused(
                    f"{where}: this holds more than {limits.max_nodes} values once its aliases are expanded "
                    f"({setting_hint('max_nodes')}); use fewer aliases or a smaller document"
                )
            if size > limits.max_bytes:
                raise DocumentRefused(
                    f"{where}: this holds more than {limits.max_bytes} bytes of text once its aliases are "
                    f"expanded ({setting_hint('max_bytes')}); use fewer aliases or a smaller document"
                )
            if depth > limits.max_depth:
                raise DocumentRefused(
                    f"{where}: aliases nest this deeper than {limits.max_depth} levels of mappings and lists "
                    f"({setting_hint('max_depth')}); flatten the data"
                )
            continue
        if key in memo:
            continue
        if key in open_nodes:
            raise DocumentRefused(f"{_at(node.start_mark)}: a recursive alias: this anchor contains itself")
        if isinstance(node, ScalarNode):
            text = node.value
            memo[key] = (1, len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass")), 0)
            continue
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(_children(node)))


def _decode(text: str | bytes, limits: DocumentLimits) -> str:
    if isinstance(text, bytes) or len(text) > limits.max_bytes:  # a character is at least one byte
        size = len(text)
    else:
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise DocumentRefused(
            f"the document is larger than {limits.max_bytes} bytes ({setting_hint('max_bytes')}); "
            "make it smaller or pass large data as files"
        )
    if isinstance(text, str):
        return text
    try:
        return text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentRefused(
            f"the document is not UTF-8 text (byte {text[exc.start]:#04x} at offset {exc.start})"
        ) from None


def load_data(text: str | bytes, limits: DocumentLimits) -> Any:
    """The data of one YAML document. Raises yaml.YAMLError (malformed) or DocumentRefused."""
    loader = _Loader(_decode(text, limits), limits)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_expansion(node, limits)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """``malformed YAML: line 3, column 5: found undefined alias 'x'``."""
    if isinstance(exc, ReaderError):  # a character YAML does not allow (control characters, bad encoding)
        return f"malformed YAML: character {exc.position + 1}: {exc.reason} ({exc.character!r})"
    mark = getattr(exc, "problem_mark", None)
    where = f"{_at(mark)}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return f"malformed YAML: {where}{context + ', ' if context else ''}{problem}"


def load_yaml(text: str | bytes, limits: DocumentLimits, *, source: str | None = None) -> Any:
    """The data of one YAML (or JSON) document, plain JSON data within ``limits``;
    WorkflowValidationError naming the line and column otherwise."""
    try:
        return load_data(text, limits)
    except DocumentRefused as exc:
        raise WorkflowValidationError([exc.problem], source) from None
    except yaml.YAMLError as exc:
        raise WorkflowValidationError([yaml_problem(exc)], source) from None


def read_input_value(text: str, limits: DocumentLimits) -> Any:
    """A value written on a command line (``--input n=6``), read as YAML like a workflow's values:
    ``6`` is a number, ``[1, 2]`` a list, ``2024-01-01`` stays a string. Text that is not
    well-formed YAML is the string itself; a value that is well-formed but not allowed (a
    ``!!binary`` tag, NaN, too deep) raises DocumentRefused."""
    try:
        return load_data(text, limits)
    except yaml.YAMLError:
        return text
