"""Check tuned kernels against their untuned selves before a build uses them.

MetaSchedule measures candidates for speed only, never for what they compute, so the fastest
record of a workload can be wrong. Seen on 2026-11-30 on a Zen 5 host: the best record of an
int8 3x3 convolution (VNNI, unrolled, LLVM 22, ``mcpu=znver5`` and ``znver4`` alike) gave
~20% wrong outputs, varying from process to process, which made the C++ app and the Python
VM disagree. A record tuned and right on one CPU can also be miscompiled for another (the
logs are shared per ISA class).

So before the tune stage publishes a workload's record, the scheduled kernel and the same
kernel unscheduled (naive loops: the lowering's own definition of the operator) are built
for the host, run on the same seeded random inputs, and compared: integers exactly, floats
within a tolerance for summation order. The fastest record that agrees is published; records
that do not are skipped and reported, and a workload none of whose records agrees gets no
record (compile then names it as untuned: slow, but right).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# A buffer access whose index holds another buffer access: ``A[idx[i], j]`` (take, gather,
# embedding lookups). The T.reads/T.writes lines are skipped: they list regions, not loads.
_INDEXED_LOAD = re.compile(r"\b\w+\[[^\]\n]*\b\w+\[")


# Why a gather keeps the schedule it has, in every report that lists such kernels.
GATHER_NOT_CHECKED = "reads by index (a gather): random inputs cannot check a schedule for it"


def reads_by_index(workload) -> bool:
    """Whether a kernel (a PrimFunc or a module of one) reads a buffer at indices it loads
    from another buffer: random inputs would index out of bounds (a segfault), so neither
    the tuner measures nor the checker runs such a kernel."""
    body = "\n".join(line for line in workload.script().splitlines()
                     if "T.reads(" not in line and "T.writes(" not in line)
    return _INDEXED_LOAD.search(body) is not None


# Floats: |tuned - reference| <= FLOAT_TOL * max(1, max |reference|). Reordered fp32 sums of
# a few thousand terms differ by ~1e-6 of the output's scale; a wrong kernel by ~1.
FLOAT_TOL = 1e-3
MAX_CANDIDATES = 8  # records tried per workload, fastest first (committed logs keep 8)


@dataclass
class KernelVerdict:
    """What checking one workload's records found."""

    name: str
    chosen_rank: int | None = None  # 0 = the fastest record; None = no record agreed
    rejected: list[str] = field(default_factory=list)  # why each faster record was skipped

    @property
    def ok(self) -> bool:
        return self.chosen_rank is not None


def scheduled_func(record):
    """The record's trace replayed on the workload it was tuned on (as compile does)."""
    from tvm import s_tir

    sch = s_tir.Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod["main"]


def _random_args(func, seed: int) -> list[np.ndarray]:
    """Seeded inputs for every buffer parameter (outputs included: they get overwritten)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for param in func.params:  # TVM 0.27: a buffer parameter carries its shape and dtype
        shape = tuple(int(d) for d in param.shape)
        dtype = str(param.dtype)
        if dtype.startswith("float"):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == "bfloat16":  # numpy has no name for it: ml_dtypes' type
            import ml_dtypes

            arrays.append(rng.standard_normal(shape).astype(ml_dtypes.bfloat16))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            info = np.iinfo(dtype)
            # wide integers (biases, accumulators) stay small enough not to overflow
            lo, hi = max(int(info.min), -(1 << 12)), min(int(info.max), 1 << 12)
            arrays.append(rng.integers(lo, hi, shape, endpoint=True).astype(dtype))
    return arrays


def _build(funcs: dict, target):
    """One host library holding every function of ``funcs`` under its key."""
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    return tvm.compile(mod, target=target)


def _run(lib, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import tvm

    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(x.copy(), dev) for x in inputs]
    lib[name](*args)
    return [a.numpy() for a in args]


def _disagreement(got: list[np.ndarray], want: list[np.ndarray]) -> str | None:
    """Why ``got`` is not ``want`` (``None`` when they agree)."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype.kind == "f":
            scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
            diff = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
            if not np.isfinite(diff) or diff > FLOAT_TOL * scale:
                return f"buffer {i}: max abs diff {diff:.3g} > {FLOAT_TOL} x {scale:.3g}"
        elif not np.array_equal(g, w):
            wrong = int(np.count_nonzero(g != w))
            return f"buffer {i}: {wrong} of {w.size} elements differ"
    return None


def check_records(candidates: dict, target, seed: int = 0,
                  progress=print) -> tuple[dict, list[KernelVerdict]]:
    """Pick, per workload, the fastest record whose kernel agrees with the naive kernel.

    ``candidates`` maps a task name to ``(workload_mod, records)`` with records fastest
    first (``tune.valid_records``). Returns ``({name: record}, verdicts)``; a name missing
    from the dict had no record that agreed. Each round builds one library with the next
    candidate of every workload still open, so a model whose best records are all right
    costs two builds.
    """
    names = sorted(n for n, (_, recs) in candidates.items() if recs)
    verdicts = {n: KernelVerdict(n) for n in candidates}
    chosen, _ = first_agreeing(
        {n: candidates[n][0]["main"] for n in names},
        {n: [(lambda r=r: scheduled_func(r)) for r in candidates[n][1]] for n in names},
        target, seed, progress=progress, verdicts=verdicts)
    return ({n: candidates[n][1][rank] for n, (rank, _) in chosen.items()},
            [verdicts[n] for n in sorted(verdicts)])


def first_agreeing(naive: dict, candidates: dict, target, seed: int = 0, check: bool = True,
                   progress=print, verdicts: dict | None = None,
                   stage: str = "tune") -> tuple[dict, dict]:
    """Per kernel name, the first candidate schedule that replays and computes what the
    naive kernel ``naive[name]`` computes. ``candidates[name]`` lists callables that return
    the scheduled PrimFunc (or raise: it does not replay), best first. Returns
    ``({name: (rank, func)}, {name: why none was taken})``. ``check=False`` takes the first
    that replays, unchecked (tests of the checker itself). ``stage`` prefixes the messages."""
    names = sorted(naive)
    verdicts = verdicts if verdicts is not None else {n: KernelVerdict(n) for n in names}
    if check:
        reference_lib = _build({n: naive[n] for n in names}, target)
        inputs = {n: _random_args(naive[n], seed) for n in names}
        expected = {n: _run(reference_lib, n, inputs[n]) for n in names}
    chosen: dict = {}
    open_names = [n for n in names if candidates.get(n)]
    rank = 0
    while open_names:
        funcs, failed_to_schedule = {}, []
        for n in open_names:
            try:
                funcs[n] = candidates[n][rank]()
            except Exception as e:  # a trace that no longer replays is a wrong record too
                verdicts[n].rejected.append(f"record {rank}: trace does not replay ({e})")
                failed_to_schedule.append(n)
        lib = _build(funcs, target) if funcs and check else None
        still_open = []
        for n in open_names:
            if n not in failed_to_schedule:
                why = _disagreement(_run(lib, n, inputs[n]), expected[n]) if check else None
                if why is None:
                    chosen[n] = (rank, funcs[n])
                    verdicts[n].chosen_rank = rank
                    if rank:
                        progress(f"{stage}: {n}: record {rank} (not the fastest) is the first "
                                 "that computes the right result")
                    continue
                verdicts[n].rejected.append(f"record {rank}: {why}")
                progress(f"{stage}: {n}: record {rank} computes WRONG results ({why}); skipped")
            if rank + 1 < len(candidates[n]):
                still_open.append(n)
            else:
                progress(f"{stage}: {n}: none of its {rank + 1} records computes the right "
                         "result; it gets no tuned schedule")
        open_names = still_open
        rank += 1
    why_not = {n: "; ".join(verdicts[n].rejected[-2:]) or "no candidate"
               for n in names if n not in chosen}
    return chosen, why_not
