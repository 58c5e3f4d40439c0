"""Who may run what: the pure checks behind the API's 403 / 422 answers."""

from __future__ import annotations

import os

import pytest

from factory.errors import PermissionDeniedError, StepNotAllowedError, WorkflowValidationError
from factory.policy import (
    FORBIDDEN_MODULES,
    Submitter,
    cache_name,
    check_inline,
    check_python_grants,
    check_registration,
    check_secret_grants,
    owner_namespace,
)
from factory.spec import Workflow
from factory.store import RunGrants

KEY = Submitter(principal="key:k1", secrets=("GRANTED",))


def workflow(*steps: dict[str, object]) -> Workflow:
    return Workflow.model_validate({"name": "w", "steps": list(steps)})


@pytest.mark.parametrize("module", [*FORBIDDEN_MODULES, "os.path", "factory.store.sqlite", "importlib.util"])
def test_forbidden_modules_are_refused_even_when_allowed(module: str) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        check_inline(workflow({"id": "s", "python": f"{module}:f"}), KEY, [module.split(".")[0]])
    assert "never callable" in info.value.problems[0] and "allowed_modules" in info.value.problems[0]


def test_only_allowed_prefixes_pass_and_the_grants_name_them() -> None:
    wf = workflow(
        {"id": "a", "python": "acme.steps:load"},
        {"id": "b", "python": "acme.steps.more:save"},
        {"id": "c", "container": {"image": "host", "command": ["true"], "secrets": ["GRANTED"]}},
    )
    grants = check_inline(wf, KEY, ["acme.steps"])
    assert grants.principal == "key:k1" and grants.modules == ["acme.steps", "acme.steps.more"]
    assert grants.secrets == ["GRANTED"] and not grants.host_mounts
    with pytest.raises(PermissionDeniedError, match="not allowed"):
        check_inline(wf, KEY, ["acme.step"])  # a prefix matches whole module names only
    with pytest.raises(PermissionDeniedError, match="not allowed"):
        check_inline(wf, KEY, [])  # nothing is allowed by default


def test_private_functions_secrets_and_host_mounts() -> None:
    with pytest.raises(PermissionDeniedError, match="private"):
        check_inline(workflow({"id": "a", "python": "acme:_hidden"}), KEY, ["acme"])
    secret = {"id": "c", "container": {"image": "host", "command": ["true"], "secrets": ["OTHER"]}}
    with pytest.raises(PermissionDeniedError, match="'OTHER' is not granted"):
        check_inline(workflow(secret), KEY, [])
    mounts = {"/a": "/etc", "/b": "${steps.x.artifacts}", "/c": "sha256:" + "0" * 64, "/d": "data/${inputs.f}"}
    mount = {"id": "c", "container": {"image": "host", "command": ["true"], "mounts": mounts}}
    with pytest.raises(WorkflowValidationError) as info:
        check_inline(workflow({"id": "x", "python": "acme:f"}, mount), KEY, ["acme"])
    assert len(info.value.problems) == 2 and all("container.mounts" in p for p in info.value.problems)
    assert "'/a'" in info.value.problems[0] and "'/d'" in info.value.problems[1]


def test_registration_refuses_forbidden_modules() -> None:
    check_registration(workflow({"id": "a", "python": "acme:f"}))
    with pytest.raises(WorkflowValidationError, match="subprocess"):
        check_registration(workflow({"id": "a", "python": "subprocess:run"}))


def test_the_worker_checks_the_module_and_where_the_function_lives() -> None:
    grants = RunGrants(principal="key:k", modules=["acme"])
    check_python_grants(None, "os:system", os.system)  # started on this machine: anything
    check_python_grants(grants, "acme.x:f", lambda: None)
    with pytest.raises(StepNotAllowedError, match="not among"):
        check_python_grants(grants, "other:f")
    with pytest.raises(StepNotAllowedError, match=r"posix\.system"):
        check_python_grants(grants, "acme:system", os.system)  # an allowed module re-exporting os.system
    with pytest.raises(StepNotAllowedError, match=r"_io\.open"):
        check_python_grants(grants, "acme:open", open)


def test_secrets_and_namespaces() -> None:
    grants = RunGrants(principal="key:k", secrets=["A"])
    check_secret_grants(grants, ["A"])
    check_secret_grants(None, ["ANY"])
    with pytest.raises(StepNotAllowedError, match="B"):
        check_secret_grants(grants, ["A", "B"])
    assert owner_namespace(None) is None and owner_namespace(RunGrants(principal="local")) is None
    assert owner_namespace(grants) == "key:k"
    assert cache_name("pip", None) == "pip"
    assert cache_name("pip", "key:a") != cache_name("pip", "key:b")
    assert cache_name("pip", "key:a").endswith("-pip")


def test_container_steps_over_the_api_run_on_the_local_executor_only() -> None:
    dagger = {"id": "c", "executor": "dagger", "container": {"image": "alpine", "command": ["true"], "network": True}}
    with pytest.raises(PermissionDeniedError, match="no network filter"):
        check_inline(workflow(dagger), KEY, [])
    plain = {"id": "c", "container": {"image": "alpine", "command": ["true"]}}
    check_inline(workflow(plain), KEY, [])
    with pytest.raises(PermissionDeniedError, match="dagger executor"):
        check_inline(workflow(plain), KEY, [], default_executor="dagger")  # the operator's default is Dagger


def test_who_may_resume_a_run() -> None:
    from factory.policy import resume_problem
    from factory.store import ApiKeyRecord

    starter = ApiKeyRecord(id="k", name="k", key_hash="h", scopes=["submit"], created_at=0)
    grants = RunGrants(principal="key:k", modules=[])
    assert resume_problem(grants, False, starter, 10.0) is None
    assert "admin key" in (resume_problem(None, False, None, 10.0) or "")  # a run started on the machine
    assert resume_problem(None, True, None, 10.0) is None
    revoked = starter.model_copy(update={"revoked": True})
    expired = starter.model_copy(update={"expires_at": 5.0})
    assert "revoked or expired" in (resume_problem(grants, False, revoked, 10.0) or "")
    assert "revoked or expired" in (resume_problem(grants, False, expired, 10.0) or "")
    assert resume_problem(grants, True, revoked, 10.0) is None


def test_a_workflow_sent_over_the_api_may_not_install_packages() -> None:
    wf = Workflow.model_validate(
        {"name": "w", "runtime": {"requirements": ["evil-pkg"]}, "steps": [{"id": "a", "python": "acme.steps:f"}]}
    )
    with pytest.raises(WorkflowValidationError) as info:
        check_inline(wf, KEY, ["acme"])
    assert "workflow field runtime" in info.value.problems[0] and "factory submit" in info.value.problems[0]
    check_inline(wf.model_copy(update={"runtime": None}), KEY, ["acme"])  # the rest of it is fine
