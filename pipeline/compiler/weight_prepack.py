"""Weights prepacked at compile time in the order a CPU kernel reads them.

A tuned conv or matmul reads its weight in tiles: a 1x1 conv's HWIO weight [Cin, Cout] is
walked as, say, 4 input channels x 64 output channels at a time, rows 2-8 KiB apart. Inside
a model the weights arrive cold (100 MB for ResNet-50 fp32, far more than the caches), so
how they are laid out decides how well the hardware prefetcher keeps up. onnxruntime's MLAS
packs every weight once, at session start, into the exact order its kernels stream it.

MetaSchedule can do the same per kernel: a PrimFunc whose ``layout_free_buffers`` attribute
names its weight parameters lets the ``RewriteLayout`` postprocessor rewrite those buffers
into the tiled loop nest's access order (a ``layout_rewrite_preproc`` block in front of the
kernel); Relax's ``SplitLayoutRewritePreproc`` moves that block into a function of its own,
and since the weights are constants until :func:`pipeline.compiler.params.lift_constants`
runs, ``FoldConstant`` evaluates it at compile time. ``model.params`` then holds the packed
weights and the app's interface does not change.

Whether packing pays is kernel by kernel. Measured (ResNet-50 fp32, AMD EPYC Zen 4, 2
threads, each kernel's committed schedule replayed with the weight packed, cold caches):
the 3x3 stride-2 conv 512 @7x7 2.25 -> 1.52 ms, the 1x1 stride-2 1024 @14x14 1.30 -> 1.06,
the 3x3 256 @14x14 (x5) 1.20 -> 1.16; but the 1x1 512 @28x28 1.19 -> 1.87 and the 1x1
stride-2 2048 @7x7 1.20 -> 1.43. So a kernel is packed only where its *twin* (the same
PrimFunc with the attribute: a workload of its own in the tuning database) has tuning
records at least as fast as its own (:func:`prefer_prepacked`), and a twin starts from its
plain kernel's best records replayed both unpacked and packed
(:func:`pipeline.tuning.transfer.twin_seeds`), so the twin's best record is itself a
measured choice between packed and not.
``doit build:<artifact> tune=extend prepack=on`` tunes the twins.
"""

from __future__ import annotations

import math

LAYOUT_FREE = "layout_free_buffers"
PREPROC_BLOCK = "meta_schedule.layout_rewrite_preproc"
SPLIT_SUFFIX = "_prepacked"  # SplitLayoutRewritePreproc's name for a kernel it splits


def constant_args(mod) -> dict[str, tuple[int, ...]]:
    """For each PrimFunc ``main`` calls with ``call_tir``: the positions of the arguments
    that are constants at every call (the weights), by the function's name."""
    from tvm import ir, relax

    seen: dict[str, set[int]] = {}
    call_tir = ir.Op.get("relax.call_tir")

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            super().visit_call_(call)
            if call.op.same_as(call_tir) and isinstance(call.args[0], ir.GlobalVar):
                args = call.args[1].fields
                weights = {i for i, a in enumerate(args) if isinstance(a, ir.Constant)}
                name = call.args[0].name_hint
                seen[name] = seen[name] & weights if name in seen else weights

    _Calls().visit_expr(mod["main"])
    return {name: tuple(sorted(found)) for name, found in seen.items() if found}


def twins(mod, names=None) -> dict[str, object]:
    """``{kernel name: its twin}`` for the kernels of ``mod`` (or those in ``names``) that
    reduce (convs, matmuls) over constant weights: the same PrimFunc with
    ``layout_free_buffers`` naming those weights."""
    from tvm import tirx

    from pipeline.compiler.workloads import has_reduction

    out = {}
    for name, weights in sorted(constant_args(mod).items()):
        if names is not None and name not in names:
            continue
        func = mod[name]
        if not isinstance(func, tirx.PrimFunc) or not has_reduction(func):
            continue
        out[name] = func.with_attr(LAYOUT_FREE, [int(i) for i in weights])
    return out


def with_twins(mod, names) -> object:
    """``mod`` with the kernels in ``names`` replaced by their twins."""
    import tvm

    chosen = twins(mod, set(names))
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs,
                       global_infos=mod.global_infos)
    for gvar in list(out.get_global_vars()):
        if gvar.name_hint in chosen:
            out[gvar] = chosen[gvar.name_hint]
    return out


def prefer_prepacked(mod, target, database, wanted=()):
    """``(mod', names)``: ``mod`` with each kernel whose twin's best record in ``database``
    is at least as fast as its own best (or that has none), or whose name is in ``wanted``
    (twins about to be tuned), replaced by its twin; ``names`` lists them. CPU targets
    only: elsewhere ``mod`` is returned as is.

    The tune stage publishes from a database ranked for this CPU (each workload's records
    of this CPU, measured cold, where it has any), so the twin and its plain kernel are
    compared on like times, and it publishes only the variant chosen; compile, on that
    published database, then chooses the same. A twin that measured slower than its plain
    kernel (its seeds replayed another CPU's record, say) is never compiled."""
    from pipeline.compiler.workloads import plan_tasks
    from pipeline.tuning.logs import FAILED_RUN_SECS

    if target.kind.name != "llvm":
        return mod, []
    candidates = twins(mod)
    if not candidates:
        return mod, []
    chosen = set(wanted) & set(candidates)
    if database is not None:
        plain = {p.name: p for p in plan_tasks(mod, target) if p.name in candidates}

        def best(workload_mod) -> float:
            """The workload's fastest measured time (inf: none, or only failed ones)."""
            if not database.has_workload(workload_mod):
                return math.inf
            records = database.get_top_k(database.commit_workload(workload_mod), 1)
            secs = ([float(t) for t in records[0].run_secs]
                    if records and records[0].run_secs else [])
            return sum(secs) / len(secs) if secs and max(secs) < FAILED_RUN_SECS else math.inf

        for plan in plan_tasks(with_twins(mod, candidates), target):
            if plan.name not in candidates or plan.name in chosen:
                continue
            twin_secs = best(plan.task.dispatched[0])
            if twin_secs < math.inf and (plan.name not in plain or twin_secs <= best(
                    plain[plan.name].task.dispatched[0])):
                chosen.add(plan.name)
    return (with_twins(mod, chosen), sorted(chosen)) if chosen else (mod, [])


def fold_packed_weights(mod, target):
    """After scheduling: each kernel's weight-packing block becomes a function of its own
    (``SplitLayoutRewritePreproc``), evaluated on the constant weights now
    (``FoldConstant``); the packing functions, then unused, are dropped."""
    from tvm import relax, tirx, transform

    with target:
        mod = transform.Sequential([
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ])(mod)
    # the split names each kernel "<name>_prepacked": it gets its own name back, the one
    # the tuning report, the roofline and tune_tasks= know it by (through a public symbol:
    # NormalizeGlobalVar renames a function to its global_symbol)
    names = {gvar.name_hint for gvar in mod.get_global_vars()}
    renamed = []
    for gvar, func in list(mod.functions_items()):
        name = gvar.name_hint.removesuffix(SPLIT_SUFFIX)
        if isinstance(func, tirx.PrimFunc) and name != gvar.name_hint and name not in names:
            mod[gvar] = func.with_attr("global_symbol", name)
            renamed.append(name)
    if renamed:
        mod = relax.transform.NormalizeGlobalVar()(mod)
        for gvar, func in list(mod.functions_items()):
            if gvar.name_hint in renamed:
                mod[gvar] = func.without_attr("global_symbol")
    return mod


def is_twin(func) -> bool:
    """Whether a PrimFunc is a weight-packing twin (marks layout-free weights)."""
    return func.attrs is not None and LAYOUT_FREE in func.attrs


def packs_weights(func) -> bool:
    """Whether a scheduled PrimFunc rewrites a weight's layout (has a packing block)."""
    return PREPROC_BLOCK in func.script()
