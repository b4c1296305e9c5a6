"""Codec of FP8 E4M3 (``float8_e4m3fn``): the project's own bit-exact encode and decode.

Layout of a code: sign (bit 7), 4 exponent bits (bias 7), 3 mantissa bits. Exponent field 0
holds the subnormals ``m * 2**-9``; ``0x7F`` and ``0xFF`` are NaN; there is no infinity, so
the largest finite value is ``0x7E`` = 448.

- :func:`decode`: every one of the 256 codes, subnormals, ``-0.0`` (``0x80``) and NaN
  included, as float32 (exactly: every E4M3 value is a float32 value).
- :func:`encode`: float32 -> code, round to nearest, ties to even. **Saturating**: anything
  beyond ±448 (±inf included) becomes ±448. That is our contract, not ml_dtypes': its
  ``astype(float8_e4m3fn)`` rounds up to 464 to 448 as we do, but turns anything past 464
  (and ±inf) into NaN. NaN -> ``0x7F``
  (``0xFF`` for a negative NaN), as ml_dtypes does.

Why our own: TVM 0.27's fp8 -> fp32 conversion on llvm is wrong on 18 of the 256 codes and
``relax.dequantize`` truncates fp8 through int32 (FACTS.md), so the kernel decodes the bits
itself (:mod:`pipeline.compiler.dequant_matmul`, mirrored by :func:`decode_via_half`); the
tests check both this codec and that decode against ``ml_dtypes.float8_e4m3fn`` on every code.
"""

from __future__ import annotations

import numpy as np

MAX = 448.0  # largest finite value (code 0x7E)
MIN_NORMAL = 2.0 ** -6
MIN_SUBNORMAL = 2.0 ** -9
NAN_CODE = 0x7F
MAX_CODE = 0x7E
EXP_BIAS = 7
MANTISSA_BITS = 3
# E4M3 read as a float16 bit pattern (see decode_via_half) is the value times 2**-8
HALF_FACTOR = 256.0

def decode(codes) -> np.ndarray:
    """float32 value of each E4M3 code (``uint8`` array or anything that casts to it)."""
    return TABLE[np.asarray(codes, dtype=np.uint8)]


def _table() -> np.ndarray:
    codes = np.arange(256)
    exp = (codes >> MANTISSA_BITS) & 0xF
    man = codes & 0x7
    mag = np.where(exp == 0, man * MIN_SUBNORMAL,
                   np.ldexp(1.0 + man / 8.0, exp - EXP_BIAS))
    value = np.where(codes & 0x80, -mag, mag)
    value[(codes & 0x7F) == NAN_CODE] = np.nan
    return value.astype(np.float32)


TABLE = _table()  # float32 [256]: the decode of every code


def decode_via_half(codes) -> np.ndarray:
    """The kernel's decode in numpy: the code sign-extended to 16 bits, shifted left by 7 and
    masked with ``0xBF80`` is the float16 with the same sign, exponent and mantissa bits, 2**-8
    times the E4M3 value (subnormals included: float16's are exact), which the hardware's
    half -> float conversion widens (the kernel multiplies by 2**8 once per output). Exact
    for every code but the NaN ones (0x7F reads as 480), which :func:`encode` never writes."""
    signed = np.asarray(codes, dtype=np.uint8).view(np.int8).astype(np.int16)
    bits = ((signed << 7).view(np.uint16) & np.uint16(0xBF80)).astype(np.uint16)
    return bits.view(np.float16).astype(np.float32) * np.float32(HALF_FACTOR)


def encode(values) -> np.ndarray:
    """E4M3 codes (``uint8``) of float32 values: nearest, ties to even, saturating at ±448,
    NaN -> 0x7F / 0xFF (see the module docstring)."""
    x = np.asarray(values, dtype=np.float32)
    bits = x.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    mag_bits = bits & np.uint32(0x7FFFFFFF)
    a = mag_bits.view(np.float32)
    # normals: round the float32 mantissa to 3 bits, nearest even (a carry moves the
    # exponent up, as it should), then rebias the exponent from 127 to 7
    shift = 23 - MANTISSA_BITS
    lsb = (mag_bits >> shift) & 1
    rounded = (mag_bits.astype(np.uint64) + ((1 << (shift - 1)) - 1) + lsb) >> shift
    normal = rounded.astype(np.int64) - ((127 - EXP_BIAS) << MANTISSA_BITS)
    # subnormals: multiples of 2**-9 (a * 512 is exact in float32); rint rounds half to
    # even; 8 (rounded up to 2**-6) is the smallest normal's code, as it should be
    with np.errstate(over="ignore", invalid="ignore"):
        sub = np.rint(np.where(a < MIN_NORMAL, a, 0).astype(np.float32) * np.float32(512))
    code = np.where(a < MIN_NORMAL, sub.astype(np.int64), normal)
    code = np.minimum(code, MAX_CODE)  # saturate (inf included: its bits round past 448)
    code = np.where(np.isnan(x), NAN_CODE, code)
    return (code.astype(np.uint8) | sign).astype(np.uint8)
