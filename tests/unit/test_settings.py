from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from factory import settings as settings_module
from factory.cli import app
from factory.errors import SettingsError
from factory.settings import Settings, get_settings, mask_secrets, use_config_file


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACTORY_CONFIG", raising=False)
    monkeypatch.setattr(settings_module, "_config_file_override", None)


def test_environment_file_and_defaults_in_that_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "factory.yaml"
    config.write_text("lease_seconds: 3\nheartbeat_seconds: 0.5\nevents_url: redis://127.0.0.1:6379/1\n")
    monkeypatch.setenv("FACTORY_CONFIG", str(config))
    monkeypatch.setenv("FACTORY_LEASE_SECONDS", "7")
    s = get_settings()
    assert s.lease_seconds == 7  # the environment beats the file
    assert s.heartbeat_seconds == 0.5  # the file beats the default
    assert s.events_url == "redis://127.0.0.1:6379/1"
    assert s.breaker_failure_threshold == 5  # the default


def test_default_store_is_sqlite_under_home(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).resolved_store_url() == f"sqlite:///{tmp_path}/factory.db"


def test_secrets_are_masked() -> None:
    assert mask_secrets("postgresql://app:s3cret@db:5432/factory") == "postgresql://app:***@db:5432/factory"
    s = Settings(store_url="postgresql://app:s3cret@db/f", events_url="redis://:pw@cache:6379/0")
    shown = str(s.masked())
    assert "s3cret" not in shown and ":pw@" not in shown
    assert "postgresql://app:***@db/f" in shown


def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTORY_STORE_URL", "mysql://x")
    with pytest.raises(SettingsError, match=r"FACTORY_STORE_URL.*not a supported URL"):
        get_settings()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not exist"):
        use_config_file(tmp_path / "nope.yaml")


def test_cli_config_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTORY_STORE_URL", "postgresql://u:topsecret@h/db")
    result = CliRunner().invoke(app, ["config", "--json"])
    assert result.exit_code == 0, result.output
    assert "topsecret" not in result.output and "postgresql://u:***@h/db" in result.output
    monkeypatch.setenv("FACTORY_LEASE_SECONDS", "soon")
    bad = CliRunner().invoke(app, ["config"])
    assert bad.exit_code == 2 and "FACTORY_LEASE_SECONDS" in bad.output


def test_container_settings_handed_to_a_worker_are_validated_and_ignore_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    from factory.settings import Settings, container_settings, settings_from

    handed = container_settings(Settings(container_executor="local", sandbox_max_processes=77))
    monkeypatch.setenv("FACTORY_CONTAINER_EXECUTOR", "dagger")  # the worker's own environment
    monkeypatch.setenv("FACTORY_SANDBOX_MAX_PROCESSES", "5")
    got = settings_from(handed)
    assert (got.container_executor, got.sandbox_max_processes) == ("local", 77)
    with pytest.raises(ValidationError, match="container_executor"):
        settings_from({**handed, "container_executor": "docker"})
    with pytest.raises(ValidationError, match="store_url"):
        settings_from({**handed, "store_url": "postgresql://elsewhere/db"})  # not a container setting
