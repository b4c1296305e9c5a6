"""pipeline.tuning.kernel_check: a record whose kernel computes something else is skipped."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.script import tirx as T

from pipeline.tuning import kernel_check

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _elementwise(op):
    """A 64x64 float32 kernel ``B = op(A)`` as a one-function IRModule."""

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((64, 64), "float32"), B: T.Buffer((64, 64), "float32")):
        for i, j in T.grid(64, 64):
            with T.sblock("B"):
                vi, vj = T.axis.remap("SS", [i, j])
                B[vi, vj] = op(A[vi, vj])

    return tvm.IRModule({"main": main})


def _record(workload_mod, seconds: float, split: bool = False):
    """A tuning record for ``workload_mod``: no schedule, or its inner loop split in two."""
    from tvm import s_tir

    sch = s_tir.Schedule(workload_mod)
    if split:
        _, j = sch.get_loops(sch.get_sblock("B"))
        sch.split(j, factors=[None, 16])
    return ms.database.TuningRecord(sch.trace, ms.database.Workload(workload_mod),
                                    [seconds], TARGET)


def test_the_fastest_record_that_agrees_is_chosen_and_wrong_ones_are_reported():
    task = _elementwise(lambda a: a * T.float32(2))
    # The fastest "record" replays on a kernel that adds instead of doubling: a stand-in for
    # a miscompiled schedule (same buffers, other values). The next one is right.
    wrong = _record(_elementwise(lambda a: a + T.float32(2)), 1e-6)
    right = _record(task, 2e-6, split=True)
    messages = []
    chosen, verdicts = kernel_check.check_records(
        {"double": (task, [wrong, right])}, TARGET, progress=messages.append)
    assert chosen["double"] is right
    (verdict,) = verdicts
    assert verdict.chosen_rank == 1
    assert len(verdict.rejected) == 1 and "max abs diff" in verdict.rejected[0]
    assert any("record 0 computes WRONG results" in m for m in messages)


def test_a_workload_with_only_wrong_records_gets_none():
    task = _elementwise(lambda a: a * T.float32(2))
    chosen, verdicts = kernel_check.check_records(
        {"double": (task, [_record(_elementwise(lambda a: a - T.float32(1)), 1e-6)])},
        TARGET, progress=lambda _: None)
    assert chosen == {}
    assert not verdicts[0].ok and len(verdicts[0].rejected) == 1


def test_a_right_fastest_record_is_kept_at_rank_zero():
    task = _elementwise(lambda a: a * T.float32(2))
    best = _record(task, 1e-6, split=True)
    chosen, verdicts = kernel_check.check_records(
        {"double": (task, [best, _record(task, 2e-6)])}, TARGET, progress=lambda _: None)
    assert chosen["double"] is best and verdicts[0].chosen_rank == 0
    assert verdicts[0].rejected == []


def test_integer_outputs_must_match_exactly():
    got = [np.array([1, 2, 3], dtype="int32")]
    assert kernel_check._disagreement(got, [got[0].copy()]) is None
    assert "1 of 3 elements differ" in kernel_check._disagreement(
        got, [np.array([1, 2, 4], dtype="int32")])


def test_floats_agree_within_summation_order_tolerance_only():
    want = [np.full(4, 100.0, dtype="float32")]
    assert kernel_check._disagreement([want[0] + 1e-3], want) is None  # reordered sums
    assert kernel_check._disagreement([want[0] + 1.0], want) is not None
