"""Winograd F(m, 3) convs (layout=NHWC-winograd): the transforms' algebra, each kernel's
numerics against a float64 direct convolution, and a model lowered with them against
onnxruntime."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

import models as M
from pipeline.compiler import lowering
from pipeline.compiler.passes import winograd
from pipeline.compiler.workloads import plan_tasks
from pipeline.core.project import REPO
from pipeline.core.targets import get_target, tvm_target


@pytest.mark.parametrize("m", sorted(winograd.WINOGRAD_TILES))
def test_tiles_compute_a_correlation_exactly(m):
    """A^T [(G k) . (B^T d)] is the valid correlation of d with k, in exact arithmetic,
    for every basis d and k (so for all of them)."""
    at, g, bt = winograd.WINOGRAD_TILES[m]

    def mul(a, v):
        return [sum(Fraction(x) * y for x, y in zip(row, v)) for row in a]

    for i in range(m + 2):
        for j in range(3):
            d = [Fraction(int(n == i)) for n in range(m + 2)]
            k = [Fraction(int(n == j)) for n in range(3)]
            got = mul(at, [x * y for x, y in zip(mul(g, k), mul(bt, d))])
            want = [sum(d[o + t] * k[t] for t in range(3)) for o in range(m)]
            assert got == want, (m, i, j)


def _direct(x, g):
    """float64 3x3 stride-1 pad-1 convolution, NHWC x HWIO."""
    n, h, w, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("nhwc,ck->nhwk", xp[:, i:i + h, j:j + w], g[i, j].astype(np.float64))
               for i in range(3) for j in range(3))


@pytest.mark.parametrize("n,h,w,cin,cout", [(1, 8, 8, 16, 32), (1, 14, 14, 8, 16),
                                            (2, 12, 8, 16, 8), (1, 6, 6, 4, 4)])
def test_kernels_compute_the_convolution(n, h, w, cin, cout):
    """input transform -> batched matmul with the transformed weight -> output transform
    equals the direct convolution (float32 rounding only), at the tile tile_for picks."""
    import tvm

    m = winograd.tile_for(h, w)
    assert m == (4 if h % 4 == 0 and w % 4 == 0 and min(h, w) >= 8 else 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    g = (rng.standard_normal((3, 3, cin, cout)) * 0.2).astype(np.float32)
    a, tiles = m + 2, n * (h // m) * (w // m)
    to_tiles, from_tiles = (
        tvm.compile(f.with_attr("global_symbol", "main"), target="llvm")
        for f in (winograd.input_transform(n, h, w, cin, m),
                  winograd.output_transform(n, h, w, cout, m)))
    v = tvm.runtime.tensor(np.zeros((a * a, tiles, cin), np.float32))
    to_tiles(tvm.runtime.tensor(x), v)
    mm = np.matmul(v.numpy(), winograd.transform_weight(g, m))
    y = tvm.runtime.tensor(np.zeros((n, h, w, cout), np.float32))
    from_tiles(tvm.runtime.tensor(mm), y)
    ref = _direct(x, g)
    assert np.abs(y.numpy() - ref).max() <= 2e-5 * np.abs(ref).max()


def test_odd_outputs_have_no_tile():
    assert winograd.tile_for(7, 7) is None and winograd.tile_for(14, 7) is None
    assert winograd.tile_for(56, 56) == 4 and winograd.tile_for(14, 14) == 2


def _lowered(model, monkeypatch, min_channels: int):
    """``model`` lowered for the CPU with layout=NHWC-winograd: (module, report)."""
    from tvm.relax.frontend.onnx import from_onnx

    monkeypatch.setattr(winograd, "MIN_CHANNELS", min_channels)
    mod = lowering.graph_cleanup()(from_onnx(model, keep_params_in_input=False))
    report: dict = {}
    lowered = lowering.lower_for_target(mod, tvm_target(get_target("cpu")), "float32",
                                        "NHWC-winograd", report)
    return lowered, report


def test_convs_with_few_channels_stay_direct(monkeypatch):
    """Below MIN_CHANNELS (the transforms would cost more than the matmul saves) a conv is
    left to the direct kernel; the layout is still the one asked for."""
    lowered, report = _lowered(M.tiny_convnet(with_bn=False), monkeypatch, 128)
    assert report["layout"] == "NHWC-winograd" and report["winograd"] == {"convs": {}}
    assert not any("winograd" in gv.name_hint for gv in lowered.get_global_vars())


def test_model_lowered_with_winograd_matches_onnxruntime(monkeypatch):
    """tiny_convnet's two 3x3 convs (8x8: F(4,3); MIN_CHANNELS lowered to their 3 and 8)
    go Winograd, the epilogue (bias, residual add, relu) fused into the output transform;
    the result matches onnxruntime."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    model = M.tiny_convnet(with_bn=False)
    x = np.random.default_rng(1).standard_normal(M.TINY_SHAPE).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    lowered, report = _lowered(model, monkeypatch, 1)
    assert report["layout"] == "NHWC-winograd"
    assert report["winograd"] == {"convs": {"8x8 3->8 F(4,3)": 1, "8x8 8->8 F(4,3)": 1}}
    kernels = [gv.name_hint for gv, f in lowered.functions.items()
               if not isinstance(f, relax.Function)]
    assert not any("conv2d" in k for k in kernels), kernels
    assert any(k.startswith("fused_winograd_output") and k.endswith("relu") for k in kernels), \
        kernels
    target = tvm_target(get_target("cpu"))
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)



def test_roofline_joins_the_three_kernels_with_the_conv_node_they_compute(monkeypatch,
                                                                          tmp_path):
    """The comparison with onnxruntime joins kernels on their work; a Winograd matmul does
    fewer MACs than the conv (and in ResNet-50 as many as an unrelated 1x1 conv), so each
    of the three kernels carries its direct conv's work, and the three join the conv's node
    in a real onnxruntime profile."""
    import qdq_helpers as H

    from pipeline.compiler import kernel_flops
    from pipeline.runtime import ort_profile

    model = H.conv_model(cin=16, cout=32, hw=8)  # channels onnxruntime's NCHWc keeps as is
    lowered, _ = _lowered(model, monkeypatch, 1)
    work = kernel_flops.module_kernel_work(lowered)
    conv = (8 * 8 * 32 * 9 * 16, 8 * 8 * 32)  # (MACs, output elements)
    chain = sorted(k for k, w in work.items() if w.direct_conv == conv)
    assert len(chain) == 3, work  # input transform, matmul, output transform
    matmul = next(k for k in chain if k.startswith("matmul"))
    assert work[matmul].flops // 2 < conv[0]  # its own MACs stay its own (its GFLOP/s)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    nodes = ort_profile.profile_onnxruntime(path, threads=1, repeat=2, warmup=1)
    rows = [{"name": k, "us": 10.0, "calls": 1} for k in work]
    groups = ort_profile.compare(rows, work, nodes)["groups"]
    assert [sorted(g["kernels"]) for g in groups] == [chain]
    assert [next(n.op for n in nodes if n.name == g["nodes"][0]) for g in groups] == ["Conv"]


def vectorized(func, which: str):
    """``func`` (a transform) scheduled the way MetaSchedule's CPU rules do: tiles x
    channels fused, split 16, the outer loop parallel, the inner vectorized."""
    import tvm

    sch = tvm.s_tir.Schedule(func.with_attr("global_symbol", "main"))
    outer, inner = sch.split(sch.fuse(*sch.get_loops(sch.get_sblock(f"winograd_{which}"))),
                             [None, 16])
    sch.parallel(outer)
    sch.vectorize(inner)
    return sch.mod


@pytest.mark.parametrize("which", ["input", "output"])
def test_transforms_stay_exact_when_vectorized(which):
    """A transform scheduled the way MetaSchedule's CPU rules do (tiles x channels fused,
    split, outer parallel, inner vectorized) computes what its loop form computes. A first
    version bound each tile value to a name; vectorized, it computed wrong values, and the
    tuner's kernel check refused every record."""
    import tvm

    n, h, w, c, m = 1, 8, 8, 32, 4
    a, tiles = m + 2, (h // m) * (w // m)
    if which == "input":
        func = winograd.input_transform(n, h, w, c, m)
        shapes = ((n, h, w, c), (a * a, tiles, c))
    else:
        func = winograd.output_transform(n, h, w, c, m)
        shapes = ((a * a, tiles, c), (n, h, w, c))
    func = func.with_attr("global_symbol", "main")
    x = np.random.default_rng(0).standard_normal(shapes[0]).astype(np.float32)
    outs = []
    for mod in (func, vectorized(func, which)):
        out = tvm.runtime.tensor(np.zeros(shapes[1], np.float32))
        tvm.compile(mod, target="llvm")(tvm.runtime.tensor(x), out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[1], outs[0])


def test_input_transform_reads_whole_vectors_at_the_border():
    """The input transform reads the unpadded input; its border reads are clamped and
    masked per tile, so vectorized over channels every read is one vector load (a version
    with branches, if_then_else, was scalarized by TIR: 1.5x slower than a pad kernel and
    the transform together)."""
    import tvm

    n, h, w, c, m = 1, 8, 8, 32, 4
    mod = vectorized(winograd.input_transform(n, h, w, c, m), "input")
    llvm_ir = tvm.compile(mod, target="llvm").mod.inspect_source("ll")
    assert llvm_ir.count("load <16 x float>") == (m + 2) ** 2  # one per tile element
    assert "load float" not in llvm_ir and "select <16 x i1>" in llvm_ir


_GUARDED_RUN = """
import ctypes, mmap, sys
import numpy as np
import tvm
from pipeline.compiler.passes import winograd
sys.path.insert(0, "tests")
from test_winograd import vectorized

n, h, w, c, m = (int(v) for v in sys.argv[1:])
func = winograd.input_transform(n, h, w, c, m).with_attr("global_symbol", "main")
page, nbytes = mmap.PAGESIZE, n * h * w * c * 4
assert nbytes % page == 0
region = mmap.mmap(-1, nbytes + 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
start = ctypes.addressof(ctypes.c_char.from_buffer(region))
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
for guard in (start, start + page + nbytes):  # no access just before and just after x
    assert libc.mprotect(guard, page, 0) == 0
x = np.frombuffer(region, np.float32, nbytes // 4, page).reshape(n, h, w, c)
x[:] = np.random.default_rng(0).standard_normal(x.shape)
v = tvm.runtime.tensor(np.zeros(((m + 2) ** 2, n * (h // m) * (w // m), c), np.float32))
for mod in (func, vectorized(func, "input")):
    tvm.compile(mod, target="llvm")(tvm.runtime.from_dlpack(x), v)
print("in bounds")
"""


@pytest.mark.parametrize("n,h,w,c,m", [(1, 28, 28, 128, 4), (1, 14, 14, 256, 2)])
def test_input_transform_reads_stay_inside_the_input(n, h, w, c, m):
    """The input sits between two pages the process may not touch: the transform, as loops
    and vectorized, must not read either (a subprocess: a stray read is a segfault). A
    version that selected border reads away (``Select(inside, x[clamped], 0)``) passed
    the value checks yet read a row before the input: TIR's simplifier, knowing the
    condition inside the select, dropped the clamps, and the select computes both sides."""
    proc = subprocess.run([sys.executable, "-c", _GUARDED_RUN, *map(str, (n, h, w, c, m))],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "in bounds" in proc.stdout, proc.stderr[-1500:]


def test_default_layout_is_plain_nhwc_for_a_model_without_wide_convs():
    """Winograd is the default CPU fp32 layout; a model with no conv it would compute (here
    every conv under MIN_CHANNELS) lowers exactly as NHWC does: the extra constant folding
    is skipped, so its kernels and tuning records stay NHWC's."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    assert lowering.DEFAULT_CPU_FP32_LAYOUT == "NHWC-winograd"
    mod = lowering.graph_cleanup()(from_onnx(M.tiny_convnet(with_bn=False),
                                             keep_params_in_input=False))
    target = tvm_target(get_target("cpu"))
    default_report: dict = {}
    default = lowering.lower_for_target(mod, target, "float32", "", default_report)
    nhwc = lowering.lower_for_target(mod, target, "float32", "NHWC", {})
    assert default_report["winograd"] == {"convs": {}}
    tvm.ir.assert_structural_equal(default, nhwc)


def test_tuning_leaves_the_transforms_to_the_rules(monkeypatch, tmp_path):
    """``tune`` does not search the transforms (the CPU rules give them the schedule a
    search converges to) unless ``tune_tasks=`` names them; the batched matmul it tunes."""
    from pipeline.tuning import tuner

    lowered, _ = _lowered(M.tiny_convnet(with_bn=False), monkeypatch, 1)
    transforms = sorted(p.name for p in plan_tasks(lowered, tvm_target(get_target("cpu")))
                        if winograd.is_transform_kernel(p.name))
    assert any(n.startswith("winograd_input") for n in transforms)
    assert any(n.startswith("fused_winograd_output") for n in transforms)
    budget = tuner.TuneBudget(trials_per_task=1, max_trials=10, wall_seconds=60,
                              mode="missing", seed=0, builder_timeout=60)
    messages: list[str] = []
    outcome = tuner.tune(lowered, tvm_target(get_target("cpu")), tmp_path / "db", budget,
                         progress=messages.append, select=lambda plan: False)
    (skipped,) = [m for m in messages if "Winograd transform" in m]
    assert all(name in skipped for name in transforms) and "tune_tasks=" in skipped
    assert outcome.complete
    messages.clear()  # named: searched like any kernel (select keeps this run from it)
    tuner.tune(lowered, tvm_target(get_target("cpu")), tmp_path / "db", budget,
               progress=messages.append, select=lambda plan: False,
               only=("winograd_input*",))
    (skipped,) = [m for m in messages if "Winograd transform" in m] or [""]
    assert not any(n in skipped for n in transforms if n.startswith("winograd_input"))
