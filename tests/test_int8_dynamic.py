"""The int8_dynamic scheme: onnxruntime's quantize_dynamic recipe, the import pass that makes
its matmuls u8 x s8 -> int32, TVM vs onnxruntime on the same model, the validation gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import mlp_with_gemm, tiny_mlp_rows
from pipeline.core.errors import ConfigError

ROWS, K = 4, 96  # mlp_with_gemm's input


def _config(**kw):
    from pipeline.stages.quantize import QuantizeConfig

    base = dict(method="minmax", samples=1, seed=0, data_dir="", activation_type="uint8",
                weight_type="int8", per_channel=True, inputs=(("x", (ROWS, K), "float32"),),
                recipe="dynamic_int8")
    base.update(kw)
    return QuantizeConfig(**base)


def _quantize(tmp_path, model, **kw):
    from pipeline.stages import quantize

    src = tmp_path / "src.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "q"
    out.mkdir(exist_ok=True)
    report = quantize.run(src, _config(**kw), out)
    return onnx.load(str(out / "model.onnx")), report


def _ort(model, x, optimized: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _import(model, shape, passes=True):
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.lowering import graph_cleanup
    from pipeline.compiler.passes.dynamic_quant import dynamic_to_integer

    mod = graph_cleanup()(from_onnx(model, shape_dict={"x": list(shape)},
                                    keep_params_in_input=False))
    if not passes:
        return mod, None
    return dynamic_to_integer(mod)


def _matmuls(mod) -> list[tuple[str, str, str]]:
    """(lhs dtype, rhs dtype, out dtype) of every relax.matmul in main."""
    from tvm import relax

    from pipeline.compiler.passes._qdq import op_name

    found = []

    def visit(expr):
        if op_name(expr) == "relax.matmul":
            found.append((str(expr.args[0].ty.dtype), str(expr.args[1].ty.dtype),
                          str(expr.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _run_tvm(mod, xs):
    import tvm
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    return [vm["main"](tvm.runtime.tensor(x)).numpy() for x in xs]


# ------------------------------------------------------------------------------- recipe

def test_recipe_writes_dynamic_quantize_linear_and_matmul_integer(tmp_path):
    q, report = _quantize(tmp_path, mlp_with_gemm())
    ops = report["op_counts"]
    assert ops.get("DynamicQuantizeLinear") == 2 and ops.get("MatMulInteger") == 2, ops
    assert "Gemm" not in ops and "MatMul" not in ops, ops  # both layers quantized
    assert report["gemms_as_matmul"] == ["fc1"]
    inits = {i.name: i for i in q.graph.initializer}
    weights = [n.input[1] for n in q.graph.node if n.op_type == "MatMulInteger"]
    assert all(inits[w].data_type == TensorProto.INT8 for w in weights)
    # per channel: one scale per output column
    assert sorted(inits[w.replace("_quantized", "_scale")].dims[0] for w in weights) == [24, 48]
    # the quantized model still computes the float one (alpha, beta, transB folded right)
    x = np.random.default_rng(1).standard_normal((ROWS, K)).astype(np.float32)
    ref, got = _ort(mlp_with_gemm(), x), _ort(q, x)
    cos = float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.995, cos


def test_recipe_options_reach_onnxruntime(tmp_path):
    q, report = _quantize(tmp_path, mlp_with_gemm(), per_channel=False, weight_type="uint8",
                          exclude_nodes=("fc2",))
    assert report["op_counts"].get("MatMulInteger") == 1
    assert report["float_layers_left"] == ["MatMul fc2"]
    inits = {i.name: i for i in q.graph.initializer}
    w = next(n.input[1] for n in q.graph.node if n.op_type == "MatMulInteger")
    assert inits[w].data_type == TensorProto.UINT8
    assert list(inits[w.replace("_quantized", "_scale")].dims) == []  # per tensor


def test_recipe_refuses_what_it_cannot_quantize(tmp_path):
    with pytest.raises(ConfigError, match="ConvInteger"):
        _quantize(tmp_path, mlp_with_gemm(), op_types=("MatMul", "Conv"))
    with pytest.raises(ConfigError, match="no MatMul or Gemm with a constant weight"):
        _quantize(tmp_path, mlp_with_gemm(), exclude_nodes=("fc1", "fc2"))


# ------------------------------------------------------------------------------- import

@pytest.mark.parametrize("per_channel,weight_type", [(True, "int8"), (False, "int8"),
                                                     (True, "uint8")])
def test_import_makes_uint8_by_int8_matmuls(tmp_path, per_channel, weight_type):
    q, _ = _quantize(tmp_path, mlp_with_gemm(), per_channel=per_channel,
                     weight_type=weight_type)
    plain, _ = _import(q, (ROWS, K), passes=False)
    # TVM's own MatMulInteger converter: int32 x int32 (no 8-bit dot product can run it)
    assert _matmuls(plain) == [("int32", "int32", "int32")] * 2
    mod, report = _import(q, (ROWS, K))
    assert _matmuls(mod) == [("uint8", "int8", "int32")] * 2
    assert len(report.integer) == 2 and not report.kept, report.as_dict()
    assert report.scales_guarded == 2


def test_float_matmuls_are_reported_and_left_alone(tmp_path):
    # a MatMul of two activations (attention's form) is not quantized by onnxruntime
    # (MatMulConstBOnly) and stays float32 in TVM
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "ht"], ["y"], name="scores")]
    graph = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, ROWS])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q, report = _quantize(tmp_path, model)
    assert report["float_layers_left"] == ["MatMul scores"]
    mod, passes = _import(q, (ROWS, K))
    assert sorted(_matmuls(mod)) == [("float32", "float32", "float32"),
                                     ("uint8", "int8", "int32")]
    assert len(passes.float_matmuls) == 1


# ------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("per_channel,weight_type", [(True, "int8"), (False, "uint8")])
def test_tvm_matches_onnxruntime_dynamic(tmp_path, per_channel, weight_type):
    """Bit-exact on the tiny models: the same run-time scales and roundings (half to even),
    exact int32 sums, the same float epilogue. An all-zero input (scale 1 in onnxruntime,
    0/0 in TVM's converter) and an all-negative one are included."""
    q, _ = _quantize(tmp_path, tiny_mlp_rows(k=K), per_channel=per_channel,
                     weight_type=weight_type)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, K)).astype(np.float32) * s for s in (1.0, 7.0, 0.01)]
    xs += [np.zeros((1, 3, K), np.float32), -np.abs(xs[0])]
    mod, report = _import(q, (1, 3, K))
    assert len(report.integer) == 2
    got = _run_tvm(mod, xs)
    for x, g in zip(xs, got, strict=True):
        for optimized in (True, False):  # fused DynamicQuantizeMatMul, and as written
            ref = q_ref = _ort(q, x, optimized)
            assert np.isfinite(g).all()
            assert np.abs(g - ref).max() <= 1e-6 * max(1.0, float(np.abs(q_ref).max())), \
                (optimized, np.abs(g - ref).max())


def test_rounding_ties_go_to_even(tmp_path):
    """x / scale exactly on .5 for many elements: DynamicQuantizeLinear rounds half to even,
    and so must TVM (round half away from zero would differ by one step on half of them)."""
    q, _ = _quantize(tmp_path, tiny_mlp_rows(k=K), per_channel=True)
    # max 255 and min 0: scale exactly 1, zero point 0; values k + 0.5 are ties
    x = np.arange(3 * K, dtype=np.float32).reshape(1, 3, K) % 200 + 0.5
    x[0, 0, 0], x[0, 0, 1] = 255.0, 0.0
    mod, _ = _import(q, (1, 3, K))
    got = _run_tvm(mod, [x])[0]
    assert np.array_equal(got, _ort(q, x))


# ------------------------------------------------------------------------- validation

def test_dynamic_step_gate():
    from pipeline.stages.validate import DYNAMIC, _gates_for, _record, dynamic_step

    assert dynamic_step(np.array([-1.0, 4.1])) == pytest.approx(5.1 / 255)
    assert dynamic_step(np.array([2.0, 3.0])) == pytest.approx(3.0 / 255)  # 0 is in range
    assert dynamic_step(np.zeros(3)) == 1.0
    gates = {"int8_cosine_min": 0.999, "int8_top1_min": 0.99, "int8_max_steps": 1.0}
    assert [g.metric for g in _gates_for(DYNAMIC, gates, False)] == \
        ["cosine", "top1_agreement", "max_err_steps"]

    class Art:
        is_gpu = False

        def header(self):
            return {"artifact": "a"}

    ref = np.linspace(-1.0, 4.0, 64, dtype=np.float32).reshape(1, 64)
    step = 5.0 / 255
    for off, ok in ((0.9 * step, True), (1.5 * step, False)):
        got = ref.copy()
        got[0, 10] += off
        rec = _record(Art(), DYNAMIC, [[got]], [[ref]], gates, dynamic_step, class_outputs=set())
        steps = next(g for g in rec["gates"] if g["metric"] == "max_err_steps")
        assert steps["pass"] is ok and steps["value"] == pytest.approx(off / step, rel=1e-4)


def test_scheme_registry_and_spec():
    from pipeline.core.spec import parse_spec, variant_validation
    from pipeline.schemes import get_scheme
    from pipeline.stages.quantize import RECIPES

    scheme = get_scheme("int8_dynamic")
    assert scheme.quantize in RECIPES and scheme.compute_dtype == "int8"
    base = {"name": "m", "source": {"path": "m.onnx"},
            "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}]}
    spec = parse_spec({**base, "variants": {"dyn": {"scheme": "int8_dynamic",
                                                      "per_channel": False}}})
    variant = spec.variants["dyn"]
    assert variant.quantize and not variant.per_channel and variant.weight_type == "int8"
    gates = variant_validation(spec, variant)
    assert gates.int8_max_steps == 1.0 and gates.int8_fp32_cosine_min == 0.99
    with pytest.raises(ConfigError, match="activation_type: does not apply"):
        parse_spec({**base, "variants": {"dyn": {"scheme": "int8_dynamic",
                                                  "activation_type": "int8"}}})
