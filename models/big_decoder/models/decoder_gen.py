"""A GPT-style decoder stack in plain ONNX with seeded random fp32 weights: a model over
2 GiB, to build the pipeline's large-model path (weights outside the IR, ONNX external data).

Nothing is downloaded: ``onnx.helper`` builds the graph (opset 17: token embedding Gather,
learned positions, per layer pre-LayerNorm causal multi-head attention and an Erf-GELU MLP,
final LayerNorm; output ``hidden`` [1, seq, d_model]). Weights are N(0, 0.02), made one tensor
at a time and written with ONNX external data (``model.onnx`` + ``model.onnx.data``), so the
generator holds one copy of them at most.
"""

from __future__ import annotations

import math
from pathlib import Path

# name -> (layers, d_model, heads, d_ffn, vocab, seq)
CONFIGS = {
    # 11 x 201 MB layers + a 262 MB embedding: 2.48 GB (2.31 GiB) of fp32 weights
    "decoder2g": (11, 2048, 16, 8192, 32000, 4),
    "tiny": (2, 16, 2, 32, 50, 4),  # for tests: the same graph, 24 KB
}


def export(out_path: Path, seed: int, config: str = "decoder2g") -> int:
    """Write the decoder of shape ``CONFIGS[config]``; returns its weights' bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers, d, heads, ffn, vocab, seq = CONFIGS[config]
    dh = d // heads
    rng = np.random.default_rng(seed)
    # Tensors go straight into the model's graph, one at a time: helper.make_graph and
    # make_model would copy every weight twice (three copies of 2.3 GiB at once).
    model = helper.make_model(helper.make_graph([], f"decoder_{config}", [], []),
                              opset_imports=[helper.make_opsetid("", 17)])
    inits = model.graph.initializer
    nodes: list = []

    def weight(name: str, shape, scale: float = 0.02, value: float | None = None) -> str:
        if value is None:
            arr = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
        else:
            arr = np.full(shape, value, np.float32)
        inits.add().CopyFrom(numpy_helper.from_array(arr, name))
        return name

    def const(name: str, arr) -> str:
        inits.add().CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def layer_norm(x: str, prefix: str) -> str:
        return node("LayerNormalization", [x, weight(f"{prefix}.g", [d], value=1.0),
                                           weight(f"{prefix}.b", [d], value=0.0)],
                    f"{prefix}.out", axis=-1, epsilon=1e-5)

    def linear(x: str, prefix: str, n_in: int, n_out: int) -> str:
        mm = node("MatMul", [x, weight(f"{prefix}.w", [n_in, n_out])], f"{prefix}.mm")
        return node("Add", [mm, weight(f"{prefix}.bias", [n_out])], f"{prefix}.out")

    heads_shape = const("heads_shape", np.array([1, seq, heads, dh], np.int64))
    model_shape = const("model_shape", np.array([1, seq, d], np.int64))
    scale = const("scale", np.array(1.0 / math.sqrt(dh), np.float32))
    mask = np.triu(np.full((seq, seq), -1e9, np.float32), k=1).reshape(1, 1, seq, seq)
    causal = const("causal_mask", mask)
    half, one = const("half", np.array(0.5, np.float32)), const("one", np.array(1.0, np.float32))
    inv_sqrt2 = const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))

    x = node("Gather", [weight("tok_emb", [vocab, d]), "input_ids"], "embed", axis=0)
    x = node("Add", [x, weight("pos_emb", [1, seq, d])], "embed_pos")
    for i in range(layers):
        p = f"layer{i}"
        h = layer_norm(x, f"{p}.ln1")
        q = node("Reshape", [linear(h, f"{p}.q", d, d), heads_shape], f"{p}.q4")
        k = node("Reshape", [linear(h, f"{p}.k", d, d), heads_shape], f"{p}.k4")
        v = node("Reshape", [linear(h, f"{p}.v", d, d), heads_shape], f"{p}.v4")
        q = node("Transpose", [q], f"{p}.qt", perm=[0, 2, 1, 3])   # [1, H, S, dh]
        k = node("Transpose", [k], f"{p}.kt", perm=[0, 2, 3, 1])   # [1, H, dh, S]
        v = node("Transpose", [v], f"{p}.vt", perm=[0, 2, 1, 3])   # [1, H, S, dh]
        s = node("Mul", [node("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scaled")
        a = node("Softmax", [node("Add", [s, causal], f"{p}.masked")], f"{p}.probs", axis=-1)
        a = node("Transpose", [node("MatMul", [a, v], f"{p}.ctx")], f"{p}.ctxt",
                 perm=[0, 2, 1, 3])
        a = node("Reshape", [a, model_shape], f"{p}.ctx3")
        x = node("Add", [x, linear(a, f"{p}.o", d, d)], f"{p}.res1")
        f = linear(layer_norm(x, f"{p}.ln2"), f"{p}.up", d, ffn)
        erf = node("Erf", [node("Mul", [f, inv_sqrt2], f"{p}.fs")], f"{p}.erf")
        g = node("Mul", [node("Mul", [f, half], f"{p}.fh"),
                         node("Add", [erf, one], f"{p}.erf1")], f"{p}.gelu")
        x = node("Add", [x, linear(g, f"{p}.down", ffn, d)], f"{p}.res2")
    out = layer_norm(x, "final_ln")
    nodes.append(helper.make_node("Identity", [out], ["hidden"], name="hidden"))

    model.graph.node.extend(nodes)
    model.graph.input.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                           [1, seq]))
    model.graph.output.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT,
                                                            [1, seq, d]))
    model.ir_version = 8  # what onnxruntime 1.31 reads
    weights = sum(len(t.raw_data) for t in inits)
    out_path = Path(out_path)
    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)
    # external data: no 2 GiB protobuf limit, and onnx moves each tensor out as it writes
    onnx.save_model(model, str(out_path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    return weights


def generate(out_path: Path, seed: int) -> None:
    """The pipeline's generator entry point: the 2.3 GiB decoder."""
    export(out_path, seed, "decoder2g")
