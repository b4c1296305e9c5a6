"""The validation kit: made by the build next to the bundle, its numpy-only checker run on a
real bundle as a subprocess, its report read back by validate; and cuda_available's errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from doit_runner import doit

from models import make_project, tiny_convnet
from pipeline.core.errors import ConfigError
from pipeline.core.project import Project
from pipeline.core.targets import get_target
from pipeline.runtime import kit_check, vm
from pipeline.runtime.artifact import ArtifactUnderTest
from pipeline.stages import validate
from pipeline.tasks.graph import all_tasks
from pipeline.tasks.options import Options

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- fast

def test_checker_metrics_are_validates():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 10)).astype(np.float32)
    for actual in (ref, ref + 0.01 * rng.standard_normal((2, 10)).astype(np.float32),
                   -ref, np.zeros_like(ref)):
        mine, theirs = kit_check.metrics(actual, ref, 0.5), validate.compare(actual, ref, 0.5)
        for key in ("max_abs_err", "max_rel_err", "cosine", "sqnr_db", "top1_agreement",
                    "max_err_steps"):
            assert mine[key] == pytest.approx(theirs[key]), key
    assert not kit_check.metrics(ref[:1], ref)["shape_ok"]


def test_checker_imports_only_the_standard_library_and_numpy():
    import ast

    tree = ast.parse(Path(kit_check.__file__).read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported - {"__future__", "numpy"} <= set(sys.stdlib_module_names), imported


def test_kit_task_sits_next_to_the_bundle_and_feeds_build(tmp_path):
    project = Project.load(make_project(tmp_path))
    groups = all_tasks(project, get_target("cpu"), Options())
    kit = next(t for t in groups["kit"] if t["name"] == "tiny_int8@cpu")
    art = tmp_path / "artifacts" / "tiny_int8" / "cpu"
    assert kit["targets"] == [str(art / "kit" / "kit.json")]
    assert str(art / "package" / "tiny_int8-cpu.tar.gz") in kit["file_dep"]
    assert str(tmp_path / "artifacts" / "tiny_int8" / "quantize" / "model.onnx") in \
        kit["file_dep"]
    build = next(t for t in groups["build"] if t["name"] == "tiny_int8")
    assert str(art / "kit" / "kit.json") in build["file_dep"]
    val = next(t for t in groups["validate"] if t["name"] == "tiny_int8@cpu")
    assert not any(d.endswith(("kit.json", "kit_report.json")) for d in val["file_dep"])


def test_kit_report_option_reaches_the_named_artifact_only(tmp_path):
    project = Project.load(make_project(tmp_path))
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"artifact": "tiny_int8", "target": "cpu"}))
    groups = all_tasks(project, get_target("cpu"), Options(kit_report=str(report)))
    val = {t["name"]: t for t in groups["validate"]}
    assert str(report) in val["tiny_int8@cpu"]["file_dep"]
    assert str(report) not in val["tiny_fp32@cpu"]["file_dep"]
    report.write_text(json.dumps({"artifact": "tiny_int8", "target": "h100"}))
    with pytest.raises(ConfigError, match="not an artifact of this run"):
        all_tasks(project, get_target("cpu"), Options(kit_report=str(report)))
    assert "no such file" in " ".join(Options(kit_report=str(tmp_path / "x")).problems())


# -- validate reading a report, for a CUDA artifact on this machine without a GPU

def _gpu_artifact(tmp_path: Path) -> ArtifactUnderTest:
    return ArtifactUnderTest(name="tiny_int8", model="tiny", variant="int8", target="h100",
                             is_gpu=True, fp32_onnx=tmp_path / "fp32.onnx",
                             qdq_onnx=tmp_path / "qdq.onnx", package_dir=tmp_path / "pkg",
                             io_json=tmp_path / "io.json", inputs=(("x", (1, 3), "float32"),))


def _kit_and_report(tmp_path: Path, cosine: float) -> tuple[Path, Path]:
    kit_dir = tmp_path / "kit"
    kit_dir.mkdir(exist_ok=True)
    (kit_dir / "kit.json").write_text('{"format": 1}\n')
    gate = {"metric": "cosine", "op": ">=", "value": cosine, "threshold": 0.999,
            "pass": cosine >= 0.999, "input_index": 2, "output_index": 0}
    report = {"format": 1, "artifact": "tiny_int8", "target": "h100",
              "kit_sha256": hashlib.sha256((kit_dir / "kit.json").read_bytes()).hexdigest(),
              "bundle": {"matches_kit": True},
              "device": {"name": "NVIDIA H200", "source": "nvidia-smi"},
              "samples": 4, "status": "pass" if gate["pass"] else "fail",
              "comparisons": [{"comparison": validate.INT8, "title": "TVM int8 vs onnxruntime",
                               "pass": gate["pass"],
                               "outputs": [{"output": 0, "name": "y",
                                            "metrics": {"cosine": cosine, "sqnr_db": "inf"},
                                            "gates": [gate]}]}],
              "errors": [], "latency_ms": {"median": 0.5, "p90": 0.6}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return kit_dir, path


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(vm, "cuda_available", lambda *a: False)


def test_validate_records_the_kit_report_of_a_cuda_artifact(tmp_path, no_gpu):
    kit_dir, report = _kit_and_report(tmp_path, cosine=0.99995)
    result = validate.run(_gpu_artifact(tmp_path), {}, tmp_path / "out", kit_report=report,
                          kit_dir=kit_dir, comparisons=[validate.INT8])
    assert result["status"] == "pass" and result["pass"] is True
    assert result["validated_on"] == "NVIDIA H200"
    assert result["kit_report"]["latency_ms"] == {"median": 0.5, "p90": 0.6}
    assert [r["source"] for r in result["records"]] == ["kit"]
    md = (tmp_path / "out" / "validation.md").read_text()
    assert "validated on NVIDIA H200" in md and validate.NO_CUDA not in md
    # without the report: today's status
    plain = validate.run(_gpu_artifact(tmp_path), {}, tmp_path / "out2",
                         comparisons=[validate.INT8])
    assert plain["status"] == validate.NO_CUDA and "validated_on" not in plain


def test_validate_fails_on_a_failing_kit_report_naming_metric_and_threshold(tmp_path, no_gpu):
    kit_dir, report = _kit_and_report(tmp_path, cosine=0.9)
    with pytest.raises(Exception) as err:
        validate.run(_gpu_artifact(tmp_path), {}, tmp_path / "out", kit_report=report,
                     kit_dir=kit_dir, comparisons=[validate.INT8])
    assert isinstance(err.value, validate.ValidationFailed)
    assert "cosine = 0.9, threshold >= 0.999 at input 2" in str(err.value)
    assert json.loads((tmp_path / "out" / "validation.json").read_text())["status"] == "fail"


def test_validate_refuses_a_report_of_another_kit(tmp_path, no_gpu):
    kit_dir, report = _kit_and_report(tmp_path, cosine=1.0)
    (kit_dir / "kit.json").write_text('{"format": 1, "changed": true}\n')
    with pytest.raises(ConfigError, match="another kit than this build's"):
        validate.run(_gpu_artifact(tmp_path), {}, tmp_path / "out", kit_report=report,
                     kit_dir=kit_dir, comparisons=[validate.INT8])


# ----------------------------------------------------------------------------- slow: real kit

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("kit"))
    run = doit(project, "build:tiny_int8", "tune=off")
    assert run.returncode == 0, run.output
    return project, run


def _art(project: Path) -> Path:
    return project / "artifacts" / "tiny_int8" / "cpu"


def _ship(project: Path, dest: Path) -> Path:
    """What travels to the device: the bundle and the kit, dereferenced, in one folder."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_art(project) / "tiny_int8-cpu.tar.gz", dest / "tiny_int8-cpu.tar.gz")
    shutil.copytree(_art(project) / "kit", dest / "tiny_int8-cpu-kit", symlinks=False)
    return dest / "tiny_int8-cpu-kit"


def _check(kit_dir: Path, *args: str) -> subprocess.CompletedProcess:
    # -I: isolated, no PYTHONPATH, no cwd on sys.path: the checker must need no pipeline
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", str(kit_dir / "check.py"), *args],
                          capture_output=True, text=True, cwd=kit_dir.parent, env=env,
                          timeout=300)


@pytest.mark.slow
def test_the_build_makes_a_content_hashed_kit(built):
    project, run = built
    assert "kit" in run.built
    kit = _art(project) / "kit"
    manifest = json.loads((kit / "manifest.json").read_text())
    assert {"kit.json", "check.py", "README.txt", "inputs/input0_x.npy",
            "reference/ort_quantized/input3_output0.npy",
            "reference/ort_fp32/input0_output0.npy"} <= set(manifest["outputs"])
    for rel, digest in manifest["outputs"].items():
        assert hashlib.sha256((kit / rel).read_bytes()).hexdigest() == digest, rel
    assert (kit / "check.py").read_bytes() == Path(kit_check.__file__).read_bytes()
    spec = json.loads((kit / "kit.json").read_text())
    bundle = _art(project) / "tiny_int8-cpu.tar.gz"
    assert spec["bundle"]["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert [c["name"] for c in spec["comparisons"]] == [validate.INT8, validate.INT8_QUALITY]
    steps = next(g for g in spec["comparisons"][0]["gates"] if g["metric"] == "max_err_steps")
    assert steps["threshold"] == 1.0 and spec["comparisons"][0]["steps"][0] > 0
    again = doit(project, "build:tiny_int8", "tune=off")
    assert again.returncode == 0, again.output
    assert "kit:tiny_int8@cpu" not in again.executed and "kit" not in again.built


@pytest.mark.slow
def test_changing_the_model_rebuilds_the_kit(tmp_path):
    project = make_project(tmp_path)
    first = doit(project, "kit:tiny_fp32@cpu", "tune=off")
    assert first.returncode == 0 and "kit" in first.built, first.output
    kit = project / "artifacts" / "tiny_fp32" / "cpu" / "kit"
    before = json.loads((kit / "kit.json").read_text())
    y_before = np.load(kit / "reference" / "ort_fp32" / "input0_output0.npy")
    onnx.save(tiny_convnet(seed=7), str(project / "models" / "tiny.onnx"))
    second = doit(project, "kit:tiny_fp32@cpu", "tune=off")
    assert second.returncode == 0 and "kit" in second.built, second.output
    after = json.loads((kit / "kit.json").read_text())
    assert not np.array_equal(np.load(kit / "reference" / "ort_fp32" / "input0_output0.npy"),
                              y_before)
    assert after["bundle"]["params_sha256"] != before["bundle"]["params_sha256"]
    assert after["samples"][0]["references"] == before["samples"][0]["references"]
    assert after["bundle"]["sha256"] != before["bundle"]["sha256"]
    # the fp32 gate is the scheme's: max_abs_err scaled to the output = max_rel_err
    gates = after["comparisons"][0]["gates"]
    assert {"metric": "max_rel_err", "op": "<=", "threshold": 1e-4, "pooled": False,
            "outputs": [0]} in gates


@pytest.mark.slow
def test_checker_passes_on_the_real_cpu_bundle(built, tmp_path):
    project, _ = built
    kit_dir = _ship(project, tmp_path / "device")
    proc = _check(kit_dir, "--out", str(tmp_path / "report.json"), "--repeat", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "pass" and report["bundle"]["matches_kit"]
    assert report["device"]["name"] and report["samples"] == 4
    assert report["latency_ms"]["median"] > 0 and report["latency_ms"]["p90"] > 0
    gates = [g for c in report["comparisons"] for o in c["outputs"] for g in o["gates"]]
    assert {g["metric"] for g in gates} == {"cosine", "top1_agreement", "max_err_steps"}
    assert all(g["pass"] for g in gates)


@pytest.mark.slow
def test_checker_fails_naming_metric_and_threshold_on_perturbed_outputs(built, tmp_path):
    project, _ = built
    kit_dir = _ship(project, tmp_path / "device")
    ref = kit_dir / "reference" / "ort_quantized" / "input1_output0.npy"
    y = np.load(ref)
    np.save(ref, y + 0.05 * np.abs(y).max() * np.sign(np.arange(y.size).reshape(y.shape) % 2
                                                       - 0.5).astype(y.dtype))
    proc = _check(kit_dir, "--out", str(tmp_path / "report.json"), "--repeat", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: tiny_int8 on cpu: tvm_int8_vs_ort_int8: output 'output0': max_err_steps =" \
        in proc.stdout
    assert "threshold <= 1 at input 1" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "fail"
    # another bundle than the kit's: refused, exit 2
    other = tmp_path / "device" / "tiny_int8-cpu.tar.gz"
    other.write_bytes(other.read_bytes() + b"\0")
    proc = _check(kit_dir)
    assert proc.returncode == 2 and "not the bundle this kit was made for" in proc.stderr


@pytest.mark.slow
def test_doit_validate_reads_the_kit_report(built, tmp_path):
    project, _ = built
    kit_dir = _ship(project, tmp_path / "device")
    assert _check(kit_dir, "--out", str(tmp_path / "pass.json"), "--repeat", "2").returncode == 0
    run = doit(project, "validate:tiny_int8@cpu", f"kit_report={tmp_path / 'pass.json'}")
    assert run.returncode == 0, run.output
    result = json.loads((_art(project) / "validate" / "validation.json").read_text())
    assert result["validated_on"] and result["status"] == "pass"
    assert any(r.get("source") == "kit" for r in result["records"])
    # a failing report, put where validate looks without the option
    np.save(kit_dir / "reference" / "ort_fp32" / "input0_output0.npy",
            -np.load(kit_dir / "reference" / "ort_fp32" / "input0_output0.npy"))
    assert _check(kit_dir, "--out", str(_art(project) / "kit_report.json"),
                  "--repeat", "2").returncode == 1
    run = doit(project, "validate:tiny_int8@cpu")
    assert run.returncode != 0
    assert "tvm_int8_vs_ort_fp32: cosine = -" in run.output and "threshold >= 0.99" in \
        run.output
    (_art(project) / "kit_report.json").unlink()


@pytest.mark.slow
def test_one_tarball_carries_bundle_and_kit_and_checks_on_arrival(built, tmp_path):
    """scripts/gpu_kit.py packs one tarball; unpacked elsewhere, one command checks it."""
    project, _ = built
    tarball = tmp_path / "ship.tar"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_kit.py"), "tiny_int8",
                           "--project", str(project), "--out", str(tarball)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "python3 tiny_int8-cpu-kit/check.py --out kit_report.json" in proc.stdout
    assert "doit validate:tiny_int8@cpu target=cpu kit_report=kit_report.json" in proc.stdout
    device = tmp_path / "device"
    device.mkdir()
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        tar.extractall(device)
    assert "tiny_int8-cpu.tar.gz" in names and "tiny_int8-cpu-kit/check.py" in names
    assert not any(n.endswith("manifest.json") for n in names)
    run = _check(device / "tiny_int8-cpu-kit", "--out", "kit_report.json", "--repeat", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads((device / "kit_report.json").read_text())["status"] == "pass"
    # too large for the transfer limit: refused, saying the sizes
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_kit.py"), "tiny_int8",
                           "--project", str(project), "--out", str(tarball), "--max-mib",
                           "0.01"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "over the 0.01 MiB" in proc.stderr
