"""A decoder step's weight-streaming core: a stack of 4096-wide MLP layers at one row.

One token through a decoder reads every weight once and does two FLOPs per weight: its time is
the time to stream the weights. This stack has only that part (``x @ W + b``, ReLU, for each
4096x4096 layer; batch 1, one row), and none of the attention over a KV cache, which this
pipeline has no state for. It is the model the weight-only formats (w4g32, w4g128, w8g128,
fp16, bf16) are measured on. Seeded random weights with a fan-in scale, so activations stay
O(1) through the layers and quantization errors are meaningful.
"""

from __future__ import annotations

WIDTH = 4096
LAYERS = 4


def build(seed: int, width: int = WIDTH, layers: int = LAYERS):
    """The ONNX ModelProto: input ``x`` [1, width] -> output ``y`` [1, width]."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        b = (rng.standard_normal(width) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"layer{i}.weight"),
                  numpy_helper.from_array(b, f"layer{i}.bias")]
        out = "y" if i == layers - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [prev, f"layer{i}.weight"], [f"mm{i}"],
                                   name=f"layer{i}/MatMul"),
                  helper.make_node("Add", [f"mm{i}", f"layer{i}.bias"],
                                   [f"pre{i}" if i < layers - 1 else out], name=f"layer{i}/Add")]
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"pre{i}"], [out], name=f"layer{i}/Relu"))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp4k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def generate(out_path: str, seed: int = 0) -> None:
    import onnx

    onnx.save(build(seed), out_path)
