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


def test_onnxruntime_nodes_are_identified_by_their_work():
    from pipeline.runtime.ort_profile import node_signature

    # 3x3 conv 64 -> 128 to 7x7: each output takes 64 * 9 MACs
    assert node_signature("Conv", [[1, 64, 14, 14], [128, 64, 3, 3], [128]],
                          [[1, 128, 7, 7]]) == (128 * 49 * 576, 128 * 49)
    # depthwise (groups 32): weight [32, 1, 3, 3]
    assert node_signature("Conv", [[1, 32, 8, 8], [32, 1, 3, 3]],
                          [[1, 32, 8, 8]]) == (32 * 64 * 9, 32 * 64)
    # QLinearConv: the weight is input 3
    assert node_signature("QLinearConv", [[1, 8, 4, 4], [], [], [16, 8, 1, 1]],
                          [[1, 16, 4, 4]]) == (16 * 16 * 8, 16 * 16)
    # ... unless onnxruntime prepacked it (then it is not listed): the graph's shape serves
    prepacked = [[1, 4, 4, 8], [], [], [16], [16], [], [], [16]]  # NHWC, as it runs it
    assert node_signature("QLinearConv", prepacked, [[1, 4, 4, 16]]) is None
    assert node_signature("QLinearConv", prepacked, [[1, 4, 4, 16]], [16, 8, 1, 1]) == (
        16 * 16 * 8, 16 * 16)
    assert node_signature("MatMul", [[1, 128, 256], [256, 64]], [[1, 128, 64]]) == (
        128 * 64 * 256, 128 * 64)
    assert node_signature("Relu", [[1, 8]], [[1, 8]]) is None
    assert node_signature("Conv", [[1, 8, 4, 4]], [[1, 16, 4, 4]]) is None  # shapes left out


def _convnet16():
    """Conv 3 -> 16 (3x3) + Relu, Conv 16 -> 32 (1x1, stride 2) + Relu, GAP, Gemm 32 -> 10:
    channels in onnxruntime's NCHWc blocks of 16 (it pads others, and their work with them)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, shape):
        return numpy_helper.from_array((0.2 * rng.standard_normal(shape)).astype(np.float32),
                                       name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "convnet16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w("w1", (16, 3, 3, 3)), w("b1", (16,)), w("w2", (32, 16, 1, 1)), w("b2", (32,)),
         w("fc", (10, 32)), w("fcb", (10,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_tvm_kernels_meet_onnxruntime_nodes_on_the_same_model(tmp_path):
    """The real onnxruntime profile of a small convnet and the same model lowered by TVM:
    each conv and the matmul find their onnxruntime node; pools and copies stay apart."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.lowering import graph_cleanup, lower_for_target
    from pipeline.core.targets import get_target, tvm_target
    from pipeline.runtime import ort_profile

    model = _convnet16()
    path = tmp_path / "convnet16.onnx"
    onnx.save(model, path)
    nodes = ort_profile.profile_onnxruntime(path, threads=1, repeat=3, warmup=1)
    assert all(n.us >= 0 for n in nodes)
    mod = graph_cleanup()(from_onnx(model, shape_dict={"x": [1, 3, 16, 16]}))
    work = kernel_flops.module_kernel_work(
        lower_for_target(mod, tvm_target(get_target("cpu")), "float32", ""))
    kernels = [{"name": name, "us": 10.0, "calls": 1} for name in work]
    result = ort_profile.compare(kernels, work, nodes)
    groups = {g["macs"]: g for g in result["groups"]}
    # the 3x3 conv (16 x 16x16 outputs, 27 MACs each), the 1x1 stride-2 conv, the Gemm
    assert sorted(groups) == [32 * 10, 32 * 8 * 8 * 16, 16 * 16 * 16 * 27], groups
    assert all(len(g["kernels"]) == 1 and len(g["nodes"]) == 1 for g in groups.values())
    assert "conv2d" in groups[16 * 16 * 16 * 27]["kernels"][0]
    assert "matmul" in groups[32 * 10]["kernels"][0]
    assert result["tvm_unmatched_us"] == pytest.approx(10.0 * (len(work) - 3))
    assert result["ort_unmatched_us"] > 0  # the pool, the reorders
    assert "| ratio | lost ms |" in ort_profile.format_comparison(result)


def test_the_comparison_puts_the_most_time_lost_first():
    from pipeline.runtime.ort_profile import OrtNode, compare, format_comparison

    work = {"conv_a": kernel_flops.KernelWork(2 * 1000, "a", 10),
            "conv_b": kernel_flops.KernelWork(2 * 1000, "b", 10),  # same work as conv_a
            "conv_c": kernel_flops.KernelWork(2 * 50, "c", 5),
            "pool": kernel_flops.KernelWork(0, "", 0)}
    kernels = [{"name": "conv_a", "us": 300.0, "calls": 1},
               {"name": "conv_b", "us": 200.0, "calls": 2},
               {"name": "conv_c", "us": 90.0, "calls": 1},
               {"name": "pool", "us": 5.0, "calls": 1}]
    nodes = [OrtNode("n1", "Conv", 100.0, (1000, 10)), OrtNode("n2", "Conv", 150.0, (1000, 10)),
             OrtNode("n3", "Conv", 100.0, (50, 5)), OrtNode("relu", "Relu", 7.0, None)]
    result = compare(kernels, work, nodes)
    first, second = result["groups"]
    assert first["kernels"] == ["conv_a", "conv_b"] and first["nodes"] == ["n1", "n2"]
    assert first["ratio"] == pytest.approx(2.0) and first["lost_us"] == pytest.approx(250.0)
    assert second["ratio"] == pytest.approx(0.9)  # faster than onnxruntime: last
    assert result["tvm_unmatched_us"] == 5.0 and result["ort_unmatched_us"] == 7.0
    table = format_comparison(result)
    assert table.index("conv_a, conv_b") < table.index("conv_c")
    assert "| 0.500 | 0.250 | 2.00x | +0.250 |" in table


def test_the_reference_onnx_is_the_quantized_model_or_the_source(tmp_path):
    (tmp_path / "m" / "source").mkdir(parents=True)
    (tmp_path / "m" / "source" / "model.onnx").write_bytes(b"x")
    assert roofline.reference_onnx(tmp_path, "m_int8_dynamic") == (
        tmp_path / "m" / "source" / "model.onnx")
    (tmp_path / "m_int8" / "quantize").mkdir(parents=True)
    (tmp_path / "m_int8" / "quantize" / "model.onnx").write_bytes(b"x")
    assert roofline.reference_onnx(tmp_path, "m_int8") == (
        tmp_path / "m_int8" / "quantize" / "model.onnx")
    assert roofline.reference_onnx(tmp_path, "other_fp32") is None
