"""PackInt8ForVNNI: packed NCHW16c integer regions, bit-exact, and tensorized by MetaSchedule."""

from __future__ import annotations

import numpy as np
import pytest
import qdq_helpers as H

from pipeline.compiler.passes.pack_int8_vnni import (
    PackInt8ForVNNI,
    PackInt8MatmulForVNNI,
    pack_conv_weight,
    pack_matmul_weight,
)
from pipeline.compiler.passes.qdq_to_integer import quantize_to_integer
from pipeline.core.targets import host_has_vnni


def _integer_module(model, tmp_path):
    qdq = H.quantize_qdq(model, tmp_path)
    mod, report = quantize_to_integer(H.import_qdq(qdq))
    assert report.unmatched == []
    return qdq, mod


def test_weight_layout_is_vpdpbusd_blocks():
    w = np.random.default_rng(0).integers(-128, 128, (32, 8, 3, 3)).astype(np.int8)
    packed = pack_conv_weight(w, ic_block=8)
    assert packed.shape == (2, 1, 3, 3, 2, 16, 4)
    # [oc_chunk, ic_chunk, kh, kw, ic_block/4, oc_block, 4]
    assert packed[1, 0, 2, 1, 1, 5, 3] == w[1 * 16 + 5, 0 * 8 + 1 * 4 + 3, 2, 1]


# (model, convs packed, layout conversions: only where a tensor enters or leaves a region)
PACK_CASES = {
    "residual": (H.residual_model, 3, 2),
    "classifier": (H.classifier_model, 1, 2),
    "rgb_input": (lambda: H.conv_model(cin=3), 1, 2),  # input channels padded 3 -> 4
    "depthwise": (H.depthwise_model, 2, 4),  # the depthwise conv stays NCHW: two regions
}


@pytest.mark.parametrize("case", sorted(PACK_CASES))
def test_packed_is_bit_exact(case, tmp_path):
    make, convs, transforms = PACK_CASES[case]
    _, mod = _integer_module(make(), tmp_path)
    pack = PackInt8ForVNNI()
    packed = pack(mod)
    assert pack.last_stats == {"convs": convs, "layout_transforms": transforms}
    xs = H.inputs(H.input_shape(make()), 2, seed=3)
    for a, b in zip(H.build_and_run(mod, xs), H.build_and_run(packed, xs)):
        np.testing.assert_array_equal(a, b)


def test_maxpool_stays_packed(tmp_path):
    _, mod = _integer_module(H.maxpool_model(), tmp_path)
    pack = PackInt8ForVNNI()
    packed = pack(mod)
    assert pack.last_stats == {"convs": 2, "layout_transforms": 2}
    assert "NCHW16c" in packed.script(show_meta=False)


def tir_uses_vnni(mod) -> bool:
    """True if TIR calls ``vpdpbusd`` as an LLVM intrinsic, i.e. VNNI was tensorized.

    A vpdpbusd instruction in the binary alone proves nothing: LLVM's auto-vectorizer
    emits a few on its own (FACTS.md).
    """
    return any("call_llvm_pure_intrin" in line and "vpdpbusd" in line
               for line in mod.script().splitlines())


@pytest.mark.slow
@pytest.mark.skipif(not host_has_vnni(), reason="host CPU has no AVX512-VNNI")
def test_metaschedule_tensorizes_packed_conv_with_vnni(tmp_path, monkeypatch):
    """16 tuning trials of one packed conv task give TIR that calls vpdpbusd (~2 min)."""
    import os
    from pathlib import Path

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import intrinsics
    from pipeline.compiler.lowering import lower_for_target
    from pipeline.tuning.tuner import WORKER_INITIALIZERS

    intrinsics.register()
    # builder workers are fresh processes: they must be able to import `pipeline`
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    _, mod = _integer_module(H.conv_model(cin=16, cout=32, hw=14), tmp_path)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
    lowered = lower_for_target(PackInt8ForVNNI()(mod), target, "int8")
    task = next(t for t in ms.relax_integration.extract_tasks(lowered, target)
                if "conv2d_NCHWc_int8" in t.task_name)
    database = ms.tir_integration.tune_tir(
        task.dispatched[0], target, str(tmp_path / "ms"), max_trials_global=16,
        num_trials_per_iter=16, seed=0,
        builder=ms.builder.LocalBuilder(timeout_sec=120, initializer=WORKER_INITIALIZERS["llvm"]))
    sch = ms.tir_integration.compile_tir(database, task.dispatched[0], target)
    assert sch is not None, "no valid tuning record"
    assert tir_uses_vnni(sch.mod)


# ---- matmul ---------------------------------------------------------------------------------
def test_matmul_weight_layout_is_vpdpbusd_blocks():
    w = np.random.default_rng(0).integers(-128, 128, (8, 32)).astype(np.int8)  # [K, N]
    packed = pack_matmul_weight(w)
    assert packed.shape == (2, 2, 16, 4)  # [N/16, K/4, 16 columns, 4 inputs]
    assert packed[1, 1, 5, 3] == w[1 * 4 + 3, 1 * 16 + 5]


def _attention_integer_module(tmp_path):
    qdq = H.quantize_qdq(H.attention_model(), tmp_path, op_types=["MatMul", "Gemm"])
    mod, report = quantize_to_integer(H.import_qdq(qdq))
    assert report.unmatched == []
    return qdq, mod


def test_packed_matmuls_are_bit_exact(tmp_path):
    """The four constant-weight matmuls of an attention block are packed; the two of two
    activations are not (VNNI multiplies a constant s8 operand here)."""
    qdq, mod = _attention_integer_module(tmp_path)
    pack = PackInt8MatmulForVNNI()
    packed = pack(mod)
    assert pack.last_stats == {"matmuls": 4}
    xs = H.inputs(H.input_shape(qdq), 2, seed=3)
    for a, b in zip(H.build_and_run(mod, xs), H.build_and_run(packed, xs)):
        np.testing.assert_array_equal(a, b)


def test_a_head_with_columns_not_a_multiple_of_16_is_packed_and_bit_exact(tmp_path):
    """A 10-class head (ResNet-50's has 1000: 62.5 blocks of 16) runs on VNNI blocks with
    zero columns up to the next 16, the extra outputs sliced off before its epilogue."""
    qdq, mod = _integer_module(H.classifier_model(), tmp_path)
    pack = PackInt8MatmulForVNNI()
    packed = pack(mod)
    assert pack.last_stats == {"matmuls": 1}
    script = packed.script(show_meta=False)
    assert 'R.call_tir(cls.matmul_vnni' in script
    assert 'out_ty=R.Tensor((1, 16), dtype="int32")' in script  # 10 columns + 6 zero ones
    assert "R.strided_slice" in script
    xs = H.inputs(H.input_shape(qdq), 3, seed=5)
    for a, b in zip(H.build_and_run(mod, xs), H.build_and_run(packed, xs)):
        assert a.shape == b.shape == (1, 10)
        np.testing.assert_array_equal(a, b)


def test_metaschedule_space_tensorizes_packed_matmul_with_vnni(tmp_path):
    """Every design space MetaSchedule generates for a packed matmul kernel (with its
    requantize epilogue) is tiled for the VNNI intrinsic."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import intrinsics
    from pipeline.compiler.lowering import lower_for_target

    intrinsics.register()
    _, mod = _attention_integer_module(tmp_path)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    report: dict = {}
    lowered = lower_for_target(mod, target, "int8", report=report)
    assert report["vnni_packed"]["matmuls"] == 4
    tasks = [t for t in ms.relax_integration.extract_tasks(lowered, target)
             if "matmul_vnni" in t.task_name]
    assert tasks
    context = ms.TuneContext(mod=tasks[0].dispatched[0], target=target,
                             space_generator="post-order-apply", task_name="matmul_vnni")
    spaces = context.generate_design_space()
    assert spaces and all(intrinsics.VNNI_DOT_16X4 in str(s.trace) for s in spaces)
