"""The 8-bit float-like weight formats fp8_e4m3 and posit8 (pipeline.schemes.codes8): the
quantize recipe and per-layer quantizer, the ONNX forms onnxruntime runs, the import into the
fused kernel, and the kernel's decode inside TVM, bit for bit, on every code."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from models import tiny_mlp_rows
from pipeline.compiler import dequant_matmul as dm
from pipeline.core.errors import UnsupportedModelError
from pipeline.frontend import blockwise_weights
from pipeline.schemes import codes8, fp8, get_scheme, posit
from pipeline.stages import quantize
from pipeline.stages.import_model import ImportConfig, import_onnx

FORMATS = ("fp8_e4m3", "posit8")
INPUTS = (("x", (1, 3, 96), "float32"),)
X = np.random.default_rng(5).standard_normal((1, 3, 96)).astype(np.float32)


def _config(fmt, **kw) -> quantize.QuantizeConfig:
    base = dict(method="minmax", samples=1, seed=0, data_dir="", activation_type="uint8",
                weight_type="int8", per_channel=True, inputs=INPUTS, recipe="weight_codes8",
                weight_format=fmt)
    base.update(kw)
    return quantize.QuantizeConfig(**base)


def _quantized(tmp_path: Path, fmt: str, **kw) -> tuple[Path, dict]:
    src = tmp_path / "m.onnx"
    onnx.save(tiny_mlp_rows(), str(src))
    out = tmp_path / f"out_{fmt}"
    out.mkdir(exist_ok=True)
    info = quantize.run(src, _config(fmt, **kw), out)
    return out / "model.onnx", info


def _ort(path: Path, level=None) -> np.ndarray:
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]
                                ).run(None, {"x": X})[0]


def test_schemes_are_registered_with_their_format():
    for fmt in FORMATS:
        scheme = get_scheme(fmt)
        assert scheme.quantize == "weight_codes8" and scheme.quantize in quantize.RECIPES
        assert dict(scheme.quantize_params) == {"weight_format": fmt}
        assert fmt in codes8.FORMATS
        assert {"tvm_vs_ort_quantized", "tvm_vs_ort_fp32_quality"} <= set(scheme.comparisons)
        assert "per_channel" in scheme.options and scheme.compute_dtype == "float32"
        assert "storage" in scheme.summary  # honest: no faster arithmetic on CPUs


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_writes_the_onnx_form_onnxruntime_runs_at_every_level(tmp_path, fmt):
    path, info = _quantized(tmp_path, fmt)
    model = onnx.load(str(path))
    ops = info["op_counts"]
    assert info["quantized_matmuls"] == 2 and ops["MatMul"] == 2
    if fmt == "fp8_e4m3":
        assert ops["DequantizeLinear"] == 2 and info["opset"] >= 19
        f8 = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN]
        assert [tuple(i.dims) for i in f8] == [(96, 64), (64, 48)]
    else:
        assert ops["Cast"] == ops["Gather"] == ops["Mul"] == 2
        tables = [numpy_helper.to_array(i) for i in model.graph.initializer
                  if i.name.endswith(".table")]
        assert len(tables) == 2 and all(np.array_equal(t, posit.table(1), equal_nan=True)
                                        for t in tables)
    # no float copy of a quantized weight is left
    assert not {"w1", "w2"} & {i.name for i in model.graph.initializer}
    levels = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    outs = [_ort(path, level) for level in levels]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=0, atol=1e-5)
    fp32 = _ort(tmp_path / "m.onnx")
    cosine = float((outs[0] * fp32).sum() / np.linalg.norm(outs[0]) / np.linalg.norm(fp32))
    assert cosine > 0.999


@pytest.mark.parametrize("fmt", FORMATS)
def test_onnx_weights_are_the_codecs_decode_times_the_scale(fmt):
    w = numpy_helper.to_array(tiny_mlp_rows().graph.initializer[0])
    codes, scales = codes8.quantize_weight(w, fmt)
    target = codes8.FORMATS[fmt].scale_target
    np.testing.assert_allclose(scales, np.abs(w).max(0) / target, rtol=1e-6)
    decoded = codes8.FORMATS[fmt].table[codes]
    assert np.abs(decoded).max() <= target and not np.isnan(decoded).any()
    _, one = codes8.quantize_weight(w, fmt, per_channel=False)
    assert one.shape == (1,)


def test_quantize_matmul_weight_quantizes_one_named_layer_only():
    model = tiny_mlp_rows()
    done = codes8.quantize_matmul_weight(model, "fc2/MatMul", "posit8")
    assert done["k"] == 64 and done["n"] == 48 and done["format"] == "posit8"
    names = {i.name for i in model.graph.initializer}
    assert "w1" in names and "w2" not in names  # fc1 untouched, fc2's float weight gone
    onnx.checker.check_model(model)
    with pytest.raises(UnsupportedModelError, match="no MatMul named"):
        codes8.quantize_matmul_weight(model, "nope", "posit8")


def test_excluded_matmuls_stay_float_and_are_listed(tmp_path):
    _, info = _quantized(tmp_path, "posit8", exclude_nodes=("fc2/MatMul",))
    assert info["quantized_matmuls"] == 1 and info["float_layers_left"] == ["MatMul fc2/MatMul"]


def _tvm_vs_ort(path: Path, report: dict):
    import tvm
    from tvm import relax

    from pipeline.compiler.lowering import graph_cleanup

    mod = graph_cleanup()(import_onnx(path, ImportConfig(inputs=INPUTS), report))
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return mod, vm["main"](tvm.runtime.tensor(X)).numpy(), _ort(path)


@pytest.mark.parametrize("fmt,per_channel", [("fp8_e4m3", True), ("fp8_e4m3", False),
                                             ("posit8", True), ("posit8", False)])
def test_import_binds_the_fused_kernel_and_matches_onnxruntime(tmp_path, fmt, per_channel):
    path, _ = _quantized(tmp_path, fmt, per_channel=per_channel)
    report: dict = {}
    mod, got, ref = _tvm_vs_ort(path, report)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))
    layers = report["blockwise_layers"]
    assert [(x["node"], x["k"], x["n"], x["decode"]) for x in layers] == \
        [("fc1/MatMul", 96, 64, fmt), ("fc2/MatMul", 64, 48, fmt)]
    assert all(x["scales"] == ("per output channel" if per_channel else "per tensor")
               for x in layers)
    assert 8 < report["blockwise_bits_per_weight"] < 8.5  # + the float32 scales
    assert report["float_layers"] == []
    assert [p.name for p in mod["main"].params] == ["x"]
    assert "dequant_matmul" in mod.script()


def test_import_report_names_the_layers_kept_float_and_why(tmp_path):
    from float_models import tiny_mlp

    src = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(), str(src))
    out = tmp_path / "q"
    out.mkdir()
    info = quantize.run(src, _config("fp8_e4m3", inputs=(("x", (1, 128), "float32"),)), out)
    assert info["float_layers_left"] == ["Gemm fc"]
    model = onnx.load(str(out / "model.onnx"))
    extracted = blockwise_weights.extract(model)
    kept = extracted.report()["float_layers"]
    assert [(k["node"], k["op"]) for k in kept] == [("fc", "Gemm")]
    assert "Gemm stays float32" in kept[0]["reason"]


def test_fp8_weights_holding_nan_codes_are_refused_by_name(tmp_path):
    path, _ = _quantized(tmp_path, "fp8_e4m3")
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN)
    raw = bytearray(init.raw_data)
    raw[3] = 0x7F
    init.raw_data = bytes(raw)
    with pytest.raises(UnsupportedModelError, match="NaN codes"):
        blockwise_weights.extract(model)


def test_posit8_weights_holding_nar_are_refused(tmp_path):
    path, _ = _quantized(tmp_path, "posit8")
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name.endswith(".codes"))
    codes = numpy_helper.to_array(init).copy()
    codes[0, 0] = posit.NAR_CODE
    init.CopyFrom(numpy_helper.from_array(codes, init.name))
    with pytest.raises(UnsupportedModelError, match="NaR codes"):
        blockwise_weights.extract(model)


def test_any_256_entry_table_imports_as_table8_and_matches_onnxruntime(tmp_path):
    path, _ = _quantized(tmp_path, "posit8")
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name.endswith(".table"):
            init.CopyFrom(numpy_helper.from_array(TABLE8, init.name))
    onnx.save(model, str(path))
    report: dict = {}
    _, got, ref = _tvm_vs_ort(path, report)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))
    assert [x["decode"] for x in report["blockwise_layers"]] == ["table8", "table8"]


def _run(func, args, out_shape):
    import tvm

    from pipeline.core.targets import get_target, tvm_target

    func = func.with_attr("global_symbol", "main")
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=tvm_target(get_target("cpu")))
    out = tvm.runtime.empty(out_shape, "float32", tvm.cpu())
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


TABLE8 = np.random.default_rng(3).standard_normal(256).astype(np.float32)


@pytest.mark.parametrize("decode", ["fp8_e4m3", "posit8", "table8"])
def test_kernel_decode_is_bit_exact_on_every_code(decode):
    """Y = I @ decode(codes) * 1: each output is one code's decoded value, exactly (the
    other 255 products are +-0). NaN/NaR codes are left out: 0 * NaN would spread."""
    col = np.arange(256, dtype=np.uint8)
    if decode == "fp8_e4m3":
        col = np.where((col & 0x7F) == fp8.NAN_CODE, 0, col).astype(np.uint8)
    elif decode == "posit8":
        col = np.where(col == posit.NAR_CODE, 0, col).astype(np.uint8)
    codes = np.ascontiguousarray(np.repeat(col[:, None], 16, axis=1))
    table = {"fp8_e4m3": fp8.TABLE, "posit8": posit.table(1), "table8": TABLE8}[decode]
    expected = table[codes]
    x = np.eye(256, dtype=np.float32)
    scales = np.ones(16, np.float32)
    func = dm.code_prim_func(256, 256, 16, decode, True)
    scheduled = dm.schedule_cpu(func)
    assert not scheduled.same_as(func)
    args = [x, codes, scales] + ([TABLE8] if decode == "table8" else [])
    for f in (func, scheduled):
        got = _run(f, args, (256, 16))
        assert np.array_equal(np.abs(got), np.abs(expected))  # +-0 sums may lose the sign
        nz = expected != 0
        assert np.array_equal(np.signbit(got[nz]), np.signbit(expected[nz]))


@pytest.mark.parametrize("decode,per_channel,m,k,n", [
    ("fp8_e4m3", True, 3, 96, 64), ("posit8", True, 1, 200, 32),
    ("posit8", False, 5, 64, 48), ("fp8_e4m3", False, 2, 33, 16)])
def test_hand_schedule_computes_what_the_definition_does(decode, per_channel, m, k, n):
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    codes, scales = codes8.quantize_weight(w, decode, per_channel)
    weight = codes8.weight_from_onnx(decode, codes, scales,
                                     None if decode == "fp8_e4m3" else posit.table(1))
    assert weight.decode == decode and weight.table is None
    x = rng.standard_normal((m, k)).astype(np.float32)
    expected = x.astype(np.float64) @ codes8.dequantize(weight).astype(np.float64)
    func = dm.code_prim_func(m, k, n, decode, per_channel)
    args = [x, weight.codes, weight.scales] + ([] if weight.table is None else [weight.table])
    for f in (func, dm.schedule_cpu(func)):
        np.testing.assert_allclose(_run(f, args, (m, n)), expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max())


def test_tuning_rule_applies_to_the_new_kernels():
    """The kernel's MetaSchedule rule is the template with sampled knobs on the block
    annotated with it: it schedules the fp8 and posit8 blocks as it does the block-wise ones
    (MetaSchedule's own design-space run is in the slow lane of test_dequant_matmul)."""
    from tvm import s_tir

    for decode in ("fp8_e4m3", "posit8"):
        func = dm.code_prim_func(4, 128, 64, decode, True)
        sch = s_tir.Schedule(func)
        block = sch.get_sblock(dm.BLOCK)
        assert sch.get(block).annotations["schedule_rule"] == dm.TUNING_RULE
        assert dm.apply_template(sch, block, sample=True)
        kinds = [inst.kind.name for inst in sch.trace.insts]
        assert kinds.count("SampleCategorical") == 2 and "Vectorize" in kinds, kinds


CODES8_SPEC = """\
name = "tiny"
description = "tiny MLP for the 8-bit weight formats"

[source]
path = "models/tiny.onnx"

[[inputs]]
name = "x"
shape = [1, 3, 96]
dtype = "float32"

[[outputs]]
name = "y"

[variants.fp8_e4m3]
scheme = "fp8_e4m3"

[variants.posit8]
scheme = "posit8"
per_channel = false

[tuning]
trials_per_task = 4
wall_seconds = 60
"""


@pytest.mark.slow
def test_fp8_and_posit8_build_validate_and_bench_end_to_end(tmp_path: Path):
    """fp8_e4m3 and posit8 (one scale per tensor) of a tiny MLP through every stage, the C++
    app included: onnxruntime runs the same quantized ONNX, the artifact stores 8-bit codes."""
    import json

    from doit_runner import doit

    from models import make_project

    project = make_project(tmp_path / "p", tiny_mlp_rows(), CODES8_SPEC)
    run = doit(project, "build:tiny_fp8_e4m3", "build:tiny_posit8", "validate", "bench",
               "tune=off", "repeat=3", "warmup=1")
    assert run.returncode == 0, run.output
    arts = project / "artifacts"
    for variant in FORMATS:
        art = arts / f"tiny_{variant}" / "cpu"
        report = json.loads((art / "validate" / "validation.json").read_text())
        assert report["status"] == "pass", report
        same = next(r for r in report["records"] if r["comparison"] == "tvm_vs_ort_quantized")
        assert same["metrics"]["max_rel_err"] <= 1e-4
        quality = next(r for r in report["records"]
                       if r["comparison"] == "tvm_vs_ort_fp32_quality")
        assert quality["metrics"]["cosine"] >= 0.99
        imported = json.loads((arts / f"tiny_{variant}" / "import" /
                               "import_report.json").read_text())
        assert [x["decode"] for x in imported["blockwise_layers"]] == [variant, variant]
        assert 8 <= imported["blockwise_bits_per_weight"] < 8.5
        compiled = json.loads((art / "compile" / "compile_report.json").read_text())
        assert compiled["rule_scheduled"], compiled
        assert json.loads((art / "bench" / "bench.json").read_text())["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_cross_compiles_for_rtx4090(tmp_path: Path, fmt):
    """The fp8/posit8 kernels build for the RTX 4090 (sm_89) here, with no GPU: DLight
    schedules them (not run on a GPU: nothing here checks the CUDA results)."""
    import shutil

    from float_models import build_in_process, tiny_mlp

    from pipeline.stages import package

    if not shutil.which("nvcc"):
        pytest.skip("nvcc is needed to cross-compile CUDA")
    built = build_in_process(tiny_mlp(), fmt, (1, 128), tmp_path, target="rtx4090")
    assert len(built["import"]["blockwise_layers"]) == 3  # the Gemm stays float32
    sources = package.cuda_kernel_sources(built["so"])
    assert any("dequant_matmul" in s for s in sources)
