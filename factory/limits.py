"""Bounds on workflow documents and run inputs: plain JSON data, and not too much of it.

A workflow (YAML text, a JSON body, or data built in Python) and the inputs of a
run must be JSON data: mappings with string keys, lists, strings, finite numbers,
booleans and null. Their size is bounded by :class:`DocumentLimits`, which the
caller builds from the settings (``DocumentLimits.from_settings``) and passes
explicitly. Every check here is iterative, so no input can exhaust the stack,
and stops as soon as a bound is passed, so none takes long.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from factory.errors import WorkflowValidationError

if TYPE_CHECKING:
    from factory.settings import Settings

# The defaults of the settings of the same names (factory.settings, "bounds on workflow documents").
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ALIASES = 100
DEFAULT_MAX_NODES = 100_000
DEFAULT_MAX_STEPS = 10_000
DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
# The step context (factory.stepcontext). A once() result is bounded by max_output_bytes too.
MAX_ONCE_KEY_CHARS = 200  # a once() key
MAX_ONCE_KEYS_PER_STEP = 1_000  # once() records of one step (or one for_each item) of a run, all attempts together
MAX_PROGRESS_MESSAGE_CHARS = 500  # a progress() message is cut to this
MAX_EMIT_BYTES = 16 * 1024  # one emit()'s data, as JSON
MAX_EMIT_BATCH_BYTES = 64 * 1024  # emitted data waiting for the next event; beyond it, emits are dropped (counted)
STEP_EVENT_INTERVAL_SECONDS = 0.5  # a running attempt publishes its progress and emitted data at most this often
# POST /v1/workflows?wait=SECONDS: the longest a caller may wait for a run's end in one request.
MAX_API_WAIT_SECONDS = 300.0
# The YAML composer and the JSON encoders recurse once or twice per level: no setting may allow more.
MAX_DEPTH_CEILING = 200
# Reporting stops after this many problems of one document (the first ones say what to fix).
MAX_PROBLEMS = 20
MAX_PATH_PARTS = 12  # a place deeper than this is shown cut short

Path = tuple[str | int, ...]
_NAME_RE = re.compile(r"[A-Za-z_][\w-]*")  # shown as .name in a place; other keys as ['key']


class DocumentLimits(BaseModel):
    """How big a workflow document (or a run's inputs) may be."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(
        default=DEFAULT_MAX_BYTES, ge=1, description="Size of the text; also the total size of its strings."
    )
    max_depth: int = Field(
        default=DEFAULT_MAX_DEPTH, ge=1, le=MAX_DEPTH_CEILING, description="Levels of nested mappings and lists."
    )
    max_aliases: int = Field(default=DEFAULT_MAX_ALIASES, ge=0, description="YAML aliases (*name) in one document.")
    max_nodes: int = Field(
        default=DEFAULT_MAX_NODES, ge=1, description="Values (mappings, lists, scalars) after aliases are expanded."
    )
    max_steps: int = Field(default=DEFAULT_MAX_STEPS, ge=1, description="Steps in one workflow.")

    @classmethod
    def from_settings(cls, settings: Settings) -> DocumentLimits:
        return cls(
            max_bytes=settings.workflow_max_bytes,
            max_depth=settings.workflow_max_depth,
            max_aliases=settings.workflow_max_aliases,
            max_nodes=settings.workflow_max_nodes,
            max_steps=settings.workflow_max_steps,
        )


def setting_hint(field: str) -> str:
    """``setting workflow_max_depth, FACTORY_WORKFLOW_MAX_DEPTH`` for the DocumentLimits field ``max_depth``."""
    name = field if field.startswith("max_output") else f"workflow_{field}"
    return f"setting {name}, FACTORY_{name.upper()}"


def format_path(path: Path) -> str:
    """``steps[2].with.x`` for ("steps", 2, "with", "x"); a very deep path is cut short."""
    text = ""
    for part in path[:MAX_PATH_PARTS]:
        if isinstance(part, int) or not _NAME_RE.fullmatch(part):
            text += f"[{part!r}]" if isinstance(part, str) else f"[{part}]"
        else:
            text += f".{part}" if text else part
    if len(path) > MAX_PATH_PARTS:
        text += f"… ({len(path) - MAX_PATH_PARTS} levels more)"
    return text or "(top level)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _type_name(value: Any) -> str:
    names = {dict: "mapping", list: "list", tuple: "list", str: "string", bool: "boolean", type(None): "null"}
    names.update({int: "number", float: "number"})
    return names.get(type(value), type(value).__name__)


def _check(value: Any, limits: DocumentLimits, place: Callable[[Path], str], what: str, sizes: bool) -> list[str]:
    """Every problem of ``value`` (iteratively; stops at the first bound passed)."""
    problems: list[str] = []
    nodes = 0
    text_bytes = 0
    stack: list[tuple[Any, Path, int]] = [(value, (), 0)]
    while stack and len(problems) < MAX_PROBLEMS:
        item, path, depth = stack.pop()
        nodes += 1
        if sizes and nodes > limits.max_nodes:
            problems.append(
                f"{what} holds more than {limits.max_nodes} values (mappings, lists, strings, numbers) "
                f"({setting_hint('max_nodes')}); make it smaller"
            )
            break
        if isinstance(item, str):
            text_bytes += len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
            if sizes and text_bytes > limits.max_bytes:
                problems.append(
                    f"{what} holds more than {limits.max_bytes} bytes of text ({setting_hint('max_bytes')}); "
                    "pass large data as a file path instead"
                )
                break
        elif item is None or isinstance(item, bool | int):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                problems.append(f"{place(path)}: {item} is not a JSON number (NaN and infinity are not allowed)")
        elif isinstance(item, dict | list | tuple):
            if depth + 1 > limits.max_depth:
                problems.append(
                    f"{place(path)}: nested deeper than {limits.max_depth} levels of mappings and lists "
                    f"({setting_hint('max_depth')}); flatten the data"
                )
                break
            if isinstance(item, dict):
                children: list[tuple[Any, Path, int]] = []
                for key, child in item.items():
                    if not isinstance(key, str):
                        problems.append(
                            f"{place(path)}: the key {_short(key)} ({_type_name(key)}) is not a string; "
                            "mapping keys must be strings (write it in quotes)"
                        )
                        continue
                    children.append((child, (*path, key), depth + 1))
                stack.extend(reversed(children))
            else:
                stack.extend((child, (*path, i), depth + 1) for i, child in reversed(list(enumerate(item))))
        else:
            problems.append(
                f"{place(path)}: {_short(item)} ({_type_name(item)}) is not JSON data; use strings, numbers, "
                "true/false, null, lists and mappings (write dates and times as strings)"
            )
    return problems


def _workflow_place(data: Any) -> Callable[[Path], str]:
    """Names a place in a workflow the way validation does: ``step 'load' field with.x``."""

    def place(path: Path) -> str:
        if len(path) >= 2 and path[0] == "steps" and isinstance(path[1], int) and isinstance(data, dict):
            steps = data.get("steps")
            raw = steps[path[1]] if isinstance(steps, list) and path[1] < len(steps) else None
            label = f"step {raw['id']!r}" if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
            label = label or f"steps[{path[1]}]"
            return f"{label} field {format_path(path[2:])}" if len(path) > 2 else label
        return f"workflow field {format_path(path)}" if path else "the workflow"

    return place


def check_data_bounds(data: Any, limits: DocumentLimits, *, source: str | None = None) -> None:
    """Raise WorkflowValidationError unless ``data`` (a workflow as parsed YAML or JSON) is JSON data
    within ``limits``: depth, number of values, bytes of text, number of steps."""
    problems = _check(data, limits, _workflow_place(data), "the workflow", sizes=True)
    steps = data.get("steps") if isinstance(data, dict) else None
    if isinstance(steps, list) and len(steps) > limits.max_steps:
        problems.append(
            f"workflow field steps: {len(steps)} steps, more than {limits.max_steps} "
            f"({setting_hint('max_steps')}); split the workflow"
        )
    if problems:
        raise WorkflowValidationError(problems, source)


def check_data_shape(data: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, source: str | None = None) -> None:
    """Like :func:`check_data_bounds` without the size bounds: JSON data nested at most ``max_depth`` deep."""
    limits = DocumentLimits(max_depth=max_depth)
    problems = _check(data, limits, _workflow_place(data), "the workflow", sizes=False)
    if problems:
        raise WorkflowValidationError(problems, source)


def check_inputs(inputs: Any, limits: DocumentLimits, *, source: str | None = None) -> dict[str, Any]:
    """The inputs of a run (``--input``, the API's ``inputs``) if they are a mapping of names to JSON
    data within ``limits``; else WorkflowValidationError naming each bad input."""
    if inputs is None:
        return {}
    if not isinstance(inputs, dict):
        raise WorkflowValidationError(
            [f"inputs: a mapping of input names to values is needed, found {_short(inputs)} ({_type_name(inputs)})"],
            source,
        )

    def place(path: Path) -> str:
        if not path:
            return "inputs"
        return f"input {path[0]!r}" + (f" field {format_path(path[1:])}" if len(path) > 1 else "")

    problems = _check(inputs, limits, place, "the inputs", sizes=True)
    if problems:
        raise WorkflowValidationError(problems, source)
    return dict(inputs)
