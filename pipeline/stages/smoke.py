"""Stage ``smoke``: run the shipped C++ binary and the Python VM on one input; they must agree
bit for bit on the CPU (same model.so, same runtime, so any difference is a packaging bug).

On CUDA the two do not run the very same machine code: the app runs the fatbins the package
stage compiled with nvcc, while the Python VM compiles the kernel source in ``model.so`` when it
loads it (``tvm_callback_cuda_compile``). Both use the same nvcc flags and SM (the Python side
is pinned to the device's own ``sm_XY``), which gave identical SASS for every kernel checked,
so the outputs should be bit-identical; the gate is nevertheless the spec's ``gpu_rel_tol``
(max abs err <= gpu_rel_tol * max(1, max abs ref)), the same one validate applies, and
``smoke.json`` records whether they were bit-identical. Without a CUDA device a CUDA artifact
is reported "not run: no CUDA device", never passed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import StageFailed
from pipeline.core.spec import ValidationSpec
from pipeline.core.targets import get_target
from pipeline.runtime.app import run_binary
from pipeline.runtime.data import file_stems, seeded_input
from pipeline.runtime.vm import cuda_available, cuda_device_name, python_vm_outputs


@dataclass(frozen=True)
class SmokeConfig:
    target: dict  # core.targets.target_config()
    seed: int = 0  # of the one input
    # CUDA: C++ vs Python VM within this (the spec's validation.gpu_rel_tol); CPU: bitwise
    gpu_rel_tol: float = ValidationSpec().gpu_rel_tol
    input_ranges: dict = field(default_factory=dict)  # compiled input name -> [lo, hi]


def run(package_dir: Path, io_json: Path, config: SmokeConfig, out_dir: Path) -> dict:
    """Write ``input.npy``, ``output_cpp.npy`` and ``smoke.json``; fail on any mismatch."""
    io = json.loads(io_json.read_text(encoding="utf-8"))
    target = get_target(config.target["name"])
    # Every input of the model, in main's order; one input keeps the name input.npy.
    feeds = [seeded_input(tuple(t["shape"]), t["dtype"], config.seed + i,
                          tuple(config.input_ranges.get(t["name"], ())))
             for i, t in enumerate(io["inputs"])]
    if len(feeds) == 1:
        inputs: Path | dict = out_dir / "input.npy"
        np.save(inputs, feeds[0])
    else:
        stems = file_stems(t["name"] for t in io["inputs"])
        inputs = {t["name"]: out_dir / f"input_{stems[t['name']]}.npy" for t in io["inputs"]}
        for t, x in zip(io["inputs"], feeds, strict=True):
            np.save(inputs[t["name"]], x)
    if target.is_gpu and not cuda_available():
        result = {"status": "not run: no CUDA device", "target": target.name}
        (out_dir / "smoke.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"smoke: {target.name} artifact built; not run here: no CUDA device", flush=True)
        return result
    y_cpp = _app_outputs(package_dir, inputs, [t["name"] for t in io["outputs"]], out_dir)
    y_pys = python_vm_outputs(package_dir / "model.so", feeds, target.backend.device)
    same_shapes = len(y_pys) == len(y_cpp) and all(
        a.shape == b.shape for a, b in zip(y_cpp, y_pys, strict=False))
    identical = same_shapes and all(a.dtype == b.dtype and np.array_equal(a, b)
                                    for a, b in zip(y_cpp, y_pys, strict=True))
    result = {"status": "pass" if identical else "fail", "target": target.name,
              "shape": list(y_cpp[0].shape), "dtype": str(y_cpp[0].dtype),
              "max_abs_diff": max(float(np.max(np.abs(a.astype(np.float64) -
                                                      b.astype(np.float64)), initial=0.0))
                                  for a, b in zip(y_cpp, y_pys, strict=True))
              if same_shapes else None}
    if len(y_cpp) > 1:
        result["outputs"] = [{"name": t["name"], "shape": list(a.shape), "dtype": str(a.dtype)}
                             for t, a in zip(io["outputs"], y_cpp, strict=True)]
    if not target.backend.bit_exact_app:
        if same_shapes and any(a.dtype != b.dtype for a, b in zip(y_cpp, y_pys, strict=True)):
            result["max_abs_diff"] = None  # a dtype mismatch fails, whatever the values
        ref = np.concatenate([y.astype(np.float64).ravel() for y in y_pys])
        return _judge_cuda(result, identical, ref, config, out_dir)
    (out_dir / "smoke.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not identical:
        raise StageFailed("smoke", f"C++ binary and Python VM disagree: {result}")
    print("smoke: C++ binary output is bit-identical to the Python VM", flush=True)
    return result


def _app_outputs(package_dir: Path, inputs, names: list[str], out_dir: Path) -> list:
    """The app's outputs, one run per output (``--output NAME=PATH``) for several."""
    outputs = []
    stems = file_stems(names)
    for name in names:
        path = out_dir / ("output_cpp.npy" if len(names) == 1 else
                          f"output_cpp_{stems[name]}.npy")
        proc = run_binary(package_dir, inputs, path if len(names) == 1 else f"{name}={path}")
        if proc.returncode != 0:
            raise StageFailed("smoke", f"bin/infer exited {proc.returncode}: "
                              f"{(proc.stderr or proc.stdout)[-2000:]}")
        outputs.append(np.load(path))
    return outputs


def _judge_cuda(result: dict, identical: bool, y_py: np.ndarray, config: SmokeConfig,
                out_dir: Path) -> dict:
    """CUDA: pass within ``gpu_rel_tol`` (see the module docstring); record bit-identity."""
    tol = float(config.gpu_rel_tol)
    diff = result["max_abs_diff"]
    ref_max = float(np.max(np.abs(y_py.astype(np.float64)))) if y_py.size else 0.0
    limit = tol * max(1.0, ref_max)
    ok = identical or (diff is not None and diff <= limit)
    result.update(status="pass" if ok else "fail", bit_identical=identical,
                  gate=f"max_abs_diff <= gpu_rel_tol * max(1, max abs ref) = {tol} * "
                       f"{max(1.0, ref_max):.6g} = {limit:.6g}",
                  gpu_rel_tol=tol, device=cuda_device_name(),
                  python_cuda_compile_mode=os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc"))
    (out_dir / "smoke.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not ok:
        raise StageFailed("smoke", f"C++ binary and Python VM disagree on CUDA: {result}")
    how = "bit-identical to" if identical else f"within gpu_rel_tol ({diff:.3g} <= {limit:.3g}) of"
    print(f"smoke: C++ binary output on {result['device']} is {how} the Python VM", flush=True)
    return result


