"""End to end, fp16 and bf16: the tiny conv net through every stage with the real doit, CMake
and C++ binary; validate and bench against onnxruntime running the same converted model."""

import json
import subprocess

import numpy as np
import pytest
from doit_runner import doit
from float_models import spec_text
from oracle import ort_run

from models import make_project


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("proj"), spec_text=spec_text())
    run = doit(project, "build:tiny_fp16", "build:tiny_bf16", "validate:tiny_fp16@cpu",
               "validate:tiny_bf16@cpu", "bench:tiny_fp16@cpu", "bench:tiny_bf16@cpu",
               "tune=off", "repeat=3", "warmup=1")
    assert run.returncode == 0, run.output
    return project, run


def _art(project, variant):
    return project / "artifacts" / f"tiny_{variant}" / "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp16", "bf16"])
def test_every_stage_ran_and_validation_passes(built, variant):
    project, run = built
    assert {"quantize", "import", "compile", "package", "smoke"} <= run.built
    art = _art(project, variant)
    report = json.loads((art / "validate" / "validation.json").read_text())
    assert report["status"] == "pass", report
    records = {r["comparison"]: r for r in report["records"]}
    assert set(records) == {f"tvm_{variant}_vs_ort_{variant}", f"tvm_{variant}_vs_ort_fp32",
                            f"ort_{variant}_vs_ort_fp32", "cpp_vs_tvm_python"}
    assert records[f"tvm_{variant}_vs_ort_fp32"]["gates"][0]["metric"] == "cosine"
    assert records["cpp_vs_tvm_python"]["metrics"]["mismatched_elements"] == 0
    # the reports say what the artifact computes
    md = (art / "validate" / "validation.md").read_text()
    assert f"(scheme {variant}: " in md
    assert ("accumulate in float32" if variant == "fp16" else "float32 compute") in \
        report["computes"]
    bench = json.loads((art / "bench" / "bench.json").read_text())
    assert bench["status"] == "ok"
    assert bench["onnxruntime"]["model"] == {"fp16": "float16 ONNX",
                                             "bf16": "bfloat16-weight ONNX"}[variant]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp16", "bf16"])
def test_binary_matches_onnxruntime_on_the_converted_model(built, variant, tmp_path):
    project, _ = built
    art = _art(project, variant)
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([str(art / "bin" / "infer"), "--input", str(tmp_path / "x.npy"),
                           "--output", str(tmp_path / "y.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "y.npy")
    assert got.dtype == np.float32  # the app's interface stays float32
    ref = ort_run(project / "artifacts" / f"tiny_{variant}" / "quantize" / "model.onnx",
                  {"x": x})
    tol = 1e-2 if variant == "fp16" else 1e-4  # the schemes' default gates
    assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max())
    assert np.argmax(got) == np.argmax(ref)


@pytest.mark.slow
def test_import_reports_name_the_rewritten_ops(built):
    project, _ = built
    def imported(variant):
        path = project / "artifacts" / f"tiny_{variant}" / "import" / "import_report.json"
        return json.loads(path.read_text())

    assert len(imported("bf16")["bf16_weights"]["rewritten"]) == 3
    assert imported("bf16")["bf16_weights"]["kept"] == []
    assert len(imported("fp16")["fp16_accumulate_fp32"]["rewritten"]) == 3
    compiled = json.loads((_art(project, "fp16") / "compile" / "compile_report.json")
                          .read_text())
    assert compiled["float16_compute"].startswith(
        ("native", "converted to float32", "float32 arithmetic on the float16 weights"))
