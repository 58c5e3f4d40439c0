"""The local isolated executor: a container spec run under bubblewrap, no container engine needed.

One execution, in order:

1. A host uid is taken from a machine-wide pool (when the Factory runs as root:
   RLIMIT_NPROC is not enforced for root, and a sandbox must not be root outside).
2. A private directory holds the scratch workdir (owned by that uid) and copies of
   mounts the uid could not reach otherwise.
3. cgroup v1 ``memory``, ``pids`` and ``cpu`` groups are made with the limits.
4. A launcher (``sh``) moves itself into the cgroups, ``prlimit`` sets the rlimits
   (address space, CPU time, file size, open files, processes, no core dumps),
   and ``bwrap`` builds the sandbox: new user, mount, PID, network, IPC, UTS and
   cgroup namespaces (``--unshare-all``: only ``lo``, also with ``network: true``,
   whose one way out is a filtering egress proxy on the host, reached through a
   unix socket: :mod:`factory.sandbox.netproxy`), a read-only root made of
   the host ``/usr`` and a few ``/etc`` files (or a rootfs configured for the
   image), a writable workdir, tmpfs ``/tmp``, secrets as files under
   ``/run/secrets`` (copied from memory, never on the host disk), an empty
   environment plus the spec's env, uid 1000 inside, no nested user namespaces,
   and death with its parent.
5. stdout and stderr are streamed line by line, redacted of secrets as they come;
   on timeout the process group is killed, and every process left in the cgroups
   after it.
6. Declared outputs are copied out of the workdir (symbolic links refused), then
   the private directory and the cgroups are removed.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field, field_validator

from factory.errors import ExecutorUnavailableError, StepInputError
from factory.sandbox.artifacts import collect_outputs, output_name
from factory.sandbox.base import (
    STDERR_TAIL_CHARS,
    STDOUT_TAIL_CHARS,
    ExecResult,
    Job,
    Stream,
    TailBuffer,
)
from factory.sandbox.cgroups import SandboxCgroups
from factory.sandbox.netpolicy import NetworkPolicy, parse_allow
from factory.sandbox.netproxy import EgressProxy
from factory.sandbox.redaction import LineRedactor, Redactor
from factory.sandbox.slots import SlotPool
from factory.spec import ContainerSpec

GiB = 1024**3
MiB = 1024**2
SANDBOX_UID = 1000
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Host /etc entries a program commonly needs; nothing else of /etc is visible.
HOST_ETC = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "nsswitch.conf",
    "mime.types",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
)
# No resolv.conf: a network: true step has no DNS of its own; the egress proxy resolves names.
HOST_ETC_NETWORK = ("hosts", "gai.conf", "host.conf")
HOST_ROOT_ENTRIES = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
ROOTFS_SKIP = {"proc", "dev", "sys", "tmp", "run"}
LAUNCHER = 'for f; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'
LAUNCHER_FAILED = 125
KILL_WAIT_SECONDS = 5.0
MAX_LINE_CHARS = 65_536  # a longer line is passed on in pieces
# network: true: the egress proxy's socket and the forwarder, inside the sandbox.
PROXY_PORT = 3128
NET_DIR = "/run/factory"
PROXY_SOCKET = f"{NET_DIR}/egress.sock"
FORWARDER = f"{NET_DIR}/forwarder.py"
FORWARDER_SOURCE = Path(__file__).with_name("forwarder.py")
PYTHON_CANDIDATES = ("usr/bin/python3", "usr/local/bin/python3", "bin/python3")


class LocalConfig(BaseModel):
    """Settings of the local executor; Settings fields ``sandbox_<name>`` map onto them (docs/isolation.md)."""

    bwrap: str = Field(default="bwrap", description="bubblewrap binary.")
    prlimit: str = Field(default="prlimit", description="util-linux prlimit binary.")
    rootfs: dict[str, Path] = Field(default_factory=dict, description="Image -> root filesystem directory.")
    scratch_root: Path | None = Field(default=None, description="Where workdirs are made; default: the temp dir.")
    uid_base: int = Field(default=200_000, ge=1, description="First host uid of the sandbox pool (root only).")
    uid_count: int = Field(default=256, ge=1, description="Host uids in the pool: at most this many at once.")
    uid_lock_dir: Path = Field(default=Path(tempfile.gettempdir()) / "factory-sandbox-uids")
    default_timeout: float = Field(default=3600.0, gt=0)
    default_memory: int = Field(default=2 * GiB, gt=0)
    address_space_headroom: int = Field(
        default=1 * GiB, ge=0, description="RLIMIT_AS = memory limit + this (virtual reservations are not RSS)."
    )
    max_processes: int = Field(default=256, ge=4, description="pids.max and RLIMIT_NPROC.")
    max_open_files: int = Field(default=1024, ge=16)
    max_file_size: int = Field(default=1 * GiB, gt=0, description="RLIMIT_FSIZE: largest file the step may write.")
    use_cgroups: bool = True
    network_allow: list[str] = Field(
        default_factory=list,
        description="Destinations a network: true step may reach although private or local: "
        "host:port, IP[:port], CIDR[:port], [IPv6]:port.",
    )
    network_max_connections: int = Field(default=64, ge=1, description="Egress connections at once per step.")
    network_idle_timeout: float = Field(default=120.0, gt=0, description="Seconds an egress connection may idle.")

    @field_validator("network_allow")
    @classmethod
    def _check_allow(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            parse_allow(entry)  # a ValueError names the entry and the accepted forms
        return entries


def _world_reachable(path: Path) -> bool:
    """Whether any uid may read ``path`` (every ancestor searchable, the target readable)."""
    try:
        for parent in reversed(path.parents):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if stat.S_ISDIR(mode):
        return bool(mode & stat.S_IROTH and mode & stat.S_IXOTH)
    return bool(mode & stat.S_IROTH)


def _world_searchable(path: Path) -> bool:
    """Whether any uid may enter ``path`` and every folder above it."""
    try:
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents))
    except OSError:
        return False


def _copy_readable(source: Path, dest: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, dest, symlinks=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    for dirpath, _dirnames, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            file = Path(dirpath) / name
            if not file.is_symlink():
                os.chmod(file, 0o444)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class _Pump:
    """Reads stdout and stderr as they come, line by line, and waits for the exit, in one thread.

    One ``poll`` over both pipes and a pidfd of the launcher: no reader threads
    to start and join, and the exit is seen at once (``Popen.wait(timeout)``
    polls with sleeps of up to 50 ms, which would add that much to every step).
    """

    def __init__(self, proc: subprocess.Popen[bytes], out_fd: int, err_fd: int, job: Job) -> None:
        self.proc = proc
        self.job = job
        # Secrets are masked here, before anything keeps or passes on the text (the tails, on_line),
        # by a streaming redactor per pipe: a secret cut by a read or a long-line cut is still found.
        redactor = Redactor(job.secrets)
        self.lines = {fd: LineRedactor(redactor, MAX_LINE_CHARS) for fd in (out_fd, err_fd)}
        self.decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in (out_fd, err_fd)}
        self.buffers: dict[int, TailBuffer] = {
            out_fd: TailBuffer(STDOUT_TAIL_CHARS),
            err_fd: TailBuffer(STDERR_TAIL_CHARS),
        }
        self.streams: dict[int, Stream] = {out_fd: "stdout", err_fd: "stderr"}
        self.open: set[int] = {out_fd, err_fd}

    @property
    def stdout(self) -> str:
        return next(b for fd, b in self.buffers.items() if self.streams[fd] == "stdout").getvalue()

    @property
    def stderr(self) -> str:
        return next(b for fd, b in self.buffers.items() if self.streams[fd] == "stderr").getvalue()

    def _emit(self, fd: int, lines: list[str]) -> None:
        for text in lines:
            self.buffers[fd].write(text)
            if self.job.on_line is not None:
                self.job.on_line(self.streams[fd], text)

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._close(fd)
            return
        self._emit(fd, self.lines[fd].feed(self.decoders[fd].decode(chunk)))

    def _close(self, fd: int) -> None:
        self._emit(fd, self.lines[fd].feed(self.decoders[fd].decode(b"", final=True)) + self.lines[fd].flush())
        self.open.discard(fd)
        os.close(fd)

    def run(self, timeout: float) -> bool:
        """Pump until the launcher exits; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            poller = select.poll()
            for fd in (*self.open, pidfd):
                poller.register(fd, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for fd, _ in poller.poll(left * 1000):
                    if fd == pidfd:
                        self.proc.wait()
                        return True
                    self._read(fd)
                    if fd not in self.open:
                        poller.unregister(fd)
        finally:
            os.close(pidfd)

    def drain(self, seconds: float) -> None:
        """After the exit (and the kill): read what is left, until EOF or ``seconds``."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        for fd in self.open:
            poller.register(fd, select.POLLIN)
        while self.open and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                self._read(fd)
                if fd not in self.open:
                    poller.unregister(fd)
        for fd in list(self.open):
            self._close(fd)


class LocalExecutor:
    """Runs a container spec in an isolated process with bubblewrap."""

    name = "local"

    def __init__(self, config: LocalConfig | None = None) -> None:
        self.config = config or LocalConfig()
        self._uids = SlotPool(self.config.uid_lock_dir, self.config.uid_count)

    # -- public ------------------------------------------------------------------------------------

    def available(self) -> str | None:
        """None if this executor can run here, else what to install."""
        if shutil.which(self.config.bwrap) is None:
            return "bubblewrap is not installed (apt-get install -y bubblewrap), or use executor: dagger"
        if shutil.which(self.config.prlimit) is None:
            return "prlimit (util-linux) is not installed"
        return None

    def run(self, spec: ContainerSpec, job: Job | None = None) -> ExecResult:
        job = job or Job(mounts={t: Path(v) for t, v in spec.mounts.items() if isinstance(v, str)})
        problem = self.available()
        if problem is not None:
            raise ExecutorUnavailableError(f"the local executor cannot run: {problem}")
        for output in spec.outputs:
            output_name(output, spec.workdir)
        with self._host_uid() as host_uid, self._private_dir(host_uid) as private:
            return self._run(spec, job, host_uid, private)

    # -- pieces ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _host_uid(self) -> Iterator[int | None]:
        """A dedicated host uid when running as root (None: run as the current user)."""
        if os.geteuid() != 0:
            yield None
            return
        with self._uids.acquire(wait_seconds=600) as slot:
            yield self.config.uid_base + slot

    @contextlib.contextmanager
    def _private_dir(self, host_uid: int | None) -> Iterator[Path]:
        root = self.config.scratch_root or Path(tempfile.gettempdir()) / "factory-sandbox"
        if not root.exists():
            root.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.chmod(root, 0o711)  # others may enter, not list
        if host_uid is not None and not _world_searchable(root):
            raise ExecutorUnavailableError(
                f"the sandbox's uid cannot reach the scratch root {root}: "
                "choose one whose folders all allow others to enter (chmod o+x)"
            )
        private = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        try:
            if host_uid is not None:
                os.chown(private, host_uid, host_uid)
            yield private
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def _root_args(self, spec: ContainerSpec, fds: list[int]) -> list[str]:
        args: list[str] = []
        rootfs = self.config.rootfs.get(spec.image)
        if rootfs is not None:
            if not rootfs.is_dir():
                raise ExecutorUnavailableError(f"the rootfs {rootfs} configured for image {spec.image!r} is missing")
            for entry in sorted(rootfs.iterdir()):
                if entry.name in ROOTFS_SKIP:
                    continue
                if entry.is_symlink():
                    args += ["--symlink", os.readlink(entry), f"/{entry.name}"]
                else:
                    args += ["--ro-bind", str(entry), f"/{entry.name}"]
            return args
        for name in HOST_ROOT_ENTRIES:
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.exists():
                args += ["--ro-bind", str(host), f"/{name}"]
        etc = list(HOST_ETC) + (list(HOST_ETC_NETWORK) if spec.network else [])
        etc += sorted(p.name for p in Path("/etc").glob("python3*"))
        for name in etc:
            host = Path("/etc") / name
            if host.exists():
                args += ["--ro-bind", str(host), f"/etc/{name}"]
        home = spec.workdir
        passwd = f"root:x:0:0::/root:/bin/sh\nsandbox:x:{SANDBOX_UID}:{SANDBOX_UID}::{home}:/bin/sh\n"
        passwd += "nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
        group = f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"
        for name, text in (("passwd", passwd), ("group", group)):
            fd = _memfd(name, text.encode())
            fds.append(fd)
            args += ["--perms", "0444", "--ro-bind-data", str(fd), f"/etc/{name}"]
        return args

    def _sandbox_python(self, spec: ContainerSpec) -> str | None:
        """A python3 the sandbox can run (for the forwarder): the host's, or the configured rootfs's."""
        root = self.config.rootfs.get(spec.image) or Path("/")
        for candidate in PYTHON_CANDIDATES:
            if os.path.lexists(root / candidate):
                return f"/{candidate}"
        return None

    def _egress(
        self, spec: ContainerSpec, job: Job, private: Path, host_uid: int | None, fds: list[int]
    ) -> tuple[EgressProxy, list[str], list[str], dict[str, str]]:
        """network: true: the proxy (not started yet), its socket and the forwarder inside, the proxy variables.

        Returns the proxy, the bwrap arguments, the command to run (the forwarder, then the
        spec's command) and the environment for HTTP clients.
        """
        on_line = job.on_line

        def notice(text: str) -> None:
            if on_line is not None:
                on_line("notice", text)

        proxy = EgressProxy(
            private / "egress.sock",
            NetworkPolicy(self.config.network_allow),
            owner=host_uid,
            max_connections=self.config.network_max_connections,
            idle_timeout=self.config.network_idle_timeout,
            on_notice=notice,
        )
        args = ["--dir", NET_DIR, "--bind", str(proxy.path), PROXY_SOCKET]
        env = {"FACTORY_EGRESS_SOCKET": PROXY_SOCKET}
        python = self._sandbox_python(spec)
        if python is None:
            notice(
                f"[network] the rootfs of image {spec.image!r} has no python3 to run the forwarder: nothing listens "
                f"on 127.0.0.1:{PROXY_PORT} and no *_PROXY variable is set; HTTP clients can talk to the proxy's "
                f"unix socket {PROXY_SOCKET} (curl --unix-socket {PROXY_SOCKET} http://host/path)\n"
            )
            return proxy, args, list(spec.command), env
        fd = _memfd("forwarder", FORWARDER_SOURCE.read_bytes())
        fds.append(fd)
        args += ["--perms", "0444", "--ro-bind-data", str(fd), FORWARDER]
        url = f"http://127.0.0.1:{PROXY_PORT}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env[name] = env[name.lower()] = url
        env["NO_PROXY"] = env["no_proxy"] = ""
        command = [python, "-I", "-S", FORWARDER, str(PROXY_PORT), PROXY_SOCKET, "--", *spec.command]
        return proxy, args, command, env

    def _limits(self, spec: ContainerSpec, timeout: float) -> tuple[int, int, list[str]]:
        memory = spec.resources.memory or self.config.default_memory
        cpus = spec.resources.cpus or float(os.cpu_count() or 1)
        cpu_seconds = math.ceil(cpus * timeout) + 1
        limits = [
            f"--as={memory + self.config.address_space_headroom}",
            f"--cpu={cpu_seconds}:{cpu_seconds + 2}",
            f"--fsize={self.config.max_file_size}",
            f"--nofile={self.config.max_open_files}",
            "--core=0",
        ]
        return memory, cpu_seconds, limits

    def _run(self, spec: ContainerSpec, job: Job, host_uid: int | None, private: Path) -> ExecResult:
        config = self.config
        timeout = job.timeout or spec.timeout or config.default_timeout
        work = private / "work"
        work.mkdir()
        if host_uid is not None:
            os.chown(work, host_uid, host_uid)
        fds: list[int] = []
        cgroups = SandboxCgroups(private.name)
        proxy: EgressProxy | None = None
        enforced = [
            "namespaces: user, mount, pid, ipc, uts, cgroup, network (only lo)",
            "read-only root",
            f"non-root uid {SANDBOX_UID} inside" + (f" (host uid {host_uid})" if host_uid is not None else ""),
        ]
        try:
            args = [config.bwrap, "--unshare-all", "--unshare-user"]
            args += ["--die-with-parent", "--new-session", "--disable-userns"]
            args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox"]
            args += self._root_args(spec, fds)
            args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/run"]
            args += ["--bind", str(work), spec.workdir]
            for index, (target, host) in enumerate(sorted(job.mounts.items())):
                where = PurePosixPath(target)
                if not where.is_absolute():
                    raise StepInputError(f"mount target {target!r} must be an absolute container path")
                if PurePosixPath(spec.workdir).is_relative_to(where):
                    raise StepInputError(f"mount target {target!r} would hide the workdir {spec.workdir!r}")
                source = host
                if not _world_reachable(host):
                    source = private / "mounts" / str(index) / host.name
                    _copy_readable(host, source)
                args += ["--ro-bind", str(source), target]
            for target, name in sorted(job.caches.items()):  # the step asked for these: writable
                folder = private.parent / "caches" / name  # beside the workdirs: reachable by the sandbox uids
                folder.mkdir(parents=True, exist_ok=True)
                os.chmod(folder, 0o1777)  # any pooled uid may write; none may delete another's files
                where = PurePosixPath(target)
                if not where.is_absolute() or PurePosixPath(spec.workdir).is_relative_to(where):
                    raise StepInputError(
                        f"cache target {target!r} must be an absolute path that does not hide the workdir"
                    )
                args += ["--bind", str(folder), target]
            for name, secret in sorted(job.secrets.items()):
                fd = _memfd(f"secret-{name}", secret.get_secret_value().encode())
                fds.append(fd)
                args += ["--perms", "0400", "--ro-bind-data", str(fd), f"/run/secrets/{name}"]
            command = list(spec.command)
            net_env: dict[str, str] = {}
            if spec.network:
                proxy, net_args, command, net_env = self._egress(spec, job, private, host_uid, fds)
                args += net_args
                allowed = f"; allowed: {', '.join(config.network_allow)}" if config.network_allow else ""
                enforced.append(
                    "network: egress only through the filtering proxy (no loopback, private, link-local "
                    f"or this machine's addresses{allowed})"
                )
            args += ["--remount-ro", "/", "--chdir", spec.workdir, "--clearenv"]
            env = {"PATH": DEFAULT_PATH, "HOME": spec.workdir, **net_env, **spec.env}
            for key, value in env.items():
                args += ["--setenv", key, value]
            args += ["--", *command]

            memory, cpu_seconds, rlimits = self._limits(spec, timeout)
            if host_uid is not None:
                rlimits.append(f"--nproc={config.max_processes}")
                enforced.append(f"RLIMIT_NPROC {config.max_processes}")
            enforced += [
                f"RLIMIT_AS {memory + config.address_space_headroom}",
                f"RLIMIT_CPU {cpu_seconds}s",
                f"RLIMIT_FSIZE {config.max_file_size}",
                f"RLIMIT_NOFILE {config.max_open_files}",
                f"timeout {timeout:g}s",
            ]
            if config.use_cgroups:
                enforced += cgroups.create(memory, config.max_processes, spec.resources.cpus, host_uid)
            launcher = ["/bin/sh", "-c", LAUNCHER, "sh", *map(str, cgroups.procs_files()), "--"]
            argv = [*launcher, config.prlimit, *rlimits, "--", *args]
            if proxy is not None:
                proxy.start()
            return self._spawn(argv, spec, job, fds, host_uid, work, cgroups, timeout, memory, enforced)
        finally:
            if proxy is not None:
                proxy.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            cgroups.remove()

    def _spawn(
        self,
        argv: list[str],
        spec: ContainerSpec,
        job: Job,
        fds: list[int],
        host_uid: int | None,
        work: Path,
        cgroups: SandboxCgroups,
        timeout: float,
        memory: int,
        enforced: list[str],
    ) -> ExecResult:
        started = time.perf_counter()
        # Our own pipes, owned by the sandbox's uid, so that `>/dev/stderr` works inside.
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            if host_uid is not None:
                os.fchown(out_w, host_uid, host_uid)
                os.fchown(err_w, host_uid, host_uid)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=fds,
                process_group=0,
                env={"PATH": DEFAULT_PATH},
                user=host_uid,  # None: stay who we are (not root)
                group=host_uid,
                extra_groups=[] if host_uid is not None else None,
            )
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            raise ExecutorUnavailableError(f"could not start the sandbox: {exc}") from exc
        finally:
            os.close(out_w)
            os.close(err_w)
        pump = _Pump(proc, out_r, err_r, job)
        try:
            timed_out = not pump.run(timeout)
        finally:
            self._kill_tree(proc, cgroups)
            pump.drain(KILL_WAIT_SECONDS)
        duration = time.perf_counter() - started
        exit_code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        if exit_code < 0:
            exit_code = 128 - exit_code
        stderr = pump.stderr
        reason = self._reason(exit_code, timed_out, timeout, memory, cgroups, stderr)
        artifacts: dict[str, Path] = {}
        if exit_code == 0 and not timed_out and spec.outputs:
            outputs_dir = job.outputs_dir or Path(tempfile.mkdtemp(prefix="factory-outputs-"))
            for name, path in collect_outputs(work, spec.outputs, spec.workdir).items():
                dest = outputs_dir / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest, follow_symlinks=False)
                artifacts[name] = dest
        return ExecResult(
            exit_code=exit_code,
            stdout=pump.stdout,
            stderr=stderr,
            artifacts=artifacts,
            duration=duration,
            timed_out=timed_out,
            reason=reason,
            enforced=enforced,
        )

    @staticmethod
    def _kill_tree(proc: subprocess.Popen[bytes], cgroups: SandboxCgroups) -> None:
        """Kill the launcher's process group (bwrap and its PID namespace with it), then any stragglers."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_WAIT_SECONDS)
        cgroups.kill_all()

    def _reason(
        self, exit_code: int, timed_out: bool, timeout: float, memory: int, cgroups: SandboxCgroups, stderr: str
    ) -> str | None:
        """Every limit that stopped or hindered the command, in words (None if none did)."""
        reasons: list[str] = []
        if timed_out:
            reasons.append(f"it ran past its timeout of {timeout:g}s and all its processes were killed")
        if exit_code == LAUNCHER_FAILED and "cgroup.procs" in stderr:
            reasons.append("the sandbox could not join its cgroups")
        if cgroups.oom_kills() or (exit_code == 128 + signal.SIGKILL and cgroups.memory_failures()):
            reasons.append(f"it was killed by the out-of-memory killer at its memory limit of {memory / MiB:g} MiB")
        elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            reasons.append(f"an allocation failed at its address-space limit (memory limit {memory / MiB:g} MiB)")
        if cgroups.pids_refused() or "Resource temporarily unavailable" in stderr:
            reasons.append(f"it hit the limit of {self.config.max_processes} processes: forks were refused")
        if exit_code == 128 + signal.SIGXCPU:
            reasons.append("it used up its CPU-time limit")
        if exit_code == 128 + signal.SIGXFSZ:
            reasons.append(f"it wrote a file past the size limit of {self.config.max_file_size} bytes")
        return "; ".join(reasons) or None
