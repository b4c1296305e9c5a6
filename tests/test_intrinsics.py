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
