"""int8 and float16 CUDA kernels on tensor cores, checked without a GPU.

A tiny conv + matmul model (dimensions of 32 and more, so the tensor-core gate takes every
layer) is quantized, imported and compiled for h100 in this process, as the pipeline does:
- the compile report lists its conv and matmul kernels under ``tensor_cores``; the CUDA
  source the executable carries uses WMMA, and nvcc's PTX for sm_90 holds the
  ``wmma.mma.sync`` of the format (s8 x s8 -> s32, f16 x f16 -> f32);
- the rewrite that makes them tensor-core shaped (convs as im2col matmuls, u8 activations as
  s8 + a constant: pipeline/compiler/passes/cuda_tensor_cores.py) computes the same numbers
  on llvm: int8 bit-identical, float16 within float32 reordering.
What runs unverified: the kernels themselves (no GPU here) and their speed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from float_models import build_in_process
from onnx import TensorProto, helper, numpy_helper

SHAPE = (1, 32, 16, 16)
# the PTX instruction of each format's tensor-core kernels (nvcc 13, sm_90; for f16 the PTX
# names the accumulator types only)
PTX_MMA = {"int8": "wmma.mma.sync.aligned.row.col.m16n16k16.s32.s8.s8.s32",
           "fp16": "wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32"}  # f16 inputs implied


def conv_matmul(seed: int = 0) -> onnx.ModelProto:
    """x [1,32,16,16] -> Conv 3x3 (32, pad 1) + Relu -> Conv 1x1 (64) -> Reshape [1,64,256]
    -> MatMul [256, 32] -> y [1, 64, 32]: 32..256 rows, columns and reductions each."""
    rng = np.random.default_rng(seed)

    def w(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    inits = [w("c1.w", (32, 32, 3, 3), 0.06), w("c1.b", (32,), 0.1),
             w("c2.w", (64, 32, 1, 1), 0.18), w("c2.b", (64,), 0.1),
             w("mm.w", (256, 32), 0.06),
             numpy_helper.from_array(np.array([1, 64, 256], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1] * 4, name="c1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="c2"),
             helper.make_node("Reshape", ["c2", "shape"], ["flat"], name="flat"),
             helper.make_node("MatMul", ["flat", "mm.w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "conv_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [1, 64, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module", params=["int8", "fp16"])
def built(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"tc_{request.param}")
    result = build_in_process(conv_matmul(), request.param, SHAPE, work, target="h100")
    result["scheme"] = request.param
    result["module"] = work / "import" / "module.json"
    result["report"] = json.loads((work / "compile" / "compile_report.json").read_text())
    return result


def test_conv_and_matmul_kernels_are_on_tensor_cores(built, tmp_path):
    from pipeline.stages.package import cuda_kernel_sources

    report = built["report"]
    forms = report["tensor_core_forms"]
    assert forms["convs"] == 2 and not forms["kept"], forms
    assert forms["matmuls"] == (1 if built["scheme"] == "int8" else 0)  # u8 -> s8
    tc = report["tensor_cores"]
    # two convs (as matmuls) and the MatMul, each one kernel on tensor cores
    assert sum("matmul" in k for k in tc) == 3, tc
    source = "\n".join(cuda_kernel_sources(built["so"]))
    assert "wmma::mma_sync" in source
    if built["scheme"] == "int8":
        assert "int32 accumulation" in report["int8_compute"]
        assert "3 kernel(s) on tensor cores" in report["int8_compute"]
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc missing: the CUDA source was checked, not the PTX")
    cu = tmp_path / "kernels.cu"
    cu.write_text(source)
    ptx = tmp_path / "kernels.ptx"
    subprocess.run(["nvcc", "-arch=sm_90", "-ptx", "-o", str(ptx), str(cu)], check=True,
                   capture_output=True)
    mmas = set(re.findall(r"wmma\.mma\.sync[\w.]*", ptx.read_text()))
    assert mmas == {PTX_MMA[built["scheme"]]}, mmas


def test_tensor_core_forms_compute_the_same_numbers_on_cpu(built):
    import tvm
    from tvm import relax

    from pipeline.compiler.lowering import graph_cleanup
    from pipeline.compiler.passes.cuda_tensor_cores import tensor_core_forms
    from pipeline.compiler.workloads import load_module

    mod = graph_cleanup()(load_module(built["module"]))
    rewritten, stats = tensor_core_forms(mod)
    assert stats["convs"] == 2
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    outs = []
    for m in (mod, rewritten):
        ex = tvm.compile(m, target="llvm")
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    if built["scheme"] == "int8":
        np.testing.assert_array_equal(outs[1], outs[0])  # the same integers, requantized
    else:
        scale = max(1.0, float(np.abs(outs[0]).max()))
        assert np.abs(outs[1] - outs[0]).max() <= 1e-2 * scale


def test_one_row_matmuls_stay_off_tensor_cores():
    """A batch-1 classifier head (1 row) would waste 127 of 128 rows of a tensor-core tile:
    the gate leaves it to GEMV."""
    import tvm
    from tvm import te

    from pipeline.compiler.cuda_schedules import tensor_core_rule
    from pipeline.core.targets import get_target, tvm_target

    target = tvm_target(get_target("h100"))
    rule = tensor_core_rule()

    def matmul(rows):
        a = te.placeholder((rows, 256), "int8", name="A")
        b = te.placeholder((256, 128), "int8", name="B")
        k = te.reduce_axis((0, 256), name="k")
        c = te.compute((rows, 128), lambda i, j: te.sum(
            a[i, k].astype("int32") * b[k, j].astype("int32"), axis=k), name="C")
        return te.create_prim_func([a, b, c])

    with target:
        assert rule.apply(matmul(1), target, False) is None
        sch = rule.apply(matmul(64), target, False)
    assert sch is not None
    func = sch.mod["main"]
    assert "wmma.matrix_a" in func.script()
    assert "software_pipeline_stage" not in func.script()  # TVM 0.27 fails on it (int8)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("tirx.is_scheduled", True)}),
                      target=target)
    assert "wmma::mma_sync" in lib.mod.imports[0].inspect_source()
