"""Tensor intrinsics: only the stock ones a target needs, the ones the stock wheel gets
wrong re-registered correctly (see FACTS.md), and the project's own: an fp32 register-blocked
micro-kernel and AMX tile dot products (int8, bf16)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

VNNI_DOT_16X4 = "dot_16x4_vnni"  # the name MetaSchedule's "vnni" rules look up
# A register-blocked fp32 micro-kernel: C[7, 32] += A[7, D] . B[D, 32] with the 7 x 32
# accumulator block in 14 zmm registers (see _fp32_block_intrin). 7 rows: every ResNet-50
# feature map width (112, 56, 28, 14, 7) is a multiple of 7. Depth D = 16 or 64 (the
# deeper one loads and stores its C block a quarter as often, for 4x the code).
FP32_FMA_7X32X16 = "avx512_fp32_fma_7x32x16"
FP32_FMA_7X32X64 = "avx512_fp32_fma_7x32x64"
# AMX tile dot products (TVM 0.27 has none): C[16, 16] += A[16, K] . B[K/g, 16, g], the B
# operand in the VNNI-style packing the AMX instructions read (g = 4 bytes for int8, 2
# bfloat16 values). The names say the tile shape, M x N x K.
AMX_INT8_16X16X64 = "amx_tdpbusd_16x16x64"
AMX_BF16_16X16X32 = "amx_tdpbf16ps_16x16x32"

STOCK_PACKAGE = "tvm.s_tir.tensor_intrin"
# The stock intrinsic modules each target kind's schedules and tuning records can name. The
# stock package's __init__ imports every module it has: cuda alone takes 22 s and all of them
# 31 s on an idle Zen 4, paid by every process that tunes or opens a tuning database, every
# builder worker included. A CPU build never names a CUDA, ROCm, Arm or Hexagon intrinsic.
STOCK_MODULES_BY_KIND = {"llvm": ("x86",), "cuda": ("x86", "cuda")}

_registered: set[str] = set()


def _lean_stock_package() -> None:
    """Put the stock package in ``sys.modules`` without running its ``__init__``.

    MetaSchedule does ``import tvm.s_tir.tensor_intrin`` (TuneContext, the local builder)
    only for the side effect of registering everything; with the package already present
    that import is free, and ``from tvm.s_tir.tensor_intrin.cuda import ...`` (DLight) still
    loads the one submodule it names. A process that imported the full package first keeps it.
    """
    if STOCK_PACKAGE in sys.modules:
        return
    import tvm.s_tir

    spec = importlib.util.find_spec(STOCK_PACKAGE)
    package = importlib.util.module_from_spec(spec)  # has __path__; __init__ not executed
    sys.modules[STOCK_PACKAGE] = package
    tvm.s_tir.tensor_intrin = package


def _vnni_impl():
    """``C[16] += A[4] . B[16, 4]`` (u8 x s8 -> s32) as one ``vpdpbusd`` of LLVM >= 17.

    LLVM changed the intrinsic's operands from ``<16 x i32>`` to ``<64 x i8>``; the stock
    implementation still passes i32 vectors and fails LLVM verification, which MetaSchedule
    reports as failed builds and silently falls back to untensorized code.
    """
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # the same 4 bytes of A for each of the 16 lanes, as 64 unsigned bytes
            a_word = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_word, 16), dtype="uint8x64")
            b_bytes = B.vload([0, 0], dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                a_bytes,
                b_bytes,
                dtype="int32x16",
            )

    return impl


def _fp32_block_intrin(rows: int = 7, cols: int = 32, depth: int = 16):
    """``(desc, impl)`` of ``C[rows, cols] += A[rows, depth] . B[depth, cols]`` (fp32) as an
    outer-product micro-kernel: the C block is loaded once into ``rows x cols/16`` zmm
    accumulators, each step of the (unrolled) depth loop broadcasts one A value per row
    and multiplies it with ``cols/16`` B vectors (explicit ``llvm.fma``), and C is stored
    once at the end. This is the register blocking MLAS and oneDNN use: loads per FMA drop
    from ~2 to ``(rows + cols/16) / (rows * cols/16)``, and 14 independent accumulators
    hide the FMA latency on cores with one or two 512-bit FMA pipes.

    The accumulator block is a ``local`` buffer indexed only by constants (every loop
    unrolled), so LLVM promotes it to registers; A, B and C may have any row strides.
    """
    from tvm.script import tirx as T

    lanes = 16  # fp32 lanes of a zmm register
    if cols % lanes or not (1 <= rows * cols // lanes <= 28):
        raise ValueError(f"cols must be a multiple of {lanes} and the accumulator block "
                         f"({rows} x {cols}) fit in 28 zmm registers")
    vectors = cols // lanes
    vector = f"float32x{lanes}"

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (rows, depth), "float32", offset_factor=1)
        B = T.match_buffer(b, (depth, cols), "float32", offset_factor=1)
        C = T.match_buffer(c, (rows, cols), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:rows, 0:depth], B[0:depth, 0:cols])
            T.writes(C[0:rows, 0:cols])
            for i, j, k in T.grid(rows, cols, depth):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + A[vi, vk] * B[vk, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a_stride = T.int32()
        b_stride = T.int32()
        c_stride = T.int32()
        A = T.match_buffer(a, (rows, depth), "float32", offset_factor=1, strides=[a_stride, 1])
        B = T.match_buffer(b, (depth, cols), "float32", offset_factor=1, strides=[b_stride, 1])
        C = T.match_buffer(c, (rows, cols), "float32", offset_factor=1, strides=[c_stride, 1])
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:rows, 0:depth], B[0:depth, 0:cols])
            T.writes(C[0:rows, 0:cols])
            acc = T.alloc_buffer((rows, cols), "float32", scope="local")
            for i in T.unroll(rows):
                for v in T.unroll(vectors):
                    acc[i, T.ramp(v * lanes, 1, lanes)] = C[i, T.ramp(v * lanes, 1, lanes)]
            for k in T.unroll(depth):
                for i in T.unroll(rows):
                    for v in T.unroll(vectors):
                        acc[i, T.ramp(v * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                            vector, "llvm.fma.v16f32", T.broadcast(A[i, k], lanes),
                            B[k, T.ramp(v * lanes, 1, lanes)],
                            acc[i, T.ramp(v * lanes, 1, lanes)])
            for i in T.unroll(rows):
                for v in T.unroll(vectors):
                    C[i, T.ramp(v * lanes, 1, lanes)] = acc[i, T.ramp(v * lanes, 1, lanes)]

    return desc, impl


# What an AMX tile dot product of each input type computes: (A dtype, B dtype, accumulator
# dtype, values per 4-byte group in a B row, LLVM intrinsic).
_AMX_KINDS = {
    "int8": ("uint8", "int8", "int32", 4, "llvm.x86.tdpbusd"),
    "bf16": ("bfloat16", "bfloat16", "float32", 2, "llvm.x86.tdpbf16ps"),
}
# Tile registers the intrinsic uses: the accumulator, A, B.
_TMM_C, _TMM_A, _TMM_B = 0, 1, 2


def amx_tile_config(m: int, n: int, a_row_bytes: int, b_rows: int) -> list[int]:
    """The 64-byte LDTILECFG operand for one tile dot product of an M x N accumulator:
    palette 1; per tile register, bytes per row (u16 at 16 + 2 t) and rows (u8 at 48 + t);
    every other byte zero (the instruction faults on non-zero reserved bytes)."""
    if not (1 <= m <= 16 and 1 <= n <= 16 and 4 <= a_row_bytes <= 64 and 1 <= b_rows <= 16):
        raise ValueError(f"AMX tiles hold at most 16 rows of 64 bytes: m={m} (1..16), "
                         f"n={n} (1..16), A row {a_row_bytes} bytes (4..64), B rows {b_rows} "
                         "(1..16)")
    config = [0] * 64
    config[0] = 1  # palette 1: 8 tiles of up to 16 rows x 64 bytes
    for tile, (rows, row_bytes) in {_TMM_C: (m, 4 * n), _TMM_A: (m, a_row_bytes),
                                    _TMM_B: (b_rows, 4 * n)}.items():
        config[16 + 2 * tile] = row_bytes & 0xFF
        config[17 + 2 * tile] = row_bytes >> 8
        config[48 + tile] = rows
    return config


def _amx_intrin(kind: str, m: int = 16, n: int = 16):
    """``(desc, impl)`` of ``C[m, n] += A[m, K] . B[K/g, n, g]`` as one AMX tile dot product.

    The impl configures the tiles for this shape (LDTILECFG), loads C, A and B into tile
    registers 0-2 with their row strides, multiplies, and stores C back. The configuration
    is reloaded at every call: tile state belongs to the thread, TVM's parallel loops run on
    pool threads, and TVM 0.27's Python API has no statement visitor to hoist it to the top
    of each parallel task, so every call must be self-contained (correct; its cost is
    unmeasured: no AMX CPU here).
    """
    from tvm.script import tirx as T

    a_dtype, b_dtype, c_dtype, group, llvm_name = _AMX_KINDS[kind]
    elem_bytes = 4 // group  # 1 for u8/s8, 2 for bf16
    k = 64 // elem_bytes  # one 64-byte row of A: 64 u8 or 32 bf16
    b_rows = k // group
    cfg = amx_tile_config(m, n, 64, b_rows)
    acc_bytes = 4  # int32 and float32 accumulators

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (m, k), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (b_rows, n, group), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (m, n), c_dtype, offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:m, 0:n], A[0:m, 0:k], B[0:b_rows, 0:n, 0:group])
            T.writes(C[0:m, 0:n])
            for i, j, r in T.grid(m, n, k):
                with T.sblock("update"):
                    vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vr], c_dtype) * T.cast(
                        B[vr // group, vj, vr % group], c_dtype)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a_stride = T.int32()
        b_stride = T.int32()
        c_stride = T.int32()
        A = T.match_buffer(a, (m, k), a_dtype, offset_factor=1, strides=[a_stride, 1])
        # one B tile row (n groups of g values) must be contiguous: 4 n bytes
        B = T.match_buffer(b, (b_rows, n, group), b_dtype, offset_factor=1,
                           strides=[b_stride, group, 1])
        C = T.match_buffer(c, (m, n), c_dtype, offset_factor=1, strides=[c_stride, 1])
        with T.sblock("root"):
            T.reads(C[0:m, 0:n], A[0:m, 0:k], B[0:b_rows, 0:n, 0:group])
            T.writes(C[0:m, 0:n])
            tile_config = T.alloc_buffer((64,), "uint8", scope="local")
            for byte in range(64):
                tile_config[byte] = T.uint8(0)
            # the non-zero bytes of amx_tile_config (every row is at most 64 bytes: the
            # high byte of each u16 stays 0)
            tile_config[0] = T.uint8(cfg[0])
            tile_config[16] = T.uint8(cfg[16])
            tile_config[18] = T.uint8(cfg[18])
            tile_config[20] = T.uint8(cfg[20])
            tile_config[48] = T.uint8(cfg[48])
            tile_config[49] = T.uint8(cfg[49])
            tile_config[50] = T.uint8(cfg[50])
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg",
                                          tile_config.access_ptr("r")))
            # tile loads and stores take the row stride in bytes. Plain addresses, not
            # access_ptr: TVM stores bfloat16 as uint16, and its access_ptr check then
            # rejects the bfloat16 annotation.
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(_TMM_C),
                                          T.address_of(C[0, 0]), T.int64(c_stride * acc_bytes)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(_TMM_A),
                                          T.address_of(A[0, 0]), T.int64(a_stride * elem_bytes)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(_TMM_B),
                                          T.address_of(B[0, 0, 0]),
                                          T.int64(b_stride * elem_bytes)))
            T.evaluate(T.call_llvm_intrin("void", llvm_name, T.int8(_TMM_C), T.int8(_TMM_A),
                                          T.int8(_TMM_B)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(_TMM_C),
                                          T.address_of(C[0, 0]), T.int64(c_stride * acc_bytes)))

    return desc, impl


def register(target_kind: str = "llvm") -> None:
    """Register the tensor intrinsics a ``target_kind`` ("llvm" or "cuda") needs (idempotent).

    Imports the stock modules first, so that a later import of them cannot re-register the
    broken version over ours.
    """
    if target_kind in _registered:
        return
    if target_kind not in STOCK_MODULES_BY_KIND:
        raise ValueError(f"no tensor intrinsics known for target kind {target_kind!r}; "
                         f"known: {sorted(STOCK_MODULES_BY_KIND)}")
    _lean_stock_package()
    for name in STOCK_MODULES_BY_KIND[target_kind]:
        importlib.import_module(f"{STOCK_PACKAGE}.{name}")
    if "llvm" not in _registered:
        from tvm.s_tir import TensorIntrin
        from tvm.s_tir.tensor_intrin import x86

        TensorIntrin.register(VNNI_DOT_16X4, x86.dot_product_16x4_u8i8i32_desc, _vnni_impl(),
                              override=True)
        TensorIntrin.register(FP32_FMA_7X32X16, *_fp32_block_intrin(7, 32, 16), override=True)
        TensorIntrin.register(FP32_FMA_7X32X64, *_fp32_block_intrin(7, 32, 64), override=True)
        TensorIntrin.register(AMX_INT8_16X16X64, *_amx_intrin("int8"), override=True)
        TensorIntrin.register(AMX_BF16_16X16X32, *_amx_intrin("bf16"), override=True)
        _registered.add("llvm")
    _registered.add(target_kind)


def int8_dot_intrinsic(target) -> str:
    """The u8 x s8 -> s32 tensor intrinsic a CPU target's int8 kernels use: the first entry
    of :data:`pipeline.core.targets.CPU_INT8_DOT_INTRINSICS` whose LLVM feature the target
    has (AMX before VNNI). A target with neither fails, naming the features looked for."""
    from tvm.target import codegen

    from pipeline.core.targets import CPU_INT8_DOT_INTRINSICS

    for feature, name in CPU_INT8_DOT_INTRINSICS:
        if codegen.target_has_features(feature, target):
            return name
    raise ValueError(f"target {target} has none of the int8 dot-product features "
                     f"{[f for f, _ in CPU_INT8_DOT_INTRINSICS]}: no int8 tensor intrinsic")


def register_for_records(record_text: str) -> None:
    """Register what tuning records can name: a record's target is written as JSON with its
    ``"kind"``, and a database holding records of a kind whose intrinsics are missing fails
    to open (every tensorized record would look broken)."""
    register("llvm")  # the host side of every target
    for kind in STOCK_MODULES_BY_KIND:
        named = f'"kind":"{kind}"' in record_text or f'"kind": "{kind}"' in record_text
        if named and kind != "llvm":
            register(kind)
