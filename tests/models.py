"""Tiny ONNX models built in code, and a project directory that uses them.

Shared by the stage tests and the end-to-end tests: no committed binaries, every model is a
few KB and compiles in seconds.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TINY_SHAPE = (1, 3, 8, 8)


def tiny_convnet(seed: int = 0, opset: int = 17, with_bn: bool = True) -> onnx.ModelProto:
    """Conv(+BatchNorm)+Relu -> residual Conv -> Add -> GAP -> Flatten -> Gemm; input ``x``."""
    rng = np.random.default_rng(seed)

    def w(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    inits = [w("c1.w", (8, 3, 3, 3)), w("c1.b", (8,)), w("c2.w", (8, 8, 3, 3), 0.15),
             w("c2.b", (8,)), w("fc.w", (10, 8)), w("fc.b", (10,))]
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1] * 4, name="c1")]
    x = "c1"
    if with_bn:
        inits += [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(8)).astype(np.float32),
                                          "bn.s"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np.float32),
                                          "bn.b"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np.float32),
                                          "bn.m"),
                  numpy_helper.from_array((1 + 0.1 * rng.random(8)).astype(np.float32), "bn.v")]
        nodes.append(helper.make_node("BatchNormalization", [x, "bn.s", "bn.b", "bn.m", "bn.v"],
                                      ["bn"], name="bn"))
        x = "bn"
    nodes += [
        helper.make_node("Relu", [x], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1] * 4, name="c2"),
        helper.make_node("Add", ["c2", "r1"], ["add"], name="add"),
        helper.make_node("Relu", ["add"], ["r2"], name="r2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(TINY_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


TINY_SPEC = """\
name = "tiny"
description = "tiny conv net for tests"

[source]
path = "models/tiny.onnx"

[[inputs]]
name = "x"
shape = [1, 3, 8, 8]
dtype = "float32"

[[outputs]]
name = "y"
class_scores = true

[calibration]
samples = 4

[variants.fp32]
scheme = "fp32"

[variants.int8]
scheme = "int8"

[tuning]
trials_per_task = 4
wall_seconds = 60
"""


def make_project(root: Path, model: onnx.ModelProto | None = None,
                 spec_text: str = TINY_SPEC) -> Path:
    """A project dir (models/tiny.toml + models/tiny.onnx) a doit run can build in."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    onnx.save(model or tiny_convnet(), str(root / "models" / "tiny.onnx"))
    (root / "models" / "tiny.toml").write_text(textwrap.dedent(spec_text), encoding="utf-8")
    return root


def tiny_bert_project(root: Path, spec_text: str) -> Path:
    """A project dir with the "tiny" BERT of models/bert_gen.py exported (torch/transformers,
    seeded random weights) as models/bert.onnx and ``spec_text`` as models/bert.toml."""
    import sys

    repo_models = str(Path(__file__).resolve().parent.parent / "models")
    sys.path.insert(0, repo_models)
    try:
        import bert_gen
    finally:
        sys.path.remove(repo_models)
    (root / "models").mkdir(parents=True, exist_ok=True)
    bert_gen.export(root / "models" / "bert.onnx", seed=0, config="tiny")
    (root / "models" / "bert.toml").write_text(spec_text, encoding="utf-8")
    return root


def tiny_token_model(seed: int = 0, vocab: int = 11, seq: int = 8,
                     hidden: int = 16) -> onnx.ModelProto:
    """A text-encoder shape: int64 ``input.ids``, ``token_type_ids`` and ``attention_mask``
    [1, seq] -> word + token-type embedding Gathers, masked sum pooling, MatMul + bias ->
    [1, 4]. Three inputs, as a BERT takes them, one with a name TVM's importer renames
    (``input.ids`` -> ``input_ids``); ids outside [0, vocab) read out of bounds."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32),
                                     "emb"),
             numpy_helper.from_array((rng.standard_normal((hidden, 4)) * 0.3).astype(np.float32),
                                     "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((2, hidden)).astype(np.float32),
                                     "type_emb"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [
        helper.make_node("Gather", ["emb", "input.ids"], ["w_e"], axis=0),        # [1,s,h]
        helper.make_node("Gather", ["type_emb", "token_type_ids"], ["t_e"], axis=0),
        helper.make_node("Add", ["w_e", "t_e"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),  # [1,s]
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),                     # [1,s,1]
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("ReduceSum", ["em", "axis1"], ["s"], keepdims=0),          # [1,h]
        helper.make_node("MatMul", ["s", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_tokens",
        [helper.make_tensor_value_info("input.ids", TensorProto.INT64, [1, seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, seq]),
         helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


TOKEN_SPEC = """
name = "tiny"
description = "three int64 inputs, one renamed by TVM"

[source]
path = "models/tiny.onnx"

[[inputs]]
name = "input.ids"
shape = [1, 8]
dtype = "int64"
range = [0, 10]   # the 11-row embedding

[[inputs]]
name = "attention_mask"
shape = [1, 8]
dtype = "int64"
range = [0, 1]

[[inputs]]
name = "token_type_ids"
shape = [1, 8]
dtype = "int64"
range = [0, 1]

[variants.fp32]
scheme = "fp32"

[variants.int8]
scheme = "int8"

[tuning]
trials_per_task = 4
wall_seconds = 60
"""


def tiny_mlp_rows(seed: int = 0, k: int = 96, hidden: int = 64, n: int = 48,
                  rows: int = 3) -> onnx.ModelProto:
    """x [1, rows, k] -> MatMul+bias -> Relu -> MatMul -> y [1, rows, n]: two MatMul weights
    and several rows (float_models.tiny_mlp has one row), for the block-wise weight-only
    schemes (k = 96: three groups of 32, and 0.75 of a group of 128, so the padded last group
    is exercised)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(
                 (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32), "w1"),
             numpy_helper.from_array((0.1 * rng.standard_normal(hidden)).astype(np.float32),
                                     "b1"),
             numpy_helper.from_array(
                 (rng.standard_normal((hidden, n)) / np.sqrt(hidden)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1/MatMul"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1/Add"),
             helper.make_node("Relu", ["hb"], ["hr"], name="fc1/Relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2/MatMul")]
    graph = helper.make_graph(
        nodes, "tiny_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MLP_SPEC = """\
name = "tiny"
description = "tiny MLP for the weight-only schemes"

[source]
path = "models/tiny.onnx"

[[inputs]]
name = "x"
shape = [1, 3, 96]
dtype = "float32"

[[outputs]]
name = "y"

[variants.fp32]
scheme = "fp32"

[variants.w4g32]
scheme = "w4g32"
symmetric = true

[variants.w8g128]
scheme = "w8g128"

[tuning]
trials_per_task = 4
wall_seconds = 60
"""


def two_sensitivities_mlp(seed: int = 0, k: int = 128) -> onnx.ModelProto:
    """x [1, k] -> MatMul "benign" -> Relu -> MatMul "sensitive" -> y [1, k], for the mixed
    precision search: one layer that 4 bits suit, one that only a float format keeps.

    The sensitive layer's input channels 0, 32, 64 ... carry a weight 100x the others, but the
    benign layer feeds them zeros: they add nothing to the output, yet they set each group's
    scale, so a 4- or 8-bit grid rounds every other weight of the group to a few steps."""
    rng = np.random.default_rng(seed)
    scale = np.float32(1 / np.sqrt(k))
    w0 = (rng.standard_normal((k, k)) * scale).astype(np.float32)
    w1 = (rng.standard_normal((k, k)) * scale).astype(np.float32)
    w0[:, ::32] = 0.0
    w1[::32] *= 100.0
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="benign"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w1"], ["y"], name="sensitive")]
    graph = helper.make_graph(
        nodes, "two_sensitivities", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MIXED_SPEC = """\
name = "tiny"
description = "two MatMul layers, one sensitive to quantization, for the mixed scheme"

[source]
path = "models/tiny.onnx"

[[inputs]]
name = "x"
shape = [1, 128]
dtype = "float32"

[[outputs]]
name = "y"

[calibration]
samples = 4

[variants.fp32]
scheme = "fp32"

[variants.mixed]
scheme = "mixed"
symmetric = true
budget = {metric = "cosine", min = 0.98}
"""


def two_sensitivities_cnn(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """x [1, C, 8, 8] -> Conv "benign" (3x3) -> Relu -> Conv "sensitive" (1x1) -> y, for the
    mixed search with int8: the benign conv's output channel 0 is always 0, and the
    sensitive conv weights that channel 1000x more than the others. It adds nothing to y,
    but it sets each output channel's weight scale, so 8-bit weights round the others to a
    step or two; the benign conv's activations and weights quantize well."""
    rng = np.random.default_rng(seed)
    wa = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(
        np.float32)
    wa[0] = 0.0
    wb = (rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels)).astype(np.float32)
    wb[:, 0] *= 1000.0
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="benign", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wb"], ["y"], name="sensitive")]
    shape = [1, channels, 8, 8]
    graph = helper.make_graph(
        nodes, "two_sensitivities_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MIXED_CNN_SPEC = """\
name = "tiny"
description = "two convs, one sensitive to int8, for the mixed scheme"

[source]
path = "models/tiny.onnx"

[[inputs]]
name = "x"
shape = [1, 8, 8, 8]
dtype = "float32"

[[outputs]]
name = "y"

[calibration]
samples = 4

[variants.mixed]
scheme = "mixed"
budget = {metric = "cosine", min = 0.999}
"""


def mlp_with_gemm(seed: int = 0, rows: int = 4, k: int = 96) -> onnx.ModelProto:
    """x [rows, k] -> Gemm(transB, alpha, beta, bias) -> Relu -> MatMul -> y [rows, 24]: a Gemm for
    int8_dynamic's Gemm -> MatMul + Add rewrite, and a plain MatMul."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((48, k)) / np.sqrt(k))
                                     .astype(np.float32), "w1t"),
             numpy_helper.from_array((0.1 * rng.standard_normal(48)).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((48, 24)) / np.sqrt(48))
                                     .astype(np.float32), "w2")]
    nodes = [helper.make_node("Gemm", ["x", "w1t", "b1"], ["h"], name="fc1", transB=1,
                              alpha=0.5, beta=2.0),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
