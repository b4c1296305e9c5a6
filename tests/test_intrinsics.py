"""The re-registered VNNI intrinsic: LLVM accepts it and it computes u8 x s8 dot products."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.compiler import intrinsics
from pipeline.core.targets import host_has_vnni


def _tensorized_dot():
    from tvm import s_tir
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def dot(A: T.Buffer((8,), "uint8"), B: T.Buffer((2, 2, 16, 4), "int8"),
            C: T.Buffer((2, 16), "int32")):
        for o, i, k in T.grid(2, 16, 8):
            with T.sblock("update"):
                vo, vi, vk = T.axis.remap("SSR", [o, i, k])
                with T.init():
                    C[vo, vi] = 0
                C[vo, vi] = C[vo, vi] + T.cast(A[vk], "int32") * T.cast(
                    B[vo, vk // 4, vi, vk % 4], "int32")

    sch = s_tir.Schedule(dot)
    block = sch.get_sblock("update")
    o, i, k = sch.get_loops(block)
    k_outer, k_inner = sch.split(k, [2, 4])
    sch.reorder(o, k_outer, i, k_inner)
    sch.decompose_reduction(block, k_outer)
    sch.tensorize(i, intrinsics.VNNI_DOT_16X4)
    return sch.mod


def test_register_is_idempotent_and_replaces_the_stock_impl():
    from tvm.s_tir import TensorIntrin

    intrinsics.register()
    intrinsics.register()
    impl = TensorIntrin.get(intrinsics.VNNI_DOT_16X4).impl.script()
    assert "uint8x64" in impl and "vpdpbusd" in impl


@pytest.mark.skipif(not host_has_vnni(), reason="host CPU has no AVX512-VNNI")
def test_vnni_dot_product_is_exact():
    import tvm

    intrinsics.register()
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
    func = tvm.compile(_tensorized_dot(), target=target)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 8).astype(np.uint8)
    b = rng.integers(-128, 128, (2, 2, 16, 4)).astype(np.int8)
    c = tvm.runtime.tensor(np.zeros((2, 16), np.int32))
    func(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    b_oik = b.transpose(0, 2, 1, 3).reshape(2, 16, 8).astype(np.int32)
    np.testing.assert_array_equal(c.numpy(), np.einsum("k,oik->oi", a.astype(np.int32), b_oik))


LEAN_PROBE = """
import sys, json
from pipeline.compiler import intrinsics
intrinsics.register(sys.argv[1])
import tvm.s_tir.tensor_intrin  # what MetaSchedule does: must not pull in the rest
from tvm.s_tir import TensorIntrin
names = {"vnni": "dot_16x4_vnni", "wmma": "wmma_sync_16x16x16_f16f16f32"}
found = {}
for key, name in names.items():
    try:
        TensorIntrin.get(name)
        found[key] = True
    except Exception:
        found[key] = False
mods = sorted(m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("tvm.s_tir.tensor_intrin."))
print(json.dumps({"found": found, "modules": mods}))
"""


def _probe(kind: str) -> dict:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LEAN_PROBE, kind], capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cpu_process_registers_only_the_cpu_intrinsics():
    # the stock package's __init__ would import cuda, rocm, arm_cpu, hexagon (31 s)
    probe = _probe("llvm")
    assert probe["found"] == {"vnni": True, "wmma": False}
    assert "cuda" not in probe["modules"] and "x86" in probe["modules"], probe


@pytest.mark.slow  # imports the CUDA intrinsics: ~12-25 s
def test_a_cuda_process_also_registers_the_tensor_core_intrinsics():
    probe = _probe("cuda")
    assert probe["found"] == {"vnni": True, "wmma": True}, probe


def test_records_naming_cuda_register_its_intrinsics(monkeypatch):
    kinds = []
    monkeypatch.setattr(intrinsics, "register", kinds.append)
    intrinsics.register_for_records('[0,[[],[]],[1e-5],{"keys":["cpu"],"kind":"llvm"}]')
    assert kinds == ["llvm"]
    kinds.clear()
    intrinsics.register_for_records('[0,[[],[]],[1e-5],{"kind": "cuda","arch":"sm_89"}]')
    assert kinds == ["llvm", "cuda"]


def test_unknown_target_kind_is_refused():
    with pytest.raises(ValueError, match="known: \\['cuda', 'llvm'\\]"):
        intrinsics.register("vulkan")


# --- AMX tile dot products (unmeasured here: the CPUs this was written on have no AMX) ----

AMX_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
# (intrinsic, A dtype, B dtype, C dtype, values per 4-byte group, K per tile, instruction)
AMX_CASES = {
    "int8": (intrinsics.AMX_INT8_16X16X64, "uint8", "int8", "int32", 4, 64, "tdpbusd"),
    "bf16": (intrinsics.AMX_BF16_16X16X32, "bfloat16", "bfloat16", "float32", 2, 32,
             "tdpbf16ps"),
}

def _tensorized(func, tiles, intrinsic: str):
    """``func``'s "update" block (i, j, r loops) split into (outer, inner) by ``tiles``, the
    inner (i, j, r) nest tensorized with ``intrinsic``."""
    from tvm import s_tir

    intrinsics.register()
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("update")
    pairs = [sch.split(loop, list(tile)) for loop, tile in zip(sch.get_loops(block), tiles)]
    sch.reorder(*[outer for outer, _ in pairs], *[inner for _, inner in pairs])
    sch.decompose_reduction(block, pairs[2][0])
    sch.tensorize(pairs[0][1], intrinsic)
    return sch.mod



def _amx_matmul(kind: str, tiles_m=2, tiles_n=2, tiles_k=2):
    """C[M, N] = A[M, K] . B[K/g, N, g] tensorized with the AMX intrinsic of ``kind``."""
    from tvm.script import tirx as T

    name, a_dtype, b_dtype, c_dtype, group, k_tile, _ = AMX_CASES[kind]
    m, n, k = 16 * tiles_m, 16 * tiles_n, k_tile * tiles_k

    @T.prim_func(s_tir=True)
    def matmul(A: T.Buffer((m, k), a_dtype), B: T.Buffer((k // group, n, group), b_dtype),
               C: T.Buffer((m, n), c_dtype)):
        for i, j, r in T.grid(m, n, k):
            with T.sblock("update"):
                vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                with T.init():
                    C[vi, vj] = T.cast(0, c_dtype)
                C[vi, vj] = C[vi, vj] + T.cast(A[vi, vr], c_dtype) * T.cast(
                    B[vr // group, vj, vr % group], c_dtype)

    return _tensorized(matmul, [(tiles_m, 16), (tiles_n, 16), (tiles_k, k_tile)], name)


@pytest.mark.parametrize("kind", sorted(AMX_CASES))
def test_an_amx_tensorized_matmul_compiles_to_tile_instructions(kind):
    import tvm

    mod = _amx_matmul(kind)
    instruction = AMX_CASES[kind][-1]
    tir = mod.script()
    assert f"llvm.x86.{instruction}" in tir and "llvm.x86.ldtilecfg" in tir
    assert "sblock(\"update\")" not in tir  # every MAC went into the intrinsic
    asm = tvm.compile(mod, target=tvm.target.Target(AMX_TARGET)).mod.inspect_source("asm")
    lines = [line.split() for line in asm.splitlines() if line.strip()]
    ops = [words[0] for words in lines]
    # 2 x 2 output tiles x 2 K steps = 8 calls, each configuring, loading, multiplying
    assert ops.count(instruction) == 8, [o for o in ops if o.startswith("t")]
    assert ops.count("ldtilecfg") == 8 and ops.count("tileloadd") == 24
    assert ops.count("tilestored") == 8


def test_amx_tile_config_bytes():
    config = intrinsics.amx_tile_config(m=7, n=16, a_row_bytes=64, b_rows=16)
    assert len(config) == 64 and config[0] == 1  # palette 1
    assert config[16:22] == [64, 0, 64, 0, 64, 0]  # bytes per row of tmm0 (C), tmm1, tmm2
    assert config[48:51] == [7, 7, 16]  # rows: C and A have m rows, B K/g
    assert sum(config) == 1 + 3 * 64 + 7 + 7 + 16  # reserved bytes stay zero
    with pytest.raises(ValueError, match="at most 16 rows"):
        intrinsics.amx_tile_config(m=17, n=16, a_row_bytes=64, b_rows=16)


def test_amx_is_chosen_only_where_the_target_has_amx_int8():
    import tvm

    def pick(mcpu):
        return intrinsics.int8_dot_intrinsic(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))

    assert pick("sapphirerapids") == intrinsics.AMX_INT8_16X16X64
    assert pick("graniterapids") == intrinsics.AMX_INT8_16X16X64
    assert pick("znver4") == intrinsics.VNNI_DOT_16X4  # AVX-512 VNNI, no AMX
    assert pick("cascadelake") == intrinsics.VNNI_DOT_16X4
    with pytest.raises(ValueError, match="none of the int8 dot-product features"):
        pick("haswell")


def _host_has_amx() -> bool:
    from pipeline.core.targets import host_cpu_flags

    return {"amx_int8", "amx_bf16", "amx_tile"} <= host_cpu_flags()


def _request_amx_permission() -> None:
    """Linux hands out AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
    XFEATURE_XTILEDATA); without it the first tile instruction raises SIGILL."""
    import ctypes

    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) != 0:
        pytest.fail(f"arch_prctl(ARCH_REQ_XCOMP_PERM) failed: errno {ctypes.get_errno()}")


@pytest.mark.skipif(not _host_has_amx(), reason="host CPU has no AMX (int8 and bf16 tiles)")
@pytest.mark.parametrize("kind", sorted(AMX_CASES))
def test_amx_matmul_matches_the_naive_kernel(kind):
    import ml_dtypes
    import tvm

    _request_amx_permission()
    _, a_dtype, b_dtype, c_dtype, group, k_tile, _ = AMX_CASES[kind]
    m, n, k = 32, 32, 2 * k_tile
    rng = np.random.default_rng(0)
    if kind == "int8":
        a = rng.integers(0, 256, (m, k)).astype(np.uint8)
        b = rng.integers(-128, 128, (k // group, n, group)).astype(np.int8)
    else:
        a = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
        b = rng.standard_normal((k // group, n, group)).astype(ml_dtypes.bfloat16)
    func = tvm.compile(_amx_matmul(kind), target=tvm.target.Target(AMX_TARGET))
    c = tvm.runtime.tensor(np.zeros((m, n), c_dtype))
    func(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    b_kn = b.transpose(0, 2, 1).reshape(k, n)
    if kind == "int8":  # bit-exact
        np.testing.assert_array_equal(c.numpy(), a.astype(np.int32) @ b_kn.astype(np.int32))
    else:  # products of bf16 are exact in fp32; only the summation order differs
        ref = a.astype(np.float64) @ b_kn.astype(np.float64)
        np.testing.assert_allclose(c.numpy(), ref, rtol=1e-5, atol=1e-4)


# --- register-blocked fp32 micro-kernel -----------------------------------------------------


def _fp32_blocked_matmul(rows_blocks=2, col_blocks=2, depth_blocks=4, depth=16):
    """C = A . B with C[7, 32] blocks tensorized to the micro-kernel of that depth."""
    from tvm.script import tirx as T

    m, n, k = 7 * rows_blocks, 32 * col_blocks, depth * depth_blocks

    @T.prim_func(s_tir=True)
    def matmul(A: T.Buffer((m, k), "float32"), B: T.Buffer((k, n), "float32"),
               C: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i, j, r in T.grid(m, n, k):
            with T.sblock("update"):
                vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + A[vi, vr] * B[vr, vj]

    by_depth = {16: intrinsics.FP32_FMA_7X32X16, 64: intrinsics.FP32_FMA_7X32X64}
    mod = _tensorized(matmul, [(rows_blocks, 7), (col_blocks, 32), (depth_blocks, depth)],
                      by_depth[depth])
    return mod, (m, n, k)


@pytest.mark.parametrize("depth", [16, 64])
def test_fp32_microkernel_matches_the_naive_matmul_and_keeps_its_block_in_registers(depth):
    import tvm

    mod, (m, n, k) = _fp32_blocked_matmul(depth=depth)
    assert '"llvm.fma"' in mod.script() and 'sblock("update")' not in mod.script()
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    func = tvm.compile(mod, target=target)
    asm = [line for line in func.mod.inspect_source("asm").splitlines()
           if line.startswith("\t") and not line.startswith("\t.")]
    asm_ops = [line.split()[0] for line in asm]
    # one call's body (the block loops around it are not unrolled): depth steps x 7 rows
    # x 2 zmm FMAs on register operands, one broadcast per A value, and no zmm register
    # spilled to the stack: the 7 x 32 accumulators stay in registers
    assert asm_ops.count("vfmadd231ps") == depth * 7 * 2
    assert asm_ops.count("vbroadcastss") == depth * 7
    assert not [line for line in asm if "zmm" in line and "rsp" in line]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    if "avx512f" not in __import__("pipeline.core.targets", fromlist=["x"]).host_cpu_flags():
        pytest.skip("host CPU has no AVX-512: the codegen was checked, not run")
    func(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    # FMA rounds once where mul + add round twice: equal up to fp32 summation error
    np.testing.assert_allclose(c.numpy(), a.astype(np.float64) @ b.astype(np.float64),
                               rtol=1e-5, atol=1e-4)


def test_fp32_microkernel_shape_is_checked():
    with pytest.raises(ValueError, match="multiple of 16"):
        intrinsics._fp32_block_intrin(rows=7, cols=24, depth=16)
    with pytest.raises(ValueError, match="28 zmm registers"):
        intrinsics._fp32_block_intrin(rows=16, cols=32, depth=16)
