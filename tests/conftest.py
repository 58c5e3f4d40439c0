"""Shared fixtures: one Ray instance per test session, a fresh FACTORY_HOME per test."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder: tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in ("unit", "integration", "e2e"):
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))


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


@pytest.fixture
def store(factory_home: Path) -> Iterator[object]:
    from factory.store.sqlite import SQLiteStore

    s = SQLiteStore(factory_home / "factory.db")
    yield s
    s.close()


@pytest.fixture
def cli_env(factory_home: Path, ray_cluster: str) -> dict[str, str]:
    """Environment for `factory` subprocesses: the test's FACTORY_HOME, the session's Ray."""
    env = dict(os.environ)
    env["FACTORY_HOME"] = str(factory_home)
    env["RAY_ADDRESS"] = ray_cluster
    env["COLUMNS"] = "200"
    return env
