"""Attacks on the HTTP API by a key holder, each with the defence it meets.

    python -m benchmarks.attacks            # starts Ray and the API, prints the table (Markdown)

Every attack is a function that tries something a ``submit`` (or ``read``) key should
not be able to do, over real HTTP, and returns how it was stopped; it raises
:class:`Breach` when the attack worked. tests/integration/test_attacks.py runs the same
list against the test session's API server and fails on any breach, so the table in
docs/security.md is produced by the code the tests run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from factory.client import ApiError, FactoryClient
from factory.store import RunChange, RunStatus

FIXTURES = Path(__file__).parent.parent / "tests" / "fixtures"
# the modules the API server of the attacks allows (the tests' api_server fixture allows the same)
ALLOWED_MODULES = ["tests.fixtures.teststeps", "tests.fixtures.guarded"]
SECRET_NAME = "ATTACK_TOKEN"
SECRET_VALUE = "s3cr3t-attack-token-8c1f"


class Breach(AssertionError):
    """The attack worked: the defence it names is missing."""


@dataclass
class AttackContext:
    base_url: str
    keys: dict[str, str]  # scope -> key: read, submit, admin
    home: Path  # the API's FACTORY_HOME (its secrets folder is home/secrets)

    def http(self, scope: str = "submit") -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.keys[scope]}"}, timeout=60)

    def client(self, key: str) -> FactoryClient:
        return FactoryClient(self.base_url, key)

    def new_key(self, scopes: list[str], secrets: list[str] | None = None, expires_in: float | None = None) -> str:
        with self.client(self.keys["admin"]) as admin:
            created = admin.create_key(scopes, "attack", expires_in, secrets)
        return str(created["key"])


@dataclass(frozen=True)
class Attack:
    name: str
    expected: str
    run: Callable[[AttackContext], str]


ATTACKS: list[Attack] = []


def attack(name: str, expected: str) -> Callable[[Callable[[AttackContext], str]], Callable[[AttackContext], str]]:
    def add(fn: Callable[[AttackContext], str]) -> Callable[[AttackContext], str]:
        ATTACKS.append(Attack(name, expected, fn))
        return fn

    return add


# -- helpers ------------------------------------------------------------------------------------------


def _python(target: str, **with_: Any) -> dict[str, Any]:
    return {"name": "attack", "steps": [{"id": "s", "python": target, "with": with_}]}


def _container(command: list[str], **spec: Any) -> dict[str, Any]:
    return {"id": "c", "container": {"image": "host", "command": command, **spec}}


def _refused(response: httpx.Response, status: int, *words: str) -> str:
    if response.status_code != status:
        raise Breach(f"expected HTTP {status}, got {response.status_code}: {response.text[:300]}")
    body = response.json()
    text = (body.get("detail") or "") + " " + " ".join(str(e) for e in body.get("errors") or [])
    missing = [w for w in words if w not in text]
    if missing:
        raise Breach(f"HTTP {status} but the answer does not say {missing}: {text[:300]}")
    return f"{status}: {text.strip()[:140]}"


def _runs_now(ctx: AttackContext) -> int:
    with ctx.http("read") as http:
        return len(http.get("/v1/runs", params={"limit": 200}).json()["runs"])


def _submit_and_wait(client: FactoryClient, workflow: dict[str, Any], timeout: float = 90) -> dict[str, Any]:
    run_id = client.submit(workflow)
    return client.wait(run_id, timeout=timeout)


def _step(run: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in run["steps"] if s["step_id"] == step_id)


# -- who may run what -----------------------------------------------------------------------------------


@attack("submit key runs `os:system` (a shell as the service's user)", "403, nothing stored, nothing ran")
def os_system(ctx: AttackContext) -> str:
    marker = Path(tempfile.gettempdir()) / f"factory-attack-{time.time_ns()}"
    before = _runs_now(ctx)
    with ctx.http() as http:
        response = http.post("/v1/workflows", json={"workflow": _python("os:system", command=f"id > {marker}")})
    how = _refused(response, 403, "'os'", "allowed_modules")
    time.sleep(0.5)
    if marker.exists():
        raise Breach("the command ran")
    if _runs_now(ctx) != before:
        raise Breach("a run was stored")
    return how


DANGEROUS_TARGETS = [
    "subprocess:run",
    "builtins:eval",
    "builtins:exec",
    "importlib:import_module",
    "shutil:rmtree",
    "pathlib:Path",
    "ctypes:CDLL",
    "pickle:loads",
    "sys:exit",
    "factory.auth:create_key",
    "factory.store.sqlite:SQLiteStore",
    "posix:system",
]


@attack("submit key names subprocess, builtins, importlib, shutil, pathlib, ctypes, pickle, sys, factory.*", "403 each")
def dangerous_modules(ctx: AttackContext) -> str:
    with ctx.http() as http:
        for target in DANGEROUS_TARGETS:
            response = http.post("/v1/workflows", json={"workflow": _python(target)})
            _refused(response, 403, repr(target.partition(":")[0]))
    return f"403 for all {len(DANGEROUS_TARGETS)}: {', '.join(DANGEROUS_TARGETS)}"


@attack("submit key names a module outside allowed_modules", "403 that says how an admin allows it")
def unlisted_module(ctx: AttackContext) -> str:
    with ctx.http() as http:
        response = http.post("/v1/workflows", json={"workflow": _python("json:loads", s="1")})
    return _refused(response, 403, "not allowed", "factory workflows register")


@attack("submit key calls a private function of an allowed module", "403")
def private_function(ctx: AttackContext) -> str:
    with ctx.http() as http:
        response = http.post("/v1/workflows", json={"workflow": _python("tests.fixtures.teststeps:_bump", counter="x")})
    return _refused(response, 403, "private")


@attack("allowed module re-exports os.system (`guarded:system`)", "the worker refuses to call it; nothing ran")
def reexported_system(ctx: AttackContext) -> str:
    marker = Path(tempfile.gettempdir()) / f"factory-attack-{time.time_ns()}"
    with ctx.client(ctx.keys["submit"]) as client:
        run = _submit_and_wait(client, _python("tests.fixtures.guarded:system", command=f"touch {marker}"))
    step = _step(run, "s")
    if marker.exists() or run["status"] != "failed" or "StepNotAllowedError" not in (step["error"] or ""):
        raise Breach(f"the run {run['status']}, step error {step['error']!r}, marker exists: {marker.exists()}")
    return f"run failed, not retried: {step['error'][:120]}"


@attack("validation imports the submitted module (import-time code runs in the API)", "the API never imports")
def import_at_validation(ctx: AttackContext) -> str:
    marker = FIXTURES / "import_marker.imported"
    marker.unlink(missing_ok=True)
    with ctx.http() as http:
        response = http.post("/v1/workflows", json={"workflow": _python("tests.fixtures.import_marker:step")})
    how = _refused(response, 403, "not allowed")
    if marker.exists():
        raise Breach("the module was imported by the API")
    return how + "; the module's import-time code did not run"


# -- secrets --------------------------------------------------------------------------------------------


@attack("submit key names a server secret it was not granted", "403 naming the secret")
def ungranted_secret(ctx: AttackContext) -> str:
    workflow = {
        "name": "attack",
        "steps": [_container(["cat", f"/run/secrets/{SECRET_NAME}"], secrets=[SECRET_NAME])],
    }
    with ctx.http() as http:
        response = http.post("/v1/workflows", json={"workflow": workflow})
    return _refused(response, 403, SECRET_NAME, "not granted")


@attack("a key granted a secret prints it plainly and base64-encoded", "the run works; logs and outputs show ***")
def granted_secret_masked(ctx: AttackContext) -> str:
    secrets_dir = ctx.home / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    (secrets_dir / SECRET_NAME).write_text(SECRET_VALUE)
    key = ctx.new_key(["submit"], secrets=[SECRET_NAME])
    path = f"/run/secrets/{SECRET_NAME}"
    workflow = {
        "name": "attack",
        "steps": [_container(["sh", "-c", f"cat {path}; echo; base64 {path}"], secrets=[SECRET_NAME])],
    }
    with ctx.client(key) as client:
        run = _submit_and_wait(client, workflow)
        with ctx.http("read") as http:
            events = http.get(f"/v1/runs/{run['id']}/events", params={"follow": False}).text
    if run["status"] != "succeeded":
        raise Breach(f"the granted secret did not work: {run}")
    shown = str(run) + events
    encoded = base64.b64encode(SECRET_VALUE.encode()).decode()
    for form in (SECRET_VALUE, encoded.rstrip("=")):
        if form in shown:
            raise Breach(f"a form of the secret is visible: {form[:6]}...")
    return "succeeded; stdout and events hold *** instead of the value and its base64"


# -- files and artifacts ----------------------------------------------------------------------------------


@attack("workflow over HTTP mounts a host path (/etc, FACTORY_HOME)", "422 at submission, naming step and field")
def host_mount(ctx: AttackContext) -> str:
    workflow = {"name": "attack", "steps": [_container(["ls", "/in"], mounts={"/in": str(ctx.home)})]}
    with ctx.http() as http:
        response = http.post("/v1/workflows", json={"workflow": workflow})
    return _refused(response, 422, "'c'", "container.mounts")


@attack("key B mounts an artifact that key A's run made (by its sha256)", "the run of B fails: not its artifact")
def foreign_artifact(ctx: AttackContext) -> str:
    make = {
        "name": "attack",
        "steps": [
            _container(["sh", "-c", f"echo private-{time.time_ns()} > /work/out.txt"], outputs=["/work/out.txt"])
        ],
    }
    with ctx.client(ctx.keys["submit"]) as owner:
        made = _submit_and_wait(owner, make)
        if made["status"] != "succeeded":
            raise Breach(f"control failed: the owner's step did not run: {_step(made, 'c')['error']}")
        digest = _step(made, "c")["output"]["artifacts"]["out.txt"]["digest"]
        again = _submit_and_wait(
            owner, {"name": "attack", "steps": [_container(["cat", "/in"], mounts={"/in": digest})]}
        )
    if again["status"] != "succeeded":
        raise Breach(f"control failed: the owner could not mount its own artifact: {_step(again, 'c')['error']}")
    with ctx.client(ctx.new_key(["submit"])) as other:
        stolen = _submit_and_wait(
            other, {"name": "attack", "steps": [_container(["cat", "/in"], mounts={"/in": digest})]}
        )
    error = _step(stolen, "c")["error"] or ""
    if stolen["status"] != "failed" or "not made by a run of this key" not in error:
        raise Breach(f"key B read key A's artifact: {stolen['status']} {error[:200]}")
    return f"owner mounts it; B's run failed: {error[:100]}"


@attack("key A plants a file in a named cache that key B's runs mount", "B sees an empty cache of its own")
def cache_planting(ctx: AttackContext) -> str:
    name = f"tools{time.time_ns()}"
    plant = _container(["sh", "-c", "echo planted > /cache/tool.sh"], caches={"/cache": name})
    read = _container(["sh", "-c", "cat /cache/tool.sh 2>/dev/null || echo absent"], caches={"/cache": name})
    with ctx.client(ctx.keys["submit"]) as a:
        _submit_and_wait(a, {"name": "attack", "steps": [plant]})
        control = _submit_and_wait(a, {"name": "attack", "steps": [read]})
    with ctx.client(ctx.new_key(["submit"])) as b:
        seen = _submit_and_wait(b, {"name": "attack", "steps": [read]})
    if "planted" not in _step(control, "c")["output"]["stdout"]:
        raise Breach("control failed: A does not see its own cache")
    if "planted" in _step(seen, "c")["output"]["stdout"]:
        raise Breach("B's run read the file A planted")
    return "A reads its cache; B's run printed 'absent'"


@attack("key A's cached step result is reused by key B's run", "B's step runs itself (not cached)")
def result_cache(ctx: AttackContext) -> str:
    workflow = {
        "name": "attack",
        "steps": [
            {
                "id": "s",
                "python": "tests.fixtures.teststeps:add",
                "with": {"a": time.time_ns() % 10**9, "b": 1},
                "cache": True,
            }
        ],
    }
    with ctx.client(ctx.keys["submit"]) as a:
        _submit_and_wait(a, workflow)
        control = _submit_and_wait(a, workflow)
    with ctx.client(ctx.new_key(["submit"])) as b:
        other = _submit_and_wait(b, workflow)
    if not _step(control, "s")["cached"]:
        raise Breach("control failed: A's second run was not served from the cache")
    if _step(other, "s")["cached"]:
        raise Breach("B's run used the result A's run stored")
    return "A's second run is cached; B's run computed its own"


# -- the network -----------------------------------------------------------------------------------------

NETWORK_PROBE = """
import os, socket
for port in (6379, 5432):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        print(f"direct {port}: OPEN")
    except OSError as exc:
        print(f"direct {port}: closed")
    try:
        with socket.create_connection(("127.0.0.1", 3128), timeout=5) as proxy:
            proxy.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n".encode())
            print(f"proxy {port}: " + proxy.recv(200).decode(errors="replace").splitlines()[0])
    except OSError as exc:
        print(f"proxy {port}: {exc}")
"""


@attack("a `network: true` step reaches Redis and PostgreSQL on the host's 127.0.0.1", "no route; the proxy says 403")
def network_to_host_services(ctx: AttackContext) -> str:
    step = _container(["python3", "-c", NETWORK_PROBE], network=True)
    with ctx.client(ctx.keys["submit"]) as client:
        run = _submit_and_wait(client, {"name": "attack", "steps": [step]})
    if run["status"] != "succeeded":
        raise Breach(f"control failed: the probe did not run: {_step(run, 'c')['error']}")
    stdout = _step(run, "c")["output"]["stdout"]
    if "OPEN" in stdout or " 200 " in stdout or stdout.count("403") != 2:
        raise Breach(f"a host service was reachable: {stdout}")
    return "direct connections closed; the egress proxy answered 403 for 6379 and 5432"


@attack("a step asks for the Dagger executor (no egress filter)", "403: API workflows use the local executor")
def dagger_executor(ctx: AttackContext) -> str:
    step = {"id": "c", "executor": "dagger", "container": {"image": "alpine", "command": ["true"], "network": True}}
    with ctx.http() as http:
        response = http.post("/v1/workflows", json={"workflow": {"name": "attack", "steps": [step]}})
    return _refused(response, 403, "executor", "no network filter")


@attack("submit key resumes a run started on the machine (no grants: any code)", "403: only an admin resumes it")
def resume_ungranted_run(ctx: AttackContext) -> str:
    from factory.api import store_for
    from factory.settings import Settings

    store = store_for(Settings(home=ctx.home))
    try:
        run_id = f"local-{time.time_ns()}"
        spec = {"name": "local", "steps": [{"id": "s", "python": "os:system", "with": {"command": "id"}}]}
        store.create_run(run_id, "local", json.dumps(spec), {}, ["s"])  # as `factory run` records one
        store.record([RunChange(run_id, RunStatus.FAILED, "run.failed", error="stopped")])
    finally:
        store.close()
    with ctx.http() as http:
        response = http.post(f"/v1/runs/{run_id}/resume")
    return _refused(response, 403, "only an admin key resumes it")


# -- keys -------------------------------------------------------------------------------------------------


@attack("a revoked key is used again at once", "401 on the next request")
def revoked_key(ctx: AttackContext) -> str:
    key = ctx.new_key(["read"])

    def revoke() -> None:
        with ctx.client(ctx.keys["admin"]) as admin:
            admin.revoke_key(key.split("_")[1])

    return _refused_after(ctx, key, revoke, "revoked")


@attack("an expired key is used", "401 saying it expired")
def expired_key(ctx: AttackContext) -> str:
    return _refused_after(ctx, ctx.new_key(["read"], expires_in=1.0), lambda: time.sleep(1.2), "expired")


def _refused_after(ctx: AttackContext, key: str, change: Callable[[], None], word: str) -> str:
    """The key works, then ``change`` happens, then the very next request is a 401 saying ``word``."""
    with ctx.client(key) as client:
        client.list_runs()
        change()
        try:
            client.list_runs()
        except ApiError as exc:
            if exc.status == 401 and word in str(exc):
                return f"401: {exc.problem['detail'][:100]}"
            raise
    raise Breach(f"the {word} key still works")


@attack("submit key registers a workflow or mints a key", "403 for both")
def submit_key_escalates(ctx: AttackContext) -> str:
    with ctx.http() as http:
        register = http.put("/v1/workflows/evil", json={"workflow": _python("os:system", command="id")})
        mint = http.post("/v1/keys", json={"scopes": ["admin"]})
    _refused(register, 403, "admin")
    _refused(mint, 403, "admin")
    return "403 for PUT /v1/workflows/evil and POST /v1/keys"


@attack("read key submits or cancels", "403")
def read_key_writes(ctx: AttackContext) -> str:
    with ctx.http("read") as http:
        submit = http.post("/v1/workflows", json={"workflow": _python("tests.fixtures.teststeps:add", a=1, b=2)})
        cancel = http.post("/v1/runs/nope/cancel")
    _refused(submit, 403, "submit")
    _refused(cancel, 403, "submit")
    return "403 for submit and cancel"


@attack("submit key starts a registered workflow with steps or inputs of its own", "422; only declared inputs")
def registered_overrides(ctx: AttackContext) -> str:
    name = f"reg-{time.time_ns()}"
    workflow = {
        "name": name,
        "inputs": {"x": 1},
        "steps": [{"id": "s", "python": "tests.fixtures.teststeps:add", "with": {"a": "${inputs.x}", "b": 1}}],
    }
    with ctx.http("admin") as admin:
        registered = admin.put(f"/v1/workflows/{name}", json={"workflow": workflow})
        if registered.status_code != 201:
            raise Breach(f"control failed: the admin could not register: {registered.text[:200]}")
    with ctx.http() as http:
        extra = http.post(f"/v1/workflows/{name}/runs", json={"inputs": {"x": 2}, "steps": [{"id": "evil"}]})
        unknown = http.post(f"/v1/workflows/{name}/runs", json={"inputs": {"command": "id"}})
    _refused(extra, 422)
    _refused(unknown, 422, "unknown input 'command'")
    with ctx.client(ctx.keys["submit"]) as client:
        run = client.wait(client.start(name, {"x": 41}), timeout=90)
    if run["status"] != "succeeded" or _step(run, "s")["output"] != 42:
        raise Breach(f"control failed: the registered workflow did not run: {run}")
    return "422 for extra fields and undeclared inputs; declared inputs run it"


# -- running the list on its own ----------------------------------------------------------------------------


def run_all(ctx: AttackContext) -> list[tuple[Attack, bool, str]]:
    results = []
    for item in ATTACKS:
        try:
            results.append((item, True, item.run(ctx)))
        except Exception as exc:  # noqa: BLE001 - a breach or an error is reported in the table
            results.append((item, False, f"{type(exc).__name__}: {exc}"))
    return results


def table(results: list[tuple[Attack, bool, str]]) -> str:
    lines = ["| attack | expected | result |", "|---|---|---|"]
    for item, blocked, how in results:
        cell = ("blocked: " if blocked else "**NOT BLOCKED**: ") + how.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {item.name} | {item.expected} | {cell} |")
    return "\n".join(lines)


@contextlib.contextmanager
def _server() -> Iterator[AttackContext]:
    import ray
    from ray import serve

    from deployments.app import run_local
    from factory.api import store_for
    from factory.auth import Scope, create_key
    from factory.settings import Settings
    from tests.fixtures.ports import free_port

    home = Path(tempfile.mkdtemp(prefix="factory-attacks-"))
    settings = Settings(home=home, allowed_modules=ALLOWED_MODULES, lease_seconds=3)
    store = store_for(settings)
    keys = {scope.value: create_key(store, [scope], f"attacks {scope.value}")[0] for scope in Scope}
    store.close()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    port = free_port()
    try:
        run_local(settings, "127.0.0.1", port, open_mode=False)
        yield AttackContext(f"http://127.0.0.1:{port}", keys, home)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


def main() -> None:
    with _server() as ctx:
        results = run_all(ctx)
    print(table(results))
    breaches = sum(1 for _, blocked, _ in results if not blocked)
    print(f"\n{len(results) - breaches} blocked, {breaches} not blocked")
    raise SystemExit(1 if breaches else 0)


if __name__ == "__main__":
    main()
