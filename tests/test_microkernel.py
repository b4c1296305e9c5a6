"""The micro-kernel search space: MetaSchedule tensorizes an NHWC conv to the fp32
register-blocked intrinsic (checked in the TIR of its design spaces, no measurement)."""

from __future__ import annotations

import pytest

from pipeline.tuning import microkernel


def _nhwc_conv(width: int = 14, channels: int = 64):
    import tvm
    from tvm import relax

    from pipeline.compiler.lowering import lower_for_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, width, width), "float32"))
    w = relax.Var("w", relax.TensorType((channels, channels, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=1))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    lowered = lower_for_target(bb.get(), target, "float32", "NHWC")
    (conv,) = [f for gv, f in lowered.functions_items() if "conv2d" in gv.name_hint]
    return tvm.IRModule({"main": conv}), target


def _design_spaces(mod, target, space):
    from tvm.s_tir import meta_schedule as ms

    context = ms.TuneContext(mod=mod, target=target, space_generator=space,
                             task_name="conv", rand_state=0)
    spaces = []
    for sch in context.generate_design_space():
        # as in tuning: a candidate whose postprocessing fails is dropped (e.g. the padding
        # inlined into the conv, which no longer matches the intrinsic's A[i, k] load)
        if all(postproc.apply(sch) for postproc in context.space_generator.postprocs):
            spaces.append(sch.mod)
    return spaces


def test_an_nhwc_conv_is_tensorized_to_the_microkernel():
    mod, target = _nhwc_conv()
    spaces = _design_spaces(mod, target, microkernel.fp32_microkernel_space())
    tensorized = [s for s in spaces if microkernel.uses_intrinsic(s)]
    assert tensorized
    # the micro-kernel's 7 rows over the output width, 32 columns over output channels
    assert "T.alloc_local((T.int64(7), T.int64(32)))" in tensorized[0].script()


def test_the_default_space_does_not_use_it():
    mod, target = _nhwc_conv()
    spaces = _design_spaces(mod, target, "post-order-apply")
    assert spaces and not any(microkernel.uses_intrinsic(s) for s in spaces)


def test_a_conv_that_does_not_fit_falls_back_to_default_tiling():
    # 8 output channels: fewer than the micro-kernel's 32 columns
    mod, target = _nhwc_conv(width=14, channels=8)
    spaces = _design_spaces(mod, target, microkernel.fp32_microkernel_space())
    assert spaces and not any(microkernel.uses_intrinsic(s) for s in spaces)


def test_a_missing_artifact_kernel_is_named(tmp_path):
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="doit build:resnet50_fp32 tune=off"):
        microkernel.artifact_kernel(tmp_path, "resnet50_fp32", "fused_conv2d16_add9_relu7")
