"""Pure parts of factory.sandbox: secrets, artifacts, buffers, slots, executor choice, argv building."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from factory.errors import ArtifactError, ExecutorUnavailableError, SecretNotFoundError, StepInputError
from factory.sandbox import DEFAULT_EXECUTOR, _argv_as_text, get_executor
from factory.sandbox.artifacts import ArtifactStore, collect_outputs, output_name, prepare_mount
from factory.sandbox.base import TailBuffer, effective_timeout, tail_lines
from factory.sandbox.local import LocalConfig, LocalExecutor, _world_reachable
from factory.sandbox.secrets import (
    ChainSecretSource,
    DirSecretSource,
    EnvSecretSource,
    Redactor,
    resolve_secrets,
)
from factory.sandbox.slots import SlotPool
from factory.spec import ContainerSpec

# -- secrets -------------------------------------------------------------------------------------


def test_secrets_come_from_the_first_source_that_holds_them(tmp_path: Path) -> None:
    (tmp_path / "API_TOKEN").write_text("from-file-value\n")
    (tmp_path / "DB_PASSWORD").write_text("file-password")
    env = EnvSecretSource({"FACTORY_SECRET_API_TOKEN": "from-env-value", "API_TOKEN": "unprefixed"})
    source = ChainSecretSource(env, DirSecretSource(tmp_path))
    values = resolve_secrets(["API_TOKEN", "DB_PASSWORD"], source)
    assert {k: v.get_secret_value() for k, v in values.items()} == {
        "API_TOKEN": "from-env-value",
        "DB_PASSWORD": "file-password",
    }
    assert "from-env-value" not in repr(values)  # SecretStr hides the value


def test_every_missing_secret_is_named_with_where_to_put_it(tmp_path: Path) -> None:
    source = ChainSecretSource(EnvSecretSource({}), DirSecretSource(tmp_path))
    with pytest.raises(SecretNotFoundError) as caught:
        resolve_secrets(["ONE", "TWO"], source)
    message = str(caught.value)
    assert "ONE, TWO" in message and "FACTORY_SECRET_<NAME>" in message and str(tmp_path) in message


def test_secrets_too_short_to_redact_and_bad_names_are_refused() -> None:
    with pytest.raises(SecretNotFoundError, match="shorter than"):
        resolve_secrets(["PIN"], EnvSecretSource({"FACTORY_SECRET_PIN": "123"}))
    with pytest.raises(StepInputError, match="not a valid secret name"):
        resolve_secrets(["../etc/passwd"], EnvSecretSource({}))


def test_the_redactor_masks_every_value_longest_first() -> None:
    redact = Redactor({"A": SecretStr("abcd"), "B": SecretStr("abcdefgh")})
    assert redact("x abcdefgh y abcd z") == "x *** y *** z"
    assert Redactor({})("abcd") == "abcd"
    pem = Redactor({"KEY": SecretStr("-----BEGIN KEY-----\nQUJDREVGR0hJSktM\nTU5PUFFSU1RVVldY\n-----END KEY-----")})
    assert pem("line: TU5PUFFSU1RVVldY\n") == "line: ***\n"  # one streamed line of the key


# -- artifacts -----------------------------------------------------------------------------------


def test_the_store_is_content_addressed_and_read_only(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    first = store.put_bytes(b"hello")
    second = store.put_bytes(b"hello")
    other = store.put_bytes(b"other")
    assert first == second != other
    assert first.digest == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    path = store.path(first.digest)
    assert path.read_bytes() == b"hello" and path.stat().st_mode & 0o222 == 0
    assert len(list((tmp_path / "artifacts").rglob("*.*"))) == 0  # no temporary files left behind
    with pytest.raises(ArtifactError, match="not an artifact digest"):
        store.path("sha256:../../etc/passwd")


def test_outputs_must_lie_inside_the_workdir() -> None:
    assert output_name("/work/out/r.json", "/work") == "out/r.json"
    for bad in ("/etc/passwd", "/work", "relative.txt", "/work/../etc/passwd"):
        with pytest.raises(StepInputError):
            output_name(bad, "/work")


def test_outputs_are_named_by_file_or_by_path_inside_a_directory(tmp_path: Path) -> None:
    (tmp_path / "out/sub").mkdir(parents=True)
    (tmp_path / "out/a.txt").write_text("a")
    (tmp_path / "out/sub/b.txt").write_text("b")
    (tmp_path / "out/link").symlink_to("/etc/hostname")
    (tmp_path / "r.json").write_text("{}")
    found = collect_outputs(tmp_path, ["/work/out", "/work/r.json"], "/work")
    assert sorted(found) == ["a.txt", "r.json", "sub/b.txt"]  # the symlink inside the directory is skipped
    with pytest.raises(ArtifactError, match="did not create"):
        collect_outputs(tmp_path, ["/work/none.txt"], "/work")
    with pytest.raises(ArtifactError, match="two outputs"):
        collect_outputs(tmp_path, ["/work/out/a.txt", "/work/out"], "/work")
    with pytest.raises(ArtifactError, match="symbolic link"):
        collect_outputs(tmp_path, ["/work/out/link"], "/work")


def test_mount_values_are_artifacts_mappings_or_host_paths(tmp_path: Path) -> None:
    home = tmp_path / "home"  # FACTORY_HOME
    store = ArtifactStore(home / "artifacts")
    ref = store.put_bytes(b"data").model_dump()
    staging = tmp_path / "staging"
    staging.mkdir()
    workflow_dir = tmp_path / "wf"
    workflow_dir.mkdir()
    single, copy = prepare_mount(store, "/in/data.txt", ref, staging, None)
    assert single.read_bytes() == b"data" and single.name == "data.txt" and not copy
    folder, _ = prepare_mount(store, "/in", {"x.txt": ref, "deep/y.txt": ref["digest"]}, staging, None)
    assert (folder / "x.txt").read_bytes() == (folder / "deep/y.txt").read_bytes() == b"data"
    (workflow_dir / "scripts").mkdir()
    host, must_check = prepare_mount(store, "/s", "scripts", staging, workflow_dir)
    assert host == (workflow_dir / "scripts").resolve() and must_check
    with pytest.raises(StepInputError, match="does not exist"):
        prepare_mount(store, "/s", "missing", staging, workflow_dir)
    # host paths: only under the workflow's own folder, never FACTORY_HOME, never without a folder
    with pytest.raises(StepInputError, match="outside the workflow's folder"):
        prepare_mount(store, "/etc", "/etc", staging, workflow_dir)
    with pytest.raises(StepInputError, match="outside the workflow's folder"):
        prepare_mount(store, "/up", "../home", staging, workflow_dir)
    with pytest.raises(StepInputError, match="only from the folder of a workflow loaded from a file"):
        prepare_mount(store, "/s", str(workflow_dir / "scripts"), staging, None)
    with pytest.raises(StepInputError, match="inside FACTORY_HOME"):
        prepare_mount(store, "/h", str(home), staging, tmp_path)
    with pytest.raises(StepInputError, match="not an artifact"):
        prepare_mount(store, "/in", {"x": 3}, staging, None)
    with pytest.raises(StepInputError, match="absolute"):
        prepare_mount(store, "in", "scripts", staging, workflow_dir)
    absent = {"digest": "sha256:" + "0" * 64, "size": 1}
    with pytest.raises(ArtifactError, match="FACTORY_HOME"):
        prepare_mount(store, "/in/x", absent, staging, None)


# -- small pieces --------------------------------------------------------------------------------


def test_tail_buffer_keeps_the_end() -> None:
    buffer = TailBuffer(10)
    for index in range(100):
        buffer.write(f"{index}\n")
    assert buffer.getvalue() == "".join(f"{index}\n" for index in range(100))[-10:]
    assert tail_lines("a\nb\nc\n", lines=2) == "b\nc"


def test_the_smallest_timeout_wins() -> None:
    assert effective_timeout(None, None) is None
    assert effective_timeout(30, None, 5) == 5


def test_slots_are_exclusive_and_a_full_pool_says_so(tmp_path: Path) -> None:
    pool = SlotPool(tmp_path / "slots", 2)
    with pool.acquire() as first, pool.acquire() as second:
        assert {first, second} == {0, 1}
        with pytest.raises(ExecutorUnavailableError, match="stayed busy"), pool.acquire(wait_seconds=0.1):
            pass
    with pool.acquire(wait_seconds=0) as again:
        assert again in (0, 1)


def test_executor_choice() -> None:
    assert DEFAULT_EXECUTOR == "local"
    assert get_executor(None).name == "local"
    assert get_executor("dagger").name == "dagger"
    with pytest.raises(ExecutorUnavailableError, match="unknown executor 'podman'"):
        get_executor("podman")


def test_whole_references_in_argv_and_env_become_text() -> None:
    spec = _argv_as_text({"command": ["gen", 500, 1.5, True, "x"], "env": {"N": 3, "S": "s"}})
    assert spec["command"] == ["gen", "500", "1.5", "true", "x"] and spec["env"] == {"N": "3", "S": "s"}


def test_a_configured_rootfs_replaces_the_host_root(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    for name in ("usr", "etc", "proc", "tmp"):
        (rootfs / name).mkdir(parents=True)
    (rootfs / "bin").symlink_to("usr/bin")
    executor = LocalExecutor(LocalConfig(rootfs={"python:3.12-slim": rootfs}))
    args = executor._root_args(ContainerSpec(image="python:3.12-slim", command=["python"]), [])
    assert args == [
        "--symlink", "usr/bin", "/bin",
        "--ro-bind", str(rootfs / "etc"), "/etc",
        "--ro-bind", str(rootfs / "usr"), "/usr",
    ]  # fmt: skip
    fds: list[int] = []
    host_args = executor._root_args(ContainerSpec(image="other", command=["python"]), fds)
    assert host_args[host_args.index("/usr") - 1 : host_args.index("/usr") + 2] == ["--ro-bind", "/usr", "/usr"]
    assert "/etc/passwd" in host_args and "/etc/resolv.conf" not in host_args  # no network: no resolver
    for fd in fds:
        os.close(fd)


def test_world_reachability(tmp_path: Path) -> None:
    assert _world_reachable(Path("/usr/bin"))
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert not _world_reachable(private)


def test_executors_take_their_settings_fields_when_settings_has_them(tmp_path: Path) -> None:
    from factory.sandbox.dagger import DaggerExecutor
    from factory.settings import Settings

    class WithSandbox(Settings):  # the fields docs/isolation.md proposes for Settings
        container_executor: str = "dagger"
        sandbox_max_processes: int = 12
        dagger_max_concurrency: int = 2

    settings = WithSandbox(home=tmp_path)
    chosen = get_executor(None, settings)
    assert isinstance(chosen, DaggerExecutor) and chosen.config.max_concurrency == 2
    local = get_executor("local", settings)
    assert isinstance(local, LocalExecutor) and local.config.max_processes == 12
    assert isinstance(get_executor("local", Settings(home=tmp_path)), LocalExecutor)
