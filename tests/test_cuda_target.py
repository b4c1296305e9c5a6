"""The CUDA targets: built anywhere (no GPU), checked wherever a GPU exists.

Without a GPU: ``doit build:... target=rtx4090|h100`` cross-compiles, the package stage compiles
the kernels for the target's SM (checked in the fatbin: cubin arch and PTX ``.target``), and
smoke/validate/bench say "not run / not validated: no CUDA device" instead of passing or
crashing. The CUDA smoke gate (C++ app vs Python VM within ``gpu_rel_tol``) and the
Python-side kernel compile are checked with fakes and nvcc. With a GPU, one test runs the
whole chain for real (what ``scripts/gpu_check.py`` does, with a bench on top).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from doit_runner import REPO, doit

from models import make_project
from pipeline.core.errors import StageFailed
from pipeline.core.targets import TARGETS, get_target
from pipeline.runtime import vm
from pipeline.runtime.vm import cuda_available
from pipeline.stages import package, smoke

NO_CUDA_SMOKE = "not run: no CUDA device"
NO_CUDA_VALIDATE = "not validated: no CUDA device"
HAVE_TOOLS = all(shutil.which(t) for t in ("nvcc", "cmake", "g++"))
needs_nvcc = pytest.mark.skipif(not HAVE_TOOLS, reason="nvcc (CUDA toolkit), cmake and g++ are "
                                "needed to cross-build a CUDA artifact")
no_gpu_here = pytest.mark.skipif(cuda_available(), reason="checks the no-GPU behaviour")
GPU_CHECK = REPO / "scripts" / "gpu_check.py"


# ------------------------------------------------------------------------------- fatbin reading

ELF_KIND, PTX_KIND = 2, 1


def fatbin_entries(fatbin: bytes) -> list[dict]:
    """The entries of an nvcc fatbin: kind (1 PTX, 2 ELF cubin), SM arch and payload.

    Layout (as nvcc 12/13 writes it): a 16-byte header (magic 0xBA55ED50, version, header size,
    size of the entries), then per entry a header (u16 kind, u16, u32 header size, u64 payload
    size, u32 compressed size, u32, u16 minor, u16 major, u32 arch, ..., u64 flags at 40) and
    the payload. With flag 0x8000 the payload (PTX) is zstd-compressed, then padded.
    """
    magic, _, header, size = struct.unpack_from("<IHHQ", fatbin, 0)
    assert magic == 0xBA55ED50, "not a CUDA fatbin"
    entries, off = [], header
    while off < header + size:
        kind, _, ehead, esize = struct.unpack_from("<HHIQ", fatbin, off)
        compressed, = struct.unpack_from("<I", fatbin, off + 16)
        arch, = struct.unpack_from("<I", fatbin, off + 28)
        flags, = struct.unpack_from("<Q", fatbin, off + 40)
        payload = fatbin[off + ehead:off + ehead + esize]
        entries.append({"kind": kind, "arch": arch, "flags": flags, "payload": payload,
                        "compressed": payload[:compressed] if flags & 0x8000 else None})
        off += ehead + esize
    return entries


def ptx_text(entry: dict) -> str | None:
    """The PTX of a fatbin entry; None when it is compressed and no zstd is at hand."""
    data = entry["payload"]
    if entry["compressed"] is not None:
        assert entry["compressed"][:4] == b"\x28\xb5\x2f\xfd", "not a zstd frame"
        if shutil.which("zstd") is None:
            return None
        data = subprocess.run(["zstd", "-d", "-c", "-q"], input=entry["compressed"],
                              capture_output=True, check=True).stdout
    return data.rstrip(b"\0").decode("ascii", errors="replace")


def cubin_text_sections(cubin: bytes) -> dict[str, bytes]:
    """``.text.<kernel>`` sections (the SASS) of a cubin ELF."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
                for i in range(shnum)]
    names = sections[shstrndx][4]
    out = {}
    for sec in sections:
        name = cubin[names + sec[0]:cubin.index(b"\0", names + sec[0])].decode()
        if name.startswith(".text."):
            out[name] = cubin[sec[4]:sec[4] + sec[5]]
    return out


# ------------------------------------------------------------------------------------ fast tests

def test_gpu_targets_name_their_sm_and_cpu_stays_the_default():
    from pipeline.tasks.options import Options

    assert (TARGETS["rtx4090"].kind, TARGETS["rtx4090"].arch) == ("cuda", "sm_89")
    assert (TARGETS["h100"].kind, TARGETS["h100"].arch) == ("cuda", "sm_90")
    assert Options().target == "cpu" and not get_target("cpu").is_gpu
    assert "target=rtx4090" in (REPO / "README.md").read_text(encoding="utf-8")


def _fake_smoke_env(monkeypatch, tmp_path, y_cpp, y_py, gpu=True):
    """smoke.run with the C++ app and the Python VM replaced by fixed outputs."""
    io = tmp_path / "io.json"
    io.write_text(json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
                              "outputs": [{"name": "y", "shape": list(y_cpp.shape),
                                           "dtype": str(y_cpp.dtype)}]}))

    def run_binary(pkg_dir, input_npy, output_npy, **kwargs):
        np.save(output_npy, y_cpp)
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(smoke, "cuda_available", lambda: gpu)
    monkeypatch.setattr(smoke, "run_binary", run_binary)
    monkeypatch.setattr(smoke, "python_vm_outputs", lambda *a, **k: [y_py])
    monkeypatch.setattr(smoke, "cuda_device_name", lambda: "Fake GPU (sm_90)")
    out = tmp_path / "out"
    out.mkdir()
    return io, out


@pytest.mark.parametrize("target", ["h100", "rtx4090"])
def test_cuda_smoke_passes_within_gpu_rel_tol_and_records_bit_identity(monkeypatch, tmp_path,
                                                                       target):
    ref = np.array([[10.0, -3.0, 0.5, 2.0]], np.float32)
    near = ref + np.float32(0.05)  # 0.05 <= 0.01 * max(1, 10) = 0.1
    io, out = _fake_smoke_env(monkeypatch, tmp_path, near, ref)
    cfg = {"seed": 0, "target": {"name": target}, "gpu_rel_tol": 0.01}
    result = smoke.run(tmp_path / "pkg", io, smoke.SmokeConfig(**cfg), out)
    assert result["status"] == "pass" and result["bit_identical"] is False
    assert result["gpu_rel_tol"] == 0.01 and "0.1" in result["gate"]
    assert json.loads((out / "smoke.json").read_text())["bit_identical"] is False

    same = tmp_path / "same"
    same.mkdir()
    io, out = _fake_smoke_env(monkeypatch, same, ref, ref.copy())
    assert smoke.run(tmp_path / "pkg", io, smoke.SmokeConfig(**cfg), out)["bit_identical"] is True


def test_cuda_smoke_fails_beyond_gpu_rel_tol(monkeypatch, tmp_path):
    ref = np.array([[10.0, -3.0, 0.5, 2.0]], np.float32)
    io, out = _fake_smoke_env(monkeypatch, tmp_path, ref + np.float32(0.5), ref)
    with pytest.raises(StageFailed, match="disagree on CUDA"):
        smoke.run(tmp_path / "pkg", io,
                  smoke.SmokeConfig(seed=0, target={"name": "h100"}, gpu_rel_tol=0.01), out)
    assert json.loads((out / "smoke.json").read_text())["status"] == "fail"


def test_cpu_smoke_stays_bit_identical(monkeypatch, tmp_path):
    ref = np.array([[10.0, -3.0, 0.5, 2.0]], np.float32)
    io, out = _fake_smoke_env(monkeypatch, tmp_path, ref + np.float32(1e-6), ref, gpu=False)
    with pytest.raises(StageFailed, match="disagree"):
        smoke.run(tmp_path / "pkg", io, smoke.SmokeConfig(seed=0, target={"name": "cpu"}), out)


def test_cuda_smoke_without_a_device_is_not_run(monkeypatch, tmp_path):
    io, out = _fake_smoke_env(monkeypatch, tmp_path, np.zeros((1, 4), np.float32),
                              np.zeros((1, 4), np.float32), gpu=False)
    monkeypatch.setattr(smoke, "run_binary", lambda *a, **k: pytest.fail("ran the app"))
    result = smoke.run(tmp_path / "pkg", io, smoke.SmokeConfig(seed=0, target={"name": "rtx4090"}),
                       out)
    assert result["status"] == NO_CUDA_SMOKE


def test_python_vm_compiles_cuda_with_nvcc_when_nvrtc_is_missing(monkeypatch):
    import importlib.util

    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvrtc")
    assert vm.cuda_compile_mode() == "nvrtc"  # an explicit choice is kept
    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "cuda" else real(name, *a))
    monkeypatch.setattr(shutil, "which", lambda tool: "/usr/bin/nvcc" if tool == "nvcc" else None)
    assert vm.cuda_compile_mode() == "nvcc" and os.environ["TVM_CUDA_COMPILE_MODE"] == "nvcc"
    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE")
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(StageFailed, match="cuda-bindings"):
        vm.cuda_compile_mode()


def _fake_nvidia_smi(tmp_path: Path, answer: str) -> dict:
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    tool = bindir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho '{answer}'\n")
    tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("cap,target", [("9.0", "h100"), ("8.9", "rtx4090")])
def test_gpu_check_picks_the_target_from_the_compute_capability(tmp_path, cap, target):
    env = _fake_nvidia_smi(tmp_path, f"NVIDIA Fake GPU, {cap}, 580.65.06")
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run", "--project",
                           str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"-> target {target}" in proc.stdout and "TVM_CUDA_COMPILE_MODE=nvcc" in proc.stdout
    for task in (f"build:resnet50_fp32 target={target}", f"validate:resnet50_int8@{target} "
                 f"target={target}", f"bench:resnet50_int8@{target} target={target}"):
        assert task in proc.stdout, task
    assert f"resnet50_int8/{target}/bin/infer --input" in proc.stdout


def test_gpu_check_fails_clearly_without_a_supported_gpu(tmp_path):
    env = _fake_nvidia_smi(tmp_path, "NVIDIA GeForce RTX 3090, 8.6, 580.65.06")
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    assert "no build target for compute capability 8.6" in proc.stderr
    assert "8.9 -> rtx4090, 9.0 -> h100" in proc.stderr
    env = {**os.environ, "PATH": "/nonexistent"}
    proc = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 2 and "nvidia-smi not found" in proc.stderr


@no_gpu_here
def test_gpu_check_refuses_when_tvm_sees_no_gpu(tmp_path):
    # nvidia-smi answers (faked) but there is no device: stop before building anything.
    env = _fake_nvidia_smi(tmp_path, "NVIDIA H100 80GB HBM3, 9.0, 580.65.06")
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--project", str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("sees no CUDA device" in proc.stderr or "not found on PATH" in proc.stderr)
    assert not (tmp_path / "artifacts").exists()


# -------------------------------------------------------------------- doit cross-builds (slow)

@pytest.fixture(scope="module")
def cuda_project(tmp_path_factory):
    """tiny fp32 + int8 for rtx4090, with validate and bench; tiny fp32 for h100."""
    if not HAVE_TOOLS:
        pytest.skip("nvcc (CUDA toolkit), cmake and g++ are needed to cross-build")
    project = make_project(tmp_path_factory.mktemp("cuda"))
    runs = {"rtx4090": doit(project, "build:tiny_fp32", "build:tiny_int8",
                            "validate:tiny_fp32@rtx4090", "validate:tiny_int8@rtx4090",
                            "bench:tiny_fp32@rtx4090", "bench:tiny_int8@rtx4090",
                            "target=rtx4090", "tune=off"),
            "h100": doit(project, "build:tiny_fp32", "target=h100", "tune=off")}
    return project, runs


def _art(project: Path, name: str, target: str) -> Path:
    return project / "artifacts" / name / target


@pytest.mark.slow
@needs_nvcc
def test_rtx4090_cross_builds_with_no_gpu(cuda_project):
    project, runs = cuda_project
    assert runs["rtx4090"].returncode == 0, runs["rtx4090"].output
    assert {"compile", "package", "smoke"} <= runs["rtx4090"].built
    for name in ("tiny_fp32", "tiny_int8"):
        art = _art(project, name, "rtx4090")
        for rel in ("model.so", "bin/infer", "src/main.cc", f"{name}-rtx4090.tar.gz",
                    "package/kernels/cuda0.cu", "package/kernels/cuda0.fatbin"):
            assert (art / rel).exists(), f"{name}: {rel}"
        report = json.loads((art / "compile" / "compile_report.json").read_text())
        assert report["untuned_scheduler"] == "dlight" and '"arch":"sm_89"' in report["target"]
        assert isinstance(report["dlight_fallback"], list)
    int8 = json.loads((_art(project, "tiny_int8", "rtx4090") / "compile" /
                       "compile_report.json").read_text())
    # The int8 CUDA artifact runs the integer passes' kernels (not fake-quant) and says so.
    assert int8["int8_compute"].startswith("integer") and "int32 accumulation" in \
        int8["int8_compute"]
    cu = (_art(project, "tiny_int8", "rtx4090") / "package" / "kernels" / "cuda0.cu").read_text()
    assert re.search(r"signed char\*", cu) and "(int)" in cu  # int8 weights, int32 math


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("target,sm", [("rtx4090", 89), ("h100", 90)])
def test_packaged_kernels_are_compiled_for_the_target_sm(cuda_project, target, sm):
    project, runs = cuda_project
    assert runs[target].returncode == 0, runs[target].output
    pkg = _art(project, "tiny_fp32", target) / "package"
    assert package.cuda_kernel_sources(pkg / "model.so") == \
        [(pkg / "kernels" / "cuda0.cu").read_text()]
    entries = fatbin_entries((pkg / "kernels" / "cuda0.fatbin").read_bytes())
    assert {(e["kind"], e["arch"]) for e in entries} == {(ELF_KIND, sm), (PTX_KIND, sm)}
    cubin = next(e["payload"] for e in entries if e["kind"] == ELF_KIND)
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", cubin, 18)[0] == 190  # EM_CUDA
    assert (struct.unpack_from("<I", cubin, 48)[0] >> 8) & 0xFF == sm
    ptx = ptx_text(next(e for e in entries if e["kind"] == PTX_KIND))
    if ptx is not None:  # compressed PTX needs the zstd tool
        assert re.search(rf"^\.target sm_{sm}\b", ptx, re.M), ptx[:300]
    assert f"sm_{sm}" in (pkg / "src" / "CMakeLists.txt").read_text()


@pytest.mark.slow
@needs_nvcc
@no_gpu_here
def test_smoke_validate_bench_say_not_run_without_a_device(cuda_project):
    project, runs = cuda_project
    out = runs["rtx4090"].output
    assert runs["rtx4090"].returncode == 0, out
    assert "smoke: rtx4090 artifact built; not run here: no CUDA device" in out
    for name in ("tiny_fp32", "tiny_int8"):
        art = _art(project, name, "rtx4090")
        assert json.loads((art / "smoke" / "smoke.json").read_text())["status"] == NO_CUDA_SMOKE
        val = json.loads((art / "validate" / "validation.json").read_text())
        assert val["status"] == NO_CUDA_VALIDATE and val["pass"] is None
        assert {r["status"] for r in val["records"]} == {NO_CUDA_VALIDATE}
        assert "NOT VALIDATED" in (art / "validate" / "validation.md").read_text()
        bench = json.loads((art / "bench" / "bench.json").read_text())
        assert bench["status"] == NO_CUDA_SMOKE and bench["cpp"] is None
        assert f"validate: {name} on rtx4090: {NO_CUDA_VALIDATE}" in out
        assert f"bench: {name} on rtx4090: {NO_CUDA_SMOKE}" in out
    # The binary itself: one clear message, no loader crash.
    art = _art(project, "tiny_fp32", "rtx4090")
    proc = subprocess.run([str(art / "bin" / "infer"), "--input",
                           str(art / "smoke" / "input.npy")], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NVIDIA driver" in proc.stderr or "CUDA device" in proc.stderr, proc.stderr


@pytest.mark.slow
@needs_nvcc
def test_bundle_readme_names_the_gpu_cuda_and_driver(cuda_project):
    project, _ = cuda_project
    bundle = _art(project, "tiny_int8", "rtx4090") / "tiny_int8-rtx4090.tar.gz"
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        readme = tar.extractfile("tiny_int8-rtx4090/README.txt").read().decode()
    cudart = [n for n in names if re.search(r"/lib/libcudart\.so\.\d+$", n)]
    assert len(cudart) == 1 and "tiny_int8-rtx4090/kernels/cuda0.fatbin" in names
    major = int(cudart[0].rsplit(".", 1)[1])
    assert "architecture sm_89" in readme
    assert f"CUDA {major}:" in readme and "NVIDIA driver" in readme
    assert f"branch {package.CUDA_MIN_DRIVER[major]} or newer" in readme


@pytest.mark.slow
@needs_nvcc
def test_python_vm_compile_matches_the_app_kernels(cuda_project, monkeypatch):
    """What the Python VM compiles at load time (TVM's callback, nvcc mode, inside the SM scope
    smoke sets) is the very SASS the app's fatbin holds: smoke on a GPU can expect equality."""
    import tvm
    from tvm.support import nvcc

    project, _ = cuda_project
    pkg = _art(project, "tiny_int8", "rtx4090") / "package"
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    with tvm.target.Target({"kind": "cuda", "arch": "sm_89"}):
        py = bytes(nvcc.tvm_callback_cuda_compile((pkg / "kernels" / "cuda0.cu").read_text()))
    app = fatbin_entries((pkg / "kernels" / "cuda0.fatbin").read_bytes())
    py_cubin = next(e["payload"] for e in fatbin_entries(py) if e["kind"] == ELF_KIND)
    app_cubin = next(e["payload"] for e in app if e["kind"] == ELF_KIND)
    py_sass, app_sass = cubin_text_sections(py_cubin), cubin_text_sections(app_cubin)
    assert app_sass and py_sass == app_sass


@pytest.mark.slow
@needs_nvcc
@no_gpu_here
def test_gpu_check_summary_reads_the_reports(cuda_project, tmp_path):
    """The script's summary over real (no-device) reports: nothing passes, nothing crashes."""
    sys.path.insert(0, str(GPU_CHECK.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(GPU_CHECK.parent))
    project, _ = cuda_project
    args = gpu_check.argparse.Namespace(tune="off", threads=1, warmup=1, repeat=2)
    runner = gpu_check.Runner(project, {**os.environ, "PYTHONPATH": str(REPO)}, dry_run=False)
    row = gpu_check.check_variant(runner, "tiny", "fp32", "rtx4090", args)
    assert row["build_rc"] == 0 and row["smoke"]["status"] == NO_CUDA_SMOKE
    assert row["run_rc"] == 1  # no driver here
    text, ok = gpu_check.summarize([row], {"name": "none", "compute_cap": "-", "driver": "-"},
                                   args)
    assert not ok and "SOME CHECKS FAILED" in text and "bench: cpp" in text
    assert any("build:tiny_fp32 target=rtx4090 tune=off" in c for c in runner.commands)


# ----------------------------------------------------------------------------- with a GPU only

@pytest.mark.slow
@pytest.mark.gpu
@needs_nvcc
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device (TVM sees none)")
def test_on_a_gpu_the_artifact_runs_and_validates(tmp_path, monkeypatch):
    import tvm

    cap = str(tvm.cuda(0).compute_version)
    target = {f"{s.arch[3:-1]}.{s.arch[-1]}": s.name for s in TARGETS.values()
              if s.is_gpu}.get(cap)
    if target is None:
        pytest.skip(f"no target for compute capability {cap}")
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    project = make_project(tmp_path)
    run = doit(project, "build:tiny_fp32", "build:tiny_int8", f"validate:tiny_fp32@{target}",
               f"validate:tiny_int8@{target}", f"target={target}", "tune=off")
    assert run.returncode == 0, run.output
    for name in ("tiny_fp32", "tiny_int8"):
        art = _art(project, name, target)
        assert json.loads((art / "smoke" / "smoke.json").read_text())["status"] == "pass"
        assert json.loads((art / "validate" / "validation.json").read_text())["status"] == "pass"
