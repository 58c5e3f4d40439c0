"""Loading and validating workflows, and the dependency graph they describe.

Validation reports every problem at once, each naming the step and the field.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from factory.callables import check_arguments, import_callable
from factory.errors import WorkflowValidationError
from factory.refs import Reference, ReferenceSyntaxError, find_references
from factory.spec import Step, Workflow

if TYPE_CHECKING:
    from factory.catalog import Catalog


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


def step_references(step: Step) -> list[Reference]:
    refs = find_references(step.with_)
    if step.for_each is not None:
        refs += find_references(step.for_each)
    if step.container is not None:
        refs += find_references(step.container.model_dump())
    if step.route is not None:
        refs += find_references(step.route.text)
    return refs


def step_dependencies(step: Step) -> list[str]:
    deps = list(dict.fromkeys(step.needs))
    for ref in step_references(step):
        if ref.root == "steps" and ref.name is not None and ref.name not in deps:
            deps.append(ref.name)
    return deps


def _loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for dep in deps.get(node, []):
            if dep not in deps:
                continue
            if color.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in color:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for node in deps:
        if node not in color:
            found = visit(node)
            if found:
                return found
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
        raise WorkflowValidationError([f"cycle: {' -> '.join(cycle)}"])
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
) -> Workflow:
    """Build a Workflow from parsed YAML/JSON data, collecting every problem.

    With ``agents`` (the agent catalogue), ``agent:`` steps must name an agent it can run.
    """
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
        try:
            refs = step_references(step)
        except ReferenceSyntaxError as exc:
            problems.append(f"step {step.id!r} field with: {exc}")
            refs = []
        for need in step.needs:
            if need not in known_ids:
                problems.append(f"step {step.id!r} field needs: unknown step {need!r}")
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
        deps[step.id] = [d for d in step_dependencies(step) if d in known_ids and d != step.id]
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
            problems.append(f"cycle: {' -> '.join(cycle)} (remove one of these dependencies)")
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


def validate_workflow(workflow: Workflow, check_imports: bool = True, agents: Catalog | None = None) -> Workflow:
    """Validate a workflow built in Python the same way as one loaded from YAML."""
    data = workflow.model_dump(by_alias=True, exclude_none=True)
    return validate_data(data, workflow.base_dir, workflow.name, check_imports, agents)


def load_workflow(path: str | Path, check_imports: bool = True, agents: Catalog | None = None) -> Workflow:
    """Read and validate a workflow YAML (or JSON) file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowValidationError([f"cannot read the file: {exc.strerror or exc}"], str(path)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise WorkflowValidationError([f"malformed YAML: {where}{problem}"], str(path)) from exc
    return validate_data(data, str(file.resolve().parent), str(path), check_imports, agents)
