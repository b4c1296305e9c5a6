"""Codec of 8-bit posits, posit<8, es> (es = 1 by default: **posit8 is posit<8, 1>**).

A code: sign bit, then a regime (a run of equal bits ended by the opposite bit or by the
code's end), ``es`` exponent bits, the remaining bits a fraction with a hidden 1. Negative
values are the two's complement of the positive code. ``0x00`` is 0, ``0x80`` is NaR (not a
real; decoded as NaN). posit<8, 1>: maxpos = 2**12 = 4096 (``0x7F``), minpos = 2**-12
(``0x01``); 4 fraction bits in [1/4, 4), fewer further out (tapered precision: most precise
near 1, which is why the weight schemes scale weights to sit there, see
:mod:`pipeline.schemes.codes8`).

- :func:`decode` / :func:`table`: every code, exactly (all posit<8, es<=2> values are
  float32 values).
- :func:`encode`: float32 -> code, the **nearest posit by value**, ties to the even bit
  pattern; never NaR for a real number (beyond ±maxpos saturates to ±maxpos, ±inf too) and
  never 0 for a nonzero one (below minpos gives ±minpos); NaN -> NaR.
  This is the posit standard's round-to-nearest-even on the bit string everywhere except
  where the regime leaves no room for an exponent bit (posit<8, 1>: between minpos 2**-12
  and 2**-10, and between 1024 and maxpos 4096): there the standard's midpoint is the
  geometric one (2**-11, 2048) and ours the arithmetic one, which gives the smaller error,
  what a weight format wants. The weight schemes' scaling keeps weights clear of both gaps.

No posit type exists in ONNX, ml_dtypes or TVM 0.27 (FACTS.md): the ONNX form gathers from
the decode table, the kernel from the same table (a 1 KB, L1-resident constant).
"""

from __future__ import annotations

import numpy as np

NBITS = 8
NAR_CODE = 0x80


def _decode_code(code: int, es: int) -> float:
    """One code's value (float64), straight from the definition."""
    mask = (1 << NBITS) - 1
    if code == 0:
        return 0.0
    if code == NAR_CODE:
        return float("nan")
    negative = bool(code >> (NBITS - 1))
    if negative:
        code = (-code) & mask
    body = format(code, f"0{NBITS}b")[1:]  # the bits after the sign
    run = len(body) - len(body.lstrip(body[0]))
    regime = run - 1 if body[0] == "1" else -run
    rest = body[run + 1:]  # past the terminating bit (absent when the run fills the code)
    exp_bits = rest[:es]
    exponent = int(exp_bits.ljust(es, "0"), 2) if es else 0  # cut-off exponent bits are 0
    frac_bits = rest[es:]
    fraction = int(frac_bits, 2) / (1 << len(frac_bits)) if frac_bits else 0.0
    value = 2.0 ** (regime * (1 << es) + exponent) * (1.0 + fraction)
    return -value if negative else value


_TABLES: dict[int, np.ndarray] = {}


def table(es: int = 1) -> np.ndarray:
    """float32 [256]: the value of every posit<8, es> code (NaR as NaN)."""
    if es not in _TABLES:
        if not 0 <= es <= 2:
            raise ValueError(f"posit<8, {es}>: es must be 0, 1 or 2")
        values = np.array([_decode_code(c, es) for c in range(256)])
        as32 = values.astype(np.float32)
        assert np.array_equal(as32.astype(np.float64), values, equal_nan=True)
        as32.setflags(write=False)
        _TABLES[es] = as32
    return _TABLES[es]


def maxpos(es: int = 1) -> float:
    return float(table(es)[0x7F])


def minpos(es: int = 1) -> float:
    return float(table(es)[0x01])


def decode(codes, es: int = 1) -> np.ndarray:
    """float32 value of each posit<8, es> code."""
    return table(es)[np.asarray(codes, dtype=np.uint8)]


def encode(values, es: int = 1) -> np.ndarray:
    """posit<8, es> codes (``uint8``) of float32 values (rounding: see the module docstring)."""
    x = np.asarray(values, dtype=np.float32).astype(np.float64)
    positive = table(es)[1:0x80].astype(np.float64)  # codes 1..127, increasing
    a = np.abs(x)
    upper = np.clip(np.searchsorted(positive, a), 1, len(positive) - 1)  # index of hi
    lo, hi = positive[upper - 1], positive[upper]
    mid = (lo + hi) / 2  # exact in float64
    up = (a > mid) | ((a == mid) & (upper % 2 == 1))  # code = index + 1: even code is odd idx
    code = np.where(up, upper, upper - 1) + 1  # saturates at both ends by the clip above
    code = np.where(a == 0, 0, code)
    code = np.where(x < 0, (-code) & 0xFF, code)
    code = np.where(np.isnan(x), NAR_CODE, code)
    return code.astype(np.uint8)


def decode_by_bits(codes) -> np.ndarray:
    """posit<8, 1> decoded with integer ops only, as the kernel does (numpy mirror, uint32
    lanes): negate two's-complement codes, put the 7 bits after the sign at the top of a
    word ``y``, the regime run length ``r`` is the count of leading zeros of ``y`` (or of
    ``~y`` for a run of ones), the bits left after the run and its terminator are ``rem = y
    << (r + 1)``; then the float32 bits are ``(127 + 2k) << 23`` plus ``rem >> 8`` (the
    exponent bit lands on the exponent field's lowest bit, the fraction under it), ``k`` the
    regime (``r - 1`` for ones, ``-r`` for zeros). Exact for every code but NaR (0x80), which
    :func:`encode` never writes for a real number."""
    c = np.asarray(codes, dtype=np.uint8).astype(np.uint32)
    sign = c >> 7
    mag = ((c ^ (sign * np.uint32(0xFF))) + sign) & np.uint32(0xFF)
    y = (mag << np.uint32(25)).astype(np.uint32)
    ones = y >> np.uint32(31)
    # | 1 << 24: y only has bits 25..31, so this changes no count but 0's (clz(0) is
    # undefined in LLVM): a zero code then reads a run of 7, harmless, its value is selected
    t = (np.where(ones == 1, ~y, y) | np.uint32(1 << 24)).astype(np.uint32)
    run = _clz32(t)  # 0..7
    rem = (y.astype(np.uint64) << (run + 1)) & 0xFFFFFFFF
    two_k = np.where(ones == 1, 2 * run.astype(np.int64) - 2, -2 * run.astype(np.int64))
    bits = ((127 + two_k) << 23) + (rem.astype(np.int64) >> 8)
    bits = (bits.astype(np.uint32) | (sign << np.uint32(31))).astype(np.uint32)
    return np.where(mag == 0, np.float32(0), bits.view(np.float32))


def _clz32(x: np.ndarray) -> np.ndarray:
    """Leading zeros of nonzero uint32 values."""
    return (31 - np.floor(np.log2(np.asarray(x, np.uint32).astype(np.float64)))
            ).astype(np.uint32)
