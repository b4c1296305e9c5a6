"""The FP8 E4M3 tensor-core matmul (pipeline/compiler/fp8_mma.py), tested without a GPU.

- The tensorized kernel cross-compiles for sm_89 and sm_90, and the generated CUDA source and
  nvcc's PTX hold the FP8 ``mma.sync`` instruction (no GPU runs it here).
- The same definition with integer conversions ("bits") runs on llvm and agrees with the
  numpy reference of the same arithmetic (the project's codec, exact products); the
  activation quantize is bit-exact against the codec and against ``ml_dtypes``.
- The ``fp8_e4m3`` scheme built for h100 runs its (tiling) matmuls on that kernel (W8A8),
  and the same rewrite emulated on llvm stays within the scheme's GPU gate.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.compiler import fp8_mma
from pipeline.schemes import fp8

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc (CUDA toolkit) is needed to produce PTX")


def _cuda_source(target_name: str, m: int, n: int, k: int) -> str:
    import tvm

    from pipeline.core.targets import get_target, tvm_target

    target = tvm_target(get_target(target_name))
    func = fp8_mma.schedule_cuda(fp8_mma.prim_func(m, n, k), target)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    return lib.mod.imports[0].inspect_source()


@pytest.mark.parametrize("target,sm", [("h100", 90), ("rtx4090", 89)])
def test_tensorized_kernel_emits_fp8_mma_sync(target, sm, tmp_path):
    source = _cuda_source(target, 64, 128, 256)
    assert fp8_mma.MMA_INSTRUCTION in source
    assert "ldmatrix.sync.aligned" in source  # fragments come from shared memory
    # every mma of the kernel is the FP8 one: no fallback to another format
    assert set(re.findall(r"mma\.sync\.aligned[\w.]*", source)) == {fp8_mma.MMA_INSTRUCTION}
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc missing: the CUDA source was checked, not the PTX")
    cu = tmp_path / "kernel.cu"
    cu.write_text(source)
    ptx = tmp_path / "kernel.ptx"
    subprocess.run(["nvcc", f"-arch=sm_{sm}", "-ptx", "-o", str(ptx), str(cu)], check=True,
                   capture_output=True)
    text = ptx.read_text()
    assert f".target sm_{sm}" in text
    # 64 x 128 x 256 with 32 x 64 tiles: 8 K steps x 2 fragments x 2 m16n8 halves per warp,
    # unrolled or not, at least one FP8 mma in the PTX
    assert fp8_mma.MMA_INSTRUCTION in text


def _run_bits_on_cpu(x, x_scale, codes, w_scale):
    import tvm

    m, k = x.shape
    n = codes.shape[0]
    lib = tvm.compile(tvm.IRModule({"main": fp8_mma.prim_func(m, n, k, "bits")}),
                      target="llvm")
    dev = tvm.cpu()
    args = [np.asarray(x, np.float32), np.array([x_scale], np.float32),
            np.array([1 / np.float32(x_scale)], np.float32), codes,
            np.asarray(w_scale, np.float32)]
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
    lib(*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy()


def test_same_arithmetic_on_cpu_matches_the_numpy_reference():
    rng = np.random.default_rng(0)
    m, n, k = 32, 64, 96
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :8] = 0.0  # zeros: TVM's own fp8 decode on llvm turns 0 into 2**-7 (FACTS.md)
    x[1, :4] = [1e-4, -3e-3, 2e-3, 1e-6]  # subnormals of E4M3 after scaling
    x_scale = np.float32(np.abs(x).max() / 448)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w_scale = (np.abs(w).max(axis=1) / 448).astype(np.float32)
    codes = fp8.encode(w / w_scale[:, None])
    got = _run_bits_on_cpu(x, x_scale, codes, w_scale)
    ref = fp8_mma.reference(x, x_scale, 1 / x_scale, codes, w_scale)
    # float32 sums in another order: a few ulps of the sum of |products|
    bound = 8 * np.finfo(np.float32).eps * (
        np.abs(fp8.decode(fp8.encode(np.clip(x / x_scale, -448, 448))))
        @ np.abs(fp8.decode(codes)).T * x_scale * w_scale[None, :]).max()
    assert np.abs(got - ref).max() <= bound
    # and it is FP8 arithmetic, not float32: the quantization shows against float32
    exact = x @ (fp8.decode(codes) * w_scale[:, None]).T
    assert np.abs(got - exact).max() > 100 * bound


def test_activation_quantize_is_bit_exact_to_the_codec_and_ml_dtypes():
    import ml_dtypes

    # identity weights (code 0x38 = 1.0, scale 1): Y[:, j] is the decoded E4M3 of X[:, j]
    k = n = 64
    rng = np.random.default_rng(1)
    values = np.concatenate([
        rng.standard_normal(800) * 10,
        rng.uniform(-2.0 ** -6, 2.0 ** -6, 400),  # subnormal range
        np.array([448, -448, 500, -1e9, 464, 0.0, -0.0, 2.0 ** -10, 2.0 ** -9 * 1.5]),
        # exact ties between two E4M3 values: 1 + 1/16 lies between 1 and 1.125
        np.array([1.0625, 1.1875, -1.0625, 2.0 ** -9 * 2.5, 2.0 ** -9 * 3.5]),
    ]).astype(np.float32)
    m = -(-values.size // k) // 32 * 32 + 32
    x = np.zeros((m, k), np.float32)
    x.flat[:values.size] = values
    codes = np.zeros((n, k), np.uint8)
    codes[np.arange(n), np.arange(k)] = 0x38
    got = _run_bits_on_cpu(x, np.float32(1.0), codes, np.ones(n, np.float32))
    clipped = np.clip(x, -448, 448)
    np.testing.assert_array_equal(got, fp8.decode(fp8.encode(clipped)))
    np.testing.assert_array_equal(got, clipped.astype(ml_dtypes.float8_e4m3fn)
                                  .astype(np.float32))


def test_refuses_targets_without_fp8_tensor_cores_and_shapes_it_cannot_tile():
    import tvm

    sm80 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host="llvm")
    with pytest.raises(ValueError, match="no FP8 tensor cores.*sm_89"):
        fp8_mma.schedule_cuda(fp8_mma.prim_func(32, 64, 32), sm80)
    with pytest.raises(ValueError, match=r"m=30 \(a multiple of 32\)"):
        fp8_mma.check_shape(30, 64, 32)
    with pytest.raises(ValueError, match="conversions 'int'"):
        fp8_mma.prim_func(32, 64, 32, "int")


# ------------------------------------------- the fp8_e4m3 scheme on h100: W8A8 on tensor cores

@pytest.fixture(scope="module")
def fp8_h100(tmp_path_factory):
    from float_models import build_in_process

    from models import tiny_mlp_rows

    work = tmp_path_factory.mktemp("fp8_h100")
    # two matmuls that tile (multiples of 32 x 64 x 32)
    model = tiny_mlp_rows(k=128, hidden=128, n=64, rows=64)
    result = build_in_process(model, "fp8_e4m3", (1, 64, 128), work, target="h100")
    result["report"] = json.loads((work / "compile" / "compile_report.json").read_text())
    result["module"] = work / "import" / "module.json"
    return result


def test_fp8_e4m3_artifact_for_h100_runs_its_matmuls_on_fp8_tensor_cores(fp8_h100, tmp_path):
    from pipeline.stages.package import cuda_kernel_sources

    report = fp8_h100["report"]
    assert report["fp8_tensor_cores"] == {"matmuls": 2, "kept": []}
    fp8 = [k for k in report["tensor_cores"] if k.startswith("fp8_mma")]
    assert len(fp8) == 2 and set(fp8) <= set(report["rule_scheduled"]), report
    source = "\n".join(cuda_kernel_sources(fp8_h100["so"]))
    assert set(re.findall(r"mma\.sync\.aligned[\w.]*", source)) == {fp8_mma.MMA_INSTRUCTION}
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc missing: the CUDA source was checked, not the PTX")
    cu = tmp_path / "kernels.cu"
    cu.write_text(source)
    subprocess.run(["nvcc", "-arch=sm_90", "-ptx", "-o", str(tmp_path / "k.ptx"), str(cu)],
                   check=True, capture_output=True)
    assert fp8_mma.MMA_INSTRUCTION in (tmp_path / "k.ptx").read_text()


def test_one_row_fp8_matmuls_keep_the_decode_kernel():
    """A one-row matmul (a decoder step) does not tile: it stays on the decode kernel, whose
    GEMV reads the same bytes, and the report says why."""
    import tvm
    from tvm import relax

    from pipeline.compiler import dequant_matmul
    from pipeline.compiler.passes.fp8_tensor_cores import fp8_tensor_core_matmuls

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 128], "float32"))
    codes = fp8.encode(np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32))
    with bb.function("main", [x]):
        gv = bb.add_func(dequant_matmul.code_prim_func((1,), 128, 64, "fp8_e4m3", True),
                         "dequant_matmul")
        y = bb.emit(relax.call_tir(gv, [x, relax.const(codes),
                                        relax.const(np.ones(64, np.float32))],
                                   relax.TensorType([1, 64], "float32")))
        bb.emit_func_output(y)
    mod, stats = fp8_tensor_core_matmuls(bb.get(), tvm.target.Target("llvm"), "bits")
    assert stats["matmuls"] == 0 and "m=1 (a multiple of 32)" in stats["kept"][0]


def test_w8a8_on_cpu_is_the_kernels_arithmetic_and_within_the_gpu_gate(fp8_h100):
    """The h100 artifact's rewrite with the llvm-runnable kernel: what the GPU computes,
    emulated. Against the float32-activation model (what onnxruntime runs, to 4e-7) it is
    FP8-quantization far (not equal) and inside the scheme's GPU gate."""
    import tvm
    from tvm import relax

    from pipeline.compiler.lowering import graph_cleanup
    from pipeline.compiler.passes.fp8_tensor_cores import fp8_tensor_core_matmuls
    from pipeline.compiler.workloads import load_module
    from pipeline.schemes import get_scheme

    mod = graph_cleanup()(load_module(fp8_h100["module"]))
    w8a8, stats = fp8_tensor_core_matmuls(mod, None, "bits")
    assert stats["matmuls"] == 2
    x = np.random.default_rng(3).standard_normal((1, 64, 128)).astype(np.float32)
    outs = [relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy() for m in (mod, w8a8)]
    ref, got = outs
    rel = np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max()))
    cosine = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    gates = get_scheme("fp8_e4m3").default_gates
    assert 1e-3 < rel <= gates["gpu_rel_tol"], rel
    assert cosine >= gates["quality_cosine_min"] and cosine >= 0.999, cosine
