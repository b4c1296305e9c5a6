"""Stage validate: metrics, output quantization steps, gates that pass and fail, no-CUDA."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import TINY_SHAPE, tiny_convnet
from pipeline.core.errors import ConfigError, ValidationFailed
from pipeline.core.targets import get_target, target_config
from pipeline.runtime.artifact import ArtifactUnderTest
from pipeline.runtime.vm import cuda_available
from pipeline.stages import compile_model as build
from pipeline.stages import import_model as importer
from pipeline.stages import package, quantize, source, validate

INPUTS = (("x", TINY_SHAPE, "float32"),)


def _quantize(fp32: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = quantize.QuantizeConfig("minmax", 4, 0, "", "uint8", "int8", True, INPUTS)
    quantize.run(fp32, config, out)
    return out / "model.onnx"


def build_artifact(tmp: Path, name: str, model: onnx.ModelProto, quantized: bool = False,
                   app_from: Path | None = None,
                   reference: Path | None = None) -> ArtifactUnderTest:
    """Build a tiny CPU artifact through the real stages: source, quantize, import, compile,
    package. The int8 variant imports the QDQ model in fake-quant form (integer=False).

    ``app_from`` reuses an earlier package's C++ app with this model.so: the app depends only
    on the io spec and the target, both identical here, and a CMake build costs ~10 s.
    ``reference`` validates against another fp32 ONNX than the one built from.
    """
    tmp.mkdir(parents=True)
    onnx.save(model, str(tmp / "given.onnx"))
    dirs = {d: tmp / d for d in ("source", "quantize", "import", "compile", "package")}
    for d in ("source", "import", "compile"):
        dirs[d].mkdir()
    source.run(source.SourceConfig(name, 0, INPUTS), tmp / "given.onnx",
               dirs["source"])
    fp32 = dirs["source"] / "model.onnx"
    qdq = _quantize(fp32, dirs["quantize"]) if quantized else None
    importer.run(qdq or fp32, importer.ImportConfig(INPUTS), dirs["import"])
    build.run(dirs["import"] / "module.json", None,
              build.CompileConfig(target_config(get_target("cpu"))),
              dirs["compile"])
    if app_from is None:
        io = json.loads((dirs["compile"] / "io.json").read_text())
        config = package.PackageConfig.for_target("tiny", get_target("cpu"), io["inputs"],
                                                  io["outputs"],
                                                  params=io["params"]["count"])
        package.run(dirs["compile"] / "model.so", config, dirs["package"])
    else:
        shutil.copytree(app_from, dirs["package"])
        for file in ("model.so", "model.params"):  # the weights go with the model
            shutil.copyfile(dirs["compile"] / file, dirs["package"] / file)
    variant = "int8" if quantized else "fp32"
    return ArtifactUnderTest(
        name=f"{name}_{variant}", model=name, variant=variant, target="cpu", is_gpu=False,
        fp32_onnx=reference or fp32, qdq_onnx=qdq, package_dir=dirs["package"],
        io_json=dirs["compile"] / "io.json", inputs=INPUTS)


def perturbed_convnet() -> onnx.ModelProto:
    """The tiny net with one classifier row shifted: a plausible but wrong artifact."""
    model = tiny_convnet()
    for init in model.graph.initializer:
        if init.name == "fc.w":
            w = numpy_helper.to_array(init).copy()
            w[3] += 0.5
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, ArtifactUnderTest]:
    tmp = tmp_path_factory.mktemp("validate")
    fp32 = build_artifact(tmp / "fp32", "tiny", tiny_convnet())
    int8 = build_artifact(tmp / "int8", "tiny", tiny_convnet(), quantized=True,
                          app_from=fp32.package_dir)
    wrong = build_artifact(tmp / "wrong", "tiny", perturbed_convnet(), app_from=fp32.package_dir,
                           reference=fp32.fp32_onnx)
    return {"fp32": fp32, "int8": int8, "wrong": wrong}


# ----------------------------------------------------------------------------- fast

def test_compare_identical_and_shifted():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 10)).astype(np.float32)
    same = validate.compare(ref.copy(), ref, step=0.1, bitwise=True)
    assert same["max_abs_err"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert same["top1_agreement"] == 1 and same["top5_agreement"] == 1
    assert same["sqnr_db"] == float("inf") and same["mismatched_elements"] == 0
    assert same["max_err_steps"] == 0

    shifted = ref.copy()
    shifted[0, np.argmin(ref[0])] = ref[0].max() + 1.0  # row 0 gets a new winner
    got = validate.compare(shifted, ref, step=0.5, bitwise=True)
    assert got["top1_agreement"] == 0.5 and got["mismatched_elements"] == 1
    assert got["max_err_steps"] == pytest.approx(got["max_abs_err"] / 0.5)
    assert got["max_rel_err"] == pytest.approx(got["max_abs_err"] / max(1, np.abs(ref).max()))
    assert np.isfinite(got["sqnr_db"]) and got["cosine"] < 1

    assert validate.compare(ref[:1], ref)["shape_ok"] is False


def test_resolve_gates_defaults_and_unknown_keys():
    gates = validate.resolve_gates({"fp32_rel_tol": 1e-3})
    assert gates["fp32_rel_tol"] == 1e-3 and gates["int8_cosine_min"] == 0.999
    with pytest.raises(ConfigError, match="cosine_mim"):
        validate.resolve_gates({"cosine_mim": 0.9})


def test_output_steps_reads_the_output_dequantize(tmp_path):
    onnx.save(tiny_convnet(), str(tmp_path / "m.onnx"))
    qdq = _quantize(tmp_path / "m.onnx", tmp_path / "q")
    model = onnx.load(str(qdq))
    scales = {i.name: float(numpy_helper.to_array(i)) for i in model.graph.initializer
              if i.name in ("y_scale", "gap_scale")}
    assert validate.output_steps(qdq) == [pytest.approx(scales["y_scale"])]

    # A float Gemm output (no Q/DQ after it): the last quantized tensor's step counts.
    nodes = model.graph.node
    out_q = next(n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0].startswith("y"))
    out_dq = next(n for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] == "y")
    gemm = next(n for n in nodes if n.op_type == "Gemm")
    gemm.output[0] = "y"
    nodes.remove(out_q)
    nodes.remove(out_dq)
    onnx.save(model, str(tmp_path / "float_out.onnx"))
    assert validate.output_steps(tmp_path / "float_out.onnx") == \
        [pytest.approx(scales["gap_scale"])]


def test_output_steps_rejects_a_float_model(tmp_path):
    onnx.save(tiny_convnet(), str(tmp_path / "m.onnx"))
    with pytest.raises(ConfigError, match="no DequantizeLinear"):
        validate.output_steps(tmp_path / "m.onnx")


@pytest.mark.skipif(cuda_available(), reason="checks the no-GPU path")
def test_gpu_artifact_without_cuda_is_not_validated(tmp_path):
    art = ArtifactUnderTest(
        "tiny_int8", "tiny", "int8", "rtx4090", True, tmp_path / "missing.onnx",
        tmp_path / "missing_qdq.onnx", tmp_path / "no_package", tmp_path / "io.json", INPUTS)
    result = validate.run(art, {}, tmp_path / "v")
    assert result["status"] == "not validated: no CUDA device" and result["pass"] is None
    saved = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert {r["status"] for r in saved["records"]} == {"not validated: no CUDA device"}
    assert "NOT VALIDATED" in (tmp_path / "v" / "validation.md").read_text()
    summary = validate.summarize([result], tmp_path / "all")
    assert summary["status"] == "not validated"


# ----------------------------------------------------------------------------- built artifacts

@pytest.mark.slow
def test_fp32_artifact_passes(artifacts, tmp_path):
    result = validate.run(artifacts["fp32"], {}, tmp_path)
    assert result["status"] == "pass" and result["samples"] == 4
    saved = json.loads((tmp_path / "validation.json").read_text())
    by_name = {r["comparison"]: r for r in saved["records"]}
    assert set(by_name) == {validate.FP32, validate.CPP}
    assert all(r["pass"] for r in by_name.values())
    gates = {g["metric"]: g for g in by_name[validate.FP32]["gates"]}
    assert set(gates) == {"max_abs_err", "top1_agreement"}
    assert by_name[validate.CPP]["metrics"]["mismatched_elements"] == 0
    first = (tmp_path / "validation.md").read_text().splitlines()[2]
    assert first.startswith("- **PASS** tiny_fp32 on cpu")


@pytest.mark.slow
def test_int8_artifact_passes_and_reports_quality(artifacts, tmp_path):
    result = validate.run(artifacts["int8"], {}, tmp_path)
    assert result["status"] == "pass"
    by_name = {r["comparison"]: r for r in result["records"]}
    assert set(by_name) == {validate.INT8, validate.INT8_QUALITY, validate.ORT_QUALITY,
                            validate.CPP}
    int8 = by_name[validate.INT8]
    assert {g["metric"] for g in int8["gates"]} == {"cosine", "top1_agreement", "max_err_steps"}
    assert int8["metrics"]["max_err_steps"] <= 1.0
    quality = by_name[validate.INT8_QUALITY]  # gated: int8 must keep its quality vs fp32
    assert quality["status"] == "pass"
    assert [(g["metric"], g["op"], g["threshold"]) for g in quality["gates"]] == \
        [("cosine", ">=", 0.99)]
    assert 10 < quality["metrics"]["sqnr_db"] < 100 and quality["metrics"]["cosine"] > 0.99
    assert by_name[validate.ORT_QUALITY]["status"] == "reported"


@pytest.mark.slow
def test_int8_that_lost_its_quality_fails_naming_the_metric_and_what_to_try(artifacts,
                                                                             tmp_path):
    with pytest.raises(ValidationFailed) as info:
        validate.run(artifacts["int8"], {"int8_fp32_cosine_min": 0.999999}, tmp_path)
    message = str(info.value)
    assert "tvm_int8_vs_ort_fp32: cosine = " in message and "threshold >= 0.999999" in message
    assert "quantize fewer ops" in message and "op_types" in message


@pytest.mark.slow
def test_wrong_artifact_fails_naming_metric_threshold_and_input(artifacts, tmp_path):
    with pytest.raises(ValidationFailed) as info:
        validate.run(artifacts["wrong"], {}, tmp_path)
    message = str(info.value)
    assert "tiny_fp32 (model tiny, variant fp32) on target cpu" in message
    assert "tvm_fp32_vs_ort_fp32: max_abs_err = " in message
    assert "threshold <= " in message and " at input " in message
    assert info.value.result["status"] == "fail"
    saved = json.loads((tmp_path / "validation.json").read_text())
    assert saved["pass"] is False
    # The binary still matches the Python VM: the model is wrong, not the packaging.
    cpp = next(r for r in saved["records"] if r["comparison"] == validate.CPP)
    assert cpp["pass"] is True
    assert "**FAIL** tiny_fp32 on cpu" in (tmp_path / "validation.md").read_text()


@pytest.mark.slow
def test_summarize_over_artifacts(artifacts, tmp_path):
    results = [validate.run(artifacts[k], {"samples": 2}, tmp_path / k, check=False)
               for k in ("fp32", "wrong")]
    summary = validate.summarize(results, tmp_path / "all")
    assert summary["status"] == "fail" and summary["counts"] == {"pass": 1, "fail": 1}
    assert any("max_abs_err" in line for line in summary["failures"])
    md = (tmp_path / "all" / "validation.md").read_text()
    assert md.startswith("# Validation: FAIL")
    assert "**PASS** tiny_fp32" in md and "**FAIL** tiny_fp32" in md
    saved = json.loads((tmp_path / "all" / "validation.json").read_text())
    assert len(saved["artifacts"]) == 2


@pytest.mark.slow
def test_top1_is_gated_only_on_outputs_marked_as_class_scores(artifacts, tmp_path):
    unmarked = validate.run(artifacts["fp32"], {}, tmp_path / "a", class_scores=[])
    fp32 = next(r for r in unmarked["records"] if r["comparison"] == validate.FP32)
    assert {g["metric"] for g in fp32["gates"]} == {"max_abs_err"}
    assert "top1_agreement" in fp32["metrics"]  # still reported
    marked = validate.run(artifacts["fp32"], {}, tmp_path / "b", class_scores=["y"])
    fp32 = next(r for r in marked["records"] if r["comparison"] == validate.FP32)
    assert {g["metric"] for g in fp32["gates"]} == {"max_abs_err", "top1_agreement"}
    with pytest.raises(ConfigError, match="not outputs of .*its outputs: y"):
        validate.run(artifacts["fp32"], {}, tmp_path / "c", class_scores=["logits"])


def test_a_mixed_model_with_int8_activations_is_judged_in_output_steps(tmp_path):
    """The same-model comparison of weight-only formats keeps its float tolerance; where the
    model quantizes activations (a mixed model's int8 layers) it is the int8 gate: one
    output step: one rounding tie (up to a step) passes, more fails."""
    import qdq_helpers as H

    qdq = H.quantize_qdq(H.conv_model(), tmp_path)  # writes tmp_path / "qdq.onnx"
    weight_only = tmp_path / "fp32.onnx"  # the float model: no QuantizeLinear
    assert validate._int8_steps(weight_only) is None
    steps = validate._int8_steps(tmp_path / "qdq.onnx")
    assert steps == [H.output_scale(qdq)]
    art = ArtifactUnderTest("tiny_mixed", "tiny", "mixed", "cpu", False, weight_only,
                            tmp_path / "qdq.onnx", tmp_path, tmp_path / "io.json", INPUTS)
    gates = {"quantized_rel_tol": 1e-4, "int8_max_steps": 1.0}
    ref = [[np.linspace(-1, 1, 64, dtype=np.float32)]]
    for shift, passed in ((0.99, True), (1.5, False)):
        got = [[ref[0][0] + np.float32(shift * steps[0]) * (np.arange(64) == 7)]]
        record = validate._record(art, validate.QUANTIZED, got, ref, gates, steps)
        assert [g["metric"] for g in record["gates"]] == ["max_err_steps"]
        assert record["pass"] is passed
        float_only = validate._record(art, validate.QUANTIZED, got, ref, gates, None)
        assert [g["metric"] for g in float_only["gates"]] == ["max_abs_err"]
        assert float_only["pass"] is False  # a step is far past 1e-4 relative
