"""ResNet-50's int8 and fp16 CUDA (h100) artifacts: one device run carries them, and their
kernels are tensor-core code. Slow: two cross-builds of ResNet-50 (`tune=off`, no GPU).

A device run carries at most 64 MiB (FACTS.md, "The GPU machine used for checks"):
``scripts/gpu_kit.py`` refuses a bundle + kit tarball over that, so packing is the check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from doit_runner import REPO, doit

MIB = 1 << 20
VARIANTS = ("int8", "fp16")
needs_nvcc = pytest.mark.skipif(not all(shutil.which(t) for t in ("nvcc", "cmake", "g++")),
                                reason="nvcc (CUDA toolkit), cmake and g++ are needed to "
                                "cross-build a CUDA artifact")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with the repository's ResNet-50 spec and generator, both variants built
    for h100 (one doit run)."""
    root = tmp_path_factory.mktemp("r50_cuda")
    (root / "models").mkdir()
    for name in ("resnet50.toml", "resnet50_gen.py"):
        shutil.copy(REPO / "models" / name, root / "models" / name)
    run = doit(root, *(f"build:resnet50_{v}" for v in VARIANTS), "target=h100", "tune=off",
               timeout=3600)
    assert run.returncode == 0, run.output[-3000:]
    return root


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("variant", VARIANTS)
def test_resnet50_cuda_bundle_fits_one_device_run(project, variant, tmp_path):
    artifact = f"resnet50_{variant}"
    art = project / "artifacts" / artifact / "h100"
    bundle = art / f"{artifact}-h100.tar.gz"
    assert bundle.stat().st_size < 64 * MIB
    tarball = tmp_path / f"{artifact}.tar"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_kit.py"), artifact,
                           "--target", "h100", "--project", str(project), "--out",
                           str(tarball)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # refused over 64 MiB
    assert tarball.stat().st_size < 64 * MIB
    print(f"{artifact} h100: bundle {bundle.stat().st_size / MIB:.1f} MiB, with kit "
          f"{tarball.stat().st_size / MIB:.1f} MiB")


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("variant", VARIANTS)
def test_resnet50_cuda_convs_run_on_tensor_cores(project, variant):
    art = project / "artifacts" / f"resnet50_{variant}" / "h100"
    report = json.loads((art / "compile" / "compile_report.json").read_text())
    forms = report["tensor_core_forms"]
    assert forms["convs"] == 53 and not forms["kept"], forms  # every conv of ResNet-50
    # every conv kernel (convs of one shape share a kernel) is on tensor cores; the one
    # matmul left off them is the classifier head (one row: a GEMV)
    kernels = report["tuned"] + report["untuned"]
    convs = [k for k in kernels if "conv_matmul" in k]
    assert convs and set(convs) <= set(report["tensor_cores"]), report["tensor_cores"]
    off = [k for k in kernels if "matmul" in k and k not in report["tensor_cores"]]
    assert len(off) == 1 and "conv" not in off[0], off
    source = (art / "package" / "kernels" / "cuda0.cu").read_text()
    assert source.count("wmma::mma_sync") >= len(report["tensor_cores"])
