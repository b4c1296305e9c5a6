"""The roofline report: the measured peak is plausible, and the FLOPs and rates are right."""

from __future__ import annotations

import pytest

from pipeline.compiler import kernel_flops
from pipeline.core.errors import ConfigError
from pipeline.core.targets import host_has_vnni
from pipeline.runtime import roofline
from pipeline.runtime.profile import KernelTime


def test_peak_probe_measures_a_plausible_fp32_rate():
    (peak,) = roofline.measure_peak(kinds=("fp32",), threads=(1,), seconds=0.05, repeat=1)
    assert peak.isa in ("avx512f", "avx2-fma")
    # one x86 core: a few GFLOP/s (a throttled VM) to a few hundred (two 512-bit FMA pipes)
    assert 1 < peak.gops < 1000, peak


@pytest.mark.skipif(not host_has_vnni(), reason="host CPU has no AVX512-VNNI")
def test_a_vnni_instruction_does_four_times_the_work_of_an_fma():
    # vpdpbusd: 64 u8 x s8 MACs per zmm, vfmadd: 16: at the same issue rate int8 is ~4x
    # fp32 (2x at least on any core that has both): a wrong op count would show here
    # best of 3: a neighbour busy during one run of one kind only ever slows that run
    fp32, int8 = roofline.measure_peak(threads=(1,), seconds=0.05, repeat=3)
    assert int8.isa == "avx512-vnni"
    assert 2 < int8.gops / fp32.gops < 8, (fp32, int8)


def test_bad_probe_arguments_are_refused():
    with pytest.raises(ConfigError, match="kinds must be among"):
        roofline.measure_peak(kinds=("fp64",))
    with pytest.raises(ConfigError, match="threads >= 1"):
        roofline.measure_peak(threads=(0,))


def test_textbook_conv_count():
    # ResNet-50's first layer: 7x7, 3 -> 64, stride 2 to 112x112: 118 M multiply-accumulates
    assert kernel_flops.conv2d_flops(1, 64, 112, 112, 3, 7, 7) == 2 * 118_013_952
    with pytest.raises(ValueError, match="divisible by groups"):
        kernel_flops.conv2d_flops(1, 8, 4, 4, 6, 3, 3, groups=4)


def _lowered(build, compute_dtype="float32"):
    import tvm
    from tvm import relax

    from pipeline.compiler.lowering import lower_for_target

    bb = relax.BlockBuilder()
    build(bb, relax)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    return lower_for_target(bb.get(), target, compute_dtype, "")


def test_a_lowered_conv_counts_its_macs_and_not_its_epilogue_or_pool():
    def build(bb, relax):
        x = relax.Var("x", relax.TensorType((1, 64, 14, 14), "float32"))
        w = relax.Var("w", relax.TensorType((128, 64, 3, 3), "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                y = bb.emit(relax.op.nn.conv2d(x, w, strides=2, padding=1))
                y = bb.emit(relax.op.nn.relu(y))
                y = bb.emit(relax.op.nn.avg_pool2d(y, pool_size=7))
                out = bb.emit_output(y)
            bb.emit_func_output(out)

    work = kernel_flops.module_kernel_work(_lowered(build))
    conv = [w for name, w in work.items() if "conv2d" in name]
    assert len(conv) == 1
    # stride 2, pad 1: 14x14 -> 7x7
    assert conv[0].flops == kernel_flops.conv2d_flops(1, 128, 7, 7, 64, 3, 3)
    assert "7x7x128 * 3x3x64" in conv[0].label  # NHWC: n, h, w, k * kh, kw, c
    assert all(w.flops == 0 for name, w in work.items() if "conv2d" not in name), work


def test_an_integer_matmul_counts_through_its_casts():
    def build(bb, relax):
        a = relax.Var("a", relax.TensorType((4, 64), "uint8"))
        b = relax.Var("b", relax.TensorType((64, 32), "int8"))
        with bb.function("main", [a, b]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.matmul(a, b, out_dtype="int32"))
            bb.emit_func_output(out)

    work = kernel_flops.module_kernel_work(_lowered(build, "int8"))
    assert sum(w.flops for w in work.values()) == 2 * 4 * 64 * 32, work


def test_rates_shares_and_peak_fractions():
    times = [KernelTime("conv", us=1000.0, calls=2), KernelTime("pool", us=250.0, calls=1)]
    work = {"conv": kernel_flops.KernelWork(50_000_000, "conv"),
            "pool": kernel_flops.KernelWork(0, "")}
    conv, pool = roofline.kernel_rows(times, work)
    assert conv.flops == 100_000_000  # called twice per run
    assert conv.gops == pytest.approx(100.0)  # 1e8 FLOP in 1 ms
    assert conv.of_peak(200.0) == pytest.approx(0.5)
    assert conv.share == pytest.approx(0.8) and pool.share == pytest.approx(0.2)
    assert pool.gops is None and pool.of_peak(200.0) is None
    summary = roofline.summarize([conv, pool], 200.0)
    assert summary["mac_gops"] == pytest.approx(100.0)
    assert summary["model_gops"] == pytest.approx(80.0)  # 1e8 FLOP in 1.25 ms
    assert summary["mac_of_peak"] == pytest.approx(0.5)
    table = roofline.format_rows([conv, pool], 200.0, "GFLOP")
    assert "| conv | conv | 2 | 1.000 | 80.0% | 0.100 | 100 | 50% |" in table


def test_a_missing_artifact_says_how_to_build_it(tmp_path):
    with pytest.raises(ConfigError, match="doit build:resnet50_fp32 tune=off"):
        roofline.artifact_dirs(tmp_path, "resnet50_fp32")


def test_peak_drift_is_the_largest_relative_change():
    def peaks(one_thread, two_threads):
        return [roofline.Peak("fp32", "avx512f", 1, one_thread),
                roofline.Peak("fp32", "avx512f", 2, two_threads),
                roofline.Peak("int8", None, 1, None)]  # no VNNI: never counts

    before, after = peaks(100e9, 200e9), peaks(90e9, 140e9)
    assert roofline.peak_drift(before, after) == pytest.approx(0.3)
    assert roofline.peak_drift(before, before) == 0.0
