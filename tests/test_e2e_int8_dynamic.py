"""End to end, int8_dynamic: a tiny MLP (a Gemm and a MatMul) through every stage with the real
doit, CMake and C++ binary; validated and benched against onnxruntime running the same
quantize_dynamic model. About 20 s on 2 cores: in the fast lane, the scheme's only
end-to-end check there (the tiny BERT in test_bert.py is the slow one)."""

import json
import subprocess

import numpy as np
import pytest
from doit_runner import doit
from oracle import ort_run

from models import make_project, mlp_with_gemm

ROWS, K = 4, 96  # mlp_with_gemm's input

SPEC = f"""\
name = "tiny"
description = "tiny MLP (Gemm + MatMul) for dynamic quantization"

[source]
path = "models/tiny.onnx"

[[inputs]]
name = "x"
shape = [{ROWS}, {K}]
dtype = "float32"

[[outputs]]
name = "y"

[variants.int8_dynamic]
scheme = "int8_dynamic"

[tuning]
trials_per_task = 4
wall_seconds = 60
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("proj"), mlp_with_gemm(), SPEC)
    run = doit(project, "build:tiny_int8_dynamic", "validate:tiny_int8_dynamic@cpu",
               "bench:tiny_int8_dynamic@cpu", "tune=off", "repeat=3", "warmup=1")
    assert run.returncode == 0, run.output[-6000:]
    return project, run


def _art(project):
    return project / "artifacts" / "tiny_int8_dynamic" / "cpu"


def test_every_stage_ran_and_validation_passes(built):
    project, run = built
    assert {"quantize", "import", "compile", "package", "smoke"} <= run.built
    quantized = json.loads((project / "artifacts" / "tiny_int8_dynamic" / "quantize" /
                            "manifest.json").read_text())["info"]
    assert quantized["op_counts"]["MatMulInteger"] == 2, quantized
    imported = json.loads((project / "artifacts" / "tiny_int8_dynamic" / "import" /
                           "import_report.json").read_text())
    assert len(imported["dynamic_to_integer"]["integer_matmuls"]) == 2, imported
    report = json.loads((_art(project) / "validate" / "validation.json").read_text())
    assert report["status"] == "pass", json.dumps(report["records"], indent=1)[-4000:]
    records = {r["comparison"]: r for r in report["records"]}
    assert set(records) == {"tvm_int8_vs_ort_dynamic", "tvm_int8_vs_ort_fp32",
                            "ort_int8_vs_ort_fp32", "cpp_vs_tvm_python"}
    assert [g["metric"] for g in records["tvm_int8_vs_ort_dynamic"]["gates"]] == \
        ["cosine", "max_err_steps"]  # no class scores: no top-1 gate
    assert records["tvm_int8_vs_ort_dynamic"]["metrics"]["max_err_steps"] < 1e-3
    assert records["cpp_vs_tvm_python"]["metrics"]["mismatched_elements"] == 0
    assert "u8 at run time" in report["computes"]
    bench = json.loads((_art(project) / "bench" / "bench.json").read_text())
    assert bench["status"] == "ok"
    assert bench["onnxruntime"]["model"].startswith("dynamically quantized ONNX")


def test_binary_matches_onnxruntime_dynamic(built, tmp_path):
    project, _ = built
    x = np.random.default_rng(5).standard_normal((ROWS, K)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([str(_art(project) / "bin" / "infer"), "--input",
                           str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "y.npy")
    ref = ort_run(project / "artifacts" / "tiny_int8_dynamic" / "quantize" / "model.onnx",
                  {"x": x})
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-6 * max(1.0, float(np.abs(ref).max()))
