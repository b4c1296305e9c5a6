"""IntegerRegion alone: residual adds, pooling and reshapes on quantized tensors, no convs."""

from __future__ import annotations

import numpy as np
import pytest
import qdq_helpers as H

from pipeline.compiler.passes.integer_region import IntegerRegion


def test_region_ops_rewritten_convs_reported(tmp_path):
    qdq = H.quantize_qdq(H.classifier_model(), tmp_path)
    region = IntegerRegion()
    mod = region(H.import_qdq(qdq))
    report = region.last_report
    assert [m.split(" ->")[0] for m in report.matched] == [
        "global average pool (int32 sum of 64)", "reshape"]
    # conv2d and matmul are QDQToInteger's business: left in correct fake-quant form
    assert [u.split(": ", 1)[1] for u in report.unmatched] == [
        "add of non-quantized operands: expected dequantize, found nn.conv2d",
        "add of non-quantized operands: expected dequantize, found matmul"]
    assert H.count_ops(mod, "relax.mean") == 0
    xs = H.inputs(H.input_shape(qdq), 2, seed=5)
    steps = H.max_steps(H.build_and_run(mod, xs), H.run_ort(qdq, xs), H.output_scale(qdq))
    assert steps <= 1.0 + 1e-5


def test_maxpool_runs_on_uint8(tmp_path):
    qdq = H.quantize_qdq(H.maxpool_model(), tmp_path)
    mod = IntegerRegion()(H.import_qdq(qdq))
    pools = [b.value for b in mod["main"].body.blocks[0].bindings
             if H._is_call(b.value, "relax.nn.max_pool2d")]
    assert len(pools) == 1 and str(pools[0].args[0].ty.dtype) == "uint8"


@pytest.mark.parametrize("lowering", ["float64", "float32 fma"])
def test_add_is_bit_exact_with_onnxruntime_on_every_input_pair(lowering, tmp_path):
    """All 256 x 256 (a, b) codes through QLinearAdd: the ties decide, so no step is lost.

    With these ranges, rounding twice (float32 multiply, then add) instead of like
    onnxruntime's FMAs differs by one step on 8 pairs; a 50-layer network amplifies such
    steps into several at its output. As IntegerRegion emits it (float64 multiply-adds) and
    as the CPU lowering runs it (float32 FMAs, one kernel: lowering._float32_fma).
    """
    import numpy as np

    from pipeline.compiler.passes.qdq_to_integer import quantize_to_integer

    def ramp(lo, hi):
        return np.linspace(lo, hi, 256 * 256, dtype=np.float32).reshape(1, 1, 256, 256)

    calib = [{"x": ramp(-0.5898259260937995, 2.9426274973907844),
              "y": ramp(-1.5499442118337012, 0.950356243110093)}]
    qdq = H.quantize_qdq(H.add_model(), tmp_path, calib=calib)
    codes = np.arange(256, dtype=np.float32)
    (sx, zx), (sy, zy) = H.input_qparams(qdq, "x"), H.input_qparams(qdq, "y")
    assert zx and zy  # both zero points take part in onnxruntime's rounding
    feed = {"x": ((codes[:, None] - zx) * sx * np.ones((1, 256))).reshape(1, 1, 256, 256),
            "y": ((codes[None, :] - zy) * sy * np.ones((256, 1))).reshape(1, 1, 256, 256)}
    feed = {k: v.astype(np.float32) for k, v in feed.items()}
    mod, report = quantize_to_integer(H.import_qdq(qdq))
    assert [m.split(" ->")[0] for m in report.matched] == ["add"]
    if lowering == "float32 fma":
        from pipeline.compiler.lowering import lower_for_target
        from pipeline.core.targets import get_target, tvm_target

        fields: dict = {}
        # this CPU (it has FMA): LLVM's fmuladd is one rounding only where the target has
        # the instruction, so the lowering emits it only for such targets
        target = tvm_target(get_target("cpu"))
        mod = lower_for_target(mod, target, "int8", report=fields)
        assert fields["float32_fma"] == 2  # QLinearAdd's two, in one kernel
        (kernel,) = [f for gv, f in mod.functions_items() if "fma" in gv.name_hint]
        assert "float64" not in kernel.script() and "T.fma" in kernel.script()
    else:
        target = None
    # QLinearAdd multiplies nothing in u8 x s8: onnxruntime's fused kernel is exact on any CPU
    np.testing.assert_array_equal(H.build_and_run(mod, [feed], target)[0],
                                  H.run_ort(qdq, [feed], fused=True)[0])


def test_float32_fmas_only_where_the_target_has_the_instruction(tmp_path):
    """LLVM's fmuladd rounds twice on a CPU without FMA: there the float64 form stays."""
    import tvm

    from pipeline.compiler.lowering import lower_for_target
    from pipeline.compiler.passes.qdq_to_integer import quantize_to_integer

    mod, _ = quantize_to_integer(H.import_qdq(H.quantize_qdq(H.add_model(), tmp_path)))
    fields: dict = {}
    lowered = lower_for_target(mod, tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}),
                               "int8", report=fields)
    assert "float32_fma" not in fields
    assert any("float64" in f.script() for _, f in lowered.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("kernel,stride,pad,count_include_pad,hw", [
    (2, 2, 0, 0, 16),  # DenseNet's transitions
    (3, 2, 1, 0, 16),  # ShuffleNet's shortcut
    (3, 1, 1, 0, 14),  # Inception's pool branch
    (3, 1, 1, 1, 14),
    (7, 1, 0, 0, 7),  # the window is the image: onnxruntime's global average pool
])
def test_average_pool_is_bit_exact_with_onnxruntime(kernel, stride, pad, count_include_pad, hw,
                                                    tmp_path):
    """Every input code, odd zero point: QLinearAveragePool rounds ``y / sy + zy``.

    onnxruntime adds the zero point before rounding; quantize's ``round(y / sy) + zy``
    flips each exact half-step tie when the zero point is odd, and a 2x2 average of one
    scale lands on half a step for about a quarter of its outputs.
    """
    from pipeline.compiler.passes.qdq_to_integer import quantize_to_integer

    # calibrated on [-1, 2.6]: an odd input zero point (the output shares it)
    calib = [{"x": np.linspace(-1.0, 2.6, 8 * hw * hw, dtype=np.float32).reshape(1, 8, hw, hw)}]
    qdq = H.quantize_qdq(H.avgpool_model(kernel, stride, pad, count_include_pad, hw=hw),
                         tmp_path, calib=calib,
                         extra_options={"ForceQuantizeNoInputCheck": True})
    sx, zx = H.input_qparams(qdq, "x")
    assert zx % 2 == 1
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (1, 8, hw, hw)).astype(np.float32)
    feed = {"x": ((codes - zx) * np.float32(sx)).astype(np.float32)}
    mod, report = quantize_to_integer(H.import_qdq(qdq))
    assert report.unmatched == []
    assert report.matched[0].startswith("average pool" if (kernel, pad) != (hw, 0)
                                        else "global average pool")
    assert H.count_ops(mod, "relax.nn.avg_pool2d") == 0
    # no u8 x s8 products: onnxruntime's fused kernel is exact on any CPU
    np.testing.assert_array_equal(H.build_and_run(mod, [feed])[0],
                                  H.run_ort(qdq, [feed], fused=True)[0])


def _qdq_mul_model(constant: bool, shape, sx, zx, sy, zy, sz, zz, c_codes=None):
    """``DequantizeLinear -> Mul -> QuantizeLinear`` written by hand, parameters chosen:
    x times a uint8 constant ``c_codes`` [C,1,1] (DenseNet's BatchNorm scale) or times a
    second input y."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in (
        ("sx", sx, np.float32), ("zx", zx, np.uint8), ("sy", sy, np.float32),
        ("zy", zy, np.uint8), ("sz", sz, np.float32), ("zz", zz, np.uint8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"])]
    if constant:
        inits.append(numpy_helper.from_array(np.asarray(c_codes, np.uint8), "yq"))
    else:
        nodes.append(helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]))
    nodes += [helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["yf"]),
              helper.make_node("Mul", ["xf", "yf"], ["z"]),
              helper.make_node("QuantizeLinear", ["z", "sz", "zz"], ["zq"]),
              helper.make_node("DequantizeLinear", ["zq", "sz", "zz"], ["out"])]
    names = ["x"] if constant else ["x", "y"]
    graph = helper.make_graph(
        nodes, "mul", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in names],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", H.OPSET)],
                             ir_version=H.IR_VERSION)


@pytest.mark.parametrize("case", ["constant", "constant_unfolded", "two_inputs"])
def test_multiply_is_bit_exact_with_onnxruntime(case):
    """Every activation code through QLinearMul, scales whose ratio makes exact ties.

    onnxruntime rounds ``(a - za) * (b - zb) * ratio + zz`` (the zero point added before
    rounding); QuantizeLinear's ``round(.) + zz`` flips every exact tie when ``zz`` is odd.
    Real scales make ties rare (123 of DenseNet's 21 million Mul outputs), so these are
    powers of two: ratio 2^-7, a tie wherever the product is 64 mod 128.
    """
    from pipeline.compiler.passes.qdq_to_integer import quantize_to_integer

    codes = np.arange(256, dtype=np.float32)
    zx, sx, sy, sz, zz = 131, 2.0**-4, 2.0**-3, 1.0, 127
    if case == "two_inputs":
        zy, shape = 125, [1, 1, 256, 256]
        qdq = _qdq_mul_model(False, shape, sx, zx, sy, zy, sz, zz)
        feed = {"x": (codes[:, None] - zx) * sx * np.ones((1, 256)),
                "y": (codes[None, :] - zy) * sy * np.ones((256, 1))}
    else:
        # codes 0 and 255 present: onnxruntime's quantizer maps a constant's range there,
        # which is how the pass recovers codes and scale once FoldConstant folded them
        zy, shape = 128, [1, 16, 16, 16]
        c_codes = np.array([0, 255, 96, 100, 113, 120, 125, 127, 129, 131, 135, 140, 150, 161,
                            190, 222]).reshape(16, 1, 1)
        qdq = _qdq_mul_model(True, shape, sx, zx, sy, zy, sz, zz, c_codes)
        feed = {"x": (np.tile(codes.reshape(1, 1, 16, 16), (1, 16, 1, 1)) - zx) * sx}
    feed = {k: v.reshape(shape).astype(np.float32) for k, v in feed.items()}
    mod, report = quantize_to_integer(H.import_qdq(qdq, fold=case != "constant_unfolded"))
    assert [m.split(" ->")[0] for m in report.matched] == ["multiply"]
    assert H.count_ops(mod, "relax.dequantize") == 1  # the output edge only
    # QLinearMul multiplies u8 codes in int16: onnxruntime's fused kernel is exact on any CPU
    np.testing.assert_array_equal(H.build_and_run(mod, [feed])[0],
                                  H.run_ort(qdq, [feed], fused=True)[0])
