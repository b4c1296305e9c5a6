"""The bfloat16 codec against ml_dtypes: every code decodes, every float32 class encodes."""

import ml_dtypes
import numpy as np

from pipeline.schemes import bfloat16


def test_every_code_decodes_as_ml_dtypes_does():
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = bfloat16.decode(codes)
    ref = codes.view(ml_dtypes.bfloat16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    assert np.isnan(ours[nan]).all()


def _float32_classes(rng) -> np.ndarray:
    finfo = np.finfo(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, finfo.max, -finfo.max,
                        finfo.tiny, -finfo.tiny, finfo.smallest_subnormal,
                        -finfo.smallest_subnormal, 1.0, -1.0, 65504.0], np.float32)
    # ties: the half-way point between two bfloat16 values, with an even and an odd low bit
    halfway = (np.array([0x3F808000, 0x3F818000, 0x00018000, 0x7F7F8000, 0x7F7FFFFF,
                         0x807F8000, 0x7FFFFFFF, 0xFF800001], np.uint32)).view(np.float32)
    every_bits = rng.integers(0, 1 << 32, 400_000, dtype=np.uint64).astype(np.uint32)
    subnormals = rng.integers(1, 1 << 23, 50_000, dtype=np.uint32)  # exponent 0
    return np.concatenate([special, halfway, every_bits.view(np.float32),
                           subnormals.view(np.float32),
                           rng.standard_normal(50_000).astype(np.float32)])


def test_encode_rounds_to_nearest_even_like_ml_dtypes():
    values = _float32_classes(np.random.default_rng(0))
    ours = bfloat16.encode(values)
    with np.errstate(invalid="ignore"):
        ref = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(values)
    assert np.array_equal(ours[~nan], ref[~nan])
    assert np.isnan(bfloat16.decode(ours[nan])).all(), "NaN must stay NaN, never inf"
    assert bfloat16.encode(np.array([1.00390625], np.float32))[0] == 0x3F80  # tie to even
    assert bfloat16.encode(np.array([1.01171875], np.float32))[0] == 0x3F82  # tie to even


def test_exactness_check():
    rounded = bfloat16.round_to_bfloat16(np.linspace(-3, 3, 101, dtype=np.float32))
    assert bfloat16.is_bfloat16_exact(rounded)
    assert not bfloat16.is_bfloat16_exact(np.array([0.1], np.float32))
    assert not bfloat16.is_bfloat16_exact(rounded.astype(np.float64))  # float32 only
