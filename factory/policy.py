"""Who may run what: the checks a submission over the API passes before anything is stored.

Operators deploy code; keys start runs. A key with the ``submit`` scope may

- start a *registered* workflow by name (``factory workflows register``): its python
  steps, its folder and the secrets granted to it are the operator's;
- submit an *inline* workflow whose python steps name only modules the operator allowed
  (``allowed_modules``, by module prefix; empty by default), whose container steps use
  only the secrets granted to the key, and which mounts no host path.

Container steps (isolated), ``agent:`` and ``route:`` steps (agents the operator
deployed) are open to every ``submit`` key. Some modules are never callable by
name over the API, whatever the settings say (:data:`FORBIDDEN_MODULES`).

Nothing here imports a step module: names are checked as text. The decisions are
pure functions; the API turns their problems into 403 / 422 answers, and the
coordinator and its workers hold each run to the :class:`RunGrants` recorded here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from factory.errors import PermissionDeniedError, StepNotAllowedError, WorkflowValidationError
from factory.refs import ReferenceSyntaxError, find_references
from factory.spec import Workflow
from factory.store import ApiKeyRecord, RegisteredWorkflow, RunGrants

# Modules (and their submodules) a python step named over the API may never call:
# they run commands or code, open files or sockets, or reach the Factory itself.
FORBIDDEN_MODULES: tuple[str, ...] = (
    "agents",
    "builtins",
    "code",
    "codeop",
    "ctypes",
    "deployments",
    "factory",
    "fileinput",
    "glob",
    "importlib",
    "io",
    "marshal",
    "multiprocessing",
    "nt",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "posix",
    "pty",
    "ray",
    "runpy",
    "shelve",
    "shutil",
    "signal",
    "socket",
    "subprocess",
    "sys",
    "tempfile",
    "webbrowser",
)
# Where the functions of those modules are defined (os.system is posix.system, open is _io.open).
_FORBIDDEN_DEFINERS: tuple[str, ...] = (
    "_ctypes",
    "_imp",
    "_io",
    "_pickle",
    "_posixsubprocess",
    "_signal",
    "_socket",
    "_thread",
    "posixpath",
)

ALLOW_HINT = (
    "an admin allows modules with the setting allowed_modules (FACTORY_ALLOWED_MODULES, by module prefix), "
    "or registers the workflow with `factory workflows register WORKFLOW.yaml` so keys start it by name"
)


def _matches(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def forbidden_module(module: str) -> bool:
    """True for a module no API submission may call (os, subprocess, factory, ...)."""
    return _matches(module, FORBIDDEN_MODULES)


def python_target_problem(target: str, allowed: Iterable[str] | None) -> str | None:
    """Why ``module:function`` may not be called over the API, or None. ``allowed`` None: any
    module that is not forbidden (a registered workflow's own steps)."""
    module, _, attr = target.partition(":")
    if forbidden_module(module):
        return (
            f"module {module!r} is never callable from the API (it runs commands, code or files); "
            f"put the step in a module of your own: {ALLOW_HINT}"
        )
    if attr.startswith("_"):
        return f"{attr!r} is private: only public functions of a step module can be steps"
    if allowed is not None and not _matches(module, allowed):
        return f"module {module!r} is not allowed; {ALLOW_HINT}"
    return None


def check_python_grants(grants: RunGrants | None, target: str, func: object = None) -> None:
    """In the coordinator and the worker, before and after importing a step's function:
    StepNotAllowedError unless the run's grants allow it. A run without grants (started
    on this machine) may call anything."""
    if grants is None:
        return
    module = target.partition(":")[0]
    if forbidden_module(module) or not grants.allows_module(module):
        raise StepNotAllowedError(
            f"{target}: module {module!r} is not among the modules this run may import "
            f"({', '.join(grants.modules or []) or 'none'}); {ALLOW_HINT}"
        )
    defined_in = getattr(func, "__module__", None)
    if isinstance(defined_in, str) and _matches(defined_in, FORBIDDEN_MODULES + _FORBIDDEN_DEFINERS):
        raise StepNotAllowedError(
            f"{target} is {defined_in}.{getattr(func, '__name__', '?')}, which the API never runs; "
            "a step module must define its own functions"
        )


def _is_host_mount(value: object) -> bool:
    """A mount value that names a host path (not artifacts, not a reference resolved later)."""
    if not isinstance(value, str):
        return False
    text = value.strip()
    if text.startswith("sha256:"):
        return False
    try:
        refs = find_references(text)
    except ReferenceSyntaxError:
        return True
    return not (len(refs) == 1 and text.startswith("${") and text.endswith("}"))


@dataclass(frozen=True)
class Submitter:
    """Who submits: the key's id and what the operator granted it."""

    principal: str
    secrets: tuple[str, ...] = ()

    @classmethod
    def of_key(cls, record: ApiKeyRecord) -> Submitter:
        return cls(principal=f"key:{record.id}", secrets=tuple(record.secrets))


def check_inline(
    workflow: Workflow, submitter: Submitter, allowed_modules: Iterable[str], default_executor: str = "local"
) -> RunGrants:
    """The grants of an inline workflow submitted over the API, or PermissionDeniedError /
    WorkflowValidationError naming every step and field that is not allowed.

    Container steps must run on the local executor, whose egress filter keeps them off the
    host's and the private networks; the Dagger executor has no such filter, so only an
    operator's registered workflow may use it."""
    allowed = [m for m in allowed_modules if m]
    denied: list[str] = []
    invalid: list[str] = []
    for step in workflow.steps:
        if step.python is not None:
            problem = python_target_problem(step.python, allowed)
            if problem:
                denied.append(f"step {step.id!r} field python: {problem}")
        if step.container is not None:
            if (step.executor or default_executor) != "local":
                denied.append(
                    f"step {step.id!r} field executor: the {step.executor or default_executor} executor has no "
                    "network filter, so workflows sent over the API run container steps on the local executor; "
                    "an admin registers workflows that need Dagger (`factory workflows register`)"
                )
            for name in step.container.secrets:
                if name not in submitter.secrets:
                    denied.append(
                        f"step {step.id!r} field container.secrets: secret {name!r} is not granted to this key; "
                        f"an admin grants it with `factory keys create --secret {name}` (or registers the workflow "
                        "with `factory workflows register --secret`)"
                    )
            for target, value in step.container.mounts.items():
                if _is_host_mount(value):
                    invalid.append(
                        f"step {step.id!r} field container.mounts[{target!r}]: host paths cannot be mounted by a "
                        "workflow sent over the API; mount ${steps.ID.artifacts} (or register the workflow)"
                    )
    if workflow.runtime is not None:
        invalid.append(
            "workflow field runtime: pip requirements and py_modules are installed by `factory submit` into a Ray "
            "job's runtime_env; the API runs steps in the server's own environment, so remove `runtime:` (and have "
            "the operator install what the steps need there)"
        )
    if invalid:
        raise WorkflowValidationError(invalid, workflow.name)
    if denied:
        raise PermissionDeniedError("this key may not run the workflow: " + "; ".join(denied), problems=denied)
    modules = sorted({step.python.partition(":")[0] for step in workflow.steps if step.python})
    return RunGrants(
        principal=submitter.principal,
        modules=modules,
        secrets=sorted({n for s in workflow.steps if s.container for n in s.container.secrets}),
        host_mounts=False,
    )


def check_registration(workflow: Workflow) -> None:
    """A workflow an admin registers may not call forbidden modules either."""
    problems = []
    for step in workflow.steps:
        if step.python is not None:
            problem = python_target_problem(step.python, None)
            if problem:
                problems.append(f"step {step.id!r} field python: {problem}")
    if problems:
        raise WorkflowValidationError(problems, workflow.name)


def registered_grants(registered: RegisteredWorkflow, workflow: Workflow, submitter: Submitter) -> RunGrants:
    """A run of a registered workflow: its own modules, its granted secrets, its folder."""
    return RunGrants(
        principal=submitter.principal,
        modules=sorted({step.python.partition(":")[0] for step in workflow.steps if step.python}),
        secrets=list(registered.secrets),
        host_mounts=registered.base_dir is not None,
        workflow_ref=f"{registered.name}@{registered.version}",
    )


def owner_namespace(grants: RunGrants | None) -> str | None:
    """The namespace a run's shared things (artifacts, caches, cached results) live in:
    None for runs started on this machine, else one per key."""
    return None if grants is None or grants.principal == "local" else grants.principal


def check_secret_grants(grants: RunGrants | None, names: Iterable[str]) -> None:
    """In the worker, before resolving a container step's secrets: StepNotAllowedError for a
    name the run was not granted."""
    if grants is None or grants.secrets is None:
        return
    refused = sorted(set(names) - set(grants.secrets))
    if refused:
        raise StepNotAllowedError(
            f"secret(s) {', '.join(refused)} are not granted to this run; an admin grants secrets to a key "
            "(`factory keys create --secret NAME`) or to a registered workflow (`factory workflows register --secret`)"
        )


def cache_name(name: str, owner: str | None) -> str:
    """The name a container cache has on disk (or in Dagger): one set of caches per key, so a
    run of one key never sees a file that a run of another key planted."""
    if owner is None:
        return name
    return f"k{hashlib.sha256(owner.encode()).hexdigest()[:16]}-{name}"


def resume_problem(
    grants: RunGrants | None, resumer_is_admin: bool, starter: ApiKeyRecord | None, now: float
) -> str | None:
    """Why a key may not resume a run over the API, or None. A run without grants (started
    on the machine, or before runs had grants) may run any code, so only an admin key
    resumes it; a run whose key was revoked or expired resumes only with an admin key."""
    if resumer_is_admin:
        return None
    if grants is None:
        return (
            "this run was started on the machine (it has no grants, so it may run any code): "
            "only an admin key resumes it over the API, or `factory resume` on the machine"
        )
    if grants.principal.startswith("key:") and (starter is None or starter.revoked or starter.expired(now)):
        return f"the key that started this run ({grants.principal}) was revoked or expired: an admin key resumes it"
    return None
