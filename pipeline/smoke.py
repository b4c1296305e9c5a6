"""Stage ``smoke``: run the shipped C++ binary and the Python VM on one input; they must agree
bit for bit (same model.so, same runtime, so any difference is a packaging bug).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import StageFailed
from .targets import get_target


def seeded_input(shape, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def python_vm_outputs(model_so: Path, feeds: list[np.ndarray], device: str = "cpu"):
    """Run ``main`` of an exported Relax executable in Python; returns numpy outputs."""
    import tvm
    from tvm import relax

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(model_so)), dev)
    out = vm["main"](*[tvm.runtime.tensor(x, dev) for x in feeds])
    outs = list(out) if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and \
        not hasattr(out, "numpy") else [out]
    return [o.numpy() for o in outs]


def run(package_dir: Path, io_json: Path, cfg: dict, out_dir: Path) -> dict:
    """Write ``input.npy``, ``output_cpp.npy`` and ``smoke.json``; fail on any mismatch."""
    from . import package

    io = json.loads(io_json.read_text(encoding="utf-8"))
    target = get_target(cfg["target"]["name"])
    inp = io["inputs"][0]
    x = seeded_input(tuple(inp["shape"]), inp["dtype"], cfg["seed"])
    np.save(out_dir / "input.npy", x)
    if target.is_gpu and not cuda_available():
        result = {"status": "not run: no CUDA device", "target": target.name}
        (out_dir / "smoke.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"smoke: {target.name} artifact built; not run here: no CUDA device", flush=True)
        return result
    proc = package.run_binary(package_dir, out_dir / "input.npy", out_dir / "output_cpp.npy")
    if proc.returncode != 0:
        raise StageFailed("smoke", f"bin/infer exited {proc.returncode}: "
                          f"{(proc.stderr or proc.stdout)[-2000:]}")
    y_cpp = np.load(out_dir / "output_cpp.npy")
    y_py = python_vm_outputs(package_dir / "model.so", [x], "cuda" if target.is_gpu else "cpu")[0]
    identical = y_cpp.shape == y_py.shape and y_cpp.dtype == y_py.dtype and \
        np.array_equal(y_cpp, y_py)
    result = {"status": "pass" if identical else "fail", "target": target.name,
              "shape": list(y_cpp.shape), "dtype": str(y_cpp.dtype),
              "max_abs_diff": float(np.max(np.abs(y_cpp.astype(np.float64) -
                                                  y_py.astype(np.float64))))
              if y_cpp.shape == y_py.shape else None}
    (out_dir / "smoke.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not identical:
        raise StageFailed("smoke", f"C++ binary and Python VM disagree: {result}")
    print("smoke: C++ binary output is bit-identical to the Python VM", flush=True)
    return result


def cuda_available() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False
