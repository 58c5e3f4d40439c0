"""Shared fixtures: one Ray instance per test session, a fresh FACTORY_HOME per test."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.chat_standin import ChatStandIn

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
API_MODEL_PRICES = {"tiny-local": {"input": 1.0, "output": 2.0}}  # the api_server's: USD per million tokens


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder: tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in ("unit", "integration", "e2e"):
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(autouse=True)
def _step_times_unknown() -> Iterator[None]:
    """Each test starts as a fresh process would: no python function's time known (the engine
    learns them as steps run, and sends short ones in groups: factory.groups)."""
    from factory.groups import STEP_TIMES

    STEP_TIMES.clear()
    yield


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray shared by the whole session; yields its GCS address for subprocesses."""
    import ray

    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, num_cpus=4)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture
def factory_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("FACTORY_HOME", str(home))
    return home


@pytest.fixture
def settings(factory_home: Path) -> object:
    from factory.settings import Settings

    return Settings(home=factory_home)


POSTGRES_URL = os.environ.get("FACTORY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FACTORY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_missing(what: str, error: Exception) -> None:
    """Without the server: skip on a laptop, fail in CI (CI=true), where it must be there."""
    message = f"{what} is not reachable ({error})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must provide it")
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    import uuid
    from urllib.parse import quote

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_missing("PostgreSQL", exc)
        raise
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


@pytest.fixture
def private_postgres() -> Iterator[Any]:
    """A PostgreSQL server of the test's own, which it may stop and start (tests.fixtures.private_postgres)."""
    from tests.fixtures.private_postgres import PrivatePostgres

    server = PrivatePostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    return REDIS_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, factory_home: Path) -> Iterator[object]:
    """The same tests on each store backend."""
    if request.param == "sqlite":
        from factory.store.sqlite import SQLiteStore

        s: object = SQLiteStore(factory_home / "factory.db")
    else:
        from factory.store.postgres import PostgresStore

        s = PostgresStore(request.getfixturevalue("postgres_url"))
    yield s
    s.close()  # type: ignore[attr-defined]


@pytest.fixture
def cli_env(factory_home: Path, ray_cluster: str) -> dict[str, str]:
    """Environment for `factory` subprocesses: the test's FACTORY_HOME, the session's Ray."""
    env = dict(os.environ)
    env["FACTORY_HOME"] = str(factory_home)
    env["RAY_ADDRESS"] = ray_cluster
    env["COLUMNS"] = "200"
    return env


@dataclass
class ApiServer:
    """The Factory's HTTP API on Ray Serve, shared by the tests of a session."""

    base_url: str
    keys: dict[str, str]  # scope -> key
    settings: Any

    def headers(self, scope: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[scope]}"}


@pytest.fixture(scope="session")
def api_server(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """Both Serve applications (API and routing) on a free port, with their own store."""

    import ray
    from ray import serve

    from deployments.app import run_local
    from factory.api import store_for
    from factory.auth import Scope, create_key
    from factory.settings import Settings

    home = tmp_path_factory.mktemp("api-home")
    settings = Settings(
        home=home,
        agents_file=FIXTURES / "api_agents.yaml",
        api_rate_limit=50,
        api_rate_burst=30,
        lease_seconds=3,
        supervisor_interval_seconds=1,
        supervisor_pending_grace_seconds=3,
        allowed_modules=["tests.fixtures.teststeps", "tests.fixtures.guarded"],
        model_prices=API_MODEL_PRICES,
    )
    store = store_for(settings)
    keys = {scope.value: create_key(store, [scope], f"test {scope.value}")[0] for scope in Scope}
    store.close()
    from tests.fixtures.ports import free_port

    port = free_port()
    run_local(settings, "127.0.0.1", port, open_mode=False)
    try:
        yield ApiServer(f"http://127.0.0.1:{port}", keys, settings)
    finally:
        serve.shutdown()
        from factory.runner import NAMESPACE, runner_name
        from factory.schedules import cron_scheduler_name
        from factory.supervisor import supervisor_name

        for name in (runner_name(settings), supervisor_name(settings), cron_scheduler_name(settings)):
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=NAMESPACE))


@pytest.fixture(scope="module")
def standin_server() -> Iterator[ChatStandIn]:
    """The stand-in for a paid model provider (tests/fixtures/chat_standin.py), one per test module."""
    server = ChatStandIn().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def standin(standin_server: ChatStandIn) -> ChatStandIn:
    """The module's stand-in provider, answering normally at the start of each test (fast-agent's
    ``generic`` provider reaches it at ``standin.url``; its replicas may stay up between tests)."""
    standin_server.mode = "ok"
    standin_server.limit_next = 0
    standin_server.hang_seconds = 30.0
    return standin_server


@pytest.fixture(scope="session")
def usage_run(api_server: ApiServer) -> str:
    """A run in the API's store whose agents used tokens, for the API's and the dashboard's tests: one agent
    step (1 request to the stand-in provider: PROMPT_TOKENS in, COMPLETION_TOKENS out), a for_each agent step
    over 2 items (2 requests), a plain python step (no usage), and a passthrough agent's step that calls its
    MCP server's tool (no usage: passthrough counts none). Run once per session with a stand-in provider of
    its own; read back through the API."""
    import json
    import sys

    import factory
    from factory.api import store_for
    from factory.catalog import AgentSpec, Catalog
    from factory.pools import DEFAULT_MANAGER_NAME, stop_manager
    from factory.spec import Step, Workflow

    pytest.importorskip("fast_agent", reason="fast-agent is not installed (pip install -e '.[fast-agent]')")
    provider = ChatStandIn().start()
    spec = AgentSpec.model_validate(
        {
            "name": "fa-usage",
            "class": "factory.fastagent:FastAgent",
            "pool": {"num_cpus": 0.1, "max_replicas": 1},
            "config": {"model": "generic.tiny-local", "base_url": provider.url},
        }
    )
    server = {"command": sys.executable, "args": [str(Path(__file__).parent / "fixtures" / "mcp_pid_server.py")]}
    tools = AgentSpec.model_validate(
        {
            "name": "fa-usage-tools",
            "class": "factory.fastagent:FastAgent",
            "pool": {"num_cpus": 0.1, "max_replicas": 1},
            "config": {"model": "passthrough", "servers": {"tools": server}},
        }
    )
    call = "***CALL_TOOL tools__echo " + json.dumps({"text": "from the API test"})
    flow = Workflow(
        name="fa-usage",
        steps=[
            Step(id="ask", agent="fa-usage", with_={"text": "hello"}),
            Step(id="each", agent="fa-usage", for_each=["one", "two"], with_={"text": "${item}"}),
            Step(id="plain", python="tests.fixtures.teststeps:add", with_={"a": 1, "b": 2}),
            Step(id="tool", agent="fa-usage-tools", with_={"text": call}),
        ],
    )
    # the pools, their MCP server and this process's relay start cold, for longer than the lease of the
    # api_server fixture (3 s): the run keeps its lease meanwhile (factory/lease.py), so the API's supervisor
    # does not adopt it
    catalog = Catalog(agents=[spec, tools])
    store = store_for(api_server.settings)
    try:
        run = factory.run(flow, store=store, settings=api_server.settings, agents=catalog)
        assert run.ok, run.error
    finally:
        store.close()
        stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)
        provider.stop()
    return run.run_id
