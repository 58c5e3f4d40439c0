"""Owner ids: what they say about a coordinator's process, and when it is certainly gone."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.owner import OwnerId, boot_id, new_owner_id, owner_is_gone, parse_owner, pid_namespace, process_info

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@linux_only
def test_an_owner_id_names_this_process_and_reads_back() -> None:
    owner = new_owner_id()
    assert owner.pid == os.getpid() and owner.hostname == socket.gethostname()
    assert owner.boot_id == boot_id() and owner.boot_id and len(owner.boot_id) == 36
    assert owner.pid_namespace == pid_namespace() and owner.start_ticks is not None
    text = str(owner)
    assert text.startswith(f"{socket.gethostname()}:{os.getpid()}:")  # readable: host and pid first
    assert parse_owner(text) == owner
    assert new_owner_id().nonce != owner.nonce  # two coordinators of one process differ
    assert not owner_is_gone(text)


@linux_only
def test_a_process_that_exited_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    info = process_info(child.pid)
    assert info is not None
    owner = dataclasses.replace(new_owner_id(), pid=child.pid, start_ticks=info.start_ticks)
    assert not owner_is_gone(owner)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert owner_is_gone(owner)
    assert owner_is_gone(str(owner))


@linux_only
def test_a_killed_process_not_yet_reaped_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = process_info(child.pid)
        assert info is not None
        owner = dataclasses.replace(new_owner_id(), pid=child.pid, start_ticks=info.start_ticks)
        os.kill(child.pid, signal.SIGKILL)
        for _ in range(200):  # until the kernel has made it a zombie
            state = process_info(child.pid)
            if state is not None and state.state == "Z":
                break
            time.sleep(0.01)
        assert owner_is_gone(owner)
    finally:
        child.wait(10)


@linux_only
def test_a_reused_pid_does_not_keep_a_dead_owner_alive() -> None:
    me = new_owner_id()
    assert me.start_ticks is not None
    earlier_process = dataclasses.replace(me, start_ticks=me.start_ticks - 1)  # same pid, another process
    assert owner_is_gone(earlier_process)


@linux_only
def test_owners_this_machine_cannot_judge_are_never_called_gone() -> None:
    me = new_owner_id()
    free_pid = _unused_pid()
    dead_here = dataclasses.replace(me, pid=free_pid)
    assert owner_is_gone(dead_here)
    assert not owner_is_gone(dataclasses.replace(dead_here, boot_id="00000000-0000-0000-0000-000000000000"))
    assert not owner_is_gone(dataclasses.replace(dead_here, hostname="another-host"))
    assert not owner_is_gone(dataclasses.replace(dead_here, pid_namespace="1"))  # another container
    assert not owner_is_gone(dataclasses.replace(dead_here, start_ticks=None))
    assert not owner_is_gone(f"{socket.gethostname()}:{free_pid}:abcdef")  # the older form: the lease decides
    assert not owner_is_gone(None) and not owner_is_gone("")


def test_parsing_refuses_what_is_not_an_owner_id() -> None:
    assert parse_owner("host:12:abc") is None
    assert parse_owner("host:x:abc:1:boot:2") is None
    assert parse_owner("host:12:abc:soon:boot:2") is None
    unknown = OwnerId("h", 12, "abc", None, None, None)
    assert str(unknown) == "h:12:abc:-:-:-" and parse_owner(str(unknown)) == unknown
    assert not owner_is_gone(unknown)


def test_without_proc_nothing_is_known(tmp_path: Path) -> None:
    owner = new_owner_id(proc=tmp_path)
    assert owner.boot_id is None and owner.start_ticks is None and owner.pid_namespace is None
    assert process_info(os.getpid(), proc=tmp_path) is None
    assert not owner_is_gone(owner, proc=tmp_path)


def test_process_names_with_spaces_and_parentheses(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    fields = ["S"] + [str(i) for i in range(4, 22)] + ["987654"] + ["0"] * 30  # fields 3.. of stat(5)
    (tmp_path / "42" / "stat").write_text("42 (a (weird) name) " + " ".join(fields) + "\n")
    info = process_info(42, proc=tmp_path)
    assert info is not None and info.state == "S" and info.start_ticks == 987654


def _unused_pid() -> int:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1, -1):
        if not Path(f"/proc/{pid}").exists():
            return pid
    raise AssertionError("no free pid")
