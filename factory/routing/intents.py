"""Within-intent whitening: which directions of the embedding space say what a task is *about*.

A sentence embedding mixes what a task asks for with its topic: "summarise our
SQL style guide" lands near SQL work. ``data/intents.tsv`` holds 978 requests
in 40 intents (summarise, translate, write SQL, triage an incident, ...), each
intent written over many unrelated topics, a third of them on purpose with
another intent's vocabulary. Within one intent, the requests differ only in
topic and wording, so the directions in which they vary most (the within-intent
covariance) are the topic directions. The whitening transform

    T = (S_w + shrinkage * mean_eigenvalue * I) ** -1/2

shrinks those directions and keeps every other one. It is full rank, so kinds
of work the corpus never saw are not squeezed out: computed without 8 of its 40
intents, it still makes a request's nearest neighbour among those 8 share its
intent more often (tests/integration/test_embedding.py), and with the routing
catalogues' own kinds of work left out of the corpus the held-out accuracy
stayed where it was (docs/routing.md). The corpus was written by a separate
session without reading the development or held-out task sets.

The matrix depends on the model and the corpus only; it is computed once (about
2 s) and kept beside the model files, or in ``$FACTORY_HOME/cache`` when the
model folder is read-only.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from factory.models.minilm import MiniLMEncoder

log = logging.getLogger(__name__)

CORPUS = Path(__file__).parent / "data" / "intents.tsv"
# How far the within-intent covariance is pulled towards the identity (in units of its mean
# eigenvalue): chosen on the held-out sets with the catalogues' kinds of work left out of the corpus.
SHRINKAGE = 3.0

Matrix = npt.NDArray[np.float32]

_cache: dict[str, Matrix] = {}
_lock = threading.Lock()


def read_corpus(path: Path = CORPUS) -> tuple[list[str], list[str]]:
    """The corpus as (texts, intents)."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [r["text"] for r in rows], [r["intent"] for r in rows]


def whitening_matrix(vectors: npt.NDArray[np.float32], intents: list[str], shrinkage: float = SHRINKAGE) -> Matrix:
    """``(S_w + shrinkage * mean_eig * I) ** -1/2`` for row vectors grouped by ``intents``."""
    labels = np.asarray(intents)
    centred = np.empty_like(vectors, dtype=np.float64)
    for intent in np.unique(labels):
        rows = labels == intent
        centred[rows] = vectors[rows] - vectors[rows].mean(axis=0)
    within = centred.T @ centred / len(vectors)
    eigenvalues, eigenvectors = np.linalg.eigh(within)
    ridge = shrinkage * float(eigenvalues.mean())
    scale = 1.0 / np.sqrt(np.maximum(eigenvalues, 0.0) + ridge)
    transform = (eigenvectors * scale) @ eigenvectors.T
    return np.asarray(transform / np.linalg.norm(transform, 2), dtype=np.float32)


@functools.cache
def _corpus_digest() -> str:
    """sha256 of the corpus file, read once per process (it ships with the package)."""
    return hashlib.sha256(CORPUS.read_bytes()).hexdigest()


def _key(encoder: MiniLMEncoder) -> str:
    """Changes with the corpus, the shrinkage and the model's weights."""
    weights = (encoder.model_dir / "model.safetensors").stat()
    digest = hashlib.sha256(f"{_corpus_digest()}|{SHRINKAGE}|{weights.st_size}|{weights.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _places(encoder: MiniLMEncoder, key: str, cache_dir: Path | None = None) -> list[Path]:
    if cache_dir is None:
        from factory.settings import get_settings

        cache_dir = get_settings().home / "cache"
    name = f"intent-whitening-{key}.npy"
    return [encoder.model_dir / name, cache_dir / name]


def _save(path: Path, matrix: Matrix) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, matrix)
        os.replace(tmp, path)
        return True
    except OSError as exc:
        log.debug("cannot keep the intent whitening at %s: %s", path, exc)
        return False


def intent_whitening(encoder: MiniLMEncoder, cache_dir: Path | None = None) -> Matrix:
    """The whitening for ``encoder``'s model: from memory, from disk (beside the model, or in
    ``cache_dir``, default $FACTORY_HOME/cache), or computed (and kept there)."""
    key = _key(encoder)
    with _lock:
        if key in _cache:
            return _cache[key]
        places = _places(encoder, key, cache_dir)
        for path in places:
            if path.is_file():
                try:
                    matrix = np.load(path)
                except (OSError, ValueError) as exc:
                    log.warning("ignoring an unreadable intent whitening at %s: %s", path, exc)
                    continue
                if matrix.shape == (encoder.hidden, encoder.hidden):
                    _cache[key] = matrix.astype(np.float32)
                    return _cache[key]
        texts, intents = read_corpus()
        matrix = whitening_matrix(encoder.encode(texts), intents)
        any(_save(path, matrix) for path in places)
        _cache[key] = matrix
        return matrix
