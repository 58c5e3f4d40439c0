"""Attacks on the local isolated executor: each guarantee is attacked, and the attack must fail.

Every attack has a control next to it (the same command with the guard relaxed,
or the allowed variant), so a test cannot pass because the command never worked.
These run the real bubblewrap sandbox; no Ray is needed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from factory.errors import (
    ArtifactError,
    ContainerStepError,
    ContainerTimeoutError,
    SecretNotFoundError,
    StepInputError,
)
from factory.sandbox import run_spec
from factory.sandbox.local import LocalConfig, LocalExecutor
from factory.sandbox.secrets import EnvSecretSource
from factory.spec import ContainerSpec

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap: apt-get install -y bubblewrap"),
    pytest.mark.usefixtures("scratch"),
]
SCRATCH: list[Path] = [Path(tempfile.gettempdir())]

PY = "/usr/bin/python3"  # the host's python, read-only inside the sandbox
HANG_BOUND = 30.0  # generous: only catches a hang


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch root the sandbox's host uid can enter (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="factory-sandbox-test-"))
    root.chmod(0o711)
    SCRATCH[0] = root
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run(
    tmp_path: Path,
    command: list[str],
    *,
    config: LocalConfig | None = None,
    secrets: dict[str, str] | None = None,
    logs: io.StringIO | None = None,
    base_dir: Path | None = None,
    **spec: Any,
) -> dict[str, Any]:
    source = EnvSecretSource({f"FACTORY_SECRET_{k}": v for k, v in (secrets or {}).items()})
    return run_spec(
        ContainerSpec(image="host", command=command, secrets=sorted(secrets or {}), **spec),
        LocalExecutor(config or LocalConfig(scratch_root=SCRATCH[0])),
        home=tmp_path / "home",
        base_dir=base_dir or tmp_path,  # plays the workflow's folder: host mounts come from it
        secret_source=source,
        logs=logs,
    )


def python(code: str) -> list[str]:
    return [PY, "-c", code]


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


WRITE_PROBE = """
import json, os
results = {}
for path in ["/usr/evil", "/etc/evil", "/evil", "/run/evil", "/data/evil", "/proc/sys/kernel/hostname", HOST]:
    try:
        with open(path, "w") as f:
            f.write("x")
        results[path] = "written"
    except OSError as e:
        results[path] = e.strerror
with open("/work/inside.txt", "w") as f:
    f.write("ok")
results["/work/inside.txt"] = "written"
print(json.dumps(results))
"""


def test_writing_outside_the_workdir_fails_and_the_host_is_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("original")
    host_target = tmp_path / "host-evil"
    code = WRITE_PROBE.replace("HOST", repr(str(host_target)))
    out = run(tmp_path, python(code), mounts={"/data": str(data)}, outputs=["/work/inside.txt"])
    results = json.loads(out["stdout"])
    assert results.pop("/work/inside.txt") == "written"  # control: the workdir is writable
    assert "inside.txt" in out["artifacts"]
    assert all(outcome != "written" for outcome in results.values()), results
    assert not host_target.exists()
    assert sorted(p.name for p in data.iterdir()) == ["keep.txt"]
    assert (data / "keep.txt").read_text() == "original"


def test_no_network_only_loopback_and_redis_unreachable(tmp_path: Path) -> None:
    probe = (
        "import os, socket, sys\n"
        "ifaces = sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])\n"
        "s = socket.socket(); s.settimeout(3)\n"
        "try:\n    s.connect(('127.0.0.1', 6379)); print(ifaces, 'CONNECTED')\n"
        "except OSError as e:\n    print(ifaces, 'REFUSED', e.strerror)\n"
        "if 'HTTP_PROXY' in os.environ:  # network: true: the one way out, a CONNECT tunnel\n"
        "    t = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n"
        "    t.sendall(b'CONNECT 127.0.0.1:6379 HTTP/1.1\\r\\n\\r\\n')\n"
        "    answer = t.recv(200).split(b' ')[1].decode()\n"
        "    if answer == '200':\n"
        "        t.sendall(b'PING\\r\\n'); answer = t.recv(100).decode().strip()\n"
        "    print('PROXY', answer)\n"
    )
    closed = run(tmp_path, python(probe))
    assert "REFUSED" in closed["stdout"] and "['lo']" in closed["stdout"]
    # network: true keeps its own namespace: Redis on the host's loopback stays out of reach, directly
    # and through the egress proxy (tests/integration/test_sandbox_network.py attacks the rest).
    opened = run(tmp_path, python(probe), network=True)
    assert "['lo'] REFUSED" in opened["stdout"] and "PROXY 403" in opened["stdout"]
    allowed = LocalConfig(scratch_root=SCRATCH[0], network_allow=["127.0.0.1:6379"])
    control = run(tmp_path, python(probe), config=allowed, network=True)  # control: an admin allows Redis
    if "PROXY +PONG" not in control["stdout"]:
        from tests.conftest import service_missing  # CI=true: Redis must be there, so this fails

        service_missing("Redis on 127.0.0.1:6379 (the control)", ConnectionError(control["stdout"].strip()))
    assert "['lo'] REFUSED" in control["stdout"]


def test_a_fork_bomb_is_stopped_at_the_process_limit(tmp_path: Path) -> None:
    marker = f"bomb-{uuid.uuid4().hex}"
    bomb = (
        f"import os, sys, time  # {marker}\n"
        "n = 0\n"
        "try:\n"
        "    while n < 100000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(120); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(f'forks refused after {n}: {e}', file=sys.stderr); sys.exit(1)\n"
    )
    config = LocalConfig(scratch_root=SCRATCH[0], max_processes=32)
    started = time.monotonic()
    with pytest.raises(ContainerStepError) as caught:
        run(tmp_path, python(bomb), config=config, timeout=HANG_BOUND)
    assert time.monotonic() - started < HANG_BOUND
    error = caught.value
    assert error.exit_code == 1 and "32 processes" in str(error.reason)
    refused_after = int(str(error).split("forks refused after ")[1].split(":")[0])
    assert 0 < refused_after < 32
    assert processes_with(marker) == []  # the sleeping children died with the sandbox


def test_forks_below_the_limit_work(tmp_path: Path) -> None:
    code = (
        "import os\n"
        "for _ in range(8):\n"
        "    pid = os.fork()\n"
        "    if pid == 0: os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
        "print('forked 8')"
    )
    out = run(tmp_path, python(code), config=LocalConfig(scratch_root=SCRATCH[0], max_processes=32))
    assert out["stdout"].strip() == "forked 8"


def test_touching_memory_past_the_limit_is_killed_by_the_oom_killer(tmp_path: Path) -> None:
    code = "b = bytearray(16 << 20)\nprint('16 MiB ok', flush=True)\nc = b'x' * (200 << 20)\nprint('NOT STOPPED')"
    with pytest.raises(ContainerStepError) as caught:
        run(tmp_path, python(code), resources={"memory": "64MiB"})
    error = caught.value
    assert "out-of-memory" in str(error.reason) and "64 MiB" in str(error.reason)
    assert error.exit_code == 137


def test_reserving_past_the_address_space_limit_fails_the_allocation(tmp_path: Path) -> None:
    config = LocalConfig(scratch_root=SCRATCH[0], address_space_headroom=256 << 20, use_cgroups=False)
    code = "b = bytearray(2 << 30)\nprint('NOT STOPPED')"
    with pytest.raises(ContainerStepError) as caught:
        run(tmp_path, python(code), config=config, resources={"memory": "64MiB"})
    assert "MemoryError" in str(caught.value) and "address-space" in str(caught.value.reason)
    small = run(tmp_path, python("b = bytearray(8 << 20); print(len(b))"), config=config, resources={"memory": "64MiB"})
    assert small["stdout"].strip() == str(8 << 20)  # control


def test_a_step_cannot_read_another_steps_secret(tmp_path: Path) -> None:
    value = f"tok-{uuid.uuid4().hex}"
    holder: dict[str, Any] = {}
    logs = io.StringIO()
    signal = SCRATCH[0] / "signal"  # A waits, its secret mounted, until B is done: they overlap for sure
    signal.mkdir(mode=0o755)

    def step_a() -> None:
        code = (
            "import os, time\n"
            "print(open('/run/secrets/A_TOKEN').read(), flush=True)\n"
            "deadline = time.time() + 20\n"
            "while not os.path.exists('/signal/done') and time.time() < deadline: time.sleep(0.02)\n"
            "print('released' if os.path.exists('/signal/done') else 'not released')\n"
        )
        holder["a"] = run(
            tmp_path,
            python(code),
            secrets={"A_TOKEN": value},
            logs=logs,
            mounts={"/signal": str(signal)},
            base_dir=SCRATCH[0],
        )

    thread = threading.Thread(target=step_a)
    thread.start()
    deadline = time.monotonic() + HANG_BOUND
    while "***" not in logs.getvalue() and time.monotonic() < deadline:  # A has read its secret
        time.sleep(0.02)
    on_host = [p for p in SCRATCH[0].rglob("*") if p.is_file() and value.encode() in p.read_bytes()]
    thief = (
        "import glob, os\n"
        "found = []\n"
        "paths = glob.glob('/run/**', recursive=True) + glob.glob('/proc/*/environ')\n"
        "paths += glob.glob('/tmp/**', recursive=True) + glob.glob('/work/**', recursive=True)\n"
        "for p in paths:\n"
        "    try:\n"
        f"        if {value!r}.encode() in open(p, 'rb').read(): found.append(p)\n"
        "    except OSError: pass\n"
        f"found += [k for k, v in os.environ.items() if {value!r} in v]\n"
        "print('FOUND' if found else 'NOTHING', found, sorted(os.listdir('/run')))\n"
    )
    b = run(tmp_path, python(thief))
    (signal / "done").touch()
    thread.join(HANG_BOUND)
    assert b["stdout"].startswith("NOTHING") and "secrets" not in b["stdout"]
    assert on_host == []  # the secret never touched the host disk
    a = holder["a"]
    assert a["stdout"].split() == ["***", "released"]  # control: A read it (redacted), and ran all along B
    assert value not in logs.getvalue() and value not in json.dumps(a)
    with pytest.raises(SecretNotFoundError, match="A_TOKEN"):
        run_spec(
            ContainerSpec(image="host", command=["true"], secrets=["A_TOKEN"]),
            LocalExecutor(LocalConfig(scratch_root=SCRATCH[0])),
            home=tmp_path / "home",
            secret_source=EnvSecretSource({}),
        )


def test_running_past_the_timeout_kills_every_process(tmp_path: Path) -> None:
    marker = "61.3579"  # a sleep nobody else runs
    command = ["sh", "-c", f"trap '' TERM; setsid sleep {marker} & sleep {marker}"]
    started = time.monotonic()
    with pytest.raises(ContainerTimeoutError) as caught:
        run(tmp_path, command, timeout=1)
    assert time.monotonic() - started < HANG_BOUND
    assert "timeout of 1s" in str(caught.value)
    time.sleep(0.2)
    assert processes_with(f"sleep {marker}") == []
    quick = run(tmp_path, ["sh", "-c", "sleep 0.1; echo done"], timeout=10)  # control
    assert quick["stdout"] == "done\n"


def test_the_environment_is_only_the_specs_and_the_uid_is_not_root(tmp_path: Path) -> None:
    os.environ["FACTORY_TEST_CANARY"] = "leaked"
    try:
        out = run(tmp_path, ["sh", "-c", "env; id -u; grep CapEff /proc/self/status"], env={"MODE": "fast"})
    finally:
        del os.environ["FACTORY_TEST_CANARY"]
    assert "MODE=fast" in out["stdout"] and "leaked" not in out["stdout"]
    lines = out["stdout"].splitlines()
    assert "1000" in lines and "CapEff:\t0000000000000000" in lines


def test_an_output_symlink_cannot_exfiltrate_host_files(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="symbolic link"):
        run(tmp_path, ["ln", "-s", "/etc/hostname", "/work/out.txt"], outputs=["/work/out.txt"])


def test_a_missing_output_and_a_nonzero_exit_are_step_failures(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="did not create"):
        run(tmp_path, ["true"], outputs=["/work/missing.json"])
    with pytest.raises(ContainerStepError) as caught:
        run(tmp_path, ["sh", "-c", "echo first >&2; echo 'the real problem' >&2; exit 7"])
    assert caught.value.exit_code == 7 and str(caught.value).rstrip().endswith("the real problem")


def test_outputs_become_content_addressed_artifacts_a_later_step_mounts(tmp_path: Path) -> None:
    first = run(
        tmp_path,
        ["sh", "-c", "mkdir -p out/sub && echo 42 > out/n.txt && echo deep > out/sub/d.txt"],
        outputs=["/work/out"],
    )
    assert sorted(first["artifacts"]) == ["n.txt", "sub/d.txt"]
    digest = first["artifacts"]["n.txt"]["digest"]
    stored = tmp_path / "home/artifacts/sha256" / digest[7:9] / digest[9:]
    assert stored.read_text() == "42\n"
    if os.geteuid() != 0:  # root may write anything; for others the store is read-only
        assert not os.access(stored, os.W_OK)
    assert stored.stat().st_mode & 0o222 == 0
    second = run(
        tmp_path, ["sh", "-c", "cat /work/in/n.txt /work/in/sub/d.txt"], mounts={"/work/in": first["artifacts"]}
    )
    assert second["stdout"] == "42\ndeep\n"


def test_a_mount_cannot_hide_the_workdir(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    with pytest.raises(StepInputError, match="hide the workdir"):
        run(tmp_path, ["true"], mounts={"/": str(tmp_path / "tree")})
    with pytest.raises(StepInputError, match="outside the workflow's folder"):
        run(tmp_path, ["true"], mounts={"/data": "/root"})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_cache_is_the_one_writable_place_kept_between_steps(tmp_path: Path) -> None:
    first = run(tmp_path, ["sh", "-c", "echo kept > /cache/note.txt && echo written"], caches={"/cache": "demo"})
    assert first["stdout"] == "written\n"
    second = run(tmp_path, ["cat", "/cache/note.txt"], caches={"/cache": "demo"})
    assert second["stdout"] == "kept\n"  # another sandbox, another uid: the cache is still there
    assert (SCRATCH[0] / "caches" / "demo" / "note.txt").read_text() == "kept\n"
    with pytest.raises(ContainerStepError):  # without asking for it, the same write fails
        run(tmp_path, ["sh", "-c", "echo x > /cache/note.txt"])
    with pytest.raises(ValueError, match="pattern"):
        run(tmp_path, ["true"], caches={"/cache": "../escape"})
