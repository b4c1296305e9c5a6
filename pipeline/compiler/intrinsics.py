"""Tensor intrinsics the stock wheel gets wrong, re-registered correctly (see FACTS.md)."""

from __future__ import annotations

VNNI_DOT_16X4 = "dot_16x4_vnni"  # the name MetaSchedule's "vnni" rules look up

_registered = False


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


def register() -> None:
    """Register the project's tensor intrinsics (idempotent).

    Imports the stock x86 intrinsics first, so that a later import of them cannot
    re-register the broken version over ours.
    """
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin import x86

    TensorIntrin.register(VNNI_DOT_16X4, x86.dot_product_16x4_u8i8i32_desc, _vnni_impl(),
                          override=True)
    _registered = True
