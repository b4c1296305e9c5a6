"""Float-format import passes: float32 accumulation for float16, bfloat16 weights that stay
bfloat16 in model.so; TVM against onnxruntime on the same converted model."""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import onnx
import pytest
from float_models import build_in_process, tiny_mlp
from onnx import TensorProto, helper, numpy_helper
from oracle import ort_run

from models import tiny_convnet
from pipeline.compiler.passes.float_formats import (
    accumulate_in_float32,
    keep_bfloat16_weights,
    widen_float16,
)
from pipeline.core.spec import ValidationSpec
from pipeline.schemes import SCHEMES
from pipeline.stages.validate import compare


def _import(model: onnx.ModelProto, shape):
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.lowering import graph_cleanup

    return graph_cleanup()(from_onnx(model, shape_dict={"x": list(shape)},
                                     keep_params_in_input=False))


def _calls(mod, name: str) -> list:
    from tvm import relax

    from pipeline.compiler.passes._qdq import op_name

    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.append(e) if op_name(e) == name else None)
    return found


def _constants(mod) -> list:
    from tvm import ir, relax

    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.append(e) if isinstance(e, ir.Constant)
                and hasattr(e.value, "numpy") and e not in found else None)
    return found


def _constant_dtypes(mod) -> list[str]:
    from tvm import ir, relax

    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.append(str(e.value.dtype))
                if isinstance(e, ir.Constant) and hasattr(e.value, "numpy") else None)
    return found


def test_float16_matmul_and_conv_accumulate_in_float32():
    from onnxconverter_common import float16

    mod = _import(float16.convert_float_to_float16(tiny_convnet(), keep_io_types=True),
                  (1, 3, 8, 8))
    assert {str(c.attrs.out_dtype) for c in _calls(mod, "relax.nn.conv2d")} != {"float32"}
    new, report = accumulate_in_float32(mod)
    assert len(report.rewritten) == 3 and report.kept == []  # 2 convs (BN separate), 1 matmul
    for op in ("relax.nn.conv2d", "relax.matmul"):
        assert {str(c.attrs.out_dtype) for c in _calls(new, op)} == {"float32"}, op
    assert all(str(c.args[0].ty.dtype) == "float16" for c in _calls(new, "relax.matmul"))


def _float16_module(model, shape):
    from onnxconverter_common import float16

    return accumulate_in_float32(_import(float16.convert_float_to_float16(
        model, keep_io_types=True), shape))[0]


def test_a_float16_convnet_widens_to_float32_compute_on_its_float16_weights():
    """No float16 value is left; every weight is a float32 constant holding the float16
    weight's value exactly; the casts are gone; convs and matmul remain."""
    mod = _float16_module(tiny_convnet(), (1, 3, 8, 8))
    halves = sorted(e.value.numpy().astype(np.float32).tobytes() for e in _constants(mod))
    new, report = widen_float16(mod)
    assert report.kept == []
    assert report.rewritten == ["10 float16 constant(s) widened to float32",
                                "5 cast(s) dropped"]
    assert "float16" not in new.script()
    assert sorted(e.value.numpy().tobytes() for e in _constants(new)) == halves
    assert _calls(new, "relax.astype") == []
    assert len(_calls(new, "relax.nn.conv2d")) == 2 and len(_calls(new, "relax.matmul")) == 1


def test_a_model_of_weight_streaming_matmuls_keeps_float16():
    """One-row matmuls read their weights once per inference: there float16's half the bytes
    is the speed, so the module is returned as it is, and the report says why."""
    mod = _float16_module(tiny_mlp(), (1, 128))
    new, report = widen_float16(mod)
    assert new.same_as(mod) and report.rewritten == []
    assert len(report.kept) == 1 and "streamed by one-row matmuls" in report.kept[0]
    # the same layers on 32 rows are compute-bound: widened
    from onnx import shape_inference

    rows = tiny_mlp()
    for vi in (*rows.graph.input, *rows.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 32
    batch = _float16_module(shape_inference.infer_shapes(rows), (32, 128))
    assert widen_float16(batch)[1].rewritten


def test_bfloat16_weights_become_bfloat16_constants_and_others_stay():
    model = tiny_mlp()
    w0 = model.graph.initializer[0]  # only w0 gets bfloat16 values: the others are kept
    w0.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w0).astype(ml_dtypes.bfloat16)
                                        .astype(np.float32), "w0"))
    mod = _import(model, (1, 128))
    assert "bfloat16" not in _constant_dtypes(mod)
    new, report = keep_bfloat16_weights(mod)
    assert len(report.rewritten) == 1 and len(report.kept) == 3, report
    assert _constant_dtypes(new).count("bfloat16") == 1
    # the decode sits in one fused function with its matmul, bias add and ReLU
    composites = [str(f.attrs["Composite"]) for _, f in new.functions_items()
                  if f.attrs is not None and "Composite" in f.attrs]
    assert composites == ["bf16_matmul_add_relu"]


# ------------------------------------------------------------------ compiled (slow)

@pytest.mark.slow
def test_tvm_bfloat16_to_float32_cast_is_exact_for_every_code():
    import tvm
    from tvm import relax

    from pipeline.core.targets import get_target, tvm_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1 << 16,), "bfloat16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.astype(x, "float32"))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm_target(get_target("cpu"))),
                              tvm.cpu())
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    got = vm["main"](tvm.runtime.tensor(codes)).numpy()
    ref = codes.astype(np.float32)  # subnormals, infinities and NaNs included
    nan = np.isnan(ref)
    assert np.array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()


def _gates(scheme: str) -> dict:
    return {**ValidationSpec().__dict__, **SCHEMES[scheme].default_gates}


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
@pytest.mark.parametrize("which", ["mlp", "conv"])
def test_tvm_matches_onnxruntime_on_the_same_converted_model(tmp_path, scheme, which):
    model, shape = (tiny_mlp(), (1, 128)) if which == "mlp" else (tiny_convnet(), (1, 3, 8, 8))
    built = build_in_process(model, scheme, shape, tmp_path)
    from pipeline.runtime.vm import python_vm_outputs

    g = _gates(scheme)
    tol = g["fp16_rel_tol"] if scheme == "fp16" else g["fp32_rel_tol"]
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        tvm_out = python_vm_outputs(built["so"], [x])[0]
        same = compare(tvm_out, ort_run(built["onnx"], {"x": x}))
        assert same["max_rel_err"] <= tol, same
        quality = compare(tvm_out, ort_run(built["fp32"], {"x": x}))
        assert quality["cosine"] >= g[f"{scheme}_fp32_cosine_min"], quality
    if scheme == "bf16":  # the weights reach model.so as bfloat16, each decoded in a kernel
        assert len(built["import"]["bf16_weights"]["rewritten"]) == \
            (4 if which == "mlp" else 3)
    else:
        assert len(built["import"]["fp16_accumulate_fp32"]["rewritten"]) == \
            (4 if which == "mlp" else 3)


@pytest.mark.slow
def test_a_widened_float16_model_computes_what_onnxruntime_computes(tmp_path):
    """On a CPU without float16 arithmetic the fp16 convnet compiles as float32 compute on its
    float16 weights, stored float16 in model.params: what onnxruntime's CPU EP runs on the
    same model (it upcasts the weights at load), so they agree to float32's gate, not only
    float16's."""
    import json

    import tvm
    from tvm.target import codegen

    from pipeline.core.targets import get_target, tvm_target
    from pipeline.runtime.vm import python_vm_outputs

    if codegen.target_has_features("avx512fp16", tvm_target(get_target("cpu"))):
        pytest.skip("this CPU has AVX512-FP16: float16 stays native")
    built = build_in_process(tiny_convnet(), "fp16", (1, 3, 8, 8), tmp_path)
    report = json.loads((built["so"].parent / "compile_report.json").read_text())
    assert report["float16_widened"]["rewritten"], report["float16_widened"]
    assert report["float16_compute"].startswith("float32 arithmetic on the float16 weights")
    stored = tvm.runtime.load_param_dict_from_file(str(built["so"].with_name("model.params")))
    assert {str(v.dtype) for k, v in stored.items() if k.endswith(".widen")} == {"float16"}
    assert sum(k.endswith(".widen") for k in stored) >= 3  # both convs' and the matmul's
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)
        same = compare(python_vm_outputs(built["so"], [x])[0], ort_run(built["onnx"], {"x": x}))
        assert same["max_rel_err"] <= _gates("fp32")["fp32_rel_tol"], same


@pytest.mark.slow
def test_float32_accumulation_is_what_onnxruntime_computes(tmp_path):
    """One long dot product (K = 4096, all-positive terms): summing in float16 drifts by
    many ulps; the pass's float32 accumulation stays within a couple of float16 roundings of
    onnxruntime. Without the pass this test fails."""
    from pipeline.runtime.vm import python_vm_outputs

    build = build_in_process

    rng = np.random.default_rng(0)
    w = rng.random((4096, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "dot",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    built = build(model, "fp16", (1, 4096), tmp_path / "with")
    x = rng.random((1, 4096)).astype(np.float32)
    ref = ort_run(built["onnx"], {"x": x})
    with_pass = compare(python_vm_outputs(built["so"], [x])[0], ref)
    assert with_pass["max_rel_err"] <= 1e-3, with_pass  # ~1 float16 ulp of the result

    import dataclasses

    import pipeline.schemes as schemes

    no_pass = dataclasses.replace(schemes.SCHEMES["fp16"], import_passes=())
    schemes.SCHEMES["fp16_no_pass"] = no_pass
    try:
        plain = build(model, "fp16_no_pass", (1, 4096), tmp_path / "without")
    finally:
        del schemes.SCHEMES["fp16_no_pass"]
    without = compare(python_vm_outputs(plain["so"], [x])[0], ref)
    assert without["max_rel_err"] > 3 * with_pass["max_rel_err"], (without, with_pass)


@pytest.mark.slow
def test_the_artifact_about_halves_for_a_weight_dominated_model(tmp_path):
    """model.so + model.params (the weights live in the params file since weights left the
    executable)."""
    sizes = {}
    for scheme in ("fp32", "fp16", "bf16"):
        built = build_in_process(tiny_mlp(hidden=512, layers=3), scheme, (1, 512),
                                 tmp_path / scheme)
        sizes[scheme] = sum(built["so"].with_name(name).stat().st_size
                            for name in ("model.so", "model.params"))
    weights = (3 * 512 * 512 + 10 * 512) * 4
    assert sizes["fp32"] > weights  # the weights are in there
    for scheme in ("fp16", "bf16"):
        # half the weight bytes (bf16 biases stay float32; code is a few 10 KB)
        assert sizes[scheme] < 0.6 * sizes["fp32"], sizes
        assert sizes["fp32"] - sizes[scheme] > 0.45 * weights, sizes


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("nvcc"), reason="nvcc is needed to cross-compile CUDA")
def test_fp16_cross_compiles_for_rtx4090(tmp_path):
    """The fp16 variant builds for the RTX 4090 (sm_89) on a machine with no GPU: DLight
    schedules its float16 kernels and nvcc compiles them."""
    built = build_in_process(tiny_mlp(), "fp16", (1, 128), tmp_path, target="rtx4090")
    from pipeline.stages import package

    sources = package.cuda_kernel_sources(built["so"])
    assert sources and "half" in sources[0]


def test_kernel_check_feeds_bfloat16_buffers():
    """The tune stage checks each tuned kernel against the naive one on random inputs; a bf16
    kernel's weight buffer is bfloat16, which numpy names only through ml_dtypes."""
    from tvm import te

    from pipeline.tuning.kernel_check import _random_args

    w = te.placeholder((4, 8), "bfloat16", name="w")
    y = te.compute((4, 8), lambda i, j: w[i, j].astype("float32"), name="y")
    arrays = _random_args(te.create_prim_func([w, y]), seed=0)
    assert arrays[0].dtype == ml_dtypes.bfloat16 and arrays[1].dtype == np.float32
