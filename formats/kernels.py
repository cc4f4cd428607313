"""numba kernels for ggml's 32-element block types, bit-exact with ggml's reference quantizers.

Public wrappers validate and allocate; the private kernels do the loops. There are only two
kernels, `_quantize_blocks` and `_dequantize_blocks`, each taking the block type as a small int:
one compile per direction instead of one per type keeps numba's cold compile time down, and the
per-type branches sit outside the 16/32-element inner loops, so they cost nothing measurable.

Arithmetic follows ggml's `quantize_row_*_ref` / `dequantize_row_*` (see docs/rwkv_spec.md 1.3)
in float32 throughout. numba promotes a Python float literal to float64, so every constant
below is an explicit np.float32.

Where ggml's C is undefined or platform dependent (float -> int8 casts of NaN, inf or values out
of range) we do what x86 does, which is also what numpy, and hence gguf-py, does: the float is
truncated to int32 (NaN and anything out of int32 range become 0x80000000) and the low byte is
kept. With finite inputs this only happens when a block's scale is a float32 subnormal so small
that 1/d overflows to inf; callers reject non-finite weights before quantizing.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .errors import BadInput
from .jit import kernel

QK = 32  # elements per block, all five types

# Block type codes for the two kernels, and their layouts (bytes per block, see formats/quants.py).
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = 0, 1, 2, 3, 4
_BLOCK_BYTES = {_Q4_0: 2 + 16, _Q4_1: 2 + 2 + 16, _Q5_0: 2 + 4 + 16, _Q5_1: 2 + 2 + 4 + 16,
                _Q8_0: 2 + 32}
_NAMES = {_Q4_0: "Q4_0", _Q4_1: "Q4_1", _Q5_0: "Q5_0", _Q5_1: "Q5_1", _Q8_0: "Q8_0"}


# ---------------------------------------------------------------------------------------------
# Bit casts and fp16 conversion

@intrinsic
def _f32_bits(typingctx, x):
    """float32 -> its IEEE bits as uint32 (no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    """uint32 bits -> the float32 they encode (no conversion)."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


@kernel
def _f32_to_f16_bits(f):
    """float32 -> binary16 bits (0..65535), round to nearest even, exactly as numpy's
    astype(float16): subnormal halves are rounded correctly, overflow gives inf, NaN keeps the
    top 10 payload bits (and stays a NaN)."""
    u = np.int64(_f32_bits(f))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:                      # inf or NaN
        if a == 0x7F800000:
            return sign | 0x7C00
        h = 0x7C00 + ((a & 0x7FFFFF) >> 13)
        if h == 0x7C00:                      # payload only in the low 13 bits: keep it a NaN
            h = 0x7C01
        return sign | h
    if a >= 0x477FF000:                      # >= 65520 (halfway past 65504) rounds to inf
        return sign | 0x7C00
    if a >= 0x38800000:                      # normal half: rebias, round the 13 dropped bits
        return sign | ((a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13)
    if a <= 0x33000000:                      # <= 2**-25: rounds to zero (2**-25 is a tie -> even)
        return sign
    # subnormal half: value / 2**-24 rounded to nearest even
    mant = (a & 0x7FFFFF) | 0x800000
    shift = 126 - (a >> 23)                  # 14..24
    q = mant >> shift
    rem = mant & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@kernel
def _f16_bits_to_f32(h):
    """binary16 bits -> float32 (exact; inf and NaN payloads carried over as numpy does)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        return _bits_f32(sign | 0x7F800000 | (m << 13))
    if e != 0:
        return _bits_f32(sign | ((e + 112) << 23) | (m << 13))
    f = np.float32(m) * np.float32(5.9604644775390625e-08)   # m * 2**-24, exact
    return -f if sign else f


@kernel
def _f32_to_f16_array(x, out):
    """float32[n] -> uint16[n] binary16 bits; for tests (compiled only when called)."""
    for i in range(x.size):
        out[i] = _f32_to_f16_bits(x[i])


@kernel
def _f16_to_f32_array(h, out):
    """uint16[n] binary16 bits -> float32[n]; for tests (compiled only when called)."""
    for i in range(h.size):
        out[i] = _f16_bits_to_f32(h[i])


# ---------------------------------------------------------------------------------------------
# float -> int casts as x86 C (and numpy) do them

@kernel
def _trunc_u8(v):
    """(uint8_t)(int32_t)v on x86: truncate toward zero, NaN/inf/out of int32 -> 0, keep the
    low byte."""
    if v > np.float32(-2147483648.0) and v < np.float32(2147483648.0):
        return np.int64(v) & 0xFF
    return np.int64(0)


@kernel
def _roundf_u8(v):
    """(int8_t)roundf(v) as a byte: round half away from zero, then the cast as in _trunc_u8."""
    a = np.abs(v)
    fl = np.floor(a)
    r = fl + np.floor(np.float32(2.0) * (a - fl))   # exact: a - floor(a) and 2*that are exact
    if v < np.float32(0.0):
        r = -r
    return _trunc_u8(r)


# ---------------------------------------------------------------------------------------------
# The kernels

@kernel
def _quantize_blocks(x, out, kind):
    """x: float32[n], n % 32 == 0; out: uint8[n // 32 * block_bytes]. ggml quantize_row_*_ref."""
    five = kind == _Q5_0 or kind == _Q5_1
    has_min = kind == _Q4_1 or kind == _Q5_1
    bb = 2 + (2 if has_min else 0) + (4 if five else 0) + (32 if kind == _Q8_0 else 16)
    qs_off = bb - (32 if kind == _Q8_0 else 16)
    qmax = 31 if five else 15
    # d = max / div; q = trunc((x - sub) * id + add)
    if kind == _Q4_0:
        div, add = np.float32(-8.0), np.float32(8.5)
    elif kind == _Q5_0:
        div, add = np.float32(-16.0), np.float32(16.5)
    elif kind == _Q4_1:
        div, add = np.float32(15.0), np.float32(0.5)
    elif kind == _Q5_1:
        div, add = np.float32(31.0), np.float32(0.5)
    else:
        div, add = np.float32(127.0), np.float32(0.0)
    zero = np.float32(0.0)
    one = np.float32(1.0)

    for b in range(x.size // QK):
        i0 = b * QK
        o = b * bb
        if kind == _Q8_0:
            amax = zero
            for j in range(QK):
                av = np.abs(x[i0 + j])
                amax = amax if amax > av else av       # MAX(amax, fabsf(v))
            d = amax / div
            inv = one / d if d != zero else zero
            h = _f32_to_f16_bits(d)
            out[o] = h & 0xFF
            out[o + 1] = h >> 8
            for j in range(QK):
                out[o + qs_off + j] = _roundf_u8(x[i0 + j] * inv)
            continue

        if has_min:
            # float min = FLT_MAX, max = -FLT_MAX; strict compares keep the first of equal values
            lo = np.float32(3.4028234663852886e38)
            hi = -lo
            for j in range(QK):
                v = x[i0 + j]
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            d = (hi - lo) / div
            sub = lo
            hm = _f32_to_f16_bits(lo)
            out[o + 2] = hm & 0xFF
            out[o + 3] = hm >> 8
        else:
            # the element with the largest |x|, signed, first one on ties; +0.0 if all are zero
            amax = zero
            vmax = zero
            for j in range(QK):
                v = x[i0 + j]
                av = np.abs(v)
                if amax < av:
                    amax = av
                    vmax = v
            d = vmax / div
            sub = zero            # x - (+0.0) == x bit for bit, -0.0 included
        inv = one / d if d != zero else zero
        h = _f32_to_f16_bits(d)
        out[o] = h & 0xFF
        out[o + 1] = h >> 8

        qh = np.int64(0)
        for j in range(QK // 2):
            q0 = min(_trunc_u8((x[i0 + j] - sub) * inv + add), qmax)
            q1 = min(_trunc_u8((x[i0 + QK // 2 + j] - sub) * inv + add), qmax)
            out[o + qs_off + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
            qh |= ((q0 >> 4) << j) | ((q1 >> 4) << (j + QK // 2))
        if five:
            p = o + 2 + (2 if has_min else 0)
            out[p] = qh & 0xFF
            out[p + 1] = (qh >> 8) & 0xFF
            out[p + 2] = (qh >> 16) & 0xFF
            out[p + 3] = (qh >> 24) & 0xFF


@kernel
def _dequantize_blocks(data, out, kind):
    """data: uint8[nb * block_bytes]; out: float32[nb * 32]. ggml dequantize_row_*."""
    five = kind == _Q5_0 or kind == _Q5_1
    has_min = kind == _Q4_1 or kind == _Q5_1
    bb = 2 + (2 if has_min else 0) + (4 if five else 0) + (32 if kind == _Q8_0 else 16)
    qs_off = bb - (32 if kind == _Q8_0 else 16)
    offset = 16 if kind == _Q5_0 else (8 if kind == _Q4_0 else 0)

    for b in range(data.size // bb):
        o = b * bb
        i0 = b * QK
        d = _f16_bits_to_f32(np.int64(data[o]) | (np.int64(data[o + 1]) << 8))
        if kind == _Q8_0:
            for j in range(QK):
                q = np.int64(data[o + qs_off + j])
                q = q - 256 if q >= 128 else q
                out[i0 + j] = np.float32(q) * d
            continue
        qh = np.int64(0)
        if five:
            p = o + 2 + (2 if has_min else 0)
            qh = (np.int64(data[p]) | (np.int64(data[p + 1]) << 8)
                  | (np.int64(data[p + 2]) << 16) | (np.int64(data[p + 3]) << 24))
        if has_min:
            m = _f16_bits_to_f32(np.int64(data[o + 2]) | (np.int64(data[o + 3]) << 8))
            for j in range(QK // 2):
                byte = np.int64(data[o + qs_off + j])
                q0 = (byte & 0x0F) | (((qh >> j) & 1) << 4)
                q1 = (byte >> 4) | (((qh >> (j + QK // 2)) & 1) << 4)
                out[i0 + j] = np.float32(q0) * d + m          # two roundings, no FMA
                out[i0 + QK // 2 + j] = np.float32(q1) * d + m
        else:
            for j in range(QK // 2):
                byte = np.int64(data[o + qs_off + j])
                q0 = (byte & 0x0F) | (((qh >> j) & 1) << 4)
                q1 = (byte >> 4) | (((qh >> (j + QK // 2)) & 1) << 4)
                out[i0 + j] = np.float32(q0 - offset) * d
                out[i0 + QK // 2 + j] = np.float32(q1 - offset) * d


# ---------------------------------------------------------------------------------------------
# Public wrappers: validate, allocate, call

def _readonly(a: np.ndarray) -> np.ndarray:
    # numba compiles a separate specialization for read-only arrays (np.frombuffer, memmaps).
    # Passing every array read-only means one compile per kernel, whatever the caller holds.
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _quantize(kind: int, x) -> np.ndarray:
    name = _NAMES[kind]
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1:
        got = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
               else type(x).__name__)
        raise BadInput(f"quantize {name} needs a 1-D float32 array, got {got}")
    if x.size % QK:
        raise BadInput(f"quantize {name} needs a multiple of {QK} values, got {x.size}")
    x = _readonly(np.ascontiguousarray(x))
    out = np.empty(x.size // QK * _BLOCK_BYTES[kind], dtype=np.uint8)
    _quantize_blocks(x, out, kind)
    return out


def _dequantize(kind: int, data) -> np.ndarray:
    name = _NAMES[kind]
    bb = _BLOCK_BYTES[kind]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        got = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise BadInput(f"dequantize {name} needs a 1-D uint8 array, got {got}")
    if data.size % bb:
        raise BadInput(f"dequantize {name} needs a multiple of {bb} bytes ({bb}-byte blocks), "
                       f"got {data.size}")
    data = _readonly(np.ascontiguousarray(data))
    out = np.empty(data.size // bb * QK, dtype=np.float32)
    _dequantize_blocks(data, out, kind)
    return out


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 32 == 0) -> uint8[n / 32 * 18], as ggml's quantize_row_q4_0_ref."""
    return _quantize(_Q4_0, x)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 18] -> float32[nb * 32], as ggml's dequantize_row_q4_0."""
    return _dequantize(_Q4_0, data)


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 32 == 0) -> uint8[n / 32 * 20], as ggml's quantize_row_q4_1_ref."""
    return _quantize(_Q4_1, x)


def dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 20] -> float32[nb * 32], as ggml's dequantize_row_q4_1."""
    return _dequantize(_Q4_1, data)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 32 == 0) -> uint8[n / 32 * 22], as ggml's quantize_row_q5_0_ref."""
    return _quantize(_Q5_0, x)


def dequantize_q5_0(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 22] -> float32[nb * 32], as ggml's dequantize_row_q5_0."""
    return _dequantize(_Q5_0, data)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 32 == 0) -> uint8[n / 32 * 24], as ggml's quantize_row_q5_1_ref."""
    return _quantize(_Q5_1, x)


def dequantize_q5_1(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 24] -> float32[nb * 32], as ggml's dequantize_row_q5_1."""
    return _dequantize(_Q5_1, data)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 32 == 0) -> uint8[n / 32 * 34], as ggml's quantize_row_q8_0_ref."""
    return _quantize(_Q8_0, x)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 34] -> float32[nb * 32], as ggml's dequantize_row_q8_0."""
    return _dequantize(_Q8_0, data)
