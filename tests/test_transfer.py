"""Schedules transferred from records of other kernels (pipeline.tuning.transfer): a kernel
with no tuning record of its own borrows the trace of a kernel of the same kind."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.targets import get_target, tvm_target
from pipeline.tuning import transfer

REPO = Path(__file__).resolve().parent.parent
CPU_LOGS = REPO / "models" / "tuning_logs" / "cpu-x86_64-avx512-vnni"


def _conv_relu(channels: int = 24, size: int = 20) -> onnx.ModelProto:
    """A 3x3 conv + bias + ReLU at a shape no committed record has (ResNet-50's convs are
    64-2048 channels at 7-112 pixels)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(channels) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _lowered(model):
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.lowering import graph_cleanup, lower_for_target

    target = tvm_target(get_target("cpu"))
    return lower_for_target(graph_cleanup()(from_onnx(model, keep_params_in_input=False)),
                            target, "float32", ""), target


def _kernels(mod) -> dict:
    from tvm import tirx

    return {g.name_hint: f for g, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def test_tile_decisions_adapt_to_new_extents():
    """Inner factors are kept where they divide what is left; the outermost takes the rest,
    so the product is always the new extent."""

    class Loop:
        def __init__(self, extent):
            self.extent = extent

    class Kind:
        name = "SamplePerfectTile"

    class Inst:
        kind = Kind()

    class Sch:
        extent = 0

        def get(self, _):
            return Loop(self.extent)

    sch = Sch()
    for extent, old, new in ((20, [1, 7, 2, 8], [1, 2, 2, 5]), (64, [2, 4, 2, 4], [2, 4, 2, 4]),
                             (7, [1, 1, 7, 1], [1, 1, 7, 1]), (13, [2, 2, 2, 2], [13, 1, 1, 1])):
        sch.extent = extent
        got = transfer.adapting_decisions(sch)(Inst(), ["loop"], [], old)
        assert got == new and int(np.prod(got)) == extent


@pytest.mark.slow  # opens the committed logs (replays ~1000 records) and builds kernels
def test_a_conv_of_a_new_shape_borrows_a_checked_schedule_from_the_committed_logs():
    import tvm

    from pipeline.tuning.kernel_check import _build, _random_args, _run

    mod, target = _lowered(_conv_relu())
    naive = _kernels(mod)
    scheduled, report = transfer.transfer_schedules(mod, CPU_LOGS, target)
    convs = [name for name in naive if "conv2d" in name]
    assert convs and set(convs) <= set(report.transferred), report.as_dict()
    after = _kernels(scheduled)
    for name in convs:
        script = after[name].script()
        assert "T.parallel" in script and "T.vectorized" in script  # no longer naive loops
        # the same numbers as the naive kernel (the transfer checked this; checked again)
        args = _random_args(naive[name], 3)
        want = _run(_build({name: naive[name]}, target), name, args)
        got = _run(_build({name: after[name]}, target), name, args)
        np.testing.assert_allclose(got[-1], want[-1], rtol=1e-4, atol=1e-4)
    assert isinstance(scheduled, tvm.IRModule)


def test_without_logs_every_kernel_keeps_naive_loops_and_says_why(tmp_path):
    mod, target = _lowered(_conv_relu(channels=8, size=6))
    same, report = transfer.transfer_schedules(mod, tmp_path / "none", target)
    assert not report.transferred and report.kept_naive
    assert set(report.kept_naive.values()) == {"no tuning logs to borrow from"}
    assert same is mod


@pytest.mark.slow  # opens the committed logs and builds/measures two candidates
def test_the_tuner_starts_a_new_kernel_from_schedules_of_its_kind(tmp_path):
    """Prior-guided search: a conv with no record gets, before any search, records measured
    from the schedules borrowed from kernels of its kind; they replay on its workload (what
    MetaSchedule's evolutionary search starts from) and are parallel and vectorised."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.workloads import plan_tasks
    from pipeline.tuning import logs, tuner

    mod, target = _lowered(_conv_relu())
    logs.merge([CPU_LOGS], tmp_path / "db")
    database = logs.open_database(tmp_path / "db")
    conv = next(p for p in plan_tasks(mod, target) if "conv2d" in p.name)
    assert not database.has_workload(conv.task.dispatched[0])  # a shape no record has
    measured, best_us = tuner._seed_from_kind(
        database, conv, transfer.records_by_kind(database), ms.runner.LocalRunner(),
        tuner.local_builder("llvm", 120))
    assert measured >= 1 and best_us is not None
    records = database.get_top_k(database.commit_workload(conv.task.dispatched[0]), 8)
    assert 1 <= len(records) <= measured
    for record in records:
        sch = s_tir.Schedule(conv.task.dispatched[0])
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        script = sch.mod.script()
        assert "T.parallel" in script and "T.vectorized" in script
    # the stock search (seed_from_kind=False) would have started from random samples only
    assert tuner.TuneBudget().seed_from_kind and not tuner.TuneBudget(
        seed_from_kind=False).seed_from_kind


@pytest.mark.slow  # builds and measures one candidate
def test_a_kernel_with_nothing_to_borrow_starts_from_its_rule_schedule(tmp_path):
    """With no record of its kind anywhere, the tuner's first record of a conv is its default
    rule schedule (cpu_rules): filed with its trace, it survives the database on disk and
    replays to the very kernel the rule gives."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import cpu_rules
    from pipeline.compiler.workloads import plan_tasks
    from pipeline.tuning import logs, tuner

    mod, target = _lowered(_conv_relu())
    (tmp_path / "db").mkdir()
    database = logs.open_database(tmp_path / "db")  # empty: nothing to borrow
    conv = next(p for p in plan_tasks(mod, target) if "conv2d" in p.name)
    measured, best_us = tuner._seed_from_kind(
        database, conv, {}, ms.runner.LocalRunner(), tuner.local_builder("llvm", 120))
    assert measured == 1 and best_us is not None
    reopened = logs.open_database(tmp_path / "db")
    (record,) = reopened.get_top_k(reopened.commit_workload(conv.task.dispatched[0]), 8)
    sch = s_tir.Schedule(conv.task.dispatched[0])
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    rule, ruled = cpu_rules.rule_schedule(conv.task.dispatched[0]["main"], target)
    assert rule == "TiledReduction"
    tvm.ir.assert_structural_equal(sch.mod["main"], ruled)


def _tiled_matmul(n: int, inner: int, step: int):
    """A (16 x 64) @ (64 x n) matmul tiled like a MetaSchedule CPU record: a parallel outer
    loop carrying the auto-unroll ``step``, then k, then an ``inner``-wide column tile and a
    2-row tile innermost."""
    import tvm
    from tvm import s_tir, te

    a = te.placeholder((16, 64), name="a")
    b = te.placeholder((64, n), name="b")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((16, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([a, b, c])}))
    i, j, kk = sch.get_loops(sch.get_sblock("matmul"))
    i0, i1 = sch.split(i, [8, 2])
    j0, j1 = sch.split(j, [n // inner, inner])
    sch.reorder(i0, j0, kk, j1, i1)
    outer = sch.fuse(i0, j0)
    sch.parallel(outer)
    sch.annotate(outer, transfer.UNROLL_KEY, step)
    return sch, outer


def test_unroll_steps_adapt_so_the_same_loop_levels_unroll():
    """A record's unroll step is a literal: at step 64 a source tile of 48x2 keeps its
    48-loop (96 > 64) while a 32x2 tile would unroll whole (64 <= 64), which LLVM then
    vectorised along the wrong loop (bert-mini's FFN: 12.4 ms instead of 0.33). The adapted
    step unrolls only the 2-row loop, as in the source."""
    source, _ = _tiled_matmul(1536, 48, 64)
    target, outer = _tiled_matmul(1024, 32, 64)
    assert transfer._unrolled_levels([64, 48, 2], 64) == 1
    assert transfer._unrolled_levels([64, 32, 2], 64) == 2  # what the literal step would do
    transfer.adapt_unroll_steps(source, target)
    step = int(target.get(outer).annotations[transfer.UNROLL_KEY])
    assert step == 2 and transfer._unrolled_levels([64, 32, 2], step) == 1
    # where the same levels unroll already, the step is left as it was
    same, outer = _tiled_matmul(1024, 64, 64)
    transfer.adapt_unroll_steps(source, same)
    assert int(same.get(outer).annotations[transfer.UNROLL_KEY]) == 64
