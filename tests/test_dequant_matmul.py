"""The fused dequantize-matmul kernel and its hand schedule (pipeline.compiler.dequant_matmul)."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.compiler import dequant_matmul as dm
from pipeline.schemes import blockwise as bw


def _weight(rng, k, n, bits, block, zeros):
    n_blocks = -(-k // block)
    codes = rng.integers(0, 1 << bits, size=(k, n), dtype=np.uint8)
    zp = rng.integers(0, 1 << bits, size=(n_blocks, n), dtype=np.uint8) if zeros else None
    scales = (rng.random((n_blocks, n)) * 0.1 + 0.01).astype(np.float16)
    return bw.BlockwiseWeight(k, n, bits, block, bw.pack_rows(codes, bits), scales,
                              None if zp is None else bw.pack_rows(zp, bits))


def _run(func, args, out_shape):
    import tvm

    from pipeline.core.targets import get_target, tvm_target

    func = func.with_attr("global_symbol", "main")
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=tvm_target(get_target("cpu")))
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    out = tvm.runtime.empty(out_shape, "float32", dev)
    lib["main"](*tensors, out)
    return out.numpy()


@pytest.mark.parametrize("m,k,n,bits,block,zeros", [
    (1, 256, 128, 4, 32, True), (1, 256, 128, 4, 32, False), (3, 96, 48, 4, 32, True),
    (17, 200, 64, 4, 128, False),   # K not a multiple of the group
    (1, 97, 32, 4, 16, True),       # odd K
    (2, 256, 256, 8, 128, True)])
def test_hand_schedule_computes_what_the_definition_does(m, k, n, bits, block, zeros):
    rng = np.random.default_rng(m * k + n)
    weight = _weight(rng, k, n, bits, block, zeros)
    x = rng.standard_normal((m, k)).astype(np.float32)
    func = dm.prim_func(m, k, n, bits, block, "float16", zeros)
    scheduled = dm.schedule_cpu(func)
    assert not scheduled.same_as(func)
    args = [x, weight.codes, weight.scales] + ([weight.zeros] if zeros else [])
    expected = x.astype(np.float64) @ bw.dequantize(weight).astype(np.float64)
    for f in (func, scheduled):
        got = _run(f, args, (m, n))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_a_width_the_vectors_do_not_divide_keeps_the_naive_loops():
    func = dm.prim_func(1, 64, 40, 4, 32, "float16", False)
    assert dm.schedule_cpu(func).same_as(func)
    assert dm.has_kernel(func)


def test_compile_schedules_fused_kernels_by_rule_and_reports_them(tmp_path: Path):
    """The block-wise MLP, lowered as compile lowers it: bias add and ReLU fuse into the
    kernel, the rule schedules both fused kernels, the report names them as untuned."""
    import copy

    import onnx
    import tvm
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from tvm import relax

    from models import tiny_mlp_rows
    from pipeline.compiler.lowering import graph_cleanup
    from pipeline.stages.compile_model import lower_and_schedule
    from pipeline.stages.import_model import ImportConfig, import_onnx

    q = MatMulNBitsQuantizer(copy.deepcopy(tiny_mlp_rows(n=64)), bits=4, block_size=32,
                             is_symmetric=True)
    q.process()
    onnx.save(q.model.model, str(tmp_path / "q.onnx"))
    mod = graph_cleanup()(import_onnx(tmp_path / "q.onnx",
                                      ImportConfig(inputs=(("x", (1, 3, 96), "float32"),))))
    plain = tvm.compile(mod, target="llvm")
    scheduled, target, report = lower_and_schedule(mod, "cpu", "float32", None)
    assert sorted(report["rule_scheduled"]) == sorted(
        k for k in report["untuned"] if "dequant_matmul" in k)
    assert any("relu" in k for k in report["rule_scheduled"]), report
    fast = tvm.compile(scheduled, target=target)
    x = np.random.default_rng(1).standard_normal((1, 3, 96)).astype(np.float32)
    outs = [relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
            for ex in (plain, fast)]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_every_tuning_decision_of_the_template_replays(tmp_path: Path):
    """MetaSchedule replays the template's trace with other sampled decisions (the column
    unroll, the row tile) when it evolves candidates; an instruction whose output count
    depended on them (get_loops after a unit loop vanished) failed every BERT tune."""
    import copy
    import itertools

    import onnx
    import tvm
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from models import tiny_mlp_rows
    from pipeline.compiler.lowering import graph_cleanup, lower_for_target
    from pipeline.compiler.workloads import plan_tasks
    from pipeline.core.targets import get_target, tvm_target
    from pipeline.stages.import_model import ImportConfig, import_onnx

    q = MatMulNBitsQuantizer(copy.deepcopy(tiny_mlp_rows(n=64, rows=4)), bits=4, block_size=32,
                             is_symmetric=True)
    q.process()
    onnx.save(q.model.model, str(tmp_path / "q.onnx"))
    target = tvm_target(get_target("cpu"))
    mod = lower_for_target(graph_cleanup()(import_onnx(
        tmp_path / "q.onnx", ImportConfig(inputs=(("x", (1, 4, 96), "float32"),)))),
        target, "float32", "")
    dm.register_tuning_rule()
    plan = next(p for p in plan_tasks(mod, target) if "relu" in p.name)
    workload = plan.task.dispatched[0]
    ctx = ms.TuneContext(mod=workload, target=target, space_generator="post-order-apply",
                         task_name=plan.name)
    (space,) = ctx.generate_design_space()
    trace = space.trace
    sampled = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    assert len(sampled) >= 2  # unroll and row tile (+ MetaSchedule's unroll_explicit)
    choices = [range(len(inst.attrs[0])) for inst in sampled]
    for decisions in itertools.product(*choices):
        replay = trace
        for inst, d in zip(sampled, decisions, strict=True):
            replay = replay.with_decision(inst, tvm.runtime.convert(d), remove_postproc=False)
        sch = s_tir.Schedule(workload)
        replay.apply_to_schedule(sch, remove_postproc=False)
