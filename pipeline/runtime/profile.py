"""Where the time goes: each kernel of a compiled CPU model timed inside the model as it runs.

Tuning estimates time one kernel at a time with hot caches; this runs ``model.so`` in the
Relax VM with an instrument that times every kernel call (:class:`KernelTimer`): one build's
profile, two builds of one model compared kernel by kernel in alternating runs (a tuning
top-up's effect in the model), and the fastest against the slowest runs of one build (which
kernels a noisy minute slows most). Thread count: ``TVM_NUM_THREADS``, which must be set
before TVM's thread pool starts (the callers set it).
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


class KernelTimer:
    """``compile_dir/model.so`` loaded in the Relax VM on seeded random inputs, with an
    instrument the VM calls before and after every kernel call; :meth:`run` runs the model
    once and returns each kernel's time in that run.

    Several timers can live in one process (an A/B of two builds runs them alternately, so
    both see the same minutes of a noisy machine)."""

    def __init__(self, compile_dir: Path, warmup: int = 3, seed: int = 0) -> None:
        import numpy as np
        import tvm
        from tvm import relax

        from pipeline.runtime.vm import model_weights

        if warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {warmup}")
        compile_dir = Path(compile_dir)
        if not (compile_dir / "model.so").exists():
            raise ConfigError(f"{compile_dir}/model.so not found: build the artifact first "
                              "(`doit build:<artifact> tune=off`)")
        io = json.loads((compile_dir / "io.json").read_text(encoding="utf-8"))
        dev = tvm.cpu()
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(compile_dir / "model.so")), dev)
        rng = np.random.default_rng(seed)
        self._inputs = [tvm.runtime.tensor(_random_input(rng, i["shape"], i["dtype"]), dev)
                        for i in io["inputs"]]
        # model.params: after the inputs; kept here, the loader caches one model's only
        self._inputs += model_weights(compile_dir / "model.so", dev)
        self._main = vm["main"]
        for _ in range(warmup):
            self._main(*self._inputs)
        self._us: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        started: list[float] = []

        def instrument(func, name, before_run, ret_value, *args):
            if before_run:
                started.append(time.perf_counter())
            else:
                elapsed = (time.perf_counter() - started.pop()) * 1e6
                self._us[name] = self._us.get(name, 0.0) + elapsed
                self._calls[name] = self._calls.get(name, 0) + 1

        vm.set_instrument(instrument)

    def run(self) -> dict[str, tuple[float, int]]:
        """One model run: ``kernel name -> (us, calls)`` (a kernel's calls summed)."""
        self._us.clear()
        self._calls.clear()
        self._main(*self._inputs)
        return {name: (us, self._calls[name]) for name, us in self._us.items()}


def profile_kernels(compile_dir: Path, repeat: int = 5, warmup: int = 3,
                    seed: int = 0) -> list[KernelTime]:
    """Per-kernel times of ``compile_dir/model.so`` on seeded random inputs, heaviest first."""
    if repeat < 1:
        raise ConfigError(f"repeat must be >= 1, got {repeat}")
    timer = KernelTimer(compile_dir, warmup=warmup, seed=seed)
    runs = [timer.run() for _ in range(repeat)]
    return _medians(runs)


def _medians(runs: list[dict[str, tuple[float, int]]]) -> list[KernelTime]:
    """Each kernel's median time over ``runs`` (a kernel missing from a run is left out of
    that run's median), heaviest first."""
    names = {name for run in runs for name in run}
    table = [KernelTime(name, statistics.median(r[name][0] for r in runs if name in r),
                        next(r[name][1] for r in runs if name in r)) for name in names]
    return sorted(table, key=lambda k: -k.us)


@dataclass(frozen=True)
class KernelDiff:
    name: str
    a_us: float | None  # median per model run in build A; None: A has no such kernel
    b_us: float | None


def compare_builds(dir_a: Path, dir_b: Path, runs: int = 40, warmup: int = 3
                   ) -> list[KernelDiff]:
    """The same model's kernels in two builds (e.g. before and after a tuning top-up), timed
    in one process, runs alternating A B B A ..., per-kernel medians; largest gain of B
    first. Kernels match by name: both builds must come from the same lowering."""
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    timers = KernelTimer(dir_a, warmup=warmup), KernelTimer(dir_b, warmup=warmup)
    per_build: tuple[list, list] = ([], [])
    for i in range(runs):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            per_build[which].append(timers[which].run())
    a, b = ({k.name: k.us for k in _medians(r)} for r in per_build)
    diffs = [KernelDiff(name, a.get(name), b.get(name)) for name in a.keys() | b.keys()]
    return sorted(diffs, key=lambda d: ((d.b_us or 0.0) - (d.a_us or 0.0), d.name))


def fast_and_slow_runs(compile_dir: Path, runs: int = 90, warmup: int = 3
                       ) -> tuple[list[KernelTime], list[KernelTime]]:
    """Per-kernel medians over the fastest and the slowest third of ``runs`` model runs (by
    the sum of kernel times): which kernels a slow minute of the machine hits hardest."""
    if runs < 3:
        raise ConfigError(f"runs must be >= 3, got {runs}")
    timer = KernelTimer(compile_dir, warmup=warmup)
    measured = sorted((timer.run() for _ in range(runs)),
                      key=lambda r: sum(us for us, _ in r.values()))
    third = runs // 3
    return _medians(measured[:third]), _medians(measured[-third:])


def _random_input(rng, shape, dtype: str):
    import numpy as np

    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)
