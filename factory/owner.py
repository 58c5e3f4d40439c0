"""Who owns a run: a coordinator's identity, and whether its process still lives.

A coordinator's owner id names its process precisely enough to tell, from the same
machine, that the process is gone::

    <hostname>:<pid>:<nonce>:<start ticks>:<boot id>:<pid namespace>

- ``boot id`` (``/proc/sys/kernel/random/boot_id``) changes at every boot, so a pid of an
  earlier boot is never mistaken for a process of this one;
- ``start ticks`` (field 22 of ``/proc/<pid>/stat``, the start time in clock ticks after
  boot) defeats pid reuse: a new process that got the same pid started later;
- ``pid namespace`` (the inode of ``/proc/self/ns/pid``): two containers share the host's
  boot id but not their pids, so only a process in the same namespace may judge;
- ``nonce`` tells two coordinators of one process apart.

:func:`owner_is_gone` answers True only when it is certain: same boot, same pid
namespace, same hostname, and no live process with that pid and start time. Anything
else (another machine, another container, an owner id of the older ``host:pid:nonce``
form, a system without ``/proc``) answers False, and the lease decides as before.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

_UNKNOWN = "-"
_PROC = Path("/proc")


@dataclass(frozen=True)
class OwnerId:
    """A coordinator's identity, as kept in ``runs.owner``."""

    hostname: str
    pid: int
    nonce: str
    start_ticks: int | None  # None: not known (no /proc)
    boot_id: str | None
    pid_namespace: str | None

    def __str__(self) -> str:
        start = _UNKNOWN if self.start_ticks is None else str(self.start_ticks)
        return ":".join(
            [self.hostname, str(self.pid), self.nonce, start, self.boot_id or _UNKNOWN, self.pid_namespace or _UNKNOWN]
        )


@dataclass(frozen=True)
class ProcessInfo:
    """What /proc says about one process: its state letter and its start time in clock ticks."""

    state: str
    start_ticks: int


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def boot_id(proc: Path = _PROC) -> str | None:
    """This boot's id (Linux), or None where there is none."""
    return _read(proc / "sys" / "kernel" / "random" / "boot_id") or None


def pid_namespace(proc: Path = _PROC) -> str | None:
    """The inode number of this process's pid namespace ("4026531836"), or None."""
    try:
        link = os.readlink(proc / "self" / "ns" / "pid")  # "pid:[4026531836]"
    except OSError:
        return None
    inode = link.partition("[")[2].rstrip("]")
    return inode if inode.isdigit() else None


def process_info(pid: int, proc: Path = _PROC) -> ProcessInfo | None:
    """State and start time of a process, or None if no process has this pid."""
    text = _read(proc / str(pid) / "stat")
    if not text or ")" not in text:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
    fields = text[text.rindex(")") + 1 :].split()
    try:
        return ProcessInfo(state=fields[0], start_ticks=int(fields[19]))  # fields 3 and 22 of stat(5)
    except (IndexError, ValueError):
        return None


def new_owner_id(proc: Path = _PROC) -> OwnerId:
    """The identity of a new coordinator in this process."""
    pid = os.getpid()
    info = process_info(pid, proc)
    return OwnerId(
        hostname=socket.gethostname(),
        pid=pid,
        nonce=uuid.uuid4().hex[:6],
        start_ticks=None if info is None else info.start_ticks,
        boot_id=boot_id(proc),
        pid_namespace=pid_namespace(proc),
    )


def parse_owner(text: str | None) -> OwnerId | None:
    """The owner id of a run, or None for an empty value or one in another (older) form."""
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 6 or not parts[1].isdigit():
        return None
    hostname, pid, nonce, start, boot, namespace = parts
    if start != _UNKNOWN and not start.isdigit():
        return None
    return OwnerId(
        hostname=hostname,
        pid=int(pid),
        nonce=nonce,
        start_ticks=None if start == _UNKNOWN else int(start),
        boot_id=None if boot == _UNKNOWN else boot,
        pid_namespace=None if namespace == _UNKNOWN else namespace,
    )


def owner_is_gone(owner: str | OwnerId | None, proc: Path = _PROC) -> bool:
    """True when the owner is certainly dead: a process of this machine, this boot and this
    pid namespace whose pid is free, a zombie, or taken by a process that started later.
    False when it lives or when this machine cannot tell (see the module's docstring)."""
    parsed = owner if isinstance(owner, OwnerId) else parse_owner(owner)
    if parsed is None or parsed.start_ticks is None or parsed.boot_id is None or parsed.pid_namespace is None:
        return False
    if parsed.boot_id != boot_id(proc) or parsed.pid_namespace != pid_namespace(proc):
        return False
    if parsed.hostname != socket.gethostname():
        return False
    info = process_info(parsed.pid, proc)
    if info is None:
        return True  # no such process
    if info.state in ("Z", "X"):
        return True  # killed, not yet reaped by its parent
    return info.start_ticks != parsed.start_ticks  # the pid was reused by a newer process
