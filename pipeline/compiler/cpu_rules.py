"""Default CPU schedules from rules, for kernels that neither a tuning record nor a transferred
schedule covers (DLight-style: no search, no timing, the same schedule every build).

Before these rules such kernels compiled as naive loops: one thread, no vectors. Which kernels:
elementwise and layout kernels (a transpose, a masked add) that the transfer leaves alone,
and reductions with no record of their kind to borrow from (a new normalisation, a sum).
The rules, tried in order:

- TVM's DLight CPU rule ``GEMV`` (matrix-vector);
- :class:`TiledReduction`: one reduction after its spatial loops (a conv or matmul of a kind
  no record covers): reduction loops inside, a 4 x vector-wide register tile innermost,
  outer spatial loops parallel (measured on the zoo's shufflenet, whose grouped convs no
  record covers: 39 -> 25 ms a run, 2 threads);
- DLight's CPU ``Reduction`` (softmax, layer norm: the batch axes in parallel, the injective
  parts vectorised);
- :class:`Injective`: every block inlined into the last one, its loops fused into one, cut
  into a vector-wide inner loop and a parallel outer one;
- :class:`SpatialParallel`: for anything else with a reduction (a matmul or conv of a new
  kind), producers and consumers inlined where they can be, and the leading spatial loops
  of each remaining block fused and run in parallel.

Every rule schedule is checked against the naive kernel like a tuned record
(:mod:`pipeline.tuning.kernel_check`) before a build uses it.
"""

from __future__ import annotations

import math
import re

# Below this many output elements a parallel loop costs more than it saves: waking the
# thread pool takes a few microseconds, a vectorised pass over 4096 floats about one.
MIN_PARALLEL_ELEMENTS = 4096
# Kernels of fewer loop iterations (all blocks) keep naive loops: ~20 us at most, less than
# the two builds that would check a schedule for them cost at compile time.
MIN_ITERATIONS = 1 << 14


def _vector_lanes(target, bits: int) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // max(bits, 8), 2)


def _largest_divisor(extent: int, limit: int) -> int:
    for factor in range(min(limit, extent), 1, -1):
        if extent % factor == 0:
            return factor
    return 1


def _const(sch, loop) -> int | None:
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _index_divisors(sch, block, spatial: int) -> list[int]:
    """The constants the last spatial axis of ``block`` is divided by (or taken modulo) in
    its reads: a grouped conv reads input channel ``c // 68 * 68 + rc``. A vector tile must
    divide them, or one vector straddles two groups and its loads become gathers."""
    stmt = sch.get(block)
    var = stmt.iter_vars[spatial - 1].var.name
    pattern = re.compile(rf"\b{re.escape(var)} (?://|%) T\.int64\((\d+)\)")
    return [int(c) for read in stmt.reads for c in pattern.findall(str(read))]


def _rules():
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base.common_schedules import try_inline
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    def output_bits(sch, block) -> int:
        writes = sch.get(block).writes
        return writes[0].source.dtype.bits if writes else 32

    class Rule(CPUScheduleRule):
        """A CPU rule's common start: the kernel's schedule and its blocks in normal form
        (None: not a PrimFunc, not a CPU target, or no normal form)."""

        def start(self, func, target):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None, None
            sch = s_tir.Schedule(func)
            return sch, normalize_prim_func(sch)

    class Injective(Rule):
        """Kernels without a reduction: one fused loop, vector-wide inside, parallel outside
        where the kernel is large enough to pay for waking the threads."""

        def apply(self, func, target, _):
            sch, infos = self.start(func, target)
            if not infos or not all(info.is_injective() for info in infos):
                return None
            for info in try_inline(sch, infos):
                loops = sch.get_loops(info.block_rv)
                if not loops:
                    continue
                fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                extent = _const(sch, fused)
                if extent is None:
                    return None
                lanes = _largest_divisor(extent, _vector_lanes(target, output_bits(
                    sch, info.block_rv)))
                outer = fused
                if lanes > 1:
                    outer, inner = sch.split(fused, [extent // lanes, lanes])
                    sch.vectorize(inner)
                if extent >= MIN_PARALLEL_ELEMENTS:
                    sch.parallel(outer)
            return sch

    class TiledReduction(Rule):
        """One reduction block with its spatial loops first (a conv or matmul of a kind no
        record covers, e.g. NCHW grouped convs): the reduction loops moved inside the
        spatial ones, with a register tile innermost (the last spatial axis, contiguous in
        the output, vector-wide; the one before it 4 wide, unrolled), the outer spatial
        loops fused and parallel, elementwise consumers computed per parallel chunk."""

        def apply(self, func, target, _):
            sch, infos = self.start(func, target)
            if not infos:
                return None
            rest = try_inline(sch, infos)
            reductions = [i for i in rest if not i.is_injective()]
            if len(reductions) != 1:
                return None
            (red,) = reductions
            kind = red.dom_kind()
            spatial = len(kind) - len(kind.lstrip("S"))
            if spatial < 2 or kind[spatial:].strip("R") or rest.index(red) != 0:
                return None  # not spatial-then-reduction, or work before the reduction
            loops = sch.get_loops(red.block_rv)
            extents = [_const(sch, loop) for loop in loops]
            if None in extents:
                return None
            lanes = _largest_divisor(
                math.gcd(extents[spatial - 1], *_index_divisors(sch, red.block_rv, spatial)),
                _vector_lanes(target, output_bits(sch, red.block_rv)))
            if lanes < 2:
                return None
            # narrow vectors (a grouped conv's 34-channel groups: 2 lanes) get more rows
            rows = _largest_divisor(extents[spatial - 2], max(4, 32 // lanes))
            row_out, row_in = sch.split(loops[spatial - 2], [extents[spatial - 2] // rows,
                                                             rows])
            col_out, col_in = sch.split(loops[spatial - 1], [extents[spatial - 1] // lanes,
                                                             lanes])
            outer = [*loops[:spatial - 2], row_out, col_out]
            sch.reorder(*outer, *loops[spatial:], row_in, col_in)
            fused = sch.fuse(*outer)
            sch.parallel(fused)
            sch.unroll(row_in)
            sch.vectorize(col_in)
            init = sch.decompose_reduction(red.block_rv, loops[spatial])
            sch.vectorize(sch.get_loops(init)[-1])
            for info in rest[1:]:  # the epilogue, per parallel chunk
                sch.reverse_compute_at(info.block_rv, fused)
                inner = sch.get_loops(info.block_rv)[1:]
                if inner:
                    last = sch.fuse(*inner) if len(inner) > 1 else inner[0]
                    extent = _const(sch, last)
                    width = _largest_divisor(extent or 1, _vector_lanes(
                        target, output_bits(sch, info.block_rv)))
                    if width > 1:
                        _, vec = sch.split(last, [extent // width, width])
                        sch.vectorize(vec)
            return sch

    class SpatialParallel(Rule):
        """Anything with a reduction that the other rules do not take: the leading spatial
        loops of each block (after inlining what inlines) fused into one parallel loop."""

        def apply(self, func, target, _):
            sch, infos = self.start(func, target)
            if not infos:
                return None
            parallel = False
            for info in try_inline(sch, infos):
                leading = len(info.dom_kind()) - len(info.dom_kind().lstrip("S"))
                loops = sch.get_loops(info.block_rv)[:leading]
                if not loops:
                    continue
                fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                if (_const(sch, fused) or 0) > 1:
                    sch.parallel(fused)
                    parallel = True
            return sch if parallel else None

    return Injective, TiledReduction, SpatialParallel


def rule_schedule(func, target):
    """``(rule name, scheduled PrimFunc)`` by the first rule that applies to ``func``, or
    None where none does."""
    ruled = rule_schedule_traced(func, target)
    return None if ruled is None else (ruled[0], ruled[1].mod["main"])


def rule_schedule_traced(func, target):
    """``(rule name, s_tir.Schedule)`` (with its trace: the tuner files it as a record) by
    the first rule that applies to ``func``, or None where none does."""
    from tvm.s_tir import dlight as dl

    injective, tiled_reduction, spatial_parallel = _rules()
    with target:
        # the tiled rule before DLight's Reduction, which would take a conv with an
        # epilogue too (parallel, but a scalar reduction)
        for rule in (dl.cpu.GEMV(), tiled_reduction(), dl.cpu.Reduction(), injective(),
                     spatial_parallel()):
            try:
                sch = rule.apply(func, target, False)
            except Exception:  # noqa: BLE001  (a rule that cannot take this kernel: the next)
                continue
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                return type(rule).__name__, sch
    return None


def iterations(func) -> int | None:
    """Loop iterations of a naive kernel, summed over its blocks (None: symbolic extents)."""
    import math

    from tvm import s_tir

    sch = s_tir.Schedule(func)
    total = 0

    def walk(block):
        nonlocal total
        for child in sch.get_child_blocks(block):
            extents = [_const(sch, loop) for loop in sch.get_loops(child)]
            if None in extents:
                raise ValueError("symbolic extent")
            total += math.prod(extents)
            walk(child)

    try:
        walk(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001  (symbolic shapes, no root block)
        return None
    return total


def schedule_by_rules(mod, target, names, check: bool = True):
    """Schedule the PrimFuncs ``names`` of ``mod`` by :func:`rule_schedule`, each checked
    against its naive self. Returns ``(mod, {name: rule}, {name: why it kept naive loops})``.
    Left out: kernels that read by index (gathers: random inputs cannot check them) and
    kernels under :data:`MIN_ITERATIONS` loop iterations."""
    from pipeline.tuning.kernel_check import GATHER_NOT_CHECKED, first_agreeing, reads_by_index

    funcs = {gvar.name_hint: (gvar, func) for gvar, func in mod.functions_items()
             if gvar.name_hint in set(names)}
    naive, candidates, rules, why_not = {}, {}, {}, {}
    for name, (_, func) in sorted(funcs.items()):
        if reads_by_index(func):
            why_not[name] = GATHER_NOT_CHECKED
            continue
        work = iterations(func)
        if work is not None and work < MIN_ITERATIONS:
            why_not[name] = f"too small to gain from a schedule ({work} loop iterations)"
            continue
        ruled = rule_schedule(func, target)
        if ruled is None:
            why_not[name] = "no default rule applies"
            continue
        rules[name], scheduled = ruled
        naive[name] = func
        candidates[name] = [lambda f=scheduled: f]
    if not candidates:
        return mod, {}, why_not
    chosen, failed = first_agreeing(naive, candidates, target, check=check, stage="compile")
    for name, why in failed.items():
        why_not[name] = f"the {rules[name]} rule's schedule: {why}"
    for name, (_, func) in chosen.items():
        mod[funcs[name][0]] = func.with_attr("tirx.is_scheduled", True)
    return mod, {name: rules[name] for name in chosen}, why_not
