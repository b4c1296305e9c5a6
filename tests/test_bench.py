"""Stage bench: statistics, the chart, bench.json of a real tiny artifact, no-CUDA."""

import json
import math

import numpy as np
import pytest
from test_validate import INPUTS, build_artifact

from models import tiny_convnet
from pipeline.core.errors import ConfigError, StageFailed
from pipeline.runtime.artifact import ArtifactUnderTest
from pipeline.runtime.vm import cuda_available
from pipeline.stages import bench

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _result(name: str, cpp: float, ort: float, status: str = "ok") -> dict:
    def entry(median):
        return {"median_ms": median, "p90_ms": median * 1.1, "min_ms": median * 0.9,
                "mean_ms": median, "count": 3, "throughput_per_s": 1e3 / median}

    if status != "ok":
        return {"artifact": name, "target": "rtx4090", "threads": 2, "status": status}
    return {"artifact": name, "target": "cpu", "threads": 2, "status": "ok",
            "cpp": {**entry(cpp), "peak_rss_mb": 20.0}, "tvm_python": entry(cpp * 1.2),
            "onnxruntime": entry(ort), "ratio": cpp / ort}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> ArtifactUnderTest:
    return build_artifact(tmp_path_factory.mktemp("bench") / "fp32", "tiny", tiny_convnet())


def test_stats_match_numpy_percentiles():
    times = [5.0, 1.0, 3.0, 2.0, 4.0]
    s = bench.stats(times)
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0 and s["count"] == 5
    assert s["p90_ms"] == pytest.approx(np.percentile(times, 90))
    assert s["throughput_per_s"] == pytest.approx(1e3 / 3.0)


def test_chart_is_a_png(tmp_path):
    # Latencies 500x apart (untuned TVM next to onnxruntime) and an artifact that did not run.
    results = [_result("a_fp32", 500.0, 1.0), _result("a_int8", 2.0, 1.5),
               _result("a_fp32", 0, 0, status=bench.NO_CUDA)]
    png = bench.chart(results, tmp_path / "chart.png")
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_report_embeds_the_chart(tmp_path):
    results = [_result("a_fp32", 3.0, 2.0), _result("a_fp32", 0, 0, status=bench.NO_CUDA)]
    aggregate = bench.report(results, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    assert "![" in md and "(bench.png)" in md and bench.NO_CUDA in md
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((tmp_path / "bench.json").read_text()) == aggregate


@pytest.mark.skipif(cuda_available(), reason="checks the no-GPU path")
def test_gpu_artifact_without_cuda_is_not_run(tmp_path):
    art = ArtifactUnderTest("tiny_fp32", "tiny", "fp32", "h100", True,
                                     tmp_path / "m.onnx", None, tmp_path / "pkg",
                                     tmp_path / "io.json", INPUTS)
    result = bench.run(art, threads=1, warmup=0, repeat=1, out_dir=tmp_path)
    assert result["status"] == "not run: no CUDA device" and result["ratio"] is None
    assert json.loads((tmp_path / "bench.json").read_text())["status"] == bench.NO_CUDA


def test_bad_settings_are_rejected(tmp_path):
    art = ArtifactUnderTest("t", "t", "fp32", "cpu", False, tmp_path, None, tmp_path,
                                     tmp_path, INPUTS)
    with pytest.raises(ConfigError, match="threads=0"):
        bench.run(art, threads=0, warmup=0, repeat=1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="rounds=0 must be >= 1"):
        bench.run(art, threads=1, warmup=0, repeat=1, out_dir=tmp_path, rounds=0)


@pytest.mark.slow
def test_bench_json_has_every_runner_and_a_finite_ratio(artifact, tmp_path):
    result = bench.run(artifact, threads=1, warmup=1, repeat=3, out_dir=tmp_path, rounds=2)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == result and saved["status"] == "ok"
    for runner in bench.RUNNERS:
        entry = saved[runner]
        for key in ("median_ms", "p90_ms", "min_ms", "throughput_per_s"):
            assert math.isfinite(entry[key]) and entry[key] > 0, (runner, key)
        assert entry["min_ms"] <= entry["median_ms"] <= entry["p90_ms"]
        # repeat=3 over 2 rounds: 2 timed runs a round, statistics over all 4
        assert entry["count"] == 4 and entry["threads"] == 1
        assert len(entry["round_medians_ms"]) == 2 and "samples_ms" not in entry
        # (the app's JSON rounds to 1e-6 ms)
        assert min(entry["round_medians_ms"]) - 1e-6 <= entry["median_ms"] <= max(
            entry["round_medians_ms"]) + 1e-6
    assert saved["cpp"]["peak_rss_mb"] > 1 and "RUSAGE_CHILDREN" in saved["cpp"]["peak_rss_method"]
    assert saved["onnxruntime"]["model"] == "fp32 ONNX"
    assert math.isfinite(saved["ratio"]) and saved["ratio"] > 0
    assert saved["ratio"] == pytest.approx(saved["cpp"]["median_ms"] /
                                           saved["onnxruntime"]["median_ms"])
    assert saved["ratio_per_round"] == pytest.approx(
        [c / o for c, o in zip(saved["cpp"]["round_medians_ms"],
                               saved["onnxruntime"]["round_medians_ms"])])
    bench.report([saved], tmp_path / "report")
    assert (tmp_path / "report" / "bench.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_model_the_python_runner_cannot_load_is_a_stage_failure(tmp_path):
    """The TVM-in-Python runner stays up between rounds; if it dies loading the model, the
    stage fails with its stderr (not a hang, not a bare traceback)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "model.so").write_text("not a shared library")
    art = ArtifactUnderTest("t_fp32", "t", "fp32", "cpu", False, tmp_path / "m.onnx", None,
                            pkg, tmp_path / "io.json", INPUTS)
    with pytest.raises(StageFailed, match="the Python VM benchmark failed") as e:
        bench._TvmPythonRunner(art, [], threads=1, out_dir=tmp_path)
    assert "exit 1" in str(e.value) and (tmp_path / "tvm_python.stderr").read_text()
