"""Kernels timed inside the model: one build's profile, two builds' A/B, fast vs slow runs.

The builds are tiny real ones (a matmul and its epilogue compiled for the host, weights in
``model.params`` as the compile stage writes them); times are only checked for shape and
sign, never for speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ConfigError
from pipeline.runtime import profile

REPO = Path(__file__).resolve().parent.parent


def _build(out: Path, seed: int, extra_tanh: bool = False) -> Path:
    """``relu(x @ w + b)`` (and a tanh when asked) compiled into ``out`` like a compile dir."""
    import tvm
    from tvm import relax

    from pipeline.compiler.params import lift_constants
    from pipeline.runtime.params import save_params

    rng = np.random.default_rng(seed)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(rng.standard_normal((64, 32)).astype("float32"))
            b = relax.const(rng.standard_normal((32,)).astype("float32"))
            y = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, w), b)))
            if extra_tanh:
                y = bb.emit(relax.op.tanh(y))
            out_var = bb.emit_output(y)
        bb.emit_func_output(out_var)
    mod, tensors = lift_constants(bb.get())
    out.mkdir(parents=True)
    tvm.compile(mod, target="llvm").export_library(str(out / "model.so"))
    save_params(tensors, out / "model.params")
    (out / "io.json").write_text(json.dumps(
        {"inputs": [{"name": "x", "shape": [4, 64], "dtype": "float32"}]}))
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    return _build(root / "a", 0), _build(root / "b", 1, extra_tanh=True)


def test_a_run_times_every_kernel_and_the_profile_is_heaviest_first(builds):
    a, _ = builds
    timer = profile.KernelTimer(a, warmup=1)
    run = timer.run()
    kernels = [name for name in run if not name.startswith("vm.builtin")]
    assert kernels and all(us > 0 and calls >= 1 for us, calls in run.values()), run
    assert any("matmul" in name for name in kernels), run
    table = profile.profile_kernels(a, repeat=3, warmup=1)
    assert {k.name for k in table} == set(run)
    assert [k.us for k in table] == sorted((k.us for k in table), reverse=True)


def test_two_builds_compare_kernel_by_kernel(builds):
    a, b = builds
    diffs = profile.compare_builds(a, b, runs=4, warmup=1)
    by_name = {d.name: d for d in diffs}
    tanh = [d for d in diffs if "tanh" in d.name]
    assert len(tanh) == 1 and tanh[0].a_us is None and tanh[0].b_us > 0, diffs
    shared = [d for d in diffs if d.a_us is not None and d.b_us is not None]
    assert any("matmul" in d.name for d in shared), by_name
    gains = [(d.b_us or 0.0) - (d.a_us or 0.0) for d in diffs]
    assert gains == sorted(gains)  # B's largest gain first, its new kernel among the last


def test_fast_and_slow_thirds_hold_the_same_kernels(builds):
    a, _ = builds
    fast, slow = profile.fast_and_slow_runs(a, runs=6, warmup=1)
    assert {k.name for k in fast} == {k.name for k in slow} != set()
    with pytest.raises(ConfigError, match="runs must be >= 3"):
        profile.fast_and_slow_runs(a, runs=2)


def test_a_missing_build_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.so not found"):
        profile.KernelTimer(tmp_path)


def test_the_script_prints_the_comparison_and_refuses_a_lone_build(builds):
    a, b = builds
    script = str(REPO / "scripts" / "ab_kernels.py")
    run = subprocess.run([sys.executable, script, str(a), str(b), "--runs", "2"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "B/A" in run.stdout and "tanh" in run.stdout, run.stdout
    lone = subprocess.run([sys.executable, script, str(a)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert lone.returncode == 2 and "--spread" in lone.stderr, lone.stderr
