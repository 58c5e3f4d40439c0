"""Artifacts: a container step's output files, stored content-addressed.

Files live at ``$FACTORY_HOME/artifacts/sha256/<2 hex>/<62 hex>``, read-only,
written once (temporary file + rename), so the same bytes are stored once and
an artifact never changes after it is referenced. A step's output holds only
references::

    "artifacts": {"report.json": {"digest": "sha256:...", "size": 123}}

Those references are JSON, committed with the step's output, so they survive a
resume: a later step mounts them by digest (``mounts: {"/work/in":
"${steps.ID.artifacts}"}`` gives a directory holding ``report.json``).

A mount value may be a host path (a string; relative to the workflow's folder),
one artifact (``{"digest": ..., "size": ...}`` or the string ``sha256:...``) or
a mapping of names to artifacts (a directory).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

from factory.errors import ArtifactError, StepInputError

DIGEST_PREFIX = "sha256:"
_CHUNK = 1 << 20


class ArtifactRef(BaseModel):
    """A reference to a stored file."""

    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ArtifactStore:
    """Content-addressed files under a root directory (``$FACTORY_HOME/artifacts``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        hexdigest = digest.removeprefix(DIGEST_PREFIX)
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise ArtifactError(f"{digest!r} is not an artifact digest (sha256:<64 hex digits>)")
        return self.root / "sha256" / hexdigest[:2] / hexdigest[2:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put_file(self, source: Path) -> ArtifactRef:
        """Store a regular file (symlinks refused); returns its reference."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(source, flags)
        except OSError as exc:
            raise ArtifactError(f"cannot read output {source.name!r}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as reader:
            if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
                raise ArtifactError(f"output {source.name!r} is not a regular file")
            self.root.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            size = 0
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".incoming-", delete=False) as out:
                try:
                    while chunk := reader.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                except BaseException:
                    os.unlink(out.name)
                    raise
        ref = ArtifactRef(digest=DIGEST_PREFIX + digest.hexdigest(), size=size)
        target = self.path(ref.digest)
        if target.exists():
            os.unlink(out.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(out.name, 0o444)
            os.replace(out.name, target)
        return ref

    def put_bytes(self, data: bytes) -> ArtifactRef:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(Path(tmp.name))
        finally:
            os.unlink(tmp.name)

    def _owner_mark(self, digest: str, owner: str) -> Path:
        hexdigest = self.path(digest).parent.name + self.path(digest).name
        namespace = hashlib.sha256(owner.encode()).hexdigest()[:32]
        return self.root / "owners" / namespace / hexdigest

    def grant(self, digest: str, owner: str | None) -> None:
        """Record that runs of ``owner`` made (and so may read) this artifact."""
        if owner is None:
            return
        mark = self._owner_mark(digest, owner)
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()

    def readable_by(self, digest: str, owner: str | None) -> bool:
        """Runs started on this machine (owner None) read every artifact; a key's runs only their own."""
        return owner is None or self._owner_mark(digest, owner).exists()

    def materialize(self, ref: ArtifactRef, dest: Path, owner: str | None = None) -> None:
        """Place the artifact at ``dest`` (a hard link where possible, else a copy), read-only.
        With ``owner``, only an artifact a run of that owner made is placed."""
        if not self.readable_by(ref.digest, owner):
            raise ArtifactError(
                f"artifact {ref.digest} was not made by a run of this key, so its runs cannot mount it; "
                "mount ${steps.ID.artifacts} of a step of this run"
            )
        source = self.path(ref.digest)
        if not source.is_file():
            raise ArtifactError(
                f"artifact {ref.digest} is not in {self.root}: the step that made it ran with another "
                "FACTORY_HOME (share FACTORY_HOME between the nodes, or re-run that step)"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)
            os.chmod(dest, 0o444)


def output_name(container_path: str, workdir: str) -> str:
    """Check that an output lies inside the workdir; returns its path relative to it."""
    path = PurePosixPath(container_path)
    root = PurePosixPath(workdir)
    if not path.is_absolute() or ".." in path.parts:
        raise StepInputError(f"output {container_path!r} must be an absolute path without '..'")
    if path == root or not path.is_relative_to(root):
        raise StepInputError(
            f"output {container_path!r} is outside the workdir {workdir!r}: write outputs under the workdir"
        )
    return str(path.relative_to(root))


def collect_outputs(scratch: Path, outputs: list[str], workdir: str) -> dict[str, Path]:
    """Map each declared output to host files in the scratch workdir.

    A file is named by its base name; a directory contributes every regular file
    under it, named by its path relative to that directory. Symbolic links and
    anything resolving outside the scratch directory are refused (a step could
    otherwise point an output at a host file).
    """
    found: dict[str, Path] = {}
    base = scratch.resolve()
    for output in outputs:
        rel = output_name(output, workdir)
        host = scratch / rel
        if host.is_symlink() or (host.exists() and not host.resolve().is_relative_to(base)):
            raise ArtifactError(f"output {output!r} is a symbolic link or leaves the workdir; outputs must be files")
        if host.is_dir():
            for dirpath, dirnames, filenames in os.walk(host, followlinks=False):
                for name in filenames:
                    file = Path(dirpath) / name
                    if file.is_symlink() or not file.is_file():
                        continue
                    _add(found, str(file.relative_to(host)), file, output)
                dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
        elif host.is_file():
            _add(found, PurePosixPath(rel).name, host, output)
        else:
            raise ArtifactError(f"the command did not create its declared output {output!r}")
    return found


def _add(found: dict[str, Path], name: str, path: Path, output: str) -> None:
    if name in found:
        raise ArtifactError(f"two outputs are named {name!r} (from {output!r}); give them different file names")
    found[name] = path


def store_outputs(
    store: ArtifactStore, files: Mapping[str, Path], owner: str | None = None
) -> dict[str, dict[str, Any]]:
    """Store collected files (readable by ``owner``'s runs); returns the JSON references a step's output carries."""
    refs: dict[str, dict[str, Any]] = {}
    for name, path in sorted(files.items()):
        ref = store.put_file(path)
        store.grant(ref.digest, owner)
        refs[name] = ref.model_dump()
    return refs


def _as_ref(value: Any) -> ArtifactRef | None:
    if isinstance(value, str) and value.startswith(DIGEST_PREFIX):
        return ArtifactRef(digest=value, size=0)
    if isinstance(value, Mapping) and isinstance(value.get("digest"), str):
        try:
            return ArtifactRef.model_validate(dict(value))
        except ValueError as exc:
            raise StepInputError(f"{value!r} is not an artifact reference: {exc}") from None
    return None


def prepare_mount(
    store: ArtifactStore, target: str, value: Any, staging: Path, base_dir: Path | None, owner: str | None = None
) -> tuple[Path, bool]:
    """The host path to mount at ``target`` and whether it must be copied into the staging area.

    Artifacts are always placed in ``staging`` (a directory the sandbox's user can reach).
    A host path is returned as it is; the caller decides whether it is reachable.
    """
    if not PurePosixPath(target).is_absolute():
        raise StepInputError(f"mount target {target!r} must be an absolute container path")
    ref = _as_ref(value)
    if ref is not None:
        dest = staging / f"file-{len(list(staging.glob('*')))}" / PurePosixPath(target).name
        store.materialize(ref, dest, owner)
        return dest, False
    if isinstance(value, Mapping):
        dest = staging / f"dir-{len(list(staging.glob('*')))}"
        dest.mkdir(parents=True)
        for name, item in value.items():
            item_ref = _as_ref(item)
            rel = PurePosixPath(str(name))
            if item_ref is None or rel.is_absolute() or ".." in rel.parts:
                raise StepInputError(
                    f"mount {target!r}: {name!r} is not an artifact; mount ${{steps.ID.artifacts}} or a host path"
                )
            store.materialize(item_ref, dest / rel, owner)
        return dest, False
    if isinstance(value, str) and value:
        if base_dir is None:
            raise StepInputError(
                f"mount {target!r}: host paths can be mounted only from the folder of a workflow loaded from "
                "a file; mount ${steps.ID.artifacts} instead"
            )
        host = Path(value)
        if not host.is_absolute():
            host = base_dir / host
        if not host.exists():
            raise StepInputError(f"mount {target!r}: host path {str(host)!r} does not exist")
        resolved, root = host.resolve(), base_dir.resolve()
        if not resolved.is_relative_to(root):
            raise StepInputError(
                f"mount {target!r}: {str(resolved)!r} is outside the workflow's folder {str(root)!r}; "
                "only files under it (or artifacts) can be mounted"
            )
        if resolved.is_relative_to(store.root.resolve().parent):
            raise StepInputError(f"mount {target!r}: {str(resolved)!r} is inside FACTORY_HOME, which is never mounted")
        return resolved, True
    raise StepInputError(
        f"mount {target!r}: {value!r} is neither a host path nor artifacts; write a path or ${{steps.ID.artifacts}}"
    )
