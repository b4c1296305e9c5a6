"""Where the time goes: each kernel of a compiled CPU model timed inside the model as it runs.

Tuning estimates time one kernel at a time with hot caches; this runs ``model.so`` in the
Relax VM with an instrument that times every kernel call. Thread count: ``TVM_NUM_THREADS``,
which must be set before TVM's thread pool starts (the callers set it).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class KernelTime:
    name: str
    us: float  # per model run: the sum of the kernel's calls, median over the profiled runs
    calls: int  # calls per model run


def profile_kernels(compile_dir: Path, repeat: int = 5, warmup: int = 3,
                    seed: int = 0) -> list[KernelTime]:
    """Per-kernel times of ``compile_dir/model.so`` on seeded random inputs, heaviest first."""
    import numpy as np
    import tvm
    from tvm import relax

    from pipeline.runtime.vm import model_weights

    if repeat < 1 or warmup < 0:
        raise ConfigError(f"repeat must be >= 1 and warmup >= 0, got {repeat} and {warmup}")
    compile_dir = Path(compile_dir)
    if not (compile_dir / "model.so").exists():
        raise ConfigError(f"{compile_dir}/model.so not found: build the artifact first "
                          "(`doit build:<artifact> tune=off`)")
    io = json.loads((compile_dir / "io.json").read_text(encoding="utf-8"))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(compile_dir / "model.so")), dev)
    rng = np.random.default_rng(seed)
    inputs = [tvm.runtime.tensor(_random_input(rng, i["shape"], i["dtype"]), dev)
              for i in io["inputs"]]
    inputs += model_weights(compile_dir / "model.so", dev)  # model.params: after the inputs
    for _ in range(warmup):
        vm["main"](*inputs)

    # The VM calls the instrument before and after every kernel call: time between the two.
    run_us: dict[str, float] = {}
    run_calls: dict[str, int] = {}
    started: list[float] = []

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            started.append(time.perf_counter())
        else:
            run_us[name] = run_us.get(name, 0.0) + (time.perf_counter() - started.pop()) * 1e6
            run_calls[name] = run_calls.get(name, 0) + 1

    vm.set_instrument(instrument)
    per_kernel: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    for _ in range(repeat):
        run_us.clear()
        run_calls.clear()
        vm["main"](*inputs)
        for name, us in run_us.items():
            per_kernel.setdefault(name, []).append(us)
        calls.update(run_calls)
    table = [KernelTime(name, statistics.median(v), calls[name])
             for name, v in per_kernel.items()]
    return sorted(table, key=lambda k: -k.us)


def _random_input(rng, shape, dtype: str):
    import numpy as np

    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)
