"""The fused dequantize-matmul kernel of the block-wise weight-only formats (w4g32, w8g128...).

``Y[m, n] = sum_k X[m, k] * (code[k, n] - zero[k // B, n]) * scale[k // B, n]``, with the
codes, scales and zero points in the packed layout of :mod:`pipeline.schemes.blockwise`.
The weight is unpacked inside the reduction, in registers: no float weight ever exists in
memory, so ``model.so`` holds 4 (or 8) bits per weight plus the group scales, and a
one-row matmul (a decoder step) reads 8x fewer bytes than fp32.

INT4 is stored in ``uint8`` and unpacked with shifts and masks: TVM 0.27 miscompiles ``int4``
buffers on llvm and CUDA (FACTS.md).

:func:`schedule_cpu` is the kernel's schedule when the tuning database has no record for it
(MetaSchedule tunes it like any other kernel): output channels split into vectors of 16
floats with several accumulators, parallel over the outer output-channel blocks, and the
unpacking hoisted out of the row loop.
"""

from __future__ import annotations

# The block name that marks this kernel inside a (possibly fused) PrimFunc.
BLOCK = "dequant_matmul"


def prim_func(rows: tuple[int, ...] | int, k: int, n: int, bits: int, block_size: int,
              scale_dtype: str, has_zeros: bool):
    """The kernel as a TIR PrimFunc: ``(X [*rows, k], codes, scales[, zeros]) -> Y [*rows,
    n]``, all static. Leading dimensions stay in the kernel (no reshape around it), so the
    lowering fuses the bias add and activation that follow into it."""
    from tvm import te, tirx

    per_byte = 8 // bits
    n_blocks = -(-k // block_size)

    def dims(*values):  # int64 extents, as Relax's legalized ops use (FuseTIR compares them)
        return tuple(tirx.IntImm("int64", v) for v in values)

    rows = (rows,) if isinstance(rows, int) else tuple(rows)
    x = te.placeholder(dims(*rows, k), "float32", name="X")
    codes = te.placeholder(dims(-(-k // per_byte), n), "uint8", name="codes")
    scales = te.placeholder(dims(n_blocks, n), scale_dtype, name="scales")
    zeros = (te.placeholder(dims(-(-n_blocks // per_byte), n), "uint8", name="zeros")
             if has_zeros else None)
    mask = (1 << bits) - 1

    def unpack(buf, row, col):
        if bits == 8:
            return buf[row, col].astype("float32")
        byte = buf[row // per_byte, col].astype("int32")
        return tirx.bitwise_and(tirx.shift_right(byte, (row % per_byte) * bits),
                                mask).astype("float32")

    def weight(kk, col):
        # code * scale - zero * scale: one FMA per weight once the group's zero * scale is
        # hoisted (the schedule unrolls the group). Exact, like (code - zero) * scale, for
        # float16 scales: each product needs at most 20 of float32's 24 mantissa bits.
        group = kk // block_size
        scale = scales[group, col].astype("float32")
        zero = unpack(zeros, group, col) if zeros is not None else \
            tirx.const(float(1 << (bits - 1)), "float32")
        return unpack(codes, kk, col) * scale - zero * scale

    r = te.reduce_axis(dims(0, k), name="k")
    # The annotation carries the group size to the schedule (fused PrimFuncs keep it).
    y = te.compute(dims(*rows, n),
                   lambda *ij: te.sum(x[(*ij[:-1], r)] * weight(r, ij[-1]), axis=r),
                   name=BLOCK, attrs={"dequant_block_size": block_size})
    args = [x, codes, scales] + ([zeros] if zeros is not None else []) + [y]
    # No global symbol: the Relax module names each instance (several layers, one name)
    return te.create_prim_func(args).without_attr("global_symbol")


def has_kernel(func) -> bool:
    """Whether a PrimFunc contains the dequantize-matmul block."""
    from tvm import s_tir

    try:
        s_tir.Schedule(func).get_sblock(BLOCK)
    except Exception:  # noqa: BLE001 - TVM raises a plain error for a missing block
        return False
    return True


def schedule_cpu(func, vector_lanes: int = 16):
    """A hand schedule for x86 (see the module docstring); returns the scheduled PrimFunc.

    Loops: ``n_outer`` (parallel) x ``k`` x ``m`` x ``n_unroll`` x ``n_vec`` with the
    accumulators in a local buffer; epilogues fused by the lowering (bias add, activation)
    are computed per ``n_outer`` block. Falls back to the unscheduled function (naive loops,
    reported like any untuned kernel) when the shapes do not fit the tiling.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = sch.get_sblock(BLOCK)
    block_size = int(sch.get(block).annotations["dequant_block_size"])
    *leading, j, r = sch.get_loops(block)
    i = sch.fuse(*leading) if len(leading) > 1 else leading[0]
    n = int(sch.get(j).extent)
    m = int(sch.get(i).extent)
    if n % vector_lanes:
        return func
    unroll = next(u for u in (4, 2, 1) if n % (vector_lanes * u) == 0)
    # Enough outer blocks for both threads even on narrow layers.
    while unroll > 1 and n // (vector_lanes * unroll) < 8:
        unroll //= 2
    jo, ju, jv = sch.split(j, [None, unroll, vector_lanes])
    # Input channels by group: a group's scale and zero point are loaded once, and with
    # the group unrolled each byte's shift amounts are constants.
    ro, ri = sch.split(r, [None, block_size])
    sch.reorder(jo, ro, ri, i, ju, jv)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, jo)
    for consumer in _epilogues(sch, acc):
        sch.reverse_compute_at(consumer, jo)
    sch.parallel(jo)
    sch.unroll(ju)
    sch.vectorize(jv)
    sch.unroll(ri)
    if m <= 8:
        sch.unroll(i)
    init = sch.decompose_reduction(block, ro)
    sch.vectorize(sch.get_loops(init)[-1])
    for blk in [acc, *_epilogues(sch, acc)]:
        loops = sch.get_loops(blk)
        if len(loops) > 1:
            inner = sch.fuse(*loops[1:])
            _, vec = sch.split(inner, [None, vector_lanes])
            sch.vectorize(vec)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _epilogues(sch, block) -> list:
    """The blocks that consume ``block``'s output, transitively (bias add, activations)."""
    found, frontier = [], [block]
    while frontier:
        for consumer in sch.get_consumers(frontier.pop()):
            if all(sch.get(consumer).same_as(sch.get(b)) is False for b in found):
                found.append(consumer)
                frontier.append(consumer)
    return found
