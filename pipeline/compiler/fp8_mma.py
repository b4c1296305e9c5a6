"""FP8 E4M3 matmul on the tensor cores of sm_89 (Ada) and sm_90 (Hopper): ``mma.sync``
``m16n8k32 .e4m3.e4m3.f32`` through TVM's ``mma_e4m3e4m3f32_trans_b`` intrinsic.

``Y[m, n] = (sum_k q(X[m, k]) * W[n, k]) * x_scale * w_scale[n]`` where

- ``q(x) = e4m3(clamp(x * x_inv_scale, -448, 448))``: the activations are quantized to E4M3
  *inside* the kernel, while they are copied to shared memory (one per-tensor scale, given
  as ``x_scale`` and its reciprocal ``x_inv_scale``: a multiply, never a division, because
  CUDA kernels are built with fast-math and an approximate division could move a value
  across a rounding boundary);
- ``W`` are the E4M3 codes written by the project's own codec
  (:func:`pipeline.schemes.fp8.encode`), ``uint8 [n, k]`` (row per output channel, the
  ``B^T`` operand ``mma`` wants), reinterpreted as ``float8_e4m3fn`` on their way into
  shared memory: no conversion touches the weights (TVM's own fp8 conversions are wrong
  on llvm: FACTS.md), so their bits are exactly the codec's;
- the products of two E4M3 values are exact in float32; the tensor core accumulates them
  in float32; the scales are applied once per output, after the reduction.

Two variants of the same definition (:func:`prim_func`): ``conversions="cuda"`` uses the
``float8_e4m3fn`` dtype (the hardware's ``cvt.rn.satfinite`` for the activations; the form
the tensorized schedule needs), ``conversions="bits"`` does both conversions with integer
ops, mirroring :func:`pipeline.schemes.fp8.encode` and ``decode_via_half``, so that the
very same arithmetic runs on a CPU (llvm), where TVM's fp8 casts are wrong. The tests run
the "bits" form on llvm against :func:`reference` (numpy, the project's codec), and check
that the tensorized "cuda" form cross-compiles to FP8 ``mma.sync`` for sm_89 and sm_90.
**What runs unverified here:** the tensorized kernel itself (no GPU on the build host) and
the hardware conversion of the activations (``__nv_fp8x4_e4m3(float4)``, which CUDA
documents as round-to-nearest-even, saturating to finite: what the codec does).
"""

from __future__ import annotations

import numpy as np

# The reduction block, and the SMs with FP8 mma.sync (PTX ISA 8.4+: sm_89 and sm_90).
BLOCK = "fp8_mma"
FP8_MMA_ARCHS = ("sm_89", "sm_90")
# The PTX instruction the schedule must produce (checked by the tests in the CUDA source).
MMA_INSTRUCTION = "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"
CONVERSIONS = ("cuda", "bits")
# marks the scheduled kernel, so the compile report names it as hand-scheduled
HAND_SCHEDULE_ATTR = "pipeline.hand_schedule"

# One tile config (unmeasured: no GPU has run it yet). A thread block computes
# (16 * WARPS_M * FRAGS_M) x (16 * WARPS_N * FRAGS_N) outputs with WARPS_M * WARPS_N warps;
# each warp holds FRAGS_M x FRAGS_N 16x16 float32 accumulators; K advances 32 (one mma).
WARPS_M, WARPS_N, FRAGS_M, FRAGS_N = 2, 2, 1, 2
MMA_K = 32


def tile_shape() -> tuple[int, int, int]:
    """(rows, columns, k) of a thread block's tile: the divisors the shapes must have."""
    return 16 * WARPS_M * FRAGS_M, 16 * WARPS_N * FRAGS_N, MMA_K


def check_shape(m: int, n: int, k: int) -> None:
    """A clear error for a shape the schedule does not tile (no padding yet)."""
    tm, tn, tk = tile_shape()
    bad = [f"{name}={v} (a multiple of {t})" for name, v, t in
           (("m", m, tm), ("n", n, tn), ("k", k, tk)) if v <= 0 or v % t]
    if bad:
        raise ValueError(f"fp8_mma: shape m={m}, n={n}, k={k} does not tile: need "
                         f"{', '.join(bad)}; pad the matmul or keep it on the decode path")


def prim_func(m: int, n: int, k: int, conversions: str = "cuda"):
    """The kernel as a TIR PrimFunc ``(X f32 [m, k], x_scale f32 [1], x_inv_scale f32 [1],
    codes u8 [n, k], w_scale f32 [n]) -> Y f32 [m, n]`` (see the module docstring)."""
    from tvm import te, tirx

    if conversions not in CONVERSIONS:
        raise ValueError(f"conversions {conversions!r}: one of {', '.join(CONVERSIONS)}")
    x = te.placeholder((m, k), "float32", name="X")
    x_scale = te.placeholder((1,), "float32", name="x_scale")
    x_inv = te.placeholder((1,), "float32", name="x_inv_scale")
    codes = te.placeholder((n, k), "uint8", name="codes")
    w_scale = te.placeholder((n,), "float32", name="w_scale")
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731

    def clamped(i, kk):
        # min/max with constants: a NaN input becomes +-448 on CUDA (fminf/fmaxf return the
        # non-NaN operand); the encoder of the "bits" form sends NaN to 448 likewise
        return tirx.max(tirx.min(x[i, kk] * x_inv[0], f32(448.0)), f32(-448.0))

    if conversions == "cuda":
        xq = te.compute((m, k), lambda i, kk: clamped(i, kk).astype("float8_e4m3fn"),
                        name="x_e4m3")
        wq = te.compute((n, k), lambda j, kk: tirx.reinterpret("float8_e4m3fn", codes[j, kk]),
                        name="w_e4m3")
        widen = lambda v: v.astype("float32")  # noqa: E731
    else:
        xq = te.compute((m, k), lambda i, kk: _encode_bits(clamped(i, kk)), name="x_e4m3")
        wq = te.compute((n, k), lambda j, kk: codes[j, kk], name="w_e4m3")
        widen = _decode_bits
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute((m, n), lambda i, j: te.sum(widen(xq[i, r]) * widen(wq[j, r]), axis=r),
                     name=BLOCK)
    y = te.compute((m, n), lambda i, j: acc[i, j] * (x_scale[0] * w_scale[j]), name="Y")
    return te.create_prim_func([x, x_scale, x_inv, codes, w_scale, y])


def _decode_bits(code8):
    """E4M3 code (uint8) -> float32 with integer ops, exact on every finite code: the code
    sign-extended to 16 bits, shifted left by 7 and masked with 0xBF80 is the float16 of
    2**-8 times the value (``pipeline.schemes.fp8.decode_via_half``), times 2**8 (exact)."""
    from tvm import tirx

    wide = tirx.shift_left(tirx.reinterpret("int8", code8).astype("int16"),
                           tirx.const(7, "int16"))
    bits = tirx.bitwise_and(tirx.reinterpret("uint16", wide), tirx.const(0xBF80, "uint16"))
    return tirx.reinterpret("float16", bits).astype("float32") * tirx.const(256.0, "float32")


def _encode_bits(v):
    """float32 in [-448, 448] -> E4M3 code (uint8), nearest even: the integer mirror of
    :func:`pipeline.schemes.fp8.encode` (normals: round the float32 mantissa to 3 bits and
    rebias the exponent; subnormals: ``rint(|v| * 512)``, exact scaling)."""
    from tvm import tirx

    u32 = lambda c: tirx.const(c, "uint32")  # noqa: E731
    bits = tirx.reinterpret("uint32", v)
    sign = tirx.bitwise_and(tirx.shift_right(bits, u32(24)), u32(0x80))
    mag_bits = tirx.bitwise_and(bits, u32(0x7FFFFFFF))
    mag = tirx.reinterpret("float32", mag_bits)
    lsb = tirx.bitwise_and(tirx.shift_right(mag_bits, u32(20)), u32(1))
    rounded = tirx.shift_right(mag_bits + u32((1 << 19) - 1) + lsb, u32(20))
    normal = rounded - u32((127 - 7) << 3)
    sub = tirx.nearbyint(mag * tirx.const(512.0, "float32")).astype("uint32")
    code = tirx.Select(mag < tirx.const(2.0 ** -6, "float32"), sub, normal)
    code = tirx.min(code, u32(0x7E))  # saturate (the clamp already keeps |v| <= 448)
    return tirx.bitwise_or(code, sign).astype("uint8")


def reference(x: np.ndarray, x_scale: float, x_inv_scale: float, codes: np.ndarray,
              w_scale: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic in numpy, with the project's codec: activations quantized as
    the kernel does, exact products, float64 sums (the kernel sums in float32, in its own
    order: compare with a tolerance of a few float32 ulps of the sum of |products|)."""
    from pipeline.schemes import fp8

    x32 = np.asarray(x, np.float32)
    scaled = np.clip(x32 * np.float32(x_inv_scale), -fp8.MAX, fp8.MAX).astype(np.float32)
    xq = fp8.decode(fp8.encode(scaled)).astype(np.float64)
    wq = fp8.decode(np.asarray(codes, np.uint8)).astype(np.float64)
    acc = xq @ wq.T
    scale = np.float64(np.float32(x_scale)) * np.asarray(w_scale, np.float32).astype(np.float64)
    return (acc * scale[None, :]).astype(np.float32)


def schedule_cuda(func, target):
    """The tensorized schedule of :func:`prim_func` (``conversions="cuda"``) for an FP8
    target: thread-block tiles staged in shared memory (activations quantized and weight
    codes reinterpreted on the way), ``ldmatrix`` into warp fragments, FP8 ``mma.sync``
    with float32 accumulators, ``mma_store`` of the sums; the scale epilogue is a second,
    element-wise kernel over the float32 sums (fusing it into the store is a next step).

    Raises ``ValueError`` for a target without FP8 tensor cores or a shape that does not
    tile (:func:`check_shape`)."""
    import tvm.s_tir.tensor_intrin.cuda as cuda_intrin  # registers the mma intrinsics
    from tvm import s_tir

    arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
    if arch not in FP8_MMA_ARCHS:
        raise ValueError(f"fp8_mma: target {target} has no FP8 tensor cores; FP8 mma.sync "
                         f"needs one of {', '.join(FP8_MMA_ARCHS)} (rtx4090, h100)")
    sch = s_tir.Schedule(func)
    block = sch.get_sblock(BLOCK)
    m, n, k = (int(iv.dom.extent) for iv in sch.get(block).iter_vars)
    check_shape(m, n, k)
    i, j, kk = sch.get_loops(block)
    # the innermost 16 x 16 x 32 is one mma intrinsic (two m16n8k32 instructions)
    i, i_tc = sch.split(i, [None, 16])
    j, j_tc = sch.split(j, [None, 16])
    kk, k_tc = sch.split(kk, [None, MMA_K])
    sch.reorder(i, j, kk, i_tc, j_tc, k_tc)
    inner = block
    outer = sch.blockize(i_tc)
    i0, i1, i2 = sch.split(i, [None, WARPS_M, FRAGS_M])
    j0, j1, j2 = sch.split(j, [None, WARPS_N, FRAGS_N])
    # k0 stages a K step in shared memory, k1 (one step) loads the warp fragments from it
    k0, k1 = sch.split(kk, [None, 1])
    sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
    sch.bind(i0, "blockIdx.y")
    sch.bind(j0, "blockIdx.x")
    warp = sch.fuse(i1, j1)
    sch.bind(warp, "threadIdx.y")
    warps = WARPS_M * WARPS_N

    def stage_in_shared(index: int, vector: int):
        # global -> shared, cooperatively by every thread; rows padded by 16 bytes so the
        # ldmatrix reads of a warp do not hit the same bank
        read = sch.cache_read(outer, index, "shared")
        sch.compute_at(read, k0)
        fused = sch.fuse(*sch.get_loops(read)[-2:])
        _, ty, tx, vec = sch.split(fused, [None, warps, 32, vector])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        sch.storage_align(read, 0, axis=-2, factor=32, offset=16)
        return read

    # float32 activations: 4 per thread (float4; the codegen has no wider float vector);
    # the weight codes: 16 bytes per thread
    stage_in_shared(0, 4)
    stage_in_shared(1, 16)
    # the quantize of X and the reinterpret of the codes happen in those copies
    sch.compute_inline(sch.get_sblock("x_e4m3"))
    sch.compute_inline(sch.get_sblock("w_e4m3"))

    a_frag = sch.cache_read(outer, 0, "warp")
    b_frag = sch.cache_read(outer, 1, "warp")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)
    acc = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(acc, warp)
    a, b = sch.get_loops(acc)[-2:]
    a0, a1 = sch.split(a, [None, 16])
    b0, b1 = sch.split(b, [None, 16])
    sch.reorder(a0, b0, a1, b1)
    init = sch.decompose_reduction(outer, k0)

    def fragment_loop(frag, rows: int, cols: int):
        a, b = sch.get_loops(frag)[-2:]
        a0, a1 = sch.split(a, [None, rows])
        b0, b1 = sch.split(b, [None, cols])
        sch.reorder(a0, b0, a1, b1)
        return a1

    load_a = fragment_loop(a_frag, 16, MMA_K)
    load_b = fragment_loop(b_frag, 16, MMA_K)
    # fragments in the per-thread layout of mma.sync m16n8k32 (8-bit operands: 16 x 32
    # tiles, 16 bytes per thread) and of its float32 accumulators (16 x 16 -> 32 x 8)
    layout_16x32 = cuda_intrin.shared_16x32_to_ldmatrix_32x16_layout
    layout_16x16 = cuda_intrin.shared_16x16_to_ldmatrix_32x8_layout
    sch.transform_layout(a_frag, ("write", 0),
                         lambda r, c: (r // 16, c // MMA_K, *layout_16x32(r % 16, c % MMA_K)))
    sch.transform_layout(b_frag, ("write", 0),
                         lambda r, c: (r // 16, c // MMA_K, *layout_16x32(r % 16, c % MMA_K)))
    sch.transform_layout(acc, ("read", 0),
                         lambda r, c: (r // 16, c // 16, *layout_16x16(r % 16, c % 16)))
    sch.tensorize(load_a, cuda_intrin.LDMATRIX_e4m3_A_INTRIN)
    sch.tensorize(load_b, cuda_intrin.LDMATRIX_e4m3_B_TRANS_INTRIN)
    sch.tensorize(sch.get_loops(inner)[-3], cuda_intrin.MMA_e4m3e4m3f32_TRANS_B_INTRIN)
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2],
                  cuda_intrin.MMA_fill_16x16_f32_INTRIN)
    sch.tensorize(sch.get_loops(acc)[-2], cuda_intrin.MMA_store_16x16_f32_global_INTRIN)

    epilogue = sch.get_sblock("Y")
    fused = sch.fuse(*sch.get_loops(epilogue))
    bx, tx = sch.split(fused, [None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True,
                                        HAND_SCHEDULE_ATTR: "fp8_mma"})
