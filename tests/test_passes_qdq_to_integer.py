"""QDQToInteger: integer conv/matmul from QDQ models, checked against onnxruntime's INT8 output."""

from __future__ import annotations

import numpy as np
import pytest
import qdq_helpers as H

from pipeline.compiler.passes._qdq import (
    IntegerReport,
    recover_affine_8bit,
    recover_symmetric_int8,
)
from pipeline.compiler.passes.qdq_to_integer import QDQToInteger, quantize_to_integer

# (model factory, quantize options, ops the report must list as matched)
CASES = {
    "conv_relu": (lambda: H.conv_model(relu=True), {}, ["conv2d"]),
    "conv_no_relu": (lambda: H.conv_model(relu=False), {}, ["conv2d"]),
    "residual_add": (H.residual_model, {}, ["conv2d"] * 3 + ["add"]),
    "maxpool": (H.maxpool_model, {}, ["conv2d", "nn.max_pool2d", "conv2d"]),
    "depthwise": (H.depthwise_model, {}, ["conv2d"] * 3),
    "gap_flatten_gemm": (H.classifier_model, {},
                         ["conv2d", "global average pool", "reshape", "matmul"]),
    "per_tensor_weights": (H.classifier_model, {"per_channel": False},
                           ["conv2d", "global average pool", "reshape", "matmul"]),
    "int8_activations": (H.residual_model, {"activation": "QInt8"},
                         ["conv2d"] * 3 + ["add"]),
}


def _check_against_ort(qdq, mod, n_inputs=4):
    xs = H.inputs(H.input_shape(qdq), n_inputs, seed=7)
    ref = H.run_ort(qdq, xs)
    got = H.build_and_run(mod, xs)
    scale = H.output_scale(qdq)
    steps = H.max_steps(got, ref, scale)
    assert steps <= 1.0 + 1e-5, f"{steps:.3f} output quantization steps from onnxruntime"
    for g, r in zip(got, ref):
        assert np.argmax(g) == np.argmax(r)
    return steps


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_onnxruntime_int8(case, tmp_path):
    make, options, expected_ops = CASES[case]
    qdq = H.quantize_qdq(make(), tmp_path, **options)
    mod, report = quantize_to_integer(H.import_qdq(qdq))
    assert report.unmatched == []
    assert [m.split(" (")[0].split(" ->")[0] for m in report.matched] == expected_ops
    assert report.summary() == f"{len(expected_ops)} of {len(expected_ops)} quantized ops " \
                               "run as integer"
    assert H.dequantize_feeds(mod) == 0
    _check_against_ort(qdq, mod)


def test_works_before_fold_constant_too(tmp_path):
    """Weights still under their dequantize (no FoldConstant yet) give the same module."""
    qdq = H.quantize_qdq(H.residual_model(), tmp_path)
    folded, report_a = quantize_to_integer(H.import_qdq(qdq, fold=True))
    unfolded, report_b = quantize_to_integer(H.import_qdq(qdq, fold=False))
    assert report_a.matched == report_b.matched
    _check_against_ort(qdq, unfolded, n_inputs=2)


def test_no_fake_quant_between_layers(tmp_path):
    """Only the network's input quantize and output dequantize remain; no float conv."""
    qdq = H.quantize_qdq(H.residual_model(), tmp_path)
    before = H.import_qdq(qdq)
    assert H.count_ops(before, "relax.quantize") == 5
    after, _ = quantize_to_integer(before)
    assert H.count_ops(after, "relax.quantize") == 1
    assert H.count_ops(after, "relax.dequantize") == 1
    assert H.count_ops(after, "relax.nn.conv2d") == 3
    assert H.dequantize_feeds(after) == 0


def test_module_pass_keeps_report(tmp_path):
    qdq = H.quantize_qdq(H.conv_model(), tmp_path)
    qpass = QDQToInteger()
    after = qpass(H.import_qdq(qdq))
    assert qpass.last_report.summary() == "1 of 1 quantized ops run as integer"
    assert H.dequantize_feeds(after) == 0


def _bind(mod, **params):
    from tvm import relax

    return relax.transform.BindParams("main", params)(mod)


def test_structure_of_a_per_tensor_conv():
    """The exact integer form: int32 conv, float32 requantize, round, +zp, clip, cast."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 4, 4), "float32"), w: R.Tensor((4, 2, 1, 1), "int8")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.5, "float32"), R.const(0, "uint8"), axis=1,
                                out_dtype="uint8")
                xf = R.dequantize(xq, R.const(0.5, "float32"), R.const(0, "uint8"), axis=1,
                                  out_dtype="float32")
                wf = R.dequantize(w, R.const(0.25, "float32"), R.const(0, "int8"), axis=0,
                                  out_dtype="float32")
                y = R.nn.conv2d(xf, wf)
                yq = R.quantize(y, R.const(0.125, "float32"), R.const(3, "uint8"), axis=1,
                                out_dtype="uint8")
                R.output(yq)
            return yq

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 4, 4), "float32"), w: R.Tensor((4, 2, 1, 1), "int8"),
                 m: R.Tensor((1, 4, 1, 1), "float32"), zp: R.Tensor((1,), "float32")):
            with R.dataflow():
                # the input edge keeps its quantize, its parameters as (1,) tensors too
                xq = R.quantize(x, R.const([0.5], "float32"), R.const([0], "uint8"), axis=1,
                                out_dtype="uint8")
                acc = R.nn.conv2d(xq, w, out_dtype="int32")
                f = R.astype(acc, "float32")
                f = R.multiply(f, m)
                f = R.round(f)
                f = R.add(f, zp)  # a (1,) tensor, not a scalar: kept out of workload hashes
                f = R.clip(f, R.prim_value(T.float64(0)), R.prim_value(T.float64(255)))
                yq = R.astype(f, "uint8")
                R.output(yq)
            return yq

    w = np.arange(-4, 4, dtype="int8").reshape(4, 2, 1, 1)
    after, report = quantize_to_integer(_bind(Before, w=w))
    # requantize multiplier: x_scale * w_scale / y_scale = 0.5 * 0.25 / 0.125
    expected = _bind(Expected, w=w, m=np.ones((1, 4, 1, 1), "float32"),
                     zp=np.array([3.0], "float32"))
    tvm.ir.assert_structural_equal(after, expected)
    assert report.matched == ["conv2d (per-tensor) -> yq [1, 4, 4, 4]"]


def test_asymmetric_weights_stay_fake_quantized_and_are_reported():
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 4, 4), "float32"), w: R.Tensor((4, 2, 1, 1), "int8")):
            with R.dataflow():
                # activation parameters already as (1,) tensors, as the pass leaves them
                xq = R.quantize(x, R.const([0.5], "float32"), R.const([0], "uint8"), axis=1,
                                out_dtype="uint8")
                xf = R.dequantize(xq, R.const([0.5], "float32"), R.const([0], "uint8"), axis=1,
                                  out_dtype="float32")
                wf = R.dequantize(w, R.const(0.25, "float32"), R.const(5, "int8"), axis=0,
                                  out_dtype="float32")
                y = R.nn.conv2d(xf, wf)
                yq = R.quantize(y, R.const([0.125], "float32"), R.const([3], "uint8"), axis=1,
                                out_dtype="uint8")
                R.output(yq)
            return yq

    before = _bind(Before, w=np.arange(-4, 4, dtype="int8").reshape(4, 2, 1, 1))
    after, report = quantize_to_integer(before)
    tvm.ir.assert_structural_equal(after, before)
    assert report.matched == []
    assert len(report.unmatched) == 1 and "nonzero zero point" in report.unmatched[0]
    assert report.summary() == "0 of 1 quantized ops run as integer"


def test_recover_int8_weights_from_folded_floats():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8)
    q[:, 0, 0, 0] = 127  # onnxruntime's symmetric scale maps each channel's max to 127
    scales = rng.uniform(1e-3, 1e-1, 8).astype(np.float32)
    floats = q.astype(np.float32) * scales.reshape(8, 1, 1, 1)
    got = recover_symmetric_int8(floats, axis=0)
    assert got is not None and got.per_channel
    np.testing.assert_array_equal(got.values, q)
    np.testing.assert_array_equal(got.values.astype(np.float32) * got.scale.reshape(8, 1, 1, 1),
                                  floats)
    assert recover_symmetric_int8(rng.standard_normal((8, 3)).astype(np.float32), 0) is None


def test_recover_affine_uint8_constant_from_folded_floats():
    """A BatchNorm scale as onnxruntime quantizes a Mul's constant (uint8, a zero point):
    the codes and the scale come back from the floats FoldConstant leaves."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    rng = np.random.default_rng(0)
    data = (0.3 + rng.standard_normal((64, 1, 1))).astype(np.float32)
    zp, scale = compute_scale_zp(data.min(), data.max(), np.uint8(0), np.uint8(255))
    codes = np.clip(np.rint(data / scale) + int(zp), 0, 255).astype(np.int32) - int(zp)
    floats = codes.astype(np.float32) * np.float32(scale)
    got = recover_affine_8bit(floats)
    assert got is not None
    np.testing.assert_array_equal(got[0], codes)
    assert got[1] == np.float32(scale)
    assert recover_affine_8bit(data) is None  # floats that are no codes x one scale
    assert recover_affine_8bit(np.float32([0.5])) is None  # one value: many scales fit


def test_report_summary():
    report = IntegerReport(matched=["a", "b"], unmatched=["c: why"])
    assert report.total == 3
    assert report.summary() == "2 of 3 quantized ops run as integer"


@pytest.mark.slow
def test_resnet50_every_activation_bit_exact_with_onnxruntime(tmp_path):
    """ResNet-50 (64x64 input): all 73 quantized ops integer, output equal to onnxruntime's.

    ~50 s. A deep network amplifies any one-step rounding difference in a middle layer
    into several steps at the output, so this checks every op mirrors onnxruntime exactly.
    """
    import importlib.util
    from pathlib import Path

    import onnx

    gen = Path(__file__).resolve().parents[1] / "models" / "resnet50_gen.py"
    spec = importlib.util.spec_from_file_location("resnet50_gen", gen)
    resnet50_gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resnet50_gen)
    model = resnet50_gen.build(image_size=64)
    model.graph.input[0].name = "x"  # the helpers feed "x"
    for node in model.graph.node:
        node.input[:] = ["x" if i == "input" else i for i in node.input]
    onnx.checker.check_model(model)
    qdq = H.quantize_qdq(model, tmp_path, calib_count=2)
    mod, report = quantize_to_integer(H.import_qdq(qdq))
    assert report.summary() == "73 of 73 quantized ops run as integer"
    assert H.count_ops(mod, "relax.quantize") == 1 and H.count_ops(mod, "relax.dequantize") == 1
    xs = H.inputs(H.input_shape(qdq), 2, seed=1)
    steps = H.max_steps(H.build_and_run(mod, xs), H.run_ort(qdq, xs), H.output_scale(qdq))
    from pipeline.runtime.ort_reference import int8_kernels_exact

    if int8_kernels_exact():
        assert steps == 0  # onnxruntime's integer kernels, element for element
    else:
        # No exact integer reference on this CPU (onnxruntime's u8 x s8 kernels saturate
        # without VNNI): the QDQ model run as written accumulates in fp32, whose roundings
        # 50 layers amplify (2 steps measured on a Zen 3 host; fused onnxruntime: 4).
        assert steps <= 3, steps


def _deep_attention_chain(layers: int):
    """``layers`` blocks of h = x @ W, x = tanh(softmax(h @ h^T) @ h): every block's MatMuls
    sit on top of everything before them, as a transformer's attention MatMuls do."""
    g = H._Graph(seed=3)
    x, dim = "x", 8
    for _ in range(layers):
        w = f"w{g.n}"
        g.inits.append(H._init(g.rng, w, (dim, dim), 1.0 / np.sqrt(dim)))
        h = g.node("MatMul", [x, w])
        ht = g.node("Transpose", [h], perm=[1, 0])
        scores = g.node("Softmax", [g.node("MatMul", [h, ht])], axis=-1)
        x = g.node("Tanh", [g.node("MatMul", [scores, h])])  # bounded: no overflow at depth
    return g.model([4, dim], x, [4, dim])


def test_import_is_linear_in_depth(tmp_path, monkeypatch):
    """Constant folding in the pass visits each value once: its work grows with the model,
    not with the square of the depth (a BERT's import once ran for minutes), and never
    recurses deeper than a weight's few ops (a 48-block chain passes Python's limit)."""
    from pipeline.compiler.passes import _qdq

    calls = {"n": 0}
    real = _qdq._fold_call

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(_qdq, "_fold_call", counting)
    per_layer = {}
    for layers in (6, 48):
        qdq = H.quantize_qdq(_deep_attention_chain(layers), tmp_path, per_channel=False,
                             calib_count=2)
        calls["n"] = 0
        quantize_to_integer(H.import_qdq(qdq, fold=False))
        per_layer[layers] = calls["n"] / layers
    assert per_layer[48] <= 1.2 * per_layer[6], per_layer


# ---- transformers: attention ---------------------------------------------------------------
def _attention(tmp_path, seq: int = 16):
    qdq = H.quantize_qdq(H.attention_model(seq=seq), tmp_path, op_types=["MatMul", "Gemm"])
    mod, report = quantize_to_integer(H.import_qdq(qdq))
    return qdq, mod, report


def _output_step(tmp_path) -> float:
    """Step of the last quantized tensor (the output is a float Gemm + bias)."""
    from pipeline.stages.validate import output_steps

    return output_steps(tmp_path / "qdq.onnx")[0]  # written by quantize_qdq


FLOAT_SUMS = "matmul of two activations (per-tensor, exact integer sums in float32)"
INT32_SUMS = "matmul of two activations (per-tensor, int32)"


# 16 tokens: both sums fit float32 exactly; 300 tokens: P x V sums 300 products (> 258)
@pytest.mark.parametrize("seq, sums", [(16, [FLOAT_SUMS] * 2), (300, [FLOAT_SUMS, INT32_SUMS])])
def test_attention_matmuls_of_two_activations_run_as_integer(tmp_path, seq, sums):
    """Q x K^T and P x V multiply two quantized activations: exact integer sums like
    onnxruntime's QLinearMatMul, and the block's output within a step of onnxruntime int8."""
    qdq, mod, report = _attention(tmp_path, seq)
    kinds = [m.split(" ->")[0] for m in report.matched]
    assert [k for k in kinds if k.startswith("matmul of two")] == sums
    assert kinds.count("matmul (per-channel, bias)") == 4
    assert report.unmatched == []
    assert report.summary().startswith("6 of 6 quantized ops run as integer")
    # Softmax, the head Transposes and the input Reshapes are float ops in onnxruntime
    # too; they are listed apart, not as quantized ops left behind
    assert any(f.startswith("nn.softmax") for f in report.float_ops)
    assert H.dequantize_feeds(mod) == 0  # no float matmul reads a dequantized tensor
    xs = H.inputs(H.input_shape(qdq), 3, seed=7)
    steps = H.max_steps(H.build_and_run(mod, xs), H.run_ort(qdq, xs), _output_step(tmp_path))
    assert steps <= 1.0 + 1e-5, f"{steps:.3f} steps from onnxruntime int8"


def test_structure_of_a_matmul_of_two_activations(tmp_path):
    """The rule's form: operands centred from the 8-bit tensors (``float32(q) - zp``, the
    subtraction left out where zp is 0), one matmul, then onnxruntime's requantize."""
    _, mod, _ = _attention(tmp_path)
    values = {b.var: b.value for block in mod["main"].body.blocks for b in block.bindings}
    matmuls = {var: v for var, v in values.items()
               if H._is_call(v, "relax.matmul") and str(v.args[0].ty.dtype) == "float32"}
    assert len(matmuls) == 2
    for var, mm in matmuls.items():
        for operand in mm.args:
            centred = values[operand]
            if H._is_call(centred, "relax.subtract"):
                centred = values[centred.args[0]]
            assert H._is_call(centred, "relax.astype")
            assert str(centred.args[0].ty.dtype) == "uint8"
        users = [v for v in values.values() if H._is_call(v, "relax.astype")
                 and v.args[0].same_as(var)]
        assert len(users) == 1  # the requantize's float32 view of the accumulator
