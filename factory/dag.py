"""Loading and validating workflows, and the dependency graph they describe.

Validation reports every problem at once, each naming the step and the field.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from factory.callables import check_arguments, import_callable
from factory.errors import WorkflowValidationError
from factory.limits import DocumentLimits, check_data_bounds, check_data_shape, format_path, setting_hint
from factory.refs import Reference, ReferenceSyntaxError, find_references, iter_strings_at, references_in
from factory.safeyaml import load_yaml
from factory.spec import Step, Workflow

if TYPE_CHECKING:
    from factory.catalog import Catalog

MAX_REPORTED_PROBLEMS = 100  # a validation error lists at most this many problems (then how many more)


@dataclass
class Graph:
    """Dependencies between the steps of a valid workflow."""

    order: list[str]
    deps: dict[str, list[str]]
    dependants: dict[str, list[str]] = field(default_factory=dict)

    def descendants(self, step_id: str) -> set[str]:
        seen: set[str] = set()
        queue = deque(self.dependants.get(step_id, []))
        while queue:
            current = queue.popleft()
            if current not in seen:
                seen.add(current)
                queue.extend(self.dependants.get(current, []))
        return seen


def _loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _reference_fields(step: Step) -> list[tuple[str, Any]]:
    """The fields of a step that may hold ${...} references, by name."""
    fields: list[tuple[str, Any]] = [("with", step.with_)]
    if step.for_each is not None:
        fields.append(("for_each", step.for_each))
    if step.container is not None:
        fields.append(("container", step.container.model_dump()))
    if step.route is not None:
        fields.append(("route.text", step.route.text))
    if step.approval is not None:
        fields.append(("approval.message", step.approval.message))
    return fields


def step_references(step: Step) -> list[Reference]:
    refs: list[Reference] = []
    for _, value in _reference_fields(step):
        refs += find_references(value)
    return refs


def _references_and_problems(step: Step) -> tuple[list[Reference], list[str]]:
    """The step's references, and a problem naming the field for each malformed one."""
    refs: list[Reference] = []
    problems: list[str] = []
    for name, value in _reference_fields(step):
        for path, text in iter_strings_at(value):
            if "${" not in text:
                continue
            try:
                refs += references_in(text)
            except ReferenceSyntaxError as exc:
                shown = format_path(path) if path else ""
                where = name + ("." + shown if shown[:1] not in ("", "[") else shown)
                problems.append(f"step {step.id!r} field {where}: {exc}")
    return refs, problems


def step_dependencies(step: Step) -> list[str]:
    deps = list(dict.fromkeys(step.needs))
    for ref in step_references(step):
        if ref.root == "steps" and ref.name is not None and ref.name not in deps:
            deps.append(ref.name)
    return deps


def _cycle_text(cycle: list[str]) -> str:
    """``a -> b -> a``; a long cycle is shown by its ends."""
    if len(cycle) <= 21:
        return " -> ".join(cycle)
    return " -> ".join(cycle[:10]) + f" -> ... ({len(cycle) - 20} steps) -> " + " -> ".join(cycle[-10:])


def _find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as [a, b, ..., a], or None. Iterative depth-first search: a chain of
    any length cannot exhaust the stack."""
    color: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in deps:
        if start in color:
            continue
        color[start] = 1
        path = [start]
        pending = [iter(deps.get(start, []))]
        while pending:
            for dep in pending[-1]:
                if dep not in deps:
                    continue
                if color.get(dep) == 1:
                    return [*path[path.index(dep) :], dep]
                if dep not in color:
                    color[dep] = 1
                    path.append(dep)
                    pending.append(iter(deps.get(dep, [])))
                    break
            else:
                color[path.pop()] = 2
                pending.pop()
    return None


def build_graph(workflow: Workflow) -> Graph:
    """Topological order and dependency maps of an already validated workflow."""
    deps = {step.id: step_dependencies(step) for step in workflow.steps}
    dependants: dict[str, list[str]] = defaultdict(list)
    indegree = {step_id: len(d) for step_id, d in deps.items()}
    for step_id, d in deps.items():
        for dep in d:
            dependants[dep].append(step_id)
    queue = deque(s.id for s in workflow.steps if indegree[s.id] == 0)
    order: list[str] = []
    while queue:
        current = queue.popleft()
        order.append(current)
        for nxt in dependants[current]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                queue.append(nxt)
    if len(order) != len(deps):
        cycle = _find_cycle(deps) or []
        raise WorkflowValidationError([f"cycle: {_cycle_text(cycle)}"])
    return Graph(order=order, deps=deps, dependants=dict(dependants))


def _step_label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("id"), str):
        return f"step {raw['id']!r}"
    return f"steps[{index}]"


def validate_data(
    data: Any,
    base_dir: str | None = None,
    source: str | None = None,
    check_imports: bool = True,
    agents: Catalog | None = None,
    *,
    limits: DocumentLimits | None = None,
) -> Workflow:
    """Build a Workflow from parsed YAML/JSON data, collecting every problem.

    With ``agents`` (the agent catalogue), ``agent:`` steps must name an agent it can run.
    With ``limits``, the data must be within them (:func:`factory.limits.check_data_bounds`);
    without, it must still be JSON data nested no deeper than the default depth.
    """
    if limits is not None:
        check_data_bounds(data, limits, source=source)
    else:
        check_data_shape(data, source=source)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise WorkflowValidationError(
            [f"a workflow is a mapping with name, inputs and steps; found {type(data).__name__}"], source
        )
    raw_steps = data.get("steps")
    steps: list[Step] = []
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append("steps: a workflow needs a non-empty list of steps")
        raw_steps = []
    for index, raw in enumerate(raw_steps):
        label = _step_label(raw, index)
        try:
            steps.append(Step.model_validate(raw))
        except ValidationError as exc:
            for err in exc.errors():
                where = _loc(tuple(err["loc"]))
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = (
                        "unknown field (allowed: "
                        + ", ".join(f.alias or name for name, f in Step.model_fields.items())
                        + ")"
                    )
                problems.append(f"{label} field {where}: {msg}")
    top = {k: v for k, v in data.items() if k != "steps"}
    try:
        Workflow.model_validate({**top, "steps": [{"id": "placeholder", "python": "m:f"}]})
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(f"workflow field {_loc(tuple(err['loc']))}: {err['msg']}")

    raw_ids = [raw.get("id") for raw in raw_steps if isinstance(raw, dict)]
    known_ids = {i for i in raw_ids if isinstance(i, str)}
    seen: set[str] = set()
    for step_id in raw_ids:
        if isinstance(step_id, str):
            if step_id in seen:
                problems.append(f"step {step_id!r} field id: duplicate id; each step needs its own")
            seen.add(step_id)
    inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
    assert isinstance(inputs, dict)

    deps: dict[str, list[str]] = {}
    for step in steps:
        refs, ref_problems = _references_and_problems(step)
        problems += ref_problems
        for need in step.needs:
            if need not in known_ids:
                hint = " (list step ids here, not ${...} references)" if "${" in need else ""
                problems.append(f"step {step.id!r} field needs: unknown step {need[:80]!r}{hint}")
        for ref in refs:
            if ref.root == "steps" and ref.name not in known_ids:
                problems.append(f"step {step.id!r} references unknown step {ref.name!r} in {ref}")
            elif ref.root == "steps" and ref.name == step.id:
                problems.append(f"step {step.id!r} references its own output in {ref}")
            elif ref.root == "inputs" and ref.name not in inputs:
                declared = ", ".join(sorted(inputs)) or "none"
                problems.append(
                    f"step {step.id!r} references unknown input {ref.name!r} in {ref} "
                    f"(declared inputs: {declared}; add it under `inputs:`)"
                )
            elif ref.root == "item" and step.for_each is None:
                problems.append(f"step {step.id!r} uses {ref} but has no for_each")
        if isinstance(step.for_each, str) and not (
            step.for_each.strip().startswith("${") and step.for_each.strip().endswith("}")
        ):
            problems.append(
                f"step {step.id!r} field for_each: must be a list or one reference like ${{steps.ID.output}}"
            )
        if step.id in step.needs:
            problems.append(f"step {step.id!r} field needs: a step cannot need itself")
        step_deps = dict.fromkeys([*step.needs, *(r.name for r in refs if r.root == "steps" and r.name)])
        deps[step.id] = [d for d in step_deps if d in known_ids and d != step.id]
        if agents is not None and step.agent is not None:
            problems.extend(_agent_problems(step.id, step.agent, agents))
        if check_imports and step.python:
            try:
                func = import_callable(step.python, [base_dir] if base_dir else [])
            except (ImportError, AttributeError, TypeError) as exc:
                problems.append(f"step {step.id!r} field python: {exc}")
            except Exception as exc:  # noqa: BLE001 - importing user code can raise anything
                problems.append(f"step {step.id!r} field python: importing {step.python} raised {exc!r}")
            else:
                for msg in check_arguments(func, set(step.with_), step.python):
                    problems.append(f"step {step.id!r} field with: {msg}")

    if len(set(deps)) == len(deps):
        cycle = _find_cycle(deps)
        if cycle:
            problems.append(f"cycle: {_cycle_text(cycle)} (remove one of these dependencies)")
    if len(problems) > MAX_REPORTED_PROBLEMS:
        more = len(problems) - MAX_REPORTED_PROBLEMS
        problems = [*problems[:MAX_REPORTED_PROBLEMS], f"... and {more} more problem(s) like these"]
    if problems:
        raise WorkflowValidationError(problems, source)
    # base_dir is where the workflow came from (its file's folder), never something its text may claim
    return Workflow.model_validate({**top, "steps": steps, "base_dir": base_dir})


def _agent_problems(step_id: str, name: str, agents: Catalog) -> list[str]:
    known = {a.name: a for a in agents.agents}
    if name not in known:
        names = ", ".join(sorted(known)) or "none"
        return [f"step {step_id!r} field agent: unknown agent {name!r} (the catalogue has: {names})"]
    if known[name].class_ is None:
        return [f"step {step_id!r} field agent: agent {name!r} has no `class:` in the catalogue, so it cannot run"]
    return []


def validate_workflow(
    workflow: Workflow,
    check_imports: bool = True,
    agents: Catalog | None = None,
    *,
    limits: DocumentLimits | None = None,
) -> Workflow:
    """Validate a workflow built in Python the same way as one loaded from YAML."""
    # fields left at their defaults are left out: they are valid, and the size bounds count what was written
    data = workflow.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
    return validate_data(data, workflow.base_dir, workflow.name, check_imports, agents, limits=limits)


def parse_workflow_text(text: str | bytes, *, limits: DocumentLimits, source: str | None = None) -> Any:
    """The data of a workflow document (YAML or JSON text), safe to validate: plain JSON data
    within ``limits`` (factory.safeyaml, factory.limits). Raises WorkflowValidationError."""
    data = load_yaml(text, limits, source=source)
    check_data_bounds(data, limits, source=source)
    return data


def workflow_from_text(
    text: str | bytes,
    *,
    limits: DocumentLimits,
    source: str | None = None,
    base_dir: str | None = None,
    check_imports: bool = True,
    agents: Catalog | None = None,
) -> Workflow:
    """The one way from text to a validated Workflow: :func:`parse_workflow_text`, then :func:`validate_data`."""
    data = parse_workflow_text(text, limits=limits, source=source)
    return validate_data(data, base_dir, source, check_imports, agents, limits=limits)


def load_workflow(
    path: str | Path,
    check_imports: bool = True,
    agents: Catalog | None = None,
    *,
    limits: DocumentLimits | None = None,
) -> Workflow:
    """Read and validate a workflow YAML (or JSON) file (``limits``: default DocumentLimits())."""
    limits = limits or DocumentLimits()
    data = read_workflow_file(path, limits=limits)
    base_dir = str(Path(path).resolve().parent)
    return validate_data(data, base_dir, str(path), check_imports, agents, limits=limits)


def read_workflow_file(path: str | Path, *, limits: DocumentLimits) -> Any:
    """The data of a workflow file, as :func:`parse_workflow_text` reads it; at most
    ``limits.max_bytes`` are read. Raises WorkflowValidationError."""
    try:
        with Path(path).open("rb") as handle:
            raw = handle.read(limits.max_bytes + 1)  # never more: the path may name a device or a huge file
    except OSError as exc:
        raise WorkflowValidationError([f"cannot read the file: {exc.strerror or exc}"], str(path)) from exc
    if len(raw) > limits.max_bytes:
        raise WorkflowValidationError(
            [f"the file is larger than {limits.max_bytes} bytes ({setting_hint('max_bytes')}); make it smaller"],
            str(path),
        )
    return parse_workflow_text(raw, limits=limits, source=str(path))
