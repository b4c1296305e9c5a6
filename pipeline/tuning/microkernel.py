"""MetaSchedule search spaces that tensorize fp32 convolutions and matmuls to the project's
register-blocked micro-kernel (``intrinsics.FP32_FMA_7X32X64``), and a same-run comparison
of one kernel tuned with and without it.

The default x86 rules tile a conv with ``MultiLevelTiling`` and leave the innermost block
to LLVM's vectorizer, which keeps few accumulators in registers. Here
``MultiLevelTilingWithIntrin`` maps the block onto the micro-kernel first (output pixels ->
its 7 rows, output channels -> 32 columns, input channels -> depth 64) and the search
chooses the tiling around it; kernels that do not fit fall through to the default
``MultiLevelTiling``. Not wired into the tuner: see README (Roofline).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass


def fp32_microkernel_space(intrin_name: str | None = None):
    """A ``PostOrderApply`` space: MetaSchedule's default LLVM rules with
    ``MultiLevelTilingWithIntrin(intrin_name)`` in front of ``MultiLevelTiling``, and the
    tensorize postprocessor that turns the marked blocks into the intrinsic."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import intrinsics

    intrinsics.register("llvm")
    # depth 64, not 16: alone on one Zen 4 core (a 28 x 64 x 512 matmul, best of 20) the
    # 7x32x64 kernel ran at 94 GFLOP/s and the 7x32x16 one at 51, which reloads and
    # stores its C block 4x as often; every ResNet-50 conv but the first has >= 64 inputs
    intrin_name = intrin_name or intrinsics.FP32_FMA_7X32X64
    reuse_write = ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")
    rules = []
    for rule in ms.schedule_rule.ScheduleRule.create("llvm"):
        name = type(rule).__name__
        if name == "MultiLevelTiling":
            rules.append(ms.schedule_rule.MultiLevelTilingWithIntrin(
                intrin_name, structure="SSRSRS", max_innermost_factor=64,
                reuse_write=reuse_write))
        if name == "ParallelizeVectorizeUnroll":
            # No vectorize annotation: on a loop around the micro-kernel, TIR's vectorizer
            # tries to widen its 16-lane vectors ("Cannot broadcast lanes=16 to 32") and the
            # build fails (25-60% of the candidates did); epilogues are left to LLVM's loop
            # vectorizer.
            rule = ms.schedule_rule.ParallelizeVectorizeUnroll(
                max_jobs_per_core=16, max_vectorize_extent=0,
                unroll_max_steps=[0, 16, 64, 512], unroll_explicit=True)
        rules.append(rule)
    # the init block of a 7 x 32 block is a 2-D loop: RewriteTensorize only vectorizes
    # a 1-D one (it asserts), and LLVM vectorizes the zeroing itself
    postprocs = [*ms.postproc.Postproc.create("llvm"),
                 ms.postproc.RewriteTensorize(vectorize_init_loop=False)]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                             mutator_probs="llvm")


def register_cpu_intrinsics() -> None:
    """Builder worker initializer (pickled by reference: a module-level function)."""
    from pipeline.compiler import intrinsics

    intrinsics.register("llvm")


@dataclass(frozen=True)
class TunedKernel:
    label: str
    trials: int
    best_us: float | None  # median over the rounds; None: no valid schedule found
    rounds_us: tuple[float, ...]  # each alternating round's time_kernel, in order
    tensorized: bool  # the micro-kernel intrinsic is in the schedule's TIR
    tir: str


def tune_kernel(func, target, trials: int, use_microkernel: bool, seed: int = 0,
                builder_timeout: float = 120.0, intrin_name: str | None = None):
    """Tune one PrimFunc with MetaSchedule (the default space, or the micro-kernel space);
    returns the best schedule's module, or None if no candidate built and ran."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import intrinsics

    intrinsics.register("llvm")
    space = fp32_microkernel_space(intrin_name) if use_microkernel else "post-order-apply"
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with tempfile.TemporaryDirectory(prefix="microkernel-tune-") as work_dir:
        database = ms.tune_tir(
            mod, target, work_dir, max_trials_global=trials,
            num_trials_per_iter=min(trials, 32), space=space, seed=seed,
            builder=ms.builder.LocalBuilder(timeout_sec=builder_timeout,
                                            initializer=register_cpu_intrinsics),
            runner=ms.runner.LocalRunner(timeout_sec=60))
        sch = ms.tir_integration.compile_tir(database, mod, target)
    return None if sch is None else sch.mod


def time_kernel(mod, target, repeat: int = 30) -> float:
    """Microseconds of one call of the module's ``main`` on random inputs: the best of
    ``repeat`` averages of 10 calls. Best, not median: on a shared 2-core machine the
    neighbours' load only ever adds time (medians of one kernel varied 2x between rounds
    a minute apart), and the best is the kernel's own speed."""
    import numpy as np
    import tvm

    lib = tvm.compile(mod, target=target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    # TVM 0.27: a buffer parameter carries its shape and dtype
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.shape])
                               .astype(str(p.dtype)), dev) for p in mod["main"].params]
    timer = lib.mod.time_evaluator("main", dev, number=10, repeat=repeat)
    return min(timer(*args).results) * 1e6


def uses_intrinsic(mod) -> bool:
    """The micro-kernel's body is in the module: tensorize leaves its explicit ``llvm.fma``
    calls (MetaSchedule's own schedules never emit one; LLVM fuses their mul-adds later)."""
    return '"llvm.fma"' in mod.script()


def artifact_kernel(artifacts, artifact: str, kernel: str):
    """``(func, target)``: one kernel of a built CPU artifact, lowered as its compile stage
    lowers it (same target, compute dtype and layout)."""
    import json
    from pathlib import Path

    from pipeline.compiler.lowering import lower_for_target
    from pipeline.compiler.workloads import load_module
    from pipeline.core.errors import ConfigError
    from pipeline.core.targets import get_target, tvm_target

    compile_dir = Path(artifacts) / artifact / "cpu" / "compile"
    module_json = Path(artifacts) / artifact / "import" / "module.json"
    if not (compile_dir / "manifest.json").exists() or not module_json.exists():
        raise ConfigError(f"{artifact} is not built: run `doit build:{artifact} tune=off`")
    config = json.loads((compile_dir / "manifest.json").read_text(encoding="utf-8"))["config"]
    target = tvm_target(get_target(config["target"]["name"]))
    lowered = lower_for_target(load_module(module_json), target, config["compute_dtype"],
                               config.get("layout", ""))
    names = sorted(gv.name_hint for gv, _ in lowered.functions_items())
    if kernel not in names:
        raise ConfigError(f"{artifact} has no kernel {kernel!r}; its kernels: "
                          f"{', '.join(n for n in names if 'conv' in n or 'matmul' in n)}")
    return lowered[kernel], target


def compare(func, target, trials: int, repeat: int = 30, rounds: int = 3,
            baseline_database=None, intrin_name: str | None = None) -> list[TunedKernel]:
    """Tune ``func`` with the default space and with the micro-kernel space (same trials,
    same seed), then time the winners alternately ``rounds`` times in this one run (the
    machine drifts between minutes: the medians of the alternating rounds compare). With
    ``baseline_database`` (a tuning database directory), its record for the kernel is
    timed too, as "committed log"."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    candidates = {}
    if baseline_database is not None:
        database = ms.database.JSONDatabase(work_dir=str(baseline_database),
                                            allow_missing=False)
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        sch = ms.tir_integration.compile_tir(database, mod, target)
        if sch is not None:
            candidates["committed log"] = (0, sch.mod)
    for label, use in (("default rules", False), ("micro-kernel rules", True)):
        candidates[label] = (trials, tune_kernel(func, target, trials, use,
                                                 intrin_name=intrin_name))
    times: dict[str, list[float]] = {label: [] for label in candidates}
    for _ in range(rounds):
        for label, (_, mod) in candidates.items():
            if mod is not None:
                times[label].append(time_kernel(mod, target, repeat))
    return [TunedKernel(label, n, statistics.median(times[label]) if times[label] else None,
                        tuple(times[label]), mod is not None and uses_intrinsic(mod),
                        "" if mod is None else mod.script())
            for label, (n, mod) in candidates.items()]
