"""Schedules for kernels that have no tuning record: transferred from records of other kernels.

A kernel without a record of its own used to compile as naive loops (one thread, no
vectors): 20-100x slower than a tuned one. But the tuning database nearly always holds a
record for a kernel of the same *kind*: the same compute blocks (a padded NHWC conv with its
bias add and ReLU, a dense with a GELU) at other shapes. Such a record's trace is a good
schedule skeleton for the new kernel: it is replayed on it with every tile decision adapted
to the new loop extents (:func:`adapting_decisions`: inner factors kept where they divide,
the outermost takes the rest; compute-at decisions kept; the literal auto-unroll step
adapted so that the same inner loop levels unroll as in the source, :func:`adapt_unroll_steps`).

Only kernels with a reduction (convs, matmuls, pooling) are transferred: on elementwise and
layout kernels a borrowed trace gains little and can take LLVM half a minute to compile.
Which record: those whose workload has exactly the kernel's block names, nearest in size
first (the sum over buffers of ``|log(elements_new / elements_old)|``), then fastest. The
choice is deterministic (no timing at compile time), so a rebuild gives the same kernel.
Every transferred kernel is checked against its naive self like a tuned record
(:mod:`pipeline.tuning.kernel_check`); the next candidate is tried when one does not replay
or disagrees, and a kernel none of whose candidates works keeps naive loops.

Measured on inception_v1 from the onnx model zoo (no record of its own; the committed logs
hold ResNet-50's, AMD EPYC Zen 4, 2 threads): its NHWC convs went from 1.3-214 ms naive to
0.04-3.1 ms transferred.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.compiler.workloads import has_reduction

MAX_TRIES = 4  # candidate records per kernel


@dataclass
class TransferReport:
    """What :func:`transfer_schedules` did, for the compile report."""

    transferred: dict[str, str] = field(default_factory=dict)  # kernel -> source workload
    kept_naive: dict[str, str] = field(default_factory=dict)  # kernel -> why

    def as_dict(self) -> dict:
        return {"transferred": dict(sorted(self.transferred.items())),
                "kept_naive": dict(sorted(self.kept_naive.items()))}


def block_names(func) -> tuple[str, ...]:
    """The names of a PrimFunc's blocks, sorted (the kernel's kind)."""
    return tuple(sorted(set(re.findall(r'T\.s?block\("([\w.]+)"', func.script()))))


def _sizes(func) -> list[int]:
    return [math.prod(int(d) for d in p.shape) for p in func.params]


def _distance(a, b) -> float:
    """How far apart two kernels of one kind are in size (0: the same buffer sizes)."""
    sa, sb = _sizes(a), _sizes(b)
    if len(sa) != len(sb):
        return math.inf
    return sum(abs(math.log(max(x, 1) / max(y, 1))) for x, y in zip(sa, sb, strict=True))


def adapting_decisions(sch):
    """A ``decision_provider`` for ``Trace.apply_to_schedule``: each tile-size decision of
    the source kernel, adapted to the extent of the same loop in ``sch``."""

    def provider(inst, inputs, attrs, decision):
        if inst.kind.name != "SamplePerfectTile" or decision is None:
            return decision
        left = int(sch.get(inputs[0]).extent)
        factors = [int(d) for d in decision]
        for i in range(len(factors) - 1, 0, -1):
            factor = min(factors[i], left)
            while factor > 1 and left % factor:
                factor -= 1
            factors[i] = max(factor, 1)
            left //= factors[i]
        factors[0] = left
        return factors

    return provider


def records_by_kind(database) -> dict[tuple, list]:
    """Each workload's fastest record in ``database`` as ``(secs, func, record)``, grouped by
    the workload's block names (a kernel's kind)."""
    best: dict = {}
    for record in database.get_all_tuning_records():
        if not record.run_secs:
            continue
        secs = sum(float(s) for s in record.run_secs) / len(record.run_secs)
        key = record.workload  # one entry per workload object
        if key not in best or secs < best[key][0]:
            best[key] = (secs, record)
    by_kind: dict[tuple, list] = {}
    for secs, record in best.values():
        func = record.workload.mod["main"]
        by_kind.setdefault(block_names(func), []).append((secs, func, record))
    return by_kind


def _ranked(func, by_kind: dict) -> list:
    """The ``(secs, func, record)`` entries of records of ``func``'s kind, nearest in size
    first, then fastest."""
    kind = by_kind.get(block_names(func.without_attr("global_symbol"))) or []
    return sorted(kind, key=lambda e: (_distance(func, e[1]), e[0]))


UNROLL_KEY = "pragma_auto_unroll_max_step"


def _unroll_nests(sch) -> dict:
    """Each loop carrying an auto-unroll step, as ``block name -> (loop, step, extents)``:
    the block is the one with the deepest nest under that loop (the reduction's inner tile,
    not its init or epilogue), the extents those of its loops below it, outermost first."""
    deepest: dict = {}  # loop statement -> (loop, step, block name, extents below)
    blocks = _blocks_under(sch, sch.get_sblock("root")) if _has_root(sch) else []
    for block in blocks:
        loops = sch.get_loops(block)
        for i, loop in enumerate(loops):
            stmt = sch.get(loop)
            if UNROLL_KEY not in stmt.annotations:
                continue
            below = [int(sch.get(lp).extent) for lp in loops[i + 1:]]
            key = stmt  # the same loop seen from each block under it
            seen = next((k for k in deepest if k.same_as(stmt)), None)
            if seen is None or len(below) > len(deepest[seen][3]):
                deepest.pop(seen, None)
                deepest[key] = (loop, int(stmt.annotations[UNROLL_KEY]),
                                sch.get(block).name_hint, below)
    return {name: (loop, step, below) for loop, step, name, below in deepest.values()}


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:  # noqa: BLE001  (TVM raises its own error type)
        return False
    return True


def _blocks_under(sch, block) -> list:
    children = sch.get_child_blocks(block)
    return [block] + [b for child in children for b in _blocks_under(sch, child)]


def _unrolled_levels(extents: list[int], step: int) -> int:
    """How many innermost loops of a nest TVM's auto-unroll unrolls at ``step`` (a loop is
    unrolled while the product of its extent and those inside it stays within the step)."""
    levels, product = 0, 1
    for extent in reversed(extents):
        product *= extent
        if product > step:
            break
        levels += 1
    return levels


def adapt_unroll_steps(source, sch) -> None:
    """Give ``sch`` (a kernel scheduled by another kernel's trace, tiles adapted) the unroll
    steps that unroll the same loop levels as in ``source`` (that trace on its own kernel).

    Why: the trace's unroll step is a literal. Replayed on other extents it can unroll a
    whole inner tile that the source kept as a loop: measured on bert-mini's 1024-wide FFN
    matmul (+GELU) with a record of minilm's 1536-wide one, step 64 fully unrolled its
    32x2 tile (64 <= 64; the source's 48x2 stayed a loop) and LLVM then vectorised the wrong
    loop: 12.4 ms instead of 0.33 ms at steps 0, 16, 32 or 512."""
    theirs = _unroll_nests(source)
    for name, (loop, step, below) in _unroll_nests(sch).items():
        if name not in theirs:
            continue
        _, their_step, their_below = theirs[name]
        levels = _unrolled_levels(their_below, their_step)
        if levels > len(below) or _unrolled_levels(below, step) == levels:
            continue
        new_step = math.prod(below[len(below) - levels:]) if levels else 0
        if levels == len(their_below):  # the source unrolled its whole nest: so does this
            new_step = max(new_step, step)
        if new_step != step:
            sch.unannotate(loop, UNROLL_KEY)
            sch.annotate(loop, UNROLL_KEY, new_step)


def _replayed(record, func):
    """The schedule of ``func`` by ``record``'s trace with adapted decisions and unroll
    steps (raises if it does not replay)."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    record.trace.apply_to_schedule(sch, remove_postproc=False,
                                   decision_provider=adapting_decisions(sch))
    source = s_tir.Schedule(record.workload.mod)
    record.trace.apply_to_schedule(source, remove_postproc=False)
    adapt_unroll_steps(source, sch)
    return sch


def _unscheduled(mod) -> list:
    from tvm import tirx

    return [(gvar, func) for gvar, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc) and not (
                func.attrs is not None and "tirx.is_scheduled" in func.attrs
                and bool(func.attrs["tirx.is_scheduled"]))]


def open_logs(logs_dir: Path):
    """A read-only database of the tuning logs in ``logs_dir`` (plain or gzipped), opened from
    a scratch copy (TVM's database writes into its folder)."""
    import tempfile

    from pipeline.tuning import logs

    scratch = Path(tempfile.mkdtemp(prefix="transfer-logs-"))
    logs.merge([Path(logs_dir)], scratch)
    return logs.open_database(scratch), scratch


def transfer_schedules(mod, logs_dir: Path | None, target, check: bool = True):
    """Schedule the unscheduled PrimFuncs of ``mod`` from records of other workloads in the
    tuning logs in ``logs_dir`` (None, missing or empty: nothing to borrow from). Returns
    ``(mod, TransferReport)``."""
    import shutil

    from pipeline.tuning.kernel_check import GATHER_NOT_CHECKED, first_agreeing, reads_by_index

    report = TransferReport()
    todo = _unscheduled(mod)
    if not todo or logs_dir is None or not any(Path(logs_dir).glob("database_*")):
        report.kept_naive.update({g.name_hint: "no tuning logs to borrow from" for g, _ in todo})
        return mod, report
    database, scratch = open_logs(logs_dir)
    try:
        by_kind = records_by_kind(database)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    candidates: dict[str, list] = {}
    naive: dict[str, object] = {}
    sources: dict[str, list[str]] = {}
    for gvar, func in todo:
        name = gvar.name_hint
        if reads_by_index(func):
            report.kept_naive[name] = GATHER_NOT_CHECKED
            continue
        if not has_reduction(func):
            # a borrowed trace on an elementwise/layout kernel gains little and can take LLVM
            # half a minute to compile (inception_v2's transposes: up to 33 s each)
            report.kept_naive[name] = "no reduction (elementwise or layout): not transferred"
            continue
        ranked = _ranked(func, by_kind)[:MAX_TRIES]
        if not ranked:
            report.kept_naive[name] = "no record of a kernel with the same blocks"
            continue
        naive[name] = func
        candidates[name] = [(lambda f=func, r=record: _replayed(r, f).mod["main"])
                            for _, _, record in ranked]
        sources[name] = ["x".join(str(int(d)) for d in e[1].params[0].shape) + " " +
                         (e[1].attrs["global_symbol"] if e[1].attrs is not None and
                          "global_symbol" in e[1].attrs else "main") for e in ranked]
    if not candidates:
        return mod, report
    chosen, why_not = first_agreeing(naive, candidates, target, check=check, stage="compile")
    for gvar, _ in list(mod.functions_items()):
        name = gvar.name_hint
        if name in chosen:
            rank, func = chosen[name]
            mod[gvar] = func.with_attr("tirx.is_scheduled", True)
            report.transferred[name] = f"record of a kernel with input {sources[name][rank]}"
        elif name in why_not:
            report.kept_naive[name] = why_not[name]
    return mod, report


def seed_schedules(mod, by_kind: dict, limit: int = 2) -> list:
    """Schedules of ``mod``'s kernel (an IRModule with ``main``, a tuning task's workload) by
    the nearest records of kernels of its kind (:func:`records_by_kind`), decisions adapted,
    at most ``limit``; empty where there is no such record or the kernel is not one
    :func:`transfer_schedules` would transfer. The tuner measures them as the task's first
    candidates (prior-guided search: MetaSchedule's evolutionary search starts from a
    workload's best records)."""
    from pipeline.compiler.weight_prepack import is_twin
    from pipeline.tuning.kernel_check import reads_by_index

    func = mod["main"]
    if reads_by_index(func) or not has_reduction(func):
        return []
    # a weight-packing twin (pipeline.compiler.weight_prepack) gets each borrowed schedule
    # twice: as recorded (weights unpacked: the twin's records then always hold the plain
    # schedule, measured beside the packed ones) and with its weights packed
    twin = is_twin(func)
    schedules = []
    for _, _, record in _ranked(func, by_kind):
        if twin:
            schedules += twin_seeds(func, [record])
        else:
            try:
                schedules.append(_replayed(record, func))
            except Exception:  # noqa: BLE001  (TVM raises its own error types; the next)
                continue
        if len(schedules) >= limit * (2 if twin else 1):
            break
    return schedules


def twin_seeds(func, records) -> list:
    """A weight-packing twin's first schedules: each of its plain kernel's ``records``
    replayed as it is (weights unpacked) and with its weights packed."""
    schedules = []
    for record in records:
        for replay in (_replayed, _replayed_packed):
            try:
                schedules.append(replay(record, func))
            except Exception:  # noqa: BLE001  (TVM raises its own error types; skip it)
                continue
    return schedules


def _replayed_packed(record, func):
    """:func:`_replayed`, then MetaSchedule's CPU postprocessors run again on the result,
    ``RewriteLayout`` among them: the weights ``func`` marks layout-free are packed into the
    order the schedule's loops read them. Raises if it does not replay."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    # (no adapt_unroll_steps: before the postprocessors the unroll step is still the
    # block annotation the trace sampled, which they turn into the loops' pragma)
    record.trace.apply_to_schedule(sch, remove_postproc=True,
                                   decision_provider=adapting_decisions(sch))
    sch.enter_postproc()
    context = ms.TuneContext(mod=sch.mod, target=record.target,
                             space_generator="post-order-apply",
                             search_strategy="evolutionary")
    for postproc in ms.postproc.Postproc.create("llvm"):
        postproc._initialize_with_tune_context(context)  # noqa: SLF001  (TVM's own hook)
        if not postproc.apply(sch):
            raise ValueError(f"{type(postproc).__name__} rejects the packed schedule")
    return sch
