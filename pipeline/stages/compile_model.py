"""Stage ``compile``: Relax IRModule + tuning database + target -> ``model.so``.

Applies the tuning records, schedules GPU kernels without records with DLight, and lists by
name every kernel that falls back to an untuned schedule (never silent). The exported Relax
VM executable holds the code only: the weights, as the compiled ``main`` takes them (in the
target's layout, folded), go to ``model.params`` next to it (TVM's param file, which the C++
app loads with the runtime library alone). For an LLVM target the bytes are reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.compiler.workloads import io_signature, load_module, untuned_kernels
from pipeline.core.targets import get_target, tvm_target


@dataclass(frozen=True)
class CompileConfig:
    target: dict  # core.targets.target_config(): the target's name, kind and machine
    compute_dtype: str = "float32"  # the scheme's (selects the lowering's layout rules)
    layout: str = ""  # fp32 conv layout on CPUs (see pipeline.compiler.lowering)


def lower_and_schedule(mod, target_name: str, compute_dtype: str, database_dir: Path | None,
                       layout: str = "", transfer_logs: Path | None = None):
    """Lower for the target and apply tuning records (and DLight on GPUs); kernels without a
    record get the target's untuned schedules (on CPUs: transferred from the records in
    ``transfer_logs``, the committed logs of the target). Returns
    ``(scheduled_mod, target, report)``."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import intrinsics, weight_prepack
    from pipeline.compiler.lowering import lower_for_target

    spec = get_target(target_name)
    target = tvm_target(spec)
    intrinsics.register(target.kind.name)  # tuning records may name the target's intrinsics
    lowering: dict = {}  # the layout used, and the fallback taken if the requested one failed
    mod = lower_for_target(mod, target, compute_dtype, layout, report=lowering)
    database = None
    if database_dir is not None and (database_dir / "database_workload.json").exists():
        database = ms.database.JSONDatabase(work_dir=str(database_dir), allow_missing=False)
    # kernels whose weight-packing twin has records are compiled as the twin (the tune
    # stage chose the same, so the records match); their weights are packed below
    twins: list[str] = []
    if database is not None:
        mod, twins = weight_prepack.prefer_prepacked(mod, target, database)
    tuned, untuned = untuned_kernels(mod, target, database)
    if database is not None:
        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    packed = [name for name in twins if weight_prepack.packs_weights(mod[name])]
    label, schedule_untuned = UNTUNED_SCHEDULERS[spec.backend.untuned_scheduler]
    extra = {}
    if schedule_untuned is not None:
        mod, extra = schedule_untuned(mod, target, compute_dtype, transfer_logs)
    if packed:
        mod = weight_prepack.fold_packed_weights(mod, target)
    report = {"target": str(target), "tuned": tuned, "untuned": untuned,
              "untuned_scheduler": label, **lowering, **extra,
              "prepacked_weights": packed, **_float16_note(target, compute_dtype, lowering)}
    return mod, target, report


def is_float16_widened(report: dict) -> bool:
    """Whether the lowering made a float16 model float32 compute on its float16 weights
    (``report``: the lowering's or the compile report, which holds the lowering's fields)."""
    return bool(report.get("float16_widened", {}).get("rewritten"))


def _float16_note(target, compute_dtype: str, lowering: dict) -> dict:
    """What float16 arithmetic becomes on this CPU, said in the compile report (FACTS.md:
    LLVM emits AVX512-FP16 instructions where the CPU has them, float32 conversions else;
    a CPU without them gets a float32 model on the float16 weights where that pays)."""
    if compute_dtype != "float16" or target.kind.name != "llvm":
        return {}
    from tvm.target import codegen

    if is_float16_widened(lowering):
        return {"float16_compute": "float32 arithmetic on the float16 weights, widened to "
                "float32 at load (this CPU has no AVX512-FP16; model.params keeps float16)"}
    native = codegen.target_has_features("avx512fp16", target)
    return {"float16_compute": "native AVX512-FP16 arithmetic" if native else
            "converted to float32 and back around each op (this CPU has no AVX512-FP16): "
            "float16 storage, float32 arithmetic speed"}


def _dlight_schedule(mod, target, compute_dtype: str, transfer_logs=None):
    """DLight default schedules for every GPU kernel that has none yet (no tuning record).

    The rules run in DLight's usual order, in two passes so that the report can name the
    kernels that only the generic ``Fallback`` rule (plain thread binding, no tiling) could
    schedule; a kernel that no rule schedules fails here, by name, instead of deep inside
    ``tvm.compile`` ("did you forget to bind?"). Returns ``(mod, report fields)``.
    """
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from pipeline.core.errors import StageFailed

    def unscheduled(m) -> list[str]:
        return sorted(gv.name_hint for gv, f in m.functions_items()
                      if isinstance(f, tirx.PrimFunc) and not (
                          f.attrs is not None and "tirx.is_scheduled" in f.attrs
                          and bool(f.attrs["tirx.is_scheduled"])))

    from pipeline.compiler.cuda_schedules import tensor_core_rule, uses_tensor_cores
    from pipeline.compiler.fp8_mma import HAND_SCHEDULE_ATTR

    # kernels the lowering scheduled itself (the FP8 tensor-core matmuls)
    hand = sorted(gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and f.attrs is not None
                  and HAND_SCHEDULE_ATTR in f.attrs)
    with target:
        # tensor cores first, for every matmul-like kernel of 16 rows and columns or more
        # (DLight's own gate inside gpu.Matmul is above 64: ResNet-50's 64-channel layers)
        mod = dl.ApplyDefaultSchedule(tensor_core_rule(), dl.gpu.Matmul(), dl.gpu.GEMV(),
                                      dl.gpu.Reduction(), dl.gpu.GeneralReduction())(mod)
        fallback = unscheduled(mod)
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    left = unscheduled(mod)
    if left:
        raise StageFailed("compile", f"no DLight rule can schedule {len(left)} CUDA kernel(s): "
                          f"{', '.join(left)}; tune them on a GPU (`doit build:<artifact> "
                          "target=... tune=missing`) or report the operator")
    tensor_cores = sorted(gv.name_hint for gv, f in mod.functions_items()
                          if isinstance(f, tirx.PrimFunc) and uses_tensor_cores(f))
    report = {"dlight_fallback": [k for k in fallback if k not in left],
              "tensor_cores": tensor_cores, "rule_scheduled": hand}
    if compute_dtype == "int8":
        # Stated in the report: the int8 CUDA artifact computes in integers, it is no
        # fake-quant (QDQ around float) model.
        report["int8_compute"] = ("integer: 8-bit activations (as s8) and weights, int32 "
                                  "accumulation, requantized (the project's integer passes, "
                                  f"not fake-quant); {len(tensor_cores)} kernel(s) on tensor "
                                  "cores (WMMA s8, listed under tensor_cores), the rest on "
                                  "CUDA cores")
    return mod, report


def run(module_json: Path, database_dir: Path | None, config: CompileConfig,
        out_dir: Path, transfer_logs: Path | None = None) -> dict:
    """Write ``model.so``, ``model.params``, ``io.json`` and ``compile_report.json`` into
    ``out_dir``. ``transfer_logs``: the target's committed tuning logs, where kernels with no
    record of their own find a record to borrow a schedule from."""
    import tvm

    from pipeline.compiler.params import lift_constants
    from pipeline.runtime.params import save_params

    mod = load_module(module_json)
    io = io_signature(mod)
    mod, target, report = lower_and_schedule(mod, config.target["name"], config.compute_dtype,
                                             database_dir, config.layout, transfer_logs)
    if report["untuned"]:
        hand = set(report.get("rule_scheduled", ()))
        moved = set(report.get("transferred", {}))
        ruled = set(report.get("default_rules", {}))
        rest = [k for k in report["untuned"] if k not in hand | moved | ruled]
        how = ("naive loops" if report["untuned_scheduler"] == UNTUNED_SCHEDULERS["rules"][0]
               else f"{report['untuned_scheduler']} schedules")
        parts = [f"{', '.join(rest)} use {how}"] if rest else []
        if hand:
            parts.append(f"{', '.join(sorted(hand))} use the project's hand schedule")
        if moved:
            parts.append(f"{len(moved)} use a schedule transferred from another kernel's "
                         "record")
        if ruled:
            parts.append(f"{len(ruled)} use a default schedule from rules")
        print(f"compile: WARNING {len(report['untuned'])} of "
              f"{len(report['untuned']) + len(report['tuned'])} kernels have no tuning record: "
              f"{'; '.join(parts)}. Tune them with `doit build:<artifact> tune=missing` (see "
              "README, Tuning).", flush=True)
    # The weights leave the module after lowering (layout conversions folded into them):
    # main(inputs..., weights...), the weights in model.params.
    mod, weights = lift_constants(mod)
    # a float16 model computed in float32 keeps its weights float16 on disk (widened at load)
    io["params"] = {"file": "model.params", "count": len(weights),
                    "bytes": save_params(weights, out_dir / "model.params",
                                         narrow_float16=is_float16_widened(report))}
    del weights
    executable = tvm.compile(mod, target=target)
    executable.export_library(str(out_dir / "model.so"))
    (out_dir / "io.json").write_text(json.dumps(io, indent=2) + "\n", encoding="utf-8")
    (out_dir / "compile_report.json").write_text(json.dumps(report, indent=2) + "\n",
                                                 encoding="utf-8")
    return {"untuned": len(report["untuned"]), "tuned": len(report["tuned"])}


def _rule_schedule(mod, target, compute_dtype: str, transfer_logs: Path | None = None):
    """Schedules for CPU kernels that have no tuning record: the project's hand schedule for
    its own kernels (the block-wise dequantize-matmul), then for the others a schedule
    transferred from a record of a kernel of the same kind (:mod:`pipeline.tuning.transfer`,
    checked against naive loops), then a default schedule from rules for what is left
    (:mod:`pipeline.compiler.cpu_rules`, checked too); what none fits keeps naive loops.
    Returns ``(mod, report fields)``."""
    from tvm import tirx

    from pipeline.compiler import cpu_rules, dequant_matmul
    from pipeline.tuning.transfer import transfer_schedules

    scheduled = []
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or (
                func.attrs is not None and "tirx.is_scheduled" in func.attrs
                and bool(func.attrs["tirx.is_scheduled"])):
            continue
        if dequant_matmul.has_kernel(func):
            new = dequant_matmul.schedule_cpu(func)
            if not new.same_as(func):
                mod[gvar] = new
                scheduled.append(gvar.name_hint)
    mod, transfer = transfer_schedules(mod, transfer_logs, target)
    if transfer.transferred:
        print(f"compile: {len(transfer.transferred)} kernel(s) without a record of their own "
              "got a schedule transferred from a record of a kernel of the same kind",
              flush=True)
    # what neither a record nor a transfer covers gets a default schedule from rules
    mod, by_rule, still_naive = cpu_rules.schedule_by_rules(mod, target, transfer.kept_naive)
    if by_rule:
        print(f"compile: {len(by_rule)} kernel(s) got a default schedule from rules "
              "(parallel, vectorised)", flush=True)
    report = transfer.as_dict()
    # why neither the transfer nor the rules took a kernel (a gather: the same reason once)
    report["kept_naive"] = {name: "; ".join(dict.fromkeys((report["kept_naive"][name], why)))
                            for name, why in sorted(still_naive.items())}
    return mod, {"rule_scheduled": sorted(scheduled), **report,
                 "default_rules": dict(sorted(by_rule.items()))}


# How kernels without a tuning record are scheduled, per a backend's ``untuned_scheduler``
# (core.targets.BACKENDS): (report label, function(mod, target, compute_dtype, transfer_logs)
# or None).
UNTUNED_SCHEDULERS = {
    "none": ("none (naive loops)", None),
    "rules": ("rules (the project's hand schedules for its own kernels: dequantize-matmul; "
              "schedules transferred from records of kernels of the same kind for the rest, "
              "then default schedules from rules; "
              "naive loops where none fits)", _rule_schedule),
    "dlight": ("dlight", _dlight_schedule),
}
