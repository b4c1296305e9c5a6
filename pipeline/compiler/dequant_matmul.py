"""The fused dequantize-matmul kernel of the weight-only formats: block-wise INT4/INT8 (w4g32,
w8g128...) and the 8-bit float-like ones (fp8_e4m3, posit8: :func:`code_prim_func`).

``Y[m, n] = sum_k X[m, k] * (code[k, n] - zero[k // B, n]) * scale[k // B, n]``, with the
codes, scales and zero points in the packed layout of :mod:`pipeline.schemes.blockwise`.
The weight is unpacked inside the reduction, in registers: no float weight ever exists in
memory, so ``model.params`` holds 4 (or 8) bits per weight plus the group scales, and a
one-row matmul (a decoder step) reads 8x fewer bytes than fp32.

INT4 is stored in ``uint8`` and unpacked with shifts and masks: TVM 0.27 miscompiles ``int4``
buffers on llvm and CUDA (FACTS.md).

One schedule template (:func:`apply_template`) serves both paths: with fixed knobs it is the
kernel's schedule when the tuning database has no record (:func:`schedule_cpu`, applied by
the compile stage's "rules" scheduler); registered as the block's MetaSchedule rule
(:func:`register_tuning_rule`) its knobs become search decisions, so tuning explores this
structure rather than generic tilings.
"""

from __future__ import annotations

# The block name that marks this kernel inside a (possibly fused) PrimFunc.
BLOCK = "dequant_matmul"
# The block's MetaSchedule rule: a block annotated ``schedule_rule = NAME`` is scheduled by the
# function registered as ``s_tir.meta_schedule.<target key>.NAME`` (ApplyCustomRule).
TUNING_RULE = "dequant_matmul"


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
                   name=BLOCK, attrs={"dequant_block_size": block_size,
                                      # MetaSchedule tunes it with register_tuning_rule's
                                      "schedule_rule": TUNING_RULE})
    args = [x, codes, scales] + ([zeros] if zeros is not None else []) + [y]
    # No global symbol: the Relax module names each instance (several layers, one name)
    return te.create_prim_func(args).without_attr("global_symbol")


# the schedule's unit of the reduction for the per-channel formats (no groups): the template
# splits K by it and unrolls it (MAX_UNROLLED_K)
CODE_GROUP = 32
DECODES = ("fp8_e4m3", "posit8", "table8")


def code_prim_func(rows: tuple[int, ...] | int, k: int, n: int, decode: str,
                   per_channel: bool):
    """The kernel of the 8-bit float-like formats (:mod:`pipeline.schemes.codes8`):
    ``Y[m, n] = sum_k X[m, k] * decode(code[k, n]) * scale[n]`` (``scale[0]`` per tensor),
    ``(X, codes uint8 [k, n], scales float32 [n] or [1][, table float32 [256]]) -> Y``.

    ``decode`` ``"fp8_e4m3"``: no table: the code sign-extended to 16 bits, shifted by 7 and
    masked is a float16 bit pattern 2**-8 times the value (subnormals included), widened by
    the hardware's half -> float conversion; the 2**8 joins the scale after the reduction
    (:func:`pipeline.schemes.fp8.decode_via_half`). Four vector ops per 16 weights: on one
    4096 x 4096 one-row layer (AMD EPYC Zen 4, 2 threads) 2.1 ms, against 3.8-4.7 ms for the
    first version (``(code & 0x7F) << 20`` read as float32 times 2**120, two widenings).
    The NaN codes 0x7F/0xFF would read as ±480, but the encoder never writes them and the
    frontend refuses weights that hold them. The scale leaves the reduction too (one
    multiply per output; onnxruntime rounds ``decode * scale`` per weight: ~1 ulp apart).

    ``"posit8"`` (posit<8, 1>): integer ops (a count of leading zeros finds the regime;
    :func:`pipeline.schemes.posit.decode_by_bits`), exact on every code but NaR, which the
    encoder never writes for a weight and the frontend refuses (the same layer: 4.1 ms, ~20
    vector ops per 16 weights; gathered from its table 6.4 ms; w8g128 1.4 ms).
    ``"table8"`` (any other 256-entry table): that gather, from a float32 table argument
    (1 KB, L1-resident).
    Same block name, annotations and schedule template as :func:`prim_func`.
    """
    from tvm import te, tirx

    from pipeline.schemes import fp8

    if decode not in DECODES:
        raise ValueError(f"decode {decode!r}: one of {', '.join(DECODES)}")

    def dims(*values):
        return tuple(tirx.IntImm("int64", v) for v in values)

    rows = (rows,) if isinstance(rows, int) else tuple(rows)
    x = te.placeholder(dims(*rows, k), "float32", name="X")
    codes = te.placeholder(dims(k, n), "uint8", name="codes")
    scales = te.placeholder(dims(n if per_channel else 1), "float32", name="scales")
    table = None if decode != "table8" else te.placeholder(dims(256), "float32", name="table")

    def u32(v):
        return tirx.const(v, "uint32")

    def i32(v):
        return tirx.const(v, "int32")

    def posit8(code8):  # posit<8, 1> by integer ops: see pipeline.schemes.posit.decode_by_bits
        # reinterpret, never cast, between signed and unsigned: TVM's bound analysis takes a
        # uint -> int cast as non-negative and folds abs() and sign shifts away
        signed = tirx.reinterpret("int8", code8).astype("int32")
        magnitude = tirx.abs(signed)  # 0..128 (two's complement negated)
        # the 7 bits after the sign at the top of the word (shifted unsigned: no overflow)
        y_bits = tirx.shift_left(tirx.reinterpret("uint32", magnitude), u32(25))
        y = tirx.reinterpret("int32", y_bits)
        ones = tirx.shift_right(y, i32(31))  # -1: a regime of ones, else 0 (arithmetic)
        run = tirx.clz(tirx.bitwise_or(tirx.bitwise_xor(y, ones), i32(1 << 24)))  # 0..7
        rem = tirx.shift_left(y_bits, (run + 1).astype("uint32"))
        # 127 + 2k: 127 + 2 * run - 2 for ones, 127 - 2 * run for zeros, with no select
        exponent = tirx.bitwise_xor(tirx.shift_left(run, i32(1)), tirx.bitwise_not(ones)) + \
            tirx.bitwise_and(ones, i32(-3)) + 128
        bits = tirx.bitwise_or(
            tirx.shift_left(tirx.reinterpret("uint32", exponent), u32(23))
            + tirx.shift_right(rem, u32(8)),
            tirx.bitwise_and(tirx.reinterpret("uint32", signed), u32(0x80000000)))
        return tirx.Select(magnitude == i32(0), tirx.const(0.0, "float32"),
                           tirx.reinterpret("float32", bits))

    def u16(v):
        return tirx.const(v, "uint16")

    def fp8_via_half(code8):
        # E4M3 -> the float16 with the same sign, exponent and mantissa bits, 2**-8 times
        # the value, subnormals included (float16's are exact); the 2**8 is applied once per
        # output, after the reduction. The hardware's half -> float conversion does the rest.
        # One widening: the code sign-extended to 16 bits and shifted left by 7 has the sign
        # on bit 15 and on bit 14, exponent and mantissa on bits 13..7; clearing bit 14
        # leaves the half (no overflow: |code| << 7 <= 2**14).
        wide = tirx.shift_left(tirx.reinterpret("int8", code8).astype("int16"),
                               tirx.const(7, "int16"))
        bits = tirx.bitwise_and(tirx.reinterpret("uint16", wide), u16(0xBF80))
        return tirx.reinterpret("float16", bits).astype("float32")

    def value(kk, col):
        if decode == "posit8":
            return posit8(codes[kk, col])
        if decode == "fp8_e4m3":
            return fp8_via_half(codes[kk, col])
        return table[codes[kk, col].astype("int64")]  # table8

    r = te.reduce_axis(dims(0, k), name="k")
    # The scale is a column's, so it leaves the reduction: one multiply per output, not per
    # weight (onnxruntime rounds decode * scale per weight instead: ~1 ulp per product)
    acc = te.compute(dims(*rows, n),
                     lambda *ij: te.sum(x[(*ij[:-1], r)] * value(r, ij[-1]), axis=r),
                     name=BLOCK, attrs={"dequant_block_size": min(CODE_GROUP, k),
                                        "dequant_decode": decode,
                                        "schedule_rule": TUNING_RULE})
    factor = fp8.HALF_FACTOR if decode == "fp8_e4m3" else 1.0
    y = te.compute(dims(*rows, n),
                   lambda *ij: acc[ij] * tirx.const(factor, "float32")
                   * scales[ij[-1] if per_channel else 0],
                   name=f"{BLOCK}_scale")
    args = [x, codes, scales] + ([table] if table is not None else []) + [y]
    return te.create_prim_func(args).without_attr("global_symbol")


def has_kernel(func) -> bool:
    """Whether a PrimFunc contains the dequantize-matmul block."""
    from tvm import s_tir

    try:
        s_tir.Schedule(func).get_sblock(BLOCK)
    except Exception:  # noqa: BLE001 - TVM raises a plain error for a missing block
        return False
    return True


VECTOR_LANES = 16  # float32 lanes of an AVX-512 register
MAX_ACCUMULATORS = 16  # row tile x column vectors kept in registers (of 32 zmm)
MAX_UNROLLED_K = 32  # input channels unrolled inside a group


def schedule_cpu(func):
    """The default x86 schedule (see :func:`apply_template`) as a scheduled PrimFunc; the
    unscheduled function (naive loops, reported like any untuned kernel) when the output
    width is not a multiple of the vector width."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if not apply_template(sch, sch.get_sblock(BLOCK), sample=False):
        return func
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def apply_template(sch, block, sample: bool) -> bool:
    """Schedule the dequantize-matmul ``block`` of ``sch`` (and the epilogues fused after it).

    Loops: ``n_outer`` (parallel) x ``m_outer`` x ``group`` x ``k in group`` (unrolled: a
    group's scale and zero point load once, the shift amounts become constants) x ``m_tile``
    x ``n_unroll`` x ``n_vec`` (vectorised), accumulating an ``m_tile x n_unroll`` block of
    vectors in registers; each decoded weight vector is reused by the ``m_tile`` rows.
    With ``sample`` the two knobs (``n_unroll``, ``m_tile``) are MetaSchedule decisions (the
    tuner's search space is this template); without, a fixed choice. Returns False, leaving
    ``sch`` untouched, when the output width is not a multiple of the vector width.
    """
    block_size = int(sch.get(block).annotations["dequant_block_size"])
    loops = sch.get_loops(block)
    n = int(sch.get(loops[-2]).extent)
    m = 1
    for loop in loops[:-2]:
        m *= int(sch.get(loop).extent)
    if n % VECTOR_LANES:
        return False
    unrolls = [u for u in (1, 2, 4) if n % (VECTOR_LANES * u) == 0]
    tiles = [t for t in (1, 2, 4, 8) if m % t == 0]
    if sample:
        unroll = sch.sample_categorical(unrolls, [1.0 / len(unrolls)] * len(unrolls))
        tile = sch.sample_categorical(tiles, [1.0 / len(tiles)] * len(tiles))
    else:
        unroll = max(unrolls)
        # enough outer blocks for both threads even on narrow layers
        while unroll > 1 and n // (VECTOR_LANES * unroll) < 8:
            unroll //= 2
        tile = max(t for t in tiles if t * unroll <= MAX_ACCUMULATORS // 2 or t == 1)
    *leading, j, r = loops
    i = sch.fuse(*leading) if len(leading) > 1 else leading[0]
    jo, ju, jv = sch.split(j, [None, unroll, VECTOR_LANES])
    io, ii = sch.split(i, [None, tile])
    ro, ri = sch.split(r, [None, block_size])
    # Unrolling a whole group of 128 bloats the loop body past the instruction cache (w4g128
    # ran 3x slower than w4g32): unroll 32 input channels; the group's scale and zero point
    # stay loop-invariant in the loop around them.
    unrolled = min(block_size, MAX_UNROLLED_K)
    rm, ri = sch.split(ri, [None, unrolled])
    sch.reorder(jo, io, ro, rm, ri, ii, ju, jv)
    epilogues = _blocks_after(sch, block)
    acc = sch.cache_write(block, 0, "local")
    # Unit loops kept: the loop counts below must not depend on the sampled tile sizes, or
    # MetaSchedule could not replay the trace with other decisions (get_loops' output count).
    sch.reverse_compute_at(acc, io, preserve_unit_loops=True)
    fused = [acc]
    for name in epilogues:  # in program order, so each one's producers are placed first
        epilogue = sch.get_sblock(name)
        try:
            sch.reverse_compute_at(epilogue, io, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - it then runs as its own loop nest, after
            break
        fused.append(epilogue)
    sch.parallel(jo)
    sch.vectorize(jv)
    for loop in (ju, ii, ri):
        sch.unroll(loop)
    if not sample:  # when tuning, MetaSchedule's RewriteReductionBlock postproc does it
        init = sch.decompose_reduction(block, ro)
        sch.vectorize(sch.get_loops(init)[-1])
    for blk in fused:
        inner = sch.get_loops(blk)[2:]  # below n_outer and m_outer
        if inner:
            _, vec = sch.split(sch.fuse(*inner) if len(inner) > 1 else inner[0],
                               [None, VECTOR_LANES])
            sch.vectorize(vec)
    return True


def register_tuning_rule() -> None:
    """Register :func:`apply_template` (sampling its knobs) as this kernel's MetaSchedule rule
    on CPU targets: the search explores the template's tilings instead of generic ones (16
    generic trials on a 4096x4096 one-row layer were 3x slower than the template)."""
    import tvm_ffi

    def rule(sch, block):
        return [sch] if apply_template(sch, block, sample=True) else []

    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{TUNING_RULE}", rule,
                                 override=True)


def _blocks_after(sch, block) -> list[str]:
    """Names of the blocks that follow ``block`` in the function (fused epilogues), in
    program order. Read from the IR, not with ``get_child_blocks``: that would be a traced
    instruction whose output count MetaSchedule re-checks on replay."""
    import re

    names = re.findall(r'T\.sblock\("([^"]+)"\)', sch.mod["main"].script())
    me = sch.get(block).name_hint
    return [n for n in names[names.index(me) + 1:] if n != "root"]
