"""The MiniLM encoder as an ONNX graph, run by ONNX Runtime.

The graph is built in memory from the same weights the numpy encoder loads
(nothing is exported or downloaded): embeddings, six BERT layers, mean pooling
over the real tokens and L2 normalisation. It computes what
``factory.models.minilm`` computes, with the exact (erf) GELU, and is about
twice as fast on a short text: ONNX Runtime's matrix kernels handle a few rows
times a large weight matrix far better than a general BLAS does, and one
decision of the router is exactly that (benchmarks/routing.py prints both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from onnx import ModelProto

    from factory.models.minilm import MiniLMEncoder

Array = npt.NDArray[np.float32]

OPSET = 18


class _GraphBuilder:
    """Collects nodes and initialisers, naming every intermediate value."""

    def __init__(self) -> None:
        from onnx import numpy_helper

        self._numpy_helper = numpy_helper
        self.nodes: list[object] = []
        self.initializers: list[object] = []
        self._count = 0

    def const(self, name: str, value: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> str:
        self.initializers.append(self._numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], domain: str | None = None, **attributes: Any) -> str:
        from onnx import helper

        self._count += 1
        output = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], domain=domain, **attributes))
        return output

    def linear(self, x: str, weight: Array, bias: Array, name: str) -> str:
        """``x @ weight + bias`` (weight stored as (in, out))."""
        return self.op("Add", [self.op("MatMul", [x, self.const(f"{name}.w", weight)]), self.const(f"{name}.b", bias)])

    def layer_norm(self, x: str, weight: Array, bias: Array, eps: float, name: str) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.const(f"{name}.w", weight), self.const(f"{name}.b", bias)],
            axis=-1,
            epsilon=eps,
        )


def build_model(encoder: MiniLMEncoder) -> ModelProto:
    """An ONNX model of ``encoder``: inputs ``input_ids`` (int64) and ``attention_mask`` (float32), both
    (batch, seq); output ``embeddings`` (batch, hidden), L2-normalised."""
    from onnx import TensorProto, helper

    g = _GraphBuilder()
    hidden, heads = encoder.hidden, encoder.heads

    # Embeddings: word + position (the first seq rows) + token type 0, then layer norm.
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("one", 1, np.int64)], axis=0)
    seq_1d = g.op("Unsqueeze", [seq_len, g.const("axis0", [0], np.int64)])
    positions = g.op(
        "Slice",
        [g.const("position_embeddings", encoder.position), g.const("zero_1d", [0], np.int64), seq_1d],
    )
    x = g.op("Gather", [g.const("word_embeddings", encoder.word), "input_ids"])
    x = g.op("Add", [g.op("Add", [x, positions]), g.const("token_type_0", encoder.token_type[0])])
    x = g.layer_norm(x, encoder.emb_ln_w, encoder.emb_ln_b, encoder.eps, "embeddings.ln")

    half, sqrt_half = g.const("half", 0.5), g.const("sqrt_half", np.sqrt(0.5))

    # Attention sees the mask as int32 (1 for a token, 0 for padding) and gives padded keys no weight.
    mask_index = g.op("Cast", ["attention_mask"], to=TensorProto.INT32)
    for i, layer in enumerate(encoder.layers):
        p = f"layer{i}"
        # ONNX Runtime's fused attention (com.microsoft): projections, scaled dot product over the
        # unmasked keys, softmax and the weighted sum of the values, in one kernel.
        context = g.op(
            "Attention",
            [x, g.const(f"{p}.qkv.w", layer.qkv_w), g.const(f"{p}.qkv.b", layer.qkv_b), mask_index],
            domain="com.microsoft",
            num_heads=heads,
        )
        attended = g.op("Add", [g.linear(context, layer.out_w, layer.out_b, f"{p}.out"), x])
        x = g.layer_norm(attended, layer.ln1_w, layer.ln1_b, encoder.eps, f"{p}.ln1")
        inner = g.linear(x, layer.inter_w, layer.inter_b, f"{p}.inter")
        # Exact GELU: 0.5 * x * (1 + erf(x / sqrt(2))).
        erf = g.op("Erf", [g.op("Mul", [inner, sqrt_half])])
        gelu = g.op("Mul", [g.op("Mul", [inner, half]), g.op("Add", [erf, g.const(f"{p}.one", 1.0)])])
        ffn = g.op("Add", [g.linear(gelu, layer.ffn_out_w, layer.ffn_out_b, f"{p}.ffn"), x])
        x = g.layer_norm(ffn, layer.ln2_w, layer.ln2_b, encoder.eps, f"{p}.ln2")

    # Mean pooling over the real tokens, then L2 normalisation.
    axis1 = g.const("axis1", [1], np.int64)
    mask3 = g.op("Unsqueeze", ["attention_mask", g.const("axis2", [2], np.int64)])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis1], keepdims=0)
    counts = g.op("Max", [g.op("ReduceSum", ["attention_mask", axis1], keepdims=1), g.const("tiny", 1e-9)])
    pooled = g.op("Div", [summed, counts])
    norm = g.op("Sqrt", [g.op("ReduceSumSquare", [pooled, axis1], keepdims=1)])
    g.nodes.append(helper.make_node("Div", [pooled, g.op("Max", [norm, g.const("eps12", 1e-12)])], ["embeddings"]))

    graph = helper.make_graph(
        g.nodes,  # type: ignore[arg-type]
        "minilm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", hidden])],
        g.initializers,  # type: ignore[arg-type]
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    )


class OnnxForward:
    """The encoder's forward pass (token ids and mask in, normalised embeddings out) on ONNX Runtime."""

    def __init__(self, encoder: MiniLMEncoder, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads sleep instead of spinning: the CPUs are shared with Ray's other workers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            build_model(encoder).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, ids: npt.NDArray[np.int64], mask: Array) -> Array:
        (embeddings,) = self.session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})
        return np.asarray(embeddings, dtype=np.float32)
