"""cluster/: the manifests parse, validate with Ray's own schemas, and agree with each other and
with the project (Ray version, image, ports, commands, settings, secrets). Nothing is applied to a
Kubernetes cluster or built with Docker here: these tests read the files."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from cluster import render

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = CLUSTER / "Dockerfile"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
DOCS = REPO / "docs" / "cluster.md"
KINDS = {"rayservice.yaml": "RayService", "rayjob.yaml": "RayJob", "raycluster.yaml": "RayCluster"}
SERVE_PORT, DASHBOARD_PORT, GCS_PORT, CLIENT_PORT = 8000, 8265, 6379, 10001
# variables that are not Settings fields but that the Factory reads (factory.settings, factory.sandbox.secrets)
EXTRA_FACTORY_VARIABLES = {"FACTORY_CONFIG"}
FACTORY_PREFIXES = ("FACTORY_SECRET_",)
RAY_VARIABLES = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"}
SENSITIVE = re.compile(r"(URL|TOKEN|PASSWORD|KEY|SECRET)", re.I)


def load(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay(name: str) -> dict[str, Any]:
    (doc,) = load(KUBERAY / name)
    assert isinstance(doc, dict)
    return doc


def cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Each RayCluster spec of the KubeRay manifests, named by its file."""
    yield "raycluster.yaml", kuberay("raycluster.yaml")["spec"]
    yield "rayservice.yaml", kuberay("rayservice.yaml")["spec"]["rayClusterConfig"]
    yield "rayjob.yaml", kuberay("rayjob.yaml")["spec"]["rayClusterSpec"]


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(head|workers group name, container) of a RayCluster spec."""
    for container in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield "head", container
    for group in spec.get("workerGroupSpecs", []):
        for container in group["template"]["spec"]["containers"]:
            yield group["groupName"], container


def serve_config_v2() -> dict[str, Any]:
    text = kuberay("rayservice.yaml")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string (a block scalar), as KubeRay expects"
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def dockerfile_base() -> tuple[str, str]:
    match = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)\s*$", DOCKERFILE.read_text(), re.M)
    assert match, "cluster/Dockerfile must start FROM rayproject/ray:<exact version>-py<python>"
    return match[1], match[2]


def image_values(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from image_values(value)
    elif isinstance(data, list):
        for item in data:
            yield from image_values(item)


def test_every_yaml_in_cluster_parses_and_kuberay_kinds_are_right() -> None:
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {*KINDS, LAUNCHER.name}
    for path in files:
        docs = load(path)
        assert docs, f"{path.relative_to(REPO)} holds no document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path.relative_to(REPO)}: a document is not a mapping"
    for name, kind in KINDS.items():
        doc = kuberay(name)
        assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind), name
        assert doc["metadata"]["name"]


def test_serve_config_v2_validates_with_rays_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config_v2())
    assert {app.name for app in schema.applications} == {"factory-api", "factory-route"}


def test_serve_config_v2_is_a_fresh_render_of_deployments_serve_yaml() -> None:
    assert render.RAYSERVICE.read_text() == render.render(), (
        "cluster/kuberay/rayservice.yaml is out of date with deployments/serve.yaml: "
        f"run `{render.REGENERATE}` and commit the result"
    )
    assert serve_config_v2() == yaml.safe_load((REPO / "deployments" / "serve.yaml").read_text())


def test_generator_keeps_the_rest_of_the_manifest_and_refuses_what_ray_refuses(tmp_path: Path) -> None:
    manifest = "a: 1\nspec:\n  serveConfigV2: |\n    old: true\n\n    more: 2\n\n  after: 3\n"
    out = render.render_manifest(manifest, {"applications": []})
    assert out == "a: 1\nspec:\n  serveConfigV2: |\n    applications: []\n\n  after: 3\n"
    assert render.render_manifest(out, {"applications": []}) == out
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n- name: a\n  import_path: m:app\n  runtime_env:\n    working_dir: ./here\n")
    with pytest.raises(ValidationError, match="remote URIs"):
        render.load_serve_config(bad)


def test_serve_import_paths_resolve_to_application_builders() -> None:
    for app in serve_config_v2()["applications"]:
        module_name, _, attribute = app["import_path"].partition(":")
        assert attribute, f"{app['name']}: import_path must be module:attribute"
        target = getattr(importlib.import_module(module_name), attribute, None)
        assert callable(target), f"{app['name']}: {app['import_path']} is not an attribute of {module_name}"


def test_one_ray_version_everywhere() -> None:
    from packaging.requirements import Requirement

    version, python = dockerfile_base()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (ray_requirement,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "ray"]
    assert ray_requirement.specifier.contains(version), f"Dockerfile base Ray {version} vs pyproject {ray_requirement}"
    assert python == "312" and pyproject["project"]["requires-python"] == ">=3.12"
    pins = re.findall(r'"ray\[[a-z,]+\]==([^"]+)"', DOCKERFILE.read_text())
    assert pins == [version], "the Dockerfile's pip install must keep Ray at the base image's version"
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == version, f"{name}: rayVersion {spec['rayVersion']} vs Dockerfile {version}"


def test_one_image_everywhere() -> None:
    images = {name: set(image_values(kuberay(name))) for name in KINDS}
    images[LAUNCHER.name] = set(image_values(load(LAUNCHER)))
    everywhere = set().union(*images.values())
    assert len(everywhere) == 1, f"manifests use different images: {images}"
    (image,) = everywhere
    assert all(images.values()), f"a manifest names no image: {images}"
    # the Dockerfile's own build instructions tag the image the manifests run
    tags = set(re.findall(r"docker build .*-t (\S+)", DOCKERFILE.read_text()))
    assert tags == {image}, f"Dockerfile builds {tags}, manifests run {image}"
    assert image in DOCS.read_text(), f"docs/cluster.md does not name the image {image}"


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def test_ports_agree_across_serve_config_manifests_launcher_and_docs() -> None:
    serve = yaml.safe_load((REPO / "deployments" / "serve.yaml").read_text())
    assert serve["http_options"]["port"] == SERVE_PORT
    assert serve_config_v2()["http_options"]["port"] == SERVE_PORT
    expected = {"gcs-server": GCS_PORT, "dashboard": DASHBOARD_PORT, "client": CLIENT_PORT}
    for name, spec in cluster_specs():
        head = spec["headGroupSpec"]
        (container,) = head["template"]["spec"]["containers"]
        ports = named_ports(container)
        assert {k: ports.get(k) for k in expected} == expected, f"{name}: head ports {ports}"
        params = head.get("rayStartParams", {})
        assert str(params.get("port", GCS_PORT)) == str(GCS_PORT), name
        assert str(params.get("dashboard-port", DASHBOARD_PORT)) == str(DASHBOARD_PORT), name
    service_head = kuberay("rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]
    service_ports = named_ports(service_head["template"]["spec"]["containers"][0])
    assert service_ports.get("serve") == SERVE_PORT, "the RayService head must expose Serve's port as 'serve'"
    launcher = load(LAUNCHER)[0]
    head_start = " ".join(launcher["head_start_ray_commands"])
    for flag in (f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}", f"--ray-client-server-port={CLIENT_PORT}"):
        assert flag in head_start, f"ray-cluster.yaml: head_start_ray_commands lack {flag}"
    assert any(f":{GCS_PORT}" in command for command in launcher["worker_start_ray_commands"])
    docs = DOCS.read_text()
    for port in (SERVE_PORT, DASHBOARD_PORT, GCS_PORT):
        assert str(port) in docs, f"docs/cluster.md does not mention port {port}"


def test_entrypoints_name_commands_that_exist() -> None:
    import typer

    from factory.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    workdir = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+\./\S*", DOCKERFILE.read_text(), re.M)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "factory" in pyproject["project"]["scripts"]
    words = shlex.split(kuberay("rayjob.yaml")["spec"]["entrypoint"])
    assert words[0] == "factory" and words[1] in commands, f"rayjob entrypoint {words}: not a factory command"
    assert words[1] == "run", f"rayjob entrypoint {words}: the example runs a workflow"
    commands[words[1]].make_context(words[1], words[2:])  # the arguments parse (nothing runs)
    workflow = Path(words[2])
    assert workflow.is_absolute() and workflow.is_relative_to(workdir), f"{workflow} is not under {workdir}"
    in_repo = REPO / workflow.relative_to(workdir)
    assert in_repo.is_file(), f"rayjob runs {workflow}, but {in_repo.relative_to(REPO)} does not exist"
    assert in_repo.relative_to(REPO).parts[0] in copied, f"the Dockerfile does not copy {in_repo.parent} into {workdir}"
    for path in copied:
        assert (REPO / path).exists(), f"the Dockerfile copies {path}, which is not in the repository"
    launcher = load(LAUNCHER)[0]
    for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        assert shlex.split(command)[0] == "ray", command


def test_environment_variables_are_real_settings() -> None:
    from factory.settings import Settings

    known = {"FACTORY_" + name.upper() for name in Settings.model_fields} | EXTRA_FACTORY_VARIABLES
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    files.append(DOCS)
    for path in files:
        for variable in re.findall(r"\bFACTORY_[A-Z0-9_]+", path.read_text()):
            assert variable in known or variable.startswith(FACTORY_PREFIXES), (
                f"{path.relative_to(REPO)} names {variable}, which is not a setting of factory.settings.Settings"
            )
    for name, spec in cluster_specs():
        for group, container in containers(spec):
            for env in container.get("env", []):
                variable = env["name"]
                assert variable in known or variable in RAY_VARIABLES, f"{name} {group}: unknown {variable}"


def test_secrets_come_from_kubernetes_secrets_by_name() -> None:
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load(path):
            assert doc.get("kind") != "Secret", f"{path.name}: create Secrets apart (docs/cluster.md), never here"
    for name, spec in cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": "factory-ray-auth"}, name
        for group, container in containers(spec):
            variables = {env["name"]: env for env in container.get("env", [])}
            assert {"FACTORY_STORE_URL", "FACTORY_EVENTS_URL"} <= set(variables), f"{name} {group}"
            for variable, env in variables.items():
                if SENSITIVE.search(variable):
                    assert "value" not in env, f"{name} {group}: {variable} has an inline value"
                    assert env["valueFrom"]["secretKeyRef"]["name"], f"{name} {group}: {variable}"
    assert not re.search(r"RAY_AUTH_TOKEN=(?!<)", LAUNCHER.read_text()), "ray-cluster.yaml holds a token"


def test_worker_groups_autoscale_within_bounds_with_resources() -> None:
    for name, spec in cluster_specs():
        assert spec.get("enableInTreeAutoscaling") is True, f"{name}: the autoscaler is off"
        assert spec.get("workerGroupSpecs"), f"{name}: no worker group"
        for group in spec["workerGroupSpecs"]:
            low, start, high = group["minReplicas"], group.get("replicas", group["minReplicas"]), group["maxReplicas"]
            assert 0 <= low <= start <= high and high > low, f"{name} {group['groupName']}: {low}/{start}/{high}"
        for group_name, container in containers(spec):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{name} {group_name}: {kind}"
    job = kuberay("rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and "clusterSelector" not in job


def test_launcher_config_validates_with_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(LAUNCHER)[0]
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "local"


def test_docs_cover_the_kuberay_steps() -> None:
    docs = DOCS.read_text()
    assert docs.startswith("# On a Ray cluster\n")
    assert "\n## Kubernetes with KubeRay\n" in docs
    for needle in (
        "docker build -f cluster/Dockerfile",
        "kubectl create secret generic factory-settings",
        "kubectl create secret generic factory-ray-auth",
        "kubectl apply -f cluster/kuberay/raycluster.yaml",
        "kubectl apply -f cluster/kuberay/rayservice.yaml",
        "kubectl apply -f cluster/kuberay/rayjob.yaml",
        render.REGENERATE,
    ):
        assert needle in docs, f"docs/cluster.md lacks {needle!r}"
