"""The posit<8, 1> codec (pipeline.schemes.posit) against an independent reference written here:
decode from the posit definition by arithmetic (not bit strings), encode by picking the nearest
of all 256 decoded values."""

import numpy as np
import pytest

from pipeline.schemes import posit

CODES = np.arange(256, dtype=np.uint8)


def _reference_decode(code: int, es: int) -> float:
    """Value of a posit<8, es> code by integer arithmetic on the code."""
    if code == 0:
        return 0.0
    if code == 0x80:
        return float("nan")
    sign = -1.0 if code & 0x80 else 1.0
    if code & 0x80:
        code = 256 - code
    bits = code & 0x7F  # 7 bits after the sign
    pos = 6
    first = (bits >> pos) & 1
    run = 0
    while pos >= 0 and ((bits >> pos) & 1) == first:
        run += 1
        pos -= 1
    k = run - 1 if first else -run
    pos -= 1  # the terminating bit (if any)
    remaining = max(pos + 1, 0)  # bits left after the regime
    tail = bits & ((1 << remaining) - 1)
    e_avail = min(es, remaining)
    e = (tail >> (remaining - e_avail)) << (es - e_avail) if e_avail else 0
    f_bits = remaining - e_avail
    f = tail & ((1 << f_bits) - 1)
    return sign * 2.0 ** (k * (1 << es) + e) * (1 + f / (1 << f_bits))


def _reference_encode(x: np.ndarray, es: int) -> np.ndarray:
    """Nearest posit by value among the codes of the value's sign (never NaR, never 0 for a
    nonzero value), ties to the even code; past +-maxpos (inf too) +-maxpos, below +-minpos
    +-minpos; NaN -> NaR. Between minpos and maxpos the float64 distances are exact (a float32
    and a posit within 2**+-12 differ by at most 48 significant bits)."""
    values = np.array([_reference_decode(c, es) for c in range(256)])
    top, low = values[0x7F], values[0x01]
    out = np.empty(x.shape, np.uint8)
    for i, v in enumerate(x.astype(np.float64)):
        if np.isnan(v):
            out[i] = 0x80
            continue
        if v == 0:
            out[i] = 0
            continue
        candidates = range(1, 0x80) if v > 0 else range(0x81, 0x100)
        a = min(max(abs(v), low), top)
        best, best_d = None, None
        for c in candidates:
            d = abs(a - abs(values[c]))
            if best is None or d < best_d or (d == best_d and c % 2 == 0):
                best, best_d = c, d
        out[i] = best
    return out


@pytest.mark.parametrize("es", [0, 1, 2])
def test_decode_matches_the_reference_on_all_256_codes(es):
    ref = np.array([_reference_decode(c, es) for c in range(256)])
    got = posit.table(es).astype(np.float64)
    assert np.array_equal(got, ref, equal_nan=True)
    assert np.array_equal(posit.decode(CODES, es), posit.table(es), equal_nan=True)


def test_posit8_known_values():
    t = posit.table(1)
    assert t[0x40] == 1.0 and t[0x7F] == 4096.0 and t[0x01] == 2.0 ** -12
    assert t[0x60] == 4.0 and t[0x50] == 2.0 and t[0x48] == 1.5 and t[0xC0] == -1.0
    assert np.isnan(t[0x80]) and t[0] == 0
    assert np.all(np.diff(t[1:0x80]) > 0)  # positive codes increase with the value


def _values(rng, es):
    t = posit.table(es)[1:0x80].astype(np.float64)
    mids = ((t[:-1] + t[1:]) / 2).astype(np.float32)  # exact ties (checked below)
    x = np.concatenate([
        rng.standard_normal(3000).astype(np.float32) * 3,
        np.exp2(rng.uniform(-16, 16, 3000)).astype(np.float32),
        mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf)),
        t.astype(np.float32),
        np.array([0.0, 1e-30, 1e-45, 5000, 1e30, np.inf, np.nan], np.float32)])
    assert np.array_equal(mids.astype(np.float64), (t[:-1] + t[1:]) / 2)
    return np.concatenate([x, -x])


@pytest.mark.parametrize("es", [1, 0, 2])
def test_encode_is_the_nearest_posit_with_ties_to_even(es):
    x = _values(np.random.default_rng(es), es)
    ours = posit.encode(x, es)
    ref = _reference_encode(x, es)
    bad = np.flatnonzero(ours != ref)
    assert bad.size == 0, (x[bad[:5]], ours[bad[:5]], ref[bad[:5]])


def test_saturation_and_special_values():
    x = np.array([1e30, -1e30, np.inf, -np.inf, 1e-30, -1e-30, 0.0, -0.0, np.nan], np.float32)
    assert list(posit.encode(x)) == [0x7F, 0x81, 0x7F, 0x81, 0x01, 0xFF, 0, 0, 0x80]
    assert np.array_equal(posit.encode(posit.table(1)[CODES != 0x80]), CODES[CODES != 0x80])


def test_the_kernels_integer_decode_is_exact_on_every_code_but_nar():
    ok = CODES != posit.NAR_CODE
    got, want = posit.decode_by_bits(CODES)[ok], posit.table(1)[ok]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
