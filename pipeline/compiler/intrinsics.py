"""Tensor intrinsics: only the stock ones a target needs, plus the ones the stock wheel gets
wrong, re-registered correctly (see FACTS.md)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

VNNI_DOT_16X4 = "dot_16x4_vnni"  # the name MetaSchedule's "vnni" rules look up

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
        _registered.add("llvm")
    _registered.add(target_kind)


def register_for_records(record_text: str) -> None:
    """Register what tuning records can name: a record's target is written as JSON with its
    ``"kind"``, and a database holding records of a kind whose intrinsics are missing fails
    to open (every tensorized record would look broken)."""
    register("llvm")  # the host side of every target
    for kind in STOCK_MODULES_BY_KIND:
        named = f'"kind":"{kind}"' in record_text or f'"kind": "{kind}"' in record_text
        if named and kind != "llvm":
            register(kind)
