"""The block-quant kernels (formats/kernels.py) against gguf-py's numpy quantizers and a literal
transcription of ggml's C reference; the quant table's entries; the fp16 helpers against numpy.

Two oracles, because they disagree in one corner: the sign of a zero scale. ggml starts Q4_0's
`max` at +0.0 and keeps the first of equal values for Q4_1's min/max; gguf-py uses argmax /
np.min, which pick another signed zero. The kernels follow ggml (the files come from ggml), so
they are compared with the C transcription on every input and with gguf-py on inputs whose
zeros are all +0.0 (where the two agree).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from formats import kernels, quants
from formats.errors import BadInput
from formats.kernels import _f16_to_f32_array, _f32_to_f16_array

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
F = np.float32


def ours_quantize(name, x):
    return getattr(kernels, "quantize_" + name.lower())(x)


def ours_dequantize(name, data):
    return getattr(kernels, "dequantize_" + name.lower())(data)


def gguf_quantize(name, x):
    with np.errstate(all="ignore"):
        return gguf_quants.quantize(x.reshape(-1, 32), GGMLQuantizationType[name]).reshape(-1)


def gguf_dequantize(name, data):
    with np.errstate(all="ignore"):
        return gguf_quants.dequantize(data.reshape(1, -1), GGMLQuantizationType[name]).reshape(-1)


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def assert_same_floats(actual, expected):
    """Bit-identical, except that any NaN matches any NaN: which NaN operand's payload an x86
    add propagates depends on operand order, which LLVM and numpy's SIMD loops choose freely."""
    a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert a.shape == e.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
    keep = ~np.isnan(e)
    np.testing.assert_array_equal(bits(a[keep]), bits(e[keep]))


def positive_zeros(x):
    return x + F(0.0)        # -0.0 + +0.0 == +0.0; every other value is unchanged


# ---------------------------------------------------------------------------------------------
# ggml's quantize_row_*_ref, transcribed line by line with float32 scalars (slow, obvious)

def _c_int8(v) -> int:
    """(int8_t)v for a float on x86: cvttss2si to int32 (NaN/inf/out of range -> 0x80000000),
    keep the low byte."""
    b = int(v) & 0xFF if -2.0**31 < v < 2.0**31 else 0
    return b - 256 if b >= 128 else b


def _roundf(v: float) -> float:
    # half away from zero; exact in float64 for any float32 v
    return math.copysign(math.floor(abs(v) + 0.5), v) if math.isfinite(v) else v


def _fp16(v) -> bytes:
    return np.array(v, dtype=np.float32).astype("<f2").tobytes()


def ggml_quantize(name: str, x: np.ndarray) -> np.ndarray:
    out = bytearray()
    with np.errstate(all="ignore"):
        for blk in x.reshape(-1, 32):
            blk = [F(v) for v in blk]
            if name == "Q8_0":
                amax = F(0.0)
                for v in blk:
                    amax = amax if amax > abs(v) else abs(v)
                d = amax / F(127)
                id_ = F(1.0) / d if d else F(0.0)
                out += _fp16(d)
                out += bytes(_c_int8(_roundf(float(v * id_))) & 0xFF for v in blk)
                continue
            if name in ("Q4_0", "Q5_0"):
                amax, vmax = F(0.0), F(0.0)
                for v in blk:
                    if amax < abs(v):
                        amax, vmax = abs(v), v
                d = vmax / F(-8 if name == "Q4_0" else -16)
                id_ = F(1.0) / d if d else F(0.0)
                out += _fp16(d)
                bias, nmax = (F(8.5), 15) if name == "Q4_0" else (F(16.5), 31)
                q = [min(nmax, _c_int8(v * id_ + bias)) & 0xFF for v in blk]
            else:
                lo, hi = F(3.4028234663852886e38), F(-3.4028234663852886e38)
                for v in blk:
                    if v < lo:
                        lo = v
                    if v > hi:
                        hi = v
                d = (hi - lo) / F(15 if name == "Q4_1" else 31)
                id_ = F(1.0) / d if d else F(0.0)
                out += _fp16(d) + _fp16(lo)
                if name == "Q4_1":
                    q = [min(15, _c_int8((v - lo) * id_ + F(0.5))) & 0xFF for v in blk]
                else:   # (uint8_t)(x0 + 0.5f), no clamp
                    q = [_c_int8((v - lo) * id_ + F(0.5)) & 0xFF for v in blk]
            if name in ("Q5_0", "Q5_1"):
                qh = 0
                for j in range(16):
                    qh |= ((q[j] & 0x10) >> 4) << j
                    qh |= ((q[j + 16] & 0x10) >> 4) << (j + 16)
                out += qh.to_bytes(4, "little")
                out += bytes((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4) for j in range(16))
            else:
                out += bytes((q[j] | (q[j + 16] << 4)) & 0xFF for j in range(16))
    return np.frombuffer(bytes(out), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Inputs: whole blocks built from recipes that hit ggml's corner cases

RECIPES = ("floats", "normal", "zeros", "constant", "tie", "outlier", "tiny", "halves")


def _block(recipe: str, rng: np.random.Generator) -> np.ndarray:
    if recipe == "normal":
        return rng.standard_normal(32) * 10.0 ** rng.uniform(-30, 30)
    if recipe == "zeros":
        return np.where(rng.random(32) < 0.5, -0.0, 0.0)
    if recipe == "constant":
        return np.full(32, rng.choice([0.25, -3.0, 1e-40, 7e30]))
    if recipe == "tie":       # the largest |x| twice, with opposite signs, in either order
        b = rng.standard_normal(32)
        a = np.abs(b).max() * (1 + rng.random()) * rng.choice([-1.0, 1.0])
        i, j = sorted(rng.choice(32, size=2, replace=False))
        b[i], b[j] = a, -a
        return b
    if recipe == "outlier":
        b = rng.standard_normal(32) * 1e-3
        b[rng.integers(32)] = rng.choice([1e4, -1e4, 65504.0, -7e4, 1e30, -3e38, 3.4e38])
        return b
    if recipe == "tiny":      # float32 subnormals (k * 2**-149), sometimes a lone one
        b = rng.integers(-2**20, 2**20, 32) * 2.0**-149
        if rng.random() < 0.3:
            b = np.zeros(32)
            b[rng.integers(32)] = rng.integers(-40, 40) * 2.0**-149
        return b
    if recipe == "halves":    # values that land exactly on .5 after scaling by 1/d
        top = float(rng.choice([8, 15, 16, 31, 127]))
        lo = 0.0 if rng.random() < 0.5 else -top
        b = (rng.integers(int(2 * lo), int(2 * top) + 1, 32) / 2.0).astype(np.float32)
        if rng.random() < 0.5:   # one float32 ulp off: 0.49999997 + 0.5f rounds to 1.0f
            b = np.nextafter(b, np.where(rng.random(32) < 0.5, -np.inf, np.inf).astype(np.float32))
        b[rng.integers(32)] = top
        if lo:
            b[rng.integers(32)] = lo
        return b * 2.0 ** rng.integers(-20, 21)
    raise AssertionError(recipe)


@st.composite
def matrices(draw, max_blocks: int = 6):
    """(n_blocks * 32,) float32 values, each block from one recipe."""
    n = draw(st.integers(1, max_blocks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    blocks = []
    for _ in range(n):
        recipe = draw(st.sampled_from(RECIPES))
        if recipe == "floats":
            b = draw(hnp.arrays(np.float32, 32, elements=st.floats(
                width=32, allow_nan=False, allow_infinity=False)))
        else:
            with np.errstate(over="ignore"):
                b = _block(recipe, rng).astype(np.float32)
        blocks.append(np.asarray(b, dtype=np.float32))
    x = np.concatenate(blocks)
    if draw(st.booleans()):   # source tensor was float16: round to it, then work in float32
        x = np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)
    assert x.size == 32 * n and np.isfinite(x).all()
    return x


# ---------------------------------------------------------------------------------------------
# Bit-exactness

@pytest.mark.parametrize("name", BLOCK_TYPES)
@settings(max_examples=30, deadline=None)
@given(x=matrices())
def test_quantize_and_dequantize_bit_exact(name, x):
    ours = ours_quantize(name, x)
    assert ours.dtype == np.uint8
    assert ours.size == x.size // 32 * quants.by_name(name).block_bytes
    # ggml's C, signed zeros included
    np.testing.assert_array_equal(ours, ggml_quantize(name, x))
    # gguf-py, on the same values with +0.0 for every zero
    xp = positive_zeros(x)
    np.testing.assert_array_equal(ours_quantize(name, xp), gguf_quantize(name, xp))
    # dequantize what we produced
    deq = ours_dequantize(name, ours)
    assert deq.dtype == np.float32 and deq.shape == x.shape
    np.testing.assert_array_equal(bits(deq), bits(gguf_dequantize(name, ours)))


@pytest.mark.parametrize("name", BLOCK_TYPES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_dequantize_arbitrary_bytes(name, data):
    bb = quants.by_name(name).block_bytes
    n = data.draw(st.integers(1, 16))
    raw = np.frombuffer(data.draw(st.binary(min_size=n * bb, max_size=n * bb)), dtype=np.uint8)
    assert_same_floats(ours_dequantize(name, raw), gguf_dequantize(name, raw))


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_dequantize_every_scale(name):
    """One block per fp16 scale pattern (subnormal, inf and NaN scales and mins included)."""
    bb = quants.by_name(name).block_bytes
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(65536, bb), dtype=np.uint8)
    raw[:, 0:2] = np.arange(65536, dtype="<u2").view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(-1)
    assert_same_floats(ours_dequantize(name, raw), gguf_dequantize(name, raw))


@pytest.mark.parametrize("source", [np.float32, np.float16])
@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_large_random_matrix(name, source):
    """A float16 source is widened to float32 first, as ggml's converters do."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 1024)) * rng.uniform(1e-3, 10, size=(64, 1))
    x = x.astype(source).astype(np.float32)
    ours = ours_quantize(name, x.reshape(-1))
    np.testing.assert_array_equal(ours, gguf_quantize(name, x))
    np.testing.assert_array_equal(bits(ours_dequantize(name, ours)),
                                  bits(gguf_dequantize(name, ours)))


def test_known_bytes():
    """Hand-computed blocks, so a shared misreading of the layout cannot hide."""
    x = np.zeros(32, np.float32)
    x[0], x[16], x[1] = -8.0, 4.0, 0.5                    # Q4_0: d = -8/-8 = 1.0, id = 1
    q = ours_quantize("Q4_0", x)
    assert q[:2].tobytes() == b"\x00\x3c"                  # fp16 1.0, little-endian
    assert q[2] == 0 | (12 << 4)          # x[0]: trunc(-8 + 8.5) = 0; x[16]: trunc(12.5) = 12
    assert q[3] == 9 | (8 << 4)           # x[1]: trunc(0.5 + 8.5) = 9; x[17]: trunc(8.5) = 8
    assert set(q[4:]) == {0x88}
    x8 = np.arange(32, dtype=np.float32) - 16.0           # Q8_0: amax 16, d = 16/127
    q8 = ours_quantize("Q8_0", x8)
    assert q8[:2].tobytes() == np.float16(16 / 127).tobytes()
    assert q8[2:].view(np.int8)[0] == -127 and q8[2:].view(np.int8)[16] == 0


def test_q8_0_rounds_half_away_from_zero():
    x = np.array([127.0, 2.5, -2.5, 0.5, -0.5, 1.5] + [0.0] * 26, np.float32)   # d = 1, id = 1
    q = ours_quantize("Q8_0", x)[2:].view(np.int8)
    assert list(q[:6]) == [127, 3, -3, 1, -1, 2]


def test_signed_zero_scales_follow_ggml():
    # Q4_0, all zeros: ggml's max stays +0.0, d = +0.0 / -8 = -0.0 whatever the zeros' signs.
    for name in ("Q4_0", "Q5_0"):
        for first in (0.0, -0.0):
            x = np.zeros(32, np.float32)
            x[0] = first
            q = ours_quantize(name, x)
            assert q[:2].tobytes() == b"\x00\x80", (name, first)
            np.testing.assert_array_equal(q, ggml_quantize(name, x))
    # (gguf-py takes x[argmax|x|] = x[0] as the max, so it stores +0.0 when x[0] is -0.0.)
    # Q4_1: the first of equal minima wins, so m keeps the first zero's sign.
    for first, m in ((-0.0, b"\x00\x80"), (0.0, b"\x00\x00")):
        x = np.ones(32, np.float32)
        x[0], x[1] = first, -first
        q = ours_quantize("Q4_1", x)
        assert q[2:4].tobytes() == m
        np.testing.assert_array_equal(q, ggml_quantize("Q4_1", x))


def test_subnormal_scale_with_infinite_inverse():
    """max|x| ~ 1e-39: d is a float32 subnormal, 1/d overflows to inf, x*id is NaN or inf."""
    x = np.zeros(32, np.float32)
    x[3], x[20] = 1e-39, -4e-40
    for name in BLOCK_TYPES:
        np.testing.assert_array_equal(ours_quantize(name, x), gguf_quantize(name, x))
        np.testing.assert_array_equal(ours_quantize(name, x), ggml_quantize(name, x))


def test_non_finite_input_does_not_crash():
    x = np.zeros(96, np.float32)
    x[0], x[40], x[70] = np.nan, np.inf, -np.inf
    for name in BLOCK_TYPES:
        q = ours_quantize(name, x)
        assert q.size == 3 * quants.by_name(name).block_bytes
        assert ours_dequantize(name, q).shape == (96,)


# ---------------------------------------------------------------------------------------------
# Wrapper contract

@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_wrappers_validate(name):
    bb = quants.by_name(name).block_bytes
    with pytest.raises(BadInput, match="multiple of 32"):
        ours_quantize(name, np.zeros(33, np.float32))
    with pytest.raises(BadInput, match="float32"):
        ours_quantize(name, np.zeros(32, np.float64))
    with pytest.raises(BadInput, match="1-D"):
        ours_quantize(name, np.zeros((2, 32), np.float32))
    with pytest.raises(BadInput, match=f"multiple of {bb} bytes"):
        ours_dequantize(name, np.zeros(bb + 1, np.uint8))
    with pytest.raises(BadInput, match="uint8"):
        ours_dequantize(name, np.zeros(bb, np.int8))
    assert ours_quantize(name, np.zeros(0, np.float32)).size == 0
    assert ours_dequantize(name, np.zeros(0, np.uint8)).size == 0
    # read-only and strided inputs work and give the same bytes
    x = np.random.default_rng(3).standard_normal(128).astype(np.float32)
    ro = x.copy()
    ro.flags.writeable = False
    wide = np.repeat(x, 2)[::2]
    expect = ours_quantize(name, x)
    np.testing.assert_array_equal(ours_quantize(name, ro), expect)
    np.testing.assert_array_equal(ours_quantize(name, wide), expect)
    frozen = np.frombuffer(expect.tobytes(), dtype=np.uint8)
    np.testing.assert_array_equal(bits(ours_dequantize(name, frozen)),
                                  bits(ours_dequantize(name, expect)))


# ---------------------------------------------------------------------------------------------
# Through the type table

@pytest.mark.parametrize("name", BLOCK_TYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 96), (128,)])
def test_table_block_types(name, shape):
    qt = quants.by_name(name)
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    q = qt.quantize(x)
    rows = int(np.prod(shape[:-1]))
    assert q.shape == (rows, qt.row_bytes(shape[-1]))
    ref = gguf_quants.quantize(x, GGMLQuantizationType[name])
    np.testing.assert_array_equal(q, ref.reshape(q.shape))
    for data in (q, q.tobytes()):
        deq = qt.dequantize(data, shape)
        assert deq.shape == shape and deq.dtype == np.float32
        np.testing.assert_array_equal(bits(deq),
                                      bits(gguf_quants.dequantize(ref, GGMLQuantizationType[name])))
    with pytest.raises(BadInput):
        qt.dequantize(q.tobytes()[:-1], shape)
    with pytest.raises(BadInput):
        qt.quantize(np.zeros((2, 40), np.float32))


def _special_f32(rng, n):
    """Random bit patterns (every class of float32) plus edge values."""
    edges = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 3.4028235e38,
                      2.0**-24, 2.0**-25, 2.0**-14, 1e-45, np.inf, -np.inf, np.nan], np.float32)
    u = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    u = np.concatenate([u, np.array([0x7F800001, 0xFFC00001, 0x7FBFFFFF, 0x7F7FFFFF,
                                     0x00000001, 0x807FFFFF], np.uint32)])
    return np.concatenate([edges, u.view(np.float32)])


def test_table_f16_matches_numpy():
    qt = quants.by_name("F16")
    x = _special_f32(np.random.default_rng(5), 4096)
    with np.errstate(all="ignore"):
        expect = x.astype(np.float16)
        q = qt.quantize(x)
    assert q.shape == (1, 2 * x.size)
    np.testing.assert_array_equal(q.reshape(-1).view(np.uint16), expect.view(np.uint16))
    np.testing.assert_array_equal(bits(qt.dequantize(q, x.shape)),
                                  bits(expect.astype(np.float32)))
    np.testing.assert_array_equal(bits(qt.dequantize(q, x.shape)),
                                  bits(gguf_quants.dequantize(expect.view(np.uint8),
                                                              GGMLQuantizationType.F16)))


def test_table_bf16_matches_gguf():
    qt = quants.by_name("BF16")
    x = _special_f32(np.random.default_rng(6), 4096).reshape(-1, 2)
    q = qt.quantize(x)
    ref = gguf_quants.quantize(x, GGMLQuantizationType.BF16)
    assert q.shape == ref.shape == (x.shape[0], 4)
    np.testing.assert_array_equal(q, ref)
    np.testing.assert_array_equal(bits(qt.dequantize(q, x.shape)),
                                  bits(gguf_quants.dequantize(ref, GGMLQuantizationType.BF16)))


# ---------------------------------------------------------------------------------------------
# fp16 helpers, looped inside numba so no float64 boxing touches the bits (it would quiet sNaNs).
# (The loops live in formats/kernels.py, not here: numba's cache of a kernel in this file would
# not notice an edit of the helpers it inlines, and the test would keep passing on stale code.)

def test_f32_to_f16_matches_numpy():
    rng = np.random.default_rng(7)
    # all halfway points between adjacent finite halves, and one float32 ulp either side
    h = np.arange(0x7C00, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).view(np.float16).astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)                  # exact: 12 significant bits
    halfway = np.concatenate([mid, np.nextafter(mid, np.float32(0)),
                              np.nextafter(mid, np.float32(np.inf))])
    # dense around the half range (exponents 2**-26 .. 2**17), random bits, edge values
    near = (rng.integers(0, 2**23, 1_000_000) | (rng.integers(100, 145, 1_000_000) << 23))
    x = np.concatenate([halfway, near.astype(np.uint32).view(np.float32),
                        _special_f32(rng, 1_000_000)])
    x = np.concatenate([x, -x])
    out = np.empty(x.size, np.uint16)
    _f32_to_f16_array(x, out)
    with np.errstate(all="ignore"):
        expect = x.astype(np.float16).view(np.uint16)
    bad = np.flatnonzero(out != expect)
    assert bad.size == 0, [(hex(v), hex(a), hex(b)) for v, a, b in
                           zip(x[bad[:5]].view(np.uint32), out[bad[:5]], expect[bad[:5]])]


def test_f16_to_f32_matches_numpy_exhaustively():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(h.size, np.float32)
    _f16_to_f32_array(h, out)
    np.testing.assert_array_equal(bits(out), bits(h.view(np.float16).astype(np.float32)))
