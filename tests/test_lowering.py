"""lower_for_target: the default CPU fp32 layout (NHWC, Winograd for wide 3x3 convs) builds
what the ONNX frontend makes of Dropout and n-ary Sum/Mean/Max/Min, keeps ops with broken
layout rules in their own layout, says what it did, and matches onnxruntime; the light model
zoo lowers in it with no fallback."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import assert_close_fp32, ort_run

from pipeline.compiler import lowering
from pipeline.compiler.passes import layout_prep
from pipeline.core.targets import get_target, tvm_target

C, HW = 8, 6
X_SHAPE = (1, C, HW, HW)
LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
DEFAULT_LAYOUT = lowering.DEFAULT_CPU_FP32_LAYOUT  # NHWC, Winograd for wide 3x3 convs


def _conv_model(nodes, outputs, inits=(), opset=13) -> onnx.ModelProto:
    """x -> conv3x3 "c" and conv1x1 "c2", then ``nodes``; outputs are (name, elem_type)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((C, C, k, k)) * 0.3)
                                       .astype(np.float32), f"w{k}") for k in (3, 1)]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w3"], ["c"], pads=[1] * 4),
         helper.make_node("Conv", ["x", "w1"], ["c2"]), *nodes],
        "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs], [*weights, *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=8)


def _import(model):
    from tvm.relax.frontend.onnx import from_onnx

    return lowering.graph_cleanup()(from_onnx(model, keep_params_in_input=False))


def _run(lowered, x: np.ndarray) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    target = tvm_target(get_target("cpu"))
    out = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())["main"](
        tvm.runtime.tensor(x))
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def _kernels(lowered) -> list[str]:
    from tvm import relax

    return sorted(gv.name_hint for gv, f in lowered.functions.items()
                  if not isinstance(f, relax.Function))


def _lower_default(mod) -> tuple[object, dict]:
    report: dict = {}
    lowered = lowering.lower_for_target(mod, tvm_target(get_target("cpu")), "float32", "",
                                        report)
    return lowered, report


def _check_against_onnxruntime(model, tmp_path) -> tuple[dict, list[str], list]:
    """Lower ``model`` in the default layout, run it, compare every output; returns
    (report, kernel names, onnxruntime outputs)."""
    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(1).standard_normal(X_SHAPE).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    lowered, report = _lower_default(_import(model))
    got = _run(lowered, x)
    assert_close_fp32(got[0], ort_run(path, {"x": x}))  # the project's fp32 gate
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.astype(np.float32), rtol=1e-5, atol=1e-5)
    return report, _kernels(lowered), expected


@pytest.mark.parametrize("mask", [False, True], ids=["output_only", "mask_requested"])
def test_dropout_lowers_in_nhwc_and_matches_onnxruntime(mask, tmp_path):
    """Opset 13 Dropout, training_mode absent: the identity (and a mask of ones)."""
    outs = ["d", "mask"] if mask else ["d"]
    model = _conv_model([helper.make_node("Dropout", ["c"], outs),
                         helper.make_node("Relu", ["d"], ["y"])],
                        [("y", TensorProto.FLOAT)] + ([("mask", TensorProto.BOOL)] if mask
                                                      else []))
    report, kernels, expected = _check_against_onnxruntime(model, tmp_path)
    assert report["layout"] == DEFAULT_LAYOUT and report["layout_fallback"] is None, report
    assert report["layout_prep"]["dropouts_removed"] == 1
    assert not any("dropout" in k for k in kernels), kernels
    if mask:
        assert expected[1].all()  # onnxruntime's inference mask: all true (ours: ones)


BIAS = numpy_helper.from_array(np.linspace(-1, 1, C, dtype=np.float32).reshape(1, C, 1, 1),
                               "bias")


@pytest.mark.parametrize("op,inputs", [
    ("Sum", ["c", "c2", "x"]),  # a residual Sum of three, as in resnet/shufflenet exports
    ("Sum", ["c", "c2", "bias"]),  # one input broadcasts
    ("Mean", ["c", "c2", "x"]),
    ("Max", ["c", "c2"]),
    ("Min", ["c", "bias", "c2"]),
], ids=["sum3", "sum3_broadcast", "mean3", "max2", "min3_broadcast"])
def test_nary_ops_lower_in_nhwc_and_match_onnxruntime(op, inputs, tmp_path):
    model = _conv_model([helper.make_node(op, inputs, ["s"]),
                         helper.make_node("Relu", ["s"], ["y"])], [("y", TensorProto.FLOAT)],
                        inits=[BIAS])
    report, kernels, _ = _check_against_onnxruntime(model, tmp_path)
    assert report["layout"] == DEFAULT_LAYOUT and report["layout_fallback"] is None, report
    assert report["layout_prep"]["nary_unstacked"] == {f"relax.{op.lower()}": 1}
    assert not any("stack" in k for k in kernels), kernels  # no 5-D tensor left


def test_residual_sum_fuses_into_the_conv(tmp_path):
    """Unstacked, the Sum is an add in NHWC: it joins the conv's kernel, no layout change
    between them."""
    model = _conv_model([helper.make_node("Sum", ["c", "c2"], ["y"])],
                        [("y", TensorProto.FLOAT)])
    _, kernels, _ = _check_against_onnxruntime(model, tmp_path)
    assert any(k.startswith("fused_conv2d") and "add" in k for k in kernels), kernels


# ---- ops deliberately left in their layout --------------------------------------------------
def _relax_after_conv(make):
    """A Relax module: x -> conv2d (NCHW) -> relu -> ``make(bb, conv, relu)``."""
    from tvm import relax
    from tvm.relax import op

    w = (np.random.default_rng(0).standard_normal((C, C, 3, 3)) * 0.3).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = bb.emit(op.nn.conv2d(x, relax.const(w), padding=1))
            relu = bb.emit(op.nn.relu(conv))
            out = bb.emit_output(bb.emit(op.nn.relu(make(bb, conv, relu))))
        bb.emit_func_output(out)
    return bb.get()


def _stack(bb, conv, relu):
    from tvm.relax import op

    return op.stack([conv, relu], axis=1)


def _rms_norm(bb, conv, relu):
    from tvm import relax
    from tvm.relax import op

    return op.nn.rms_norm(relu, relax.const(np.linspace(0.5, 1.5, HW, dtype=np.float32)), [3])


FENCED = {"relax.stack": _stack, "relax.nn.rms_norm": _rms_norm}


@pytest.mark.parametrize("name", sorted(FENCED))
def test_tvm_layout_rule_is_still_broken(name):
    """Why each fenced op is in UNCONVERTED_OPS: TVM 0.27's ConvertLayout (or legalizing
    what it made) fails on it after an NHWC conv. When this starts passing, TVM fixed the
    rule: check its numbers, then drop the op from the list."""
    import tvm
    from tvm import relax

    mod = _relax_after_conv(FENCED[name])
    with tvm.target.Target({"kind": "llvm"}), pytest.raises(Exception):  # noqa: B017
        relax.transform.LegalizeOps()(
            relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod))


@pytest.mark.parametrize("name", sorted(FENCED))
def test_fenced_op_stays_in_its_layout_and_the_rest_converts(name):
    """The region fallback: the op keeps NCHW (converted at its edges, and the report says
    so), the conv is still NHWC, and the numbers equal the unconverted module's."""
    import tvm
    from tvm import relax

    mod = _relax_after_conv(FENCED[name])
    lowered, report = _lower_default(mod)
    assert report["layout"] == DEFAULT_LAYOUT and report["layout_fallback"] is None, report
    assert report["layout_prep"]["unconverted_ops"] == {name: 1}
    assert name in layout_prep.UNCONVERTED_OPS
    # the conv ran in NHWC: its input and the fenced op's inputs are layout-converted
    assert any("transpose" in k for k in _kernels(lowered)), _kernels(lowered)
    x = np.random.default_rng(2).standard_normal(X_SHAPE).astype(np.float32)
    target = tvm_target(get_target("cpu"))
    with target:
        plain = relax.transform.LegalizeOps()(mod)  # TVM as it is, no layout change
    want = relax.VirtualMachine(tvm.compile(plain, target=target), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(_run(lowered, x)[0], want, rtol=1e-5, atol=1e-5)


def test_a_module_without_those_ops_is_left_as_it_is():
    """Nothing to rewrite: the very same module goes on to ConvertLayout (so the kernels,
    and the tuning records matched by their workloads, are what they were)."""
    model = _conv_model([helper.make_node("Add", ["c", "c2"], ["y"])],
                        [("y", TensorProto.FLOAT)])
    mod = _import(model)
    out, prep = layout_prep.prepare_for_layout(mod)
    assert out.same_as(mod)
    assert prep.as_dict() == {"dropouts_removed": 0, "nary_unstacked": {},
                              "unconverted_ops": {}}


def test_lowering_is_deterministic():
    """Tune and compile lower separately: the same module gives the same kernels."""
    import tvm

    model = _conv_model([helper.make_node("Dropout", ["c"], ["d"]),
                         helper.make_node("Sum", ["d", "c2", "x"], ["y"])],
                        [("y", TensorProto.FLOAT)])
    (a, ra), (b, rb) = _lower_default(_import(model)), _lower_default(_import(model))
    tvm.ir.assert_structural_equal(a, b)
    assert ra == rb


@pytest.mark.slow  # registering the project's intrinsics imports tvm.s_tir.tensor_intrin
def test_compile_report_records_the_layout():
    """The compile stage's report (compile_report.json) carries the lowering's fields."""
    from pipeline.stages import compile_model

    model = _conv_model([helper.make_node("Dropout", ["c"], ["d"]),
                         helper.make_node("Sum", ["d", "c2"], ["y"])],
                        [("y", TensorProto.FLOAT)])
    _, _, report = compile_model.lower_and_schedule(_import(model), "cpu", "float32", None)
    assert report["layout"] == report["layout_requested"] == DEFAULT_LAYOUT
    assert report["layout_fallback"] is None
    assert report["layout_prep"] == {"dropouts_removed": 1,
                                     "nary_unstacked": {"relax.sum": 1},
                                     "unconverted_ops": {}}


# ---- the light model zoo ----------------------------------------------------------------
ZOO = ("squeezenet", "resnet50", "shufflenet", "inception_v1", "bvlc_alexnet", "vgg19",
       "zfnet512", "densenet121", "inception_v2")


def _zoo():
    return [n for n in ZOO if (LIGHT / f"light_{n}.onnx").exists()]


@pytest.mark.slow
@pytest.mark.skipif(not _zoo(), reason=f"onnx's light model zoo not found at {LIGHT}")
@pytest.mark.parametrize("name", _zoo())
def test_light_zoo_lowers_in_nhwc(name):
    """As exported (Dropout kept: onnxruntime's folding in the source stage would remove
    it), every model lowers in the default layout with no fallback."""
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    mod = lowering.graph_cleanup()(from_onnx(model, shape_dict={"data_0": [1, 3, 224, 224]},
                                             keep_params_in_input=False))
    _, report = _lower_default(mod)
    assert report["layout"] == DEFAULT_LAYOUT and report["layout_fallback"] is None, report


def test_cpu_float32_exp_erf_softmax_are_fast_polynomials():
    """On CPUs, exp/erf/softmax of float32 become TOPI's vectorizable approximations (the
    exact ones call libm per element), counted in the report, within 1e-6 relative."""
    import math

    import tvm
    from tvm import relax
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((4, 64), "float32")):
            with R.dataflow():
                p = R.nn.softmax(x, axis=-1)
                y = R.exp(R.add(p, R.erf(x)))
                R.output(y)
            return y

    target = tvm_target(get_target("cpu"))
    report: dict = {}
    lowered = lowering.lower_for_target(Module, target, "float32", report=report)
    assert report["fast_math"] == {"erf": 1, "exp": 1, "nn.softmax": 1}
    assert "tirx.erf" not in lowered.script() and "T.erf" not in lowered.script()
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    x = (np.random.default_rng(0).standard_normal((4, 64)) * 3).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    e = np.exp(x - x.max(-1, keepdims=True))
    ref = np.exp(e / e.sum(-1, keepdims=True) + np.vectorize(math.erf)(x.astype(np.float64)))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
