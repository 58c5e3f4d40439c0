"""all-MiniLM-L6-v2 sentence embeddings without torch and without network.

A BERT encoder (6 layers, hidden size 384, 12 heads) run on the weights of
``model.safetensors``, tokenised by ``tokenizer.json`` (the ``tokenizers``
library), then mean pooling over the real tokens and L2 normalisation, as
sentence-transformers does for this model. Two backends run the forward pass:
``numpy`` (here) and ``onnxruntime`` (``factory.models.minilm_onnx``, about twice
as fast on one short text); ``auto`` takes ONNX Runtime when it is installed.
Both match sentence-transformers to a cosine above 0.999
(tests/integration/test_embedding.py).
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from factory.errors import ModelNotFoundError
from factory.models.files import resolve_model_dir

Array = npt.NDArray[np.float32]
BACKENDS: tuple[str, ...] = ("auto", "numpy", "onnxruntime")

_GELU_C = np.float32(0.7978845608028654)  # sqrt(2 / pi)
_GELU_K = np.float32(0.044715)


def _gelu(x: Array) -> Array:
    """BERT's GELU in its tanh form: numpy has no erf, and the tanh form is fast.

    It differs from the erf form by less than 1e-3 per activation; the embeddings stay within a
    cosine of 0.99999 of sentence-transformers' (tests/integration/test_embedding.py).
    """
    inner = x * x
    inner *= _GELU_K * x
    inner += x
    inner *= _GELU_C
    np.tanh(inner, out=inner)
    inner += np.float32(1.0)
    inner *= np.float32(0.5) * x
    return inner


def _layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    centred = x - x.mean(axis=-1, keepdims=True)
    var = np.einsum("ij,ij->i", centred, centred)[:, None] / np.float32(x.shape[-1])
    centred *= 1.0 / np.sqrt(var + np.float32(eps))
    centred *= weight
    centred += bias
    return centred


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar token count, so little work goes into padding.

    Sorted by length; a batch closes at ``batch_size`` texts or when the next text is
    more than twice as long as the batch's first one.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) >= batch_size or lengths[i] > 2 * lengths[current[0]]):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class _Layer:
    qkv_w: Array  # (hidden, 3 * hidden): query, key and value projections side by side
    qkv_b: Array
    out_w: Array
    out_b: Array
    ln1_w: Array
    ln1_b: Array
    inter_w: Array
    inter_b: Array
    ffn_out_w: Array
    ffn_out_b: Array
    ln2_w: Array
    ln2_b: Array


def resolve_backend(backend: str) -> Literal["numpy", "onnxruntime"]:
    """The backend ``backend`` names; ``auto`` is ``onnxruntime`` when onnx and onnxruntime are installed."""
    have_ort = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    if backend == "auto":
        return "onnxruntime" if have_ort else "numpy"
    if backend == "onnxruntime":
        if not have_ort:
            raise ModelNotFoundError(
                "the onnxruntime embedding backend needs the packages onnx and onnxruntime: "
                "install the Factory's embedding extra, or set FACTORY_EMBEDDING_BACKEND=numpy"
            )
        return "onnxruntime"
    if backend == "numpy":
        return "numpy"
    raise ModelNotFoundError(f"unknown embedding backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


class MiniLMEncoder:
    """Sentence embeddings from a BERT-style sentence-transformers model folder."""

    def __init__(self, model_dir: str | Path | None = None, backend: str = "auto") -> None:
        self.backend = resolve_backend(backend)
        self.model_dir = resolve_model_dir(model_dir)
        config = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        if config.get("hidden_act", "gelu") != "gelu":
            raise ModelNotFoundError(f"{self.model_dir}: only BERT models with gelu activations are supported")
        self.max_seq_length = self._max_seq_length(config)

        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)

        w = load_file(str(self.model_dir / "model.safetensors"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""

        def get(name: str) -> Array:
            try:
                return np.ascontiguousarray(w[prefix + name], dtype=np.float32)
            except KeyError:
                raise ModelNotFoundError(f"{self.model_dir}/model.safetensors has no tensor {prefix + name}") from None

        self.word = get("embeddings.word_embeddings.weight")
        self.position = get("embeddings.position_embeddings.weight")
        self.token_type = get("embeddings.token_type_embeddings.weight")
        self.emb_ln_w = get("embeddings.LayerNorm.weight")
        self.emb_ln_b = get("embeddings.LayerNorm.bias")
        self.layers: list[_Layer] = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            q, k, v = (get(p + f"attention.self.{n}.weight") for n in ("query", "key", "value"))
            qb, kb, vb = (get(p + f"attention.self.{n}.bias") for n in ("query", "key", "value"))
            self.layers.append(
                _Layer(
                    # torch's Linear stores (out, in): transpose once so the forward pass is x @ W.
                    qkv_w=np.ascontiguousarray(np.concatenate([q, k, v], axis=0).T),
                    qkv_b=np.concatenate([qb, kb, vb]),
                    out_w=np.ascontiguousarray(get(p + "attention.output.dense.weight").T),
                    out_b=get(p + "attention.output.dense.bias"),
                    ln1_w=get(p + "attention.output.LayerNorm.weight"),
                    ln1_b=get(p + "attention.output.LayerNorm.bias"),
                    inter_w=np.ascontiguousarray(get(p + "intermediate.dense.weight").T),
                    inter_b=get(p + "intermediate.dense.bias"),
                    ffn_out_w=np.ascontiguousarray(get(p + "output.dense.weight").T),
                    ffn_out_b=get(p + "output.dense.bias"),
                    ln2_w=get(p + "output.LayerNorm.weight"),
                    ln2_b=get(p + "output.LayerNorm.bias"),
                )
            )
        self._run: Callable[[npt.NDArray[np.int64], Array], Array] = self._forward
        if self.backend == "onnxruntime":
            from factory.models.minilm_onnx import OnnxForward

            self._run = OnnxForward(self)

    def _max_seq_length(self, config: dict[str, Any]) -> int:
        limit = int(config.get("max_position_embeddings", 512))
        st_config = self.model_dir / "sentence_bert_config.json"
        if st_config.is_file():
            limit = min(limit, int(json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length", limit)))
        return limit

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> Array:
        """L2-normalised embeddings, one row per text, shape (len(texts), hidden)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts; wrap a single text in a list")
        out = np.zeros((len(texts), self.hidden), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts)) if texts else []
        lengths = [len(e.ids) for e in encodings]
        for idx in _batches(lengths, batch_size):
            longest = max(lengths[i] for i in idx)
            ids = np.zeros((len(idx), longest), dtype=np.int64)
            mask = np.zeros((len(idx), longest), dtype=np.float32)
            for row, i in enumerate(idx):
                ids[row, : lengths[i]] = encodings[i].ids
                mask[row, : lengths[i]] = 1.0
            out[idx] = self._run(ids, mask)
        return out

    def _forward(self, ids: npt.NDArray[np.int64], mask: Array) -> Array:
        """The numpy forward pass: token ids and mask in, normalised embeddings out."""
        batch, seq = ids.shape
        heads, dim, hidden = self.heads, self.hidden // self.heads, self.hidden
        # Dense layers work on (batch * seq, hidden): plain 2-D matrix products are the fastest here.
        x = (self.word[ids] + self.position[:seq][None, :, :] + self.token_type[0]).reshape(batch * seq, hidden)
        x = _layer_norm(x, self.emb_ln_w, self.emb_ln_b, self.eps)
        # Padded keys get a large negative score so softmax gives them no weight.
        padded = bool((mask == 0).any())
        key_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(dim))
        for layer in self.layers:
            qkv = x @ layer.qkv_w
            qkv += layer.qkv_b
            qkv4 = qkv.reshape(batch, seq, 3, heads, dim).transpose(2, 0, 3, 1, 4)  # (3, batch, heads, seq, dim)
            q, k, v = qkv4[0], qkv4[1], qkv4[2]
            scores = q @ k.transpose(0, 1, 3, 2)
            scores *= scale
            if padded:
                scores += key_bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = np.ascontiguousarray((scores @ v).transpose(0, 2, 1, 3)).reshape(batch * seq, hidden)
            attended = context @ layer.out_w
            attended += layer.out_b
            attended += x
            x = _layer_norm(attended, layer.ln1_w, layer.ln1_b, self.eps)
            inner = x @ layer.inter_w
            inner += layer.inter_b
            ffn = _gelu(inner) @ layer.ffn_out_w
            ffn += layer.ffn_out_b
            ffn += x
            x = _layer_norm(ffn, layer.ln2_w, layer.ln2_b, self.eps)
        tokens = x.reshape(batch, seq, hidden)
        summed = (tokens * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


_cache: dict[tuple[Path, str], MiniLMEncoder] = {}
_cache_lock = threading.Lock()


def load_encoder(model_dir: str | Path | None = None, backend: str | None = None) -> MiniLMEncoder:
    """The encoder for ``model_dir`` (resolved as ``resolve_model_dir`` does), loaded once per process and backend.

    ``backend`` defaults to the ``embedding_backend`` setting (``FACTORY_EMBEDDING_BACKEND``, ``auto``).
    """
    if backend is None:
        from factory.settings import get_settings

        backend = get_settings().embedding_backend
    key = (resolve_model_dir(model_dir).resolve(), resolve_backend(backend))
    with _cache_lock:
        encoder = _cache.get(key)
        if encoder is None:
            encoder = _cache[key] = MiniLMEncoder(key[0], key[1])
        return encoder
