"""numba kernels for ggml's 32-element block types, bit-exact with ggml's reference quantizers.

Public wrappers validate and allocate; the private kernels do the loops. There are only two
kernels, `_quantize_blocks` and `_dequantize_blocks`, each taking the block type as a small int:
one compile per direction instead of one per type keeps numba's cold compile time down, and the
per-type branches sit outside the 16/32-element inner loops, so they cost nothing measurable.
A conversion reaches `_quantize_blocks` through `_quantize_from_kernel` (the last section),
which feeds it F32/F16/BF16 source bytes converted a few blocks at a time.

Arithmetic follows ggml's `quantize_row_*_ref` / `dequantize_row_*` (see docs/rwkv_spec.md 1.3)
in float32 throughout. numba promotes a Python float literal to float64, so every constant
below is an explicit np.float32.

Where ggml's C is undefined or platform dependent (float -> int8 casts of NaN, inf or values out
of range) we do what x86 does, which is also what numpy, and hence gguf-py, does: the float is
truncated to int32 (NaN and anything out of int32 range become 0x80000000) and the low byte is
kept. With finite inputs this only happens when a block's scale is a float32 subnormal so small
that 1/d overflows to inf; callers reject non-finite weights (`quantize_from` finds them
while it quantizes).

The second half of the file holds the device simulator's fused dequantize-and-dot kernels
(`prepare_activation`, `matvec_blocks`, `dequantize_into`, for all eight element types, in a
float mode and in ggml's int8 arithmetic); its own header below describes them. Their wrappers
validate but never allocate: they run once per chunk of a streamed matrix.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
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


def run_quantize(kernel, kind: int, name: str, block_size: int, block_bytes: int,
                 x) -> np.ndarray:
    """Validate a 1-D float32 input, allocate, and run a block-quantize kernel (shared by the
    ggml types here and the k-quants in kquants.py)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1:
        got = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
               else type(x).__name__)
        raise BadInput(f"quantize {name} needs a 1-D float32 array, got {got}")
    if x.size % block_size:
        raise BadInput(f"quantize {name} needs a multiple of {block_size} values, got {x.size}")
    x = _readonly(np.ascontiguousarray(x))
    out = np.zeros(x.size // block_size * block_bytes, dtype=np.uint8)
    kernel(x, out, kind)
    return out


def run_dequantize(kernel, kind: int, name: str, block_size: int, block_bytes: int,
                   data) -> np.ndarray:
    """Validate whole blocks of uint8 input, allocate, and run a block-dequantize kernel."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        got = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise BadInput(f"dequantize {name} needs a 1-D uint8 array, got {got}")
    if data.size % block_bytes:
        raise BadInput(f"dequantize {name} needs a multiple of {block_bytes} bytes "
                       f"({block_bytes}-byte blocks of {block_size} values), got {data.size}")
    data = _readonly(np.ascontiguousarray(data))
    out = np.empty(data.size // block_bytes * block_size, dtype=np.float32)
    kernel(data, out, kind)
    return out


def _quantize(kind: int, x) -> np.ndarray:
    return run_quantize(_quantize_blocks, kind, _NAMES[kind], QK, _BLOCK_BYTES[kind], x)


def _dequantize(kind: int, data) -> np.ndarray:
    return run_dequantize(_dequantize_blocks, kind, _NAMES[kind], QK, _BLOCK_BYTES[kind], data)


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


# =============================================================================================
# Fused dequantize-and-dot: what the device simulator's matrix-vector products run
#
# A matrix is stored row-major, each row `blocks_per_row` whole blocks (for F32/F16/BF16 a
# "block" is one element). The simulator streams it through a small buffer, a run of whole
# blocks at a time, and calls `matvec_blocks` on each run. Two arithmetic modes:
#
# * float mode: the weights dequantized exactly as ggml's `dequantize_row_*` (float32; q*d + m
#   rounded twice, no FMA) times the float32 activation. F32/F16: ggml's 4 x 8 FMA lanes as in
#   int8 mode below, with the activation as it is (not rounded to fp16): a left-to-right sum
#   is one long dependent chain, about 4x slower. BF16: each product is added to the row's
#   float32 sum, left to right. Block types: a block's 32 products are summed as a fixed tree
#   (p[j] + p[j+16] for j < 16, then halves of 16, 8, 4, 2) and that sum is added to the row's
#   sum; every block goes straight into out[row].
#
# * int8 mode: what rwkv.cpp computes on x86 with AVX2 (the build behind the rwkv.cpp fixtures,
#   docs/rwkv_spec.md 4.8). `prepare_activation` converts the activation to the type's
#   vec_dot_type once per matvec (F32: as is; F16: fp16; BF16: bf16; Q4_0/Q5_0/Q8_0: Q8_0;
#   Q4_1/Q5_1: Q8_1, as ggml's AVX2 quantize_row_q8_0/1), and each row's dot follows ggml's
#   AVX2 kernel lane for lane:
#     block types (ggml_vec_dot_q*_q8_*): 8 float32 lanes; lane k of a block is the exact
#       integer sum of q_w*q_x over elements 4k..4k+3 (maddubs + madd), and each block does
#       acc = fma(d_w*d_x, lanes, acc). The row is hsum_float_8(acc) =
#       ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), plus, for Q4_1/Q5_1, summs = the float32
#       sum over the blocks, in order, of m_w*s_x.
#     F32, F16 (ggml_vec_dot_f32/_f16): 4 x 8 lanes; column c < n & ~31 goes into lane c % 32
#       by fma; GGML_F32x8_REDUCE; the remaining columns are then added, F32 by fma in float32
#       (assuming gcc contracts `sumf += x*y` under -mfma; the fixtures' rows are all
#       multiples of 32, so this tail is unverified), F16 as float32 products summed in double.
#     BF16 (rwkv.cpp has no BF16): the bf16-rounded activation, summed as in float mode.
#   A row's dot is added to out[row] when its last block has been processed. The lanes of a
#   row that a run boundary cuts wait in `row_state` (float64[ROW_STATE_SIZE]) for the next
#   run, which must continue that same row of the same matrix and `out`, else BadInput.
#   Why lanes and not ggml's scalar `ggml_vec_dot_*_generic` (one float32 rounding per block,
#   what a non-x86 build computes): the two differ by float32 rounding, and that is enough to
#   flip the Q8/fp16 rounding of some later activation; with the lanes the simulator's int8
#   logits match the rwkv.cpp fixtures bit for bit on all 49 rows for about half of the
#   model/format pairs, with the scalar arithmetic for none.
#
# In both modes `out` is bit-identical however a matrix is split into runs.
#
# The hot loops are written as LLVM vector IR (the intrinsics below): numba runs LLVM's loop
# vectorizer but not the SLP vectorizer, and LLVM fully unrolls the 16/32-element block loops
# before the loop vectorizer sees them, so plain numba loops would stay scalar. The vector IR is
# target independent; LLVM lowers it to whatever the host has (pmaddwd, vcvtph2ps, vfmadd...).
# No fast-math flags are set: no reassociation, and FMA only where ggml has one (llvm.fma).
#
# There are three kernels (`_matvec_kernel`, `_prepare_kernel`, `_dequantize_into_kernel`), each
# compiled for one explicit signature the first time its wrapper runs (cached on disk): arrays
# the kernel only reads are declared read-only and every array C-contiguous, so writable and
# read-only arrays alike dispatch to the one compiled version without a copy or a view, and
# wrong dtypes or strided arrays fail numba's dispatch (reported as BadInput).
# =============================================================================================

T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0, T_BF16 = 0, 1, 2, 3, 6, 7, 8, 30

# ggml type id -> (name, elements per block, bytes per block); the same as formats/quants.py's
# table (which imports this module, so the few numbers are repeated here).
_DOT_TYPES = {T_F32: ("F32", 1, 4), T_F16: ("F16", 1, 2), T_Q4_0: ("Q4_0", 32, 18),
              T_Q4_1: ("Q4_1", 32, 20), T_Q5_0: ("Q5_0", 32, 22), T_Q5_1: ("Q5_1", 32, 24),
              T_Q8_0: ("Q8_0", 32, 34), T_BF16: ("BF16", 1, 2)}

# int8 mode's per-row lane state: [0:32] the lanes (float32 values; block types use 8),
# [32] summs (Q4_1/Q5_1) or the sum after the reduction (F32: float32, F16: double), and the
# tag of a row left unfinished: next global block, type id, blocks per row, out's address.
ROW_STATE_SIZE = 40
_ST_SUM, _ST_NEXT, _ST_TYPE, _ST_BPR, _ST_OUT = 32, 34, 35, 36, 37
_ROW_STATE = np.zeros(ROW_STATE_SIZE, np.float64)      # the default (one simulator at a time)
_ROW_STATE[_ST_NEXT] = -1

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32, _F64 = ir.FloatType(), ir.DoubleType()


def _vt(elem, n):
    return ir.VectorType(elem, n)


def _const_vec(elem, values):
    values = list(values)
    return ir.Constant(_vt(elem, len(values)), values)


def _splat(builder, value, n):
    v = builder.insert_element(ir.Constant(_vt(value.type, n), ir.Undefined), value,
                               ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_vt(value.type, n), ir.Undefined),
                                  _const_vec(_I32, [0] * n))


def _data_ptr(context, builder, arytype, ary, index):
    """Pointer to element `index` of a 1-D array (no wraparound, no bounds check)."""
    if isinstance(index, int):
        index = ir.Constant(_I64, index)
    data = context.make_array(arytype)(context, builder, ary).data
    return builder.gep(data, [index])


def _load(builder, ptr, llty):
    """Load an `llty` (scalar or vector) from any byte address (align 1)."""
    return builder.load(builder.bitcast(ptr, llty.as_pointer()), align=1)


def _store(builder, value, ptr):
    builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=1)


def _byte_ptr(context, builder, sig, args, offset=0):
    """Pointer to buf[o + offset] for an intrinsic whose first two arguments are (buf, o)."""
    o = args[1] if offset == 0 else builder.add(args[1], ir.Constant(_I64, offset))
    return _data_ptr(context, builder, sig.args[0], args[0], o)


def _half_to_float(builder, h):
    """fp16 bits (i16) -> float32, exact (subnormals, inf, NaN payloads too), in integer and
    float32 ops: LLVM lowers a scalar `fpext half` to `vpinsrw` into whatever register is at
    hand, often a loop's accumulator, which chains every block's scale to the running sum."""
    h = builder.zext(h, _I32)
    em = builder.shl(builder.and_(h, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13))
    f = builder.fmul(builder.bitcast(em, _F32), ir.Constant(_F32, 2.0 ** 112))   # exact rebias
    inf_nan = builder.icmp_unsigned(">=", em, ir.Constant(_I32, 0x0F800000))
    bits = builder.select(inf_nan, builder.or_(em, ir.Constant(_I32, 0x7F800000)),
                          builder.bitcast(f, _I32))
    sign = builder.shl(builder.and_(h, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    return builder.bitcast(builder.or_(bits, sign), _F32)


def _half_at(context, builder, sig, args, offset):
    """The fp16 at buf[o + offset], as float32 (exact)."""
    return _half_to_float(builder, _load(builder, _byte_ptr(context, builder, sig, args, offset),
                                         _I16))


def _fma(builder, a, b, c):
    """a*b + c rounded once (llvm.fma: the hardware FMA, or libm's exact fmaf)."""
    t = a.type
    name = f"llvm.fma.v{t.count}f32" if isinstance(t, ir.VectorType) else "llvm.fma.f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]), name)
    return builder.call(fn, [a, b, c])


def _tree_sum(builder, v, n):
    """Sum of an <n x float> as a fixed tree: lanes [0, n/2) + [n/2, n), repeated."""
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, _const_vec(_I32, range(n)))
        hi = builder.shuffle_vector(v, v, _const_vec(_I32, range(n, 2 * n)))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


# Block layouts: (offset of qs, offset of qh or None, offset of m or None, q offset)
_LAYOUT = {T_Q4_0: (2, None, None, 8), T_Q4_1: (4, None, 2, 0), T_Q5_0: (6, 2, None, 16),
           T_Q5_1: (8, 4, 2, 0)}


def _emit_quants(context, builder, sig, args, type_id):
    """The 32 quants of the block at buf[o:] as one <32 x i8> in element order, as the dot
    uses them: Q8_0's int8s, or nibble | fifth bit << 4, minus 8 / 16 for Q4_0 / Q5_0
    (Q4_1 / Q5_1: 0..15 / 0..31)."""
    if type_id == T_Q8_0:
        return _load(builder, _byte_ptr(context, builder, sig, args, 2), _vt(_I8, 32))
    qs_off, qh_off, _, q_off = _LAYOUT[type_id]
    v = _load(builder, _byte_ptr(context, builder, sig, args, qs_off), _vt(_I8, 16))
    lo = builder.and_(v, _const_vec(_I8, [15] * 16))
    hi = builder.lshr(v, _const_vec(_I8, [4] * 16))
    q = builder.shuffle_vector(lo, hi, _const_vec(_I32, range(32)))    # element j: qs[j] low,
    if qh_off is not None:                                               # j+16: qs[j] high
        # bit e of the little-endian qh is bit 4 of element e: byte e // 8, bit e % 8
        qh = _load(builder, _byte_ptr(context, builder, sig, args, qh_off), _vt(_I8, 4))
        qh = builder.shuffle_vector(qh, qh, _const_vec(_I32, [e // 8 for e in range(32)]))
        bit = builder.and_(qh, _const_vec(_I8, [1 << (e % 8) for e in range(32)]))
        set_ = builder.icmp_unsigned("!=", bit, _const_vec(_I8, [0] * 32))
        q = builder.or_(q, builder.select(set_, _const_vec(_I8, [16] * 32),
                                          _const_vec(_I8, [0] * 32)))
    if q_off:
        q = builder.sub(q, _const_vec(_I8, [q_off] * 32))
    return q


def _emit_weights(context, builder, sig, args, type_id):
    """The block at buf[o:] (intrinsic arguments starting (buf, o)) dequantized exactly as
    ggml's dequantize_row_*: (q - offset)*d, q*d + m (two roundings), or q*d for Q8_0; as a
    <32 x float> in element order."""
    v32 = _vt(_F32, 32)
    q = builder.sitofp(_emit_quants(context, builder, sig, args, type_id), v32)
    w = builder.fmul(q, _splat(builder, _half_at(context, builder, sig, args, 0), 32))
    if type_id in (T_Q4_1, T_Q5_1):
        w = builder.fadd(w, _splat(builder, _half_at(context, builder, sig, args, 2), 32))
    return w


def _emit_int_lanes(context, builder, sig, args, type_id, xq_t, xq, xo):
    """ggml's AVX2 integer dot of a block with the Q8 activation block at xq[xo:xo+32], as
    <8 x i32>: lane k = sum of q_w*q_x over elements 4k..4k+3 (exact)."""
    qw = builder.sext(_emit_quants(context, builder, sig, args, type_id), _vt(_I32, 32))
    qx = builder.sext(_load(builder, _data_ptr(context, builder, xq_t, xq, xo), _vt(_I8, 32)),
                      _vt(_I32, 32))
    p = builder.mul(qw, qx)
    for n in (16, 8):               # adjacent pairs twice (the shape of pmaddwd)
        even = builder.shuffle_vector(p, p, _const_vec(_I32, range(0, 2 * n, 2)))
        odd = builder.shuffle_vector(p, p, _const_vec(_I32, range(1, 2 * n, 2)))
        p = builder.add(even, odd)
    return p


def _block_float_intrinsic(type_id):
    """float mode: one block's contribution, sum(w*x) as the fixed tree."""
    @intrinsic
    def block_dot(typingctx, buf, o, c, xf):
        sig = types.float32(buf, types.int64, types.int64, xf)

        def codegen(context, builder, sig, args):
            xf_t, xf = sig.args[3], args[3]
            xo = builder.mul(args[2], ir.Constant(_I64, QK))
            w = _emit_weights(context, builder, sig, args, type_id)
            x = _load(builder, _data_ptr(context, builder, xf_t, xf, xo), _vt(_F32, 32))
            return _tree_sum(builder, builder.fmul(w, x), 32)     # p[j] + p[j+16], then halves

        return sig, codegen

    return block_dot


def _block_lanes_intrinsic(type_id):
    """int8 mode: blocks c0 .. end-1 of one row (the first at buf[o:]) into the 8 lanes (and
    summs) kept in state, as ggml's AVX2 ggml_vec_dot_*_q8_* does; the loop is in the IR so
    the lanes stay in a register."""
    bb = _DOT_TYPES[type_id][2]
    has_min = type_id in (T_Q4_1, T_Q5_1)

    @intrinsic
    def block_lanes(typingctx, buf, o, c0, end, xq, xd, xs, state):
        sig = types.void(buf, types.int64, types.int64, types.int64, xq, xd, xs, state)

        def codegen(context, builder, sig, args):
            buf, o, c0, end, xq, xd, xs, state = args
            xq_t, xd_t, xs_t, st_t = sig.args[4:]
            v8 = _vt(_F32, 8)
            acc_p = _data_ptr(context, builder, st_t, state, 0)
            sum_p = _data_ptr(context, builder, st_t, state, _ST_SUM)
            acc = cgutils.alloca_once_value(
                builder, builder.fptrunc(_load(builder, acc_p, _vt(_F64, 8)), v8))
            summs = cgutils.alloca_once_value(builder, builder.fptrunc(builder.load(sum_p), _F32))
            with cgutils.for_range(builder, builder.sub(end, c0)) as loop:
                c = builder.add(c0, loop.index)
                blk = [buf, builder.add(o, builder.mul(loop.index, ir.Constant(_I64, bb)))]
                lanes = _emit_int_lanes(context, builder, sig, blk, type_id, xq_t, xq,
                                        builder.mul(c, ir.Constant(_I64, QK)))
                d = builder.fmul(_half_at(context, builder, sig, blk, 0),
                                 builder.load(_data_ptr(context, builder, xd_t, xd, c)))
                builder.store(_fma(builder, _splat(builder, d, 8), builder.sitofp(lanes, v8),
                                   builder.load(acc)), acc)
                if has_min:
                    ms = builder.fmul(_half_at(context, builder, sig, blk, 2),
                                      builder.load(_data_ptr(context, builder, xs_t, xs, c)))
                    builder.store(builder.fadd(builder.load(summs), ms), summs)
            _store(builder, builder.fpext(builder.load(acc), _vt(_F64, 8)), acc_p)
            builder.store(builder.fpext(builder.load(summs), _F64), sum_p)
            return context.get_dummy_value()

        return sig, codegen

    return block_lanes


def _dequant_intrinsic(type_id):
    @intrinsic
    def dequant(typingctx, buf, o, out, i):
        """out[i:i+32] = the block at buf[o:], dequantized."""
        sig = types.void(buf, types.int64, out, types.int64)

        def codegen(context, builder, sig, args):
            w = _emit_weights(context, builder, sig, args, type_id)
            _store(builder, w, _data_ptr(context, builder, sig.args[2], args[2], args[3]))
            return context.get_dummy_value()

        return sig, codegen

    return dequant


_dq_q4_0, _dq_q4_1, _dq_q5_0, _dq_q5_1, _dq_q8_0 = (
    _dequant_intrinsic(T_Q4_0), _dequant_intrinsic(T_Q4_1), _dequant_intrinsic(T_Q5_0),
    _dequant_intrinsic(T_Q5_1), _dequant_intrinsic(T_Q8_0))
_q4_0_f, _q4_1_f, _q5_0_f, _q5_1_f, _q8_0_f = (
    _block_float_intrinsic(T_Q4_0), _block_float_intrinsic(T_Q4_1),
    _block_float_intrinsic(T_Q5_0), _block_float_intrinsic(T_Q5_1),
    _block_float_intrinsic(T_Q8_0))
_q4_0_l, _q4_1_l, _q5_0_l, _q5_1_l, _q8_0_l = (
    _block_lanes_intrinsic(T_Q4_0), _block_lanes_intrinsic(T_Q4_1),
    _block_lanes_intrinsic(T_Q5_0), _block_lanes_intrinsic(T_Q5_1),
    _block_lanes_intrinsic(T_Q8_0))


def _emit_element_weights(builder, ptr, type_id, n):
    """n consecutive F32/F16/BF16 weights at a byte address, as <n x float> (exact)."""
    if type_id == T_F32:
        return _load(builder, ptr, _vt(_F32, n))
    h = _load(builder, ptr, _vt(_I16, n))
    if type_id == T_F16:
        if n == 1:
            f = _half_to_float(builder, builder.extract_element(h, ir.Constant(_I32, 0)))
            return builder.insert_element(ir.Constant(_vt(_F32, 1), ir.Undefined), f,
                                          ir.Constant(_I32, 0))
        return builder.fpext(builder.bitcast(h, _vt(ir.HalfType(), n)), _vt(_F32, n))
    w = builder.shl(builder.zext(h, _vt(_I32, n)), _const_vec(_I32, [16] * n))
    return builder.bitcast(w, _vt(_F32, n))


def _element_intrinsics(type_id):
    @intrinsic
    def weight(typingctx, buf, o):
        """The weight at buf[o:]."""
        def codegen(context, builder, sig, args):
            p = _byte_ptr(context, builder, sig, args)
            return builder.extract_element(_emit_element_weights(builder, p, type_id, 1),
                                           ir.Constant(_I32, 0))
        return types.float32(buf, types.int64), codegen

    @intrinsic
    def serial8(typingctx, acc, buf, o, xf, c):
        """acc + w[0]*x[0] + ... + w[7]*x[7], added one at a time left to right, for the 8
        weights at buf[o:] and xf[c:c+8]: 8 scalar steps, but the loads, conversions and
        products are one vector each, off the serial chain."""
        sig = types.float32(types.float32, buf, types.int64, xf, types.int64)

        def codegen(context, builder, sig, args):
            acc, buf, o, xf, c = args
            w = _emit_element_weights(builder, _data_ptr(context, builder, sig.args[1], buf, o),
                                      type_id, 8)
            x = _load(builder, _data_ptr(context, builder, sig.args[3], xf, c), _vt(_F32, 8))
            prod = builder.fmul(w, x)
            for i in range(8):
                acc = builder.fadd(acc, builder.extract_element(prod, ir.Constant(_I32, i)))
            return acc

        return sig, codegen

    @intrinsic
    def lanes_fma(typingctx, state, lane, buf, o, xf, c, n):
        """int8 mode: state[lane:lane+n] = fma(w, xf[c:c+n], state[lane:lane+n]) for the n
        (1 or 8, a literal) weights at buf[o:] (ggml's GGML_F32_VEC_FMA on 32 lanes)."""
        if not isinstance(n, types.IntegerLiteral):
            return None
        width = n.literal_value
        sig = types.void(state, types.int64, buf, types.int64, xf, types.int64, n)

        def codegen(context, builder, sig, args):
            state, lane, buf, o, xf, c, _ = args
            vt = _vt(_F32, width)
            sp = _data_ptr(context, builder, sig.args[0], state, lane)
            w = _emit_element_weights(builder, _data_ptr(context, builder, sig.args[2], buf, o),
                                      type_id, width)
            x = _load(builder, _data_ptr(context, builder, sig.args[4], xf, c), vt)
            acc = builder.fptrunc(_load(builder, sp, _vt(_F64, width)), vt)
            _store(builder, builder.fpext(_fma(builder, w, x, acc), _vt(_F64, width)), sp)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def lanes_run(typingctx, state, buf, o, xf, c, n):
        """lanes_fma over n whole 32-column groups (columns c .. c+32n, c % 32 == 0, weights
        from buf[o:]): the same FMAs in the same order, but the loop is in the IR, so the four
        8-lane accumulators stay in registers instead of going through state every 8 weights."""
        sig = types.void(state, buf, types.int64, xf, types.int64, types.int64)
        width = {T_F32: 4, T_F16: 2}[type_id]

        def codegen(context, builder, sig, args):
            state, buf, o, xf, c, n = args
            v8, d8 = _vt(_F32, 8), _vt(_F64, 8)
            accs = []
            for j in range(4):
                p = _data_ptr(context, builder, sig.args[0], state, 8 * j)
                accs.append(cgutils.alloca_once_value(builder,
                                                      builder.fptrunc(_load(builder, p, d8), v8)))
            with cgutils.for_range(builder, n) as loop:
                g = builder.mul(loop.index, ir.Constant(_I64, 32))
                for j in range(4):
                    e = builder.add(g, ir.Constant(_I64, 8 * j))
                    wo = builder.add(o, builder.mul(e, ir.Constant(_I64, width)))
                    w = _emit_element_weights(
                        builder, _data_ptr(context, builder, sig.args[1], buf, wo), type_id, 8)
                    x = _load(builder, _data_ptr(context, builder, sig.args[3], xf,
                                                 builder.add(c, e)), v8)
                    builder.store(_fma(builder, w, x, builder.load(accs[j])), accs[j])
            for j in range(4):
                _store(builder, builder.fpext(builder.load(accs[j]), d8),
                       _data_ptr(context, builder, sig.args[0], state, 8 * j))
            return context.get_dummy_value()

        return sig, codegen

    return weight, serial8, lanes_fma, lanes_run


_w_f32, _f32x8, _f32_lanes, _f32_run = _element_intrinsics(T_F32)
_w_f16, _f16x8, _f16_lanes, _f16_run = _element_intrinsics(T_F16)
_w_bf16, _bf16x8, _, _ = _element_intrinsics(T_BF16)


@intrinsic
def _fma32(typingctx, a, b, c):
    """a*b + c in float32, rounded once."""
    def codegen(context, builder, sig, args):
        return _fma(builder, *args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _at(typingctx, ary, i):
    """ary[i] without numba's negative-index wraparound (which blocks vectorization)."""
    def codegen(context, builder, sig, args):
        return builder.load(_data_ptr(context, builder, sig.args[0], args[0], args[1]))
    return ary.dtype(ary, types.int64), codegen


@intrinsic
def _hsum_float_8(typingctx, state):
    """ggml's hsum_float_8 of the lanes state[0:8]: hi128 + lo128, then movehl, then movehdup:
    ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))."""
    def codegen(context, builder, sig, args):
        v = builder.fptrunc(_load(builder, _data_ptr(context, builder, sig.args[0], args[0], 0),
                                  _vt(_F64, 8)), _vt(_F32, 8))
        r = builder.fadd(builder.shuffle_vector(v, v, _const_vec(_I32, range(4, 8))),
                         builder.shuffle_vector(v, v, _const_vec(_I32, range(4))))
        e = [builder.extract_element(r, ir.Constant(_I32, i)) for i in range(4)]
        return builder.fadd(builder.fadd(e[0], e[2]), builder.fadd(e[1], e[3]))
    return types.float32(state), codegen


@intrinsic
def _f32x8_reduce(typingctx, state):
    """GGML_F32x8_REDUCE of 4 accumulators x 8 lanes (state[8j:8j+8] = accumulator j):
    (acc0+acc2) + (acc1+acc3), then lo128 + hi128, then _mm_hadd_ps twice."""
    def codegen(context, builder, sig, args):
        acc = [builder.fptrunc(_load(builder, _data_ptr(context, builder, sig.args[0], args[0],
                                                        8 * j), _vt(_F64, 8)), _vt(_F32, 8))
               for j in range(4)]
        x = builder.fadd(builder.fadd(acc[0], acc[2]), builder.fadd(acc[1], acc[3]))
        t = builder.fadd(builder.shuffle_vector(x, x, _const_vec(_I32, range(4))),
                         builder.shuffle_vector(x, x, _const_vec(_I32, range(4, 8))))
        e = [builder.extract_element(t, ir.Constant(_I32, i)) for i in range(4)]
        return builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3]))
    return types.float32(state), codegen


@kernel
def _matvec_kernel(type_id, int8_mode, buf, n_blocks, first_block, blocks_per_row,
                   xf, xq, xd, xs, out, state):
    """The n_blocks blocks in buf (global blocks first_block ...) into out (see the section
    header). Returns 0, or 1 if an int8-mode run starts mid-row but state holds no unfinished
    row of this matrix ending just before it."""
    if type_id == T_F32:
        bb = 4
    elif type_id == T_F16 or type_id == T_BF16:
        bb = 2
    elif type_id == T_Q4_0:
        bb = 18
    elif type_id == T_Q4_1:
        bb = 20
    elif type_id == T_Q5_0:
        bb = 22
    elif type_id == T_Q5_1:
        bb = 24
    else:
        bb = 34
    bpr = blocks_per_row
    row = first_block // bpr
    c0 = first_block - row * bpr
    # F32/F16 rows run in ggml's 32 FMA lanes in both modes (float mode: unrounded activations)
    lanes = (int8_mode and type_id != T_BF16) or type_id == T_F32 or type_id == T_F16
    if lanes and n_blocks > 0:
        where = np.float64(out.ctypes.data)
        if c0 > 0 and not (state[_ST_NEXT] == first_block and state[_ST_TYPE] == type_id
                           and state[_ST_BPR] == bpr and state[_ST_OUT] == where):
            return 1
        state[_ST_NEXT] = -1
    n_left = bpr & ~31                      # F32/F16: the columns ggml's SIMD loop covers
    k = 0
    while k < n_blocks:                     # one row segment per pass: blocks c0 .. end-1
        end = min(bpr, c0 + (n_blocks - k))
        o = k * bb
        if lanes:
            if c0 == 0:
                state[:_ST_SUM + 1] = 0.0
            if type_id == T_F32 or type_id == T_F16:
                c = c0
                stop = min(end, n_left)
                while c < stop:
                    if c % 32 == 0 and c + 32 <= stop:
                        n32 = (stop - c) // 32
                        if type_id == T_F32:
                            _f32_run(state, buf, o + 4 * (c - c0), xf, c, n32)
                        else:
                            _f16_run(state, buf, o + 2 * (c - c0), xf, c, n32)
                        c += 32 * n32
                    elif c % 8 == 0 and c + 8 <= stop:
                        if type_id == T_F32:
                            _f32_lanes(state, c % 32, buf, o + 4 * (c - c0), xf, c, 8)
                        else:
                            _f16_lanes(state, c % 32, buf, o + 2 * (c - c0), xf, c, 8)
                        c += 8
                    else:
                        if type_id == T_F32:
                            _f32_lanes(state, c % 32, buf, o + 4 * (c - c0), xf, c, 1)
                        else:
                            _f16_lanes(state, c % 32, buf, o + 2 * (c - c0), xf, c, 1)
                        c += 1
                for c in range(max(c, n_left), end):          # ggml's "leftovers"
                    if c == n_left:
                        state[_ST_SUM] = _f32x8_reduce(state)
                    if type_id == T_F32:
                        state[_ST_SUM] = _fma32(_w_f32(buf, o + 4 * (c - c0)), _at(xf, c),
                                                np.float32(state[_ST_SUM]))
                    else:
                        state[_ST_SUM] += np.float64(_w_f16(buf, o + 2 * (c - c0)) * _at(xf, c))
                if end == bpr:
                    total = (np.float32(state[_ST_SUM]) if n_left < bpr
                             else _f32x8_reduce(state))
                    out[row] += total
            else:
                if type_id == T_Q4_0:
                    _q4_0_l(buf, o, c0, end, xq, xd, xs, state)
                elif type_id == T_Q4_1:
                    _q4_1_l(buf, o, c0, end, xq, xd, xs, state)
                elif type_id == T_Q5_0:
                    _q5_0_l(buf, o, c0, end, xq, xd, xs, state)
                elif type_id == T_Q5_1:
                    _q5_1_l(buf, o, c0, end, xq, xd, xs, state)
                else:
                    _q8_0_l(buf, o, c0, end, xq, xd, xs, state)
                if end == bpr:
                    total = _hsum_float_8(state)
                    if type_id == T_Q4_1 or type_id == T_Q5_1:
                        total += np.float32(state[_ST_SUM])
                    out[row] += total
            if end < bpr:                   # the run ends mid-row: leave the row's tag
                state[_ST_NEXT] = first_block + n_blocks
                state[_ST_TYPE] = type_id
                state[_ST_BPR] = bpr
                state[_ST_OUT] = np.float64(out.ctypes.data)
        else:
            acc = out[row]
            if type_id == T_F32 or type_id == T_F16 or type_id == T_BF16:
                c = c0
                while c + 8 <= end:
                    if type_id == T_F32:
                        acc = _f32x8(acc, buf, o + 4 * (c - c0), xf, c)
                    elif type_id == T_F16:
                        acc = _f16x8(acc, buf, o + 2 * (c - c0), xf, c)
                    else:
                        acc = _bf16x8(acc, buf, o + 2 * (c - c0), xf, c)
                    c += 8
                for c in range(c, end):
                    if type_id == T_F32:
                        acc += _w_f32(buf, o + 4 * (c - c0)) * _at(xf, c)
                    elif type_id == T_F16:
                        acc += _w_f16(buf, o + 2 * (c - c0)) * _at(xf, c)
                    else:
                        acc += _w_bf16(buf, o + 2 * (c - c0)) * _at(xf, c)
            elif type_id == T_Q4_0:
                for c in range(c0, end):
                    acc += _q4_0_f(buf, o + 18 * (c - c0), c, xf)
            elif type_id == T_Q4_1:
                for c in range(c0, end):
                    acc += _q4_1_f(buf, o + 20 * (c - c0), c, xf)
            elif type_id == T_Q5_0:
                for c in range(c0, end):
                    acc += _q5_0_f(buf, o + 22 * (c - c0), c, xf)
            elif type_id == T_Q5_1:
                for c in range(c0, end):
                    acc += _q5_1_f(buf, o + 24 * (c - c0), c, xf)
            else:
                for c in range(c0, end):
                    acc += _q8_0_f(buf, o + 34 * (c - c0), c, xf)
            out[row] = acc
        k += end - c0
        row += 1
        c0 = 0
    return 0


@kernel
def _bf16_round(f):
    """float32 -> nearest-even bf16, back as float32: ggml_compute_fp32_to_bf16 (a NaN stays a
    NaN with the quiet bit set; overflow rounds to inf)."""
    u = np.int64(_f32_bits(f))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        h = (u >> 16) | 64
    else:
        h = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF
    return _bits_f32(h << 16)


@kernel(inline="always")
def _q8_block(x, i0, n, xq, xd, b):
    """ggml's AVX2 quantize_row_q8_0 of x[i0:i0+n] into xq[i0:i0+n] and xd[b] (d = amax/127
    rounded to fp16; q = x*(127/amax) rounded half to even, 0 if amax is 0). Returns d before
    the fp16 rounding and the int64 sum of the values before their int8 clamp (Q8_1's s)."""
    zero = np.float32(0.0)
    amax = zero
    for j in range(n):
        a = np.abs(x[i0 + j])
        if a > amax:
            amax = a
    d = amax / np.float32(127.0)
    inv = np.float32(127.0) / amax if amax != zero else zero
    xd[b] = _f16_bits_to_f32(_f32_to_f16_bits(d))
    s = np.int64(0)
    for j in range(n):
        r = np.rint(x[i0 + j] * inv)                # _mm256_round_ps: half to even
        if r >= np.float32(-2147483648.0) and r < np.float32(2147483648.0):
            v = np.int64(r)
        else:
            v = np.int64(-2147483648)                # cvtps2dq: NaN / out of range
        s += v
        xq[i0 + j] = min(max(v, -128), 127)          # packs_epi32 + packs_epi16
    return d, s


@kernel
def _prepare_kernel(type_id, int8_mode, x, xf, xq, xd, xs):
    """The activation x in the form the type's dot needs (see prepare_activation)."""
    n = x.size
    if not int8_mode or type_id == T_F32:
        for i in range(n):
            xf[i] = x[i]
    elif type_id == T_F16:
        for i in range(n):
            xf[i] = _f16_bits_to_f32(_f32_to_f16_bits(x[i]))
    elif type_id == T_BF16:
        for i in range(n):
            xf[i] = _bf16_round(x[i])
    else:
        # ggml's AVX2 quantize_row_q8_0 / quantize_row_q8_1, one 32-block at a time
        q8_1 = type_id == T_Q4_1 or type_id == T_Q5_1
        for b in range(n // QK):
            d, s = _q8_block(x, b * QK, QK, xq, xd, b)
            if q8_1:
                s = ((s + 2147483648) & 0xFFFFFFFF) - 2147483648   # int32 sum (wraps)
                xs[b] = _f16_bits_to_f32(_f32_to_f16_bits(d * np.float32(s)))


@kernel
def _dequantize_into_kernel(type_id, buf, n_blocks, out):
    if type_id == T_F32:
        for i in range(n_blocks):
            out[i] = _w_f32(buf, 4 * i)
    elif type_id == T_F16:
        for i in range(n_blocks):
            out[i] = _w_f16(buf, 2 * i)
    elif type_id == T_BF16:
        for i in range(n_blocks):
            out[i] = _w_bf16(buf, 2 * i)
    elif type_id == T_Q4_0:
        for b in range(n_blocks):
            _dq_q4_0(buf, 18 * b, out, QK * b)
    elif type_id == T_Q4_1:
        for b in range(n_blocks):
            _dq_q4_1(buf, 20 * b, out, QK * b)
    elif type_id == T_Q5_0:
        for b in range(n_blocks):
            _dq_q5_0(buf, 22 * b, out, QK * b)
    elif type_id == T_Q5_1:
        for b in range(n_blocks):
            _dq_q5_1(buf, 24 * b, out, QK * b)
    else:
        for b in range(n_blocks):
            _dq_q8_0(buf, 34 * b, out, QK * b)


# ---------------------------------------------------------------------------------------------
# Public wrappers for the simulator: cheap integer checks, no allocation

def _ro(dtype):
    return types.Array(dtype, 1, "C", readonly=True)


def _rw(dtype):
    return types.Array(dtype, 1, "C")


_SIGNATURES = {
    "matvec": (_matvec_kernel, types.int64(
        types.int64, types.boolean, _ro(types.uint8), types.int64, types.int64, types.int64,
        _ro(types.float32), _ro(types.int8), _ro(types.float32), _ro(types.float32),
        _rw(types.float32), _rw(types.float64))),
    "prepare": (_prepare_kernel, types.void(
        types.int64, types.boolean, _ro(types.float32), _rw(types.float32), _rw(types.int8),
        _rw(types.float32), _rw(types.float32))),
    "dequantize_into": (_dequantize_into_kernel, types.void(
        types.int64, _ro(types.uint8), types.int64, _rw(types.float32))),
}
_ready: dict = {}
_matvec = None          # _matvec_kernel once compiled (saves a call on the per-chunk path)


def _compiled(which: str):
    """The kernel, compiled (or loaded from the cache) for its one signature on first use;
    compiling is then disabled, so every call converts to that signature or fails."""
    global _matvec
    fn = _ready.get(which)
    if fn is None:
        fn, sig = _SIGNATURES[which]
        fn.compile(sig)
        fn.disable_compile()
        _ready[which] = fn
        if which == "matvec":
            _matvec = fn
    return fn


def _dot_type(what: str, type_id):
    spec = _DOT_TYPES.get(type_id)
    if spec is None:
        raise BadInput(f"{what}: unknown type id {type_id!r} "
                       f"(known: {', '.join(f'{k} {v[0]}' for k, v in _DOT_TYPES.items())})")
    return spec


_OUTPUTS = {"matvec": ("out", "row_state"), "prepare_activation": ("xf", "xq", "xd", "xs"),
            "dequantize_into": ("out",)}


def _bad_arrays(what: str, **arrays) -> BadInput:
    """The message for arrays numba's dispatch rejected (wrong dtype, not 1-D C-contiguous, a
    read-only output)."""
    want = {"buf": "uint8", "x": "float32", "xf": "float32", "xq": "int8", "xd": "float32",
            "xs": "float32", "out": "float32", "row_state": "float64"}
    got = []
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            got.append(f"{name} is {type(a).__name__}")
        elif a.dtype != want[name] or a.ndim != 1 or not a.flags.c_contiguous:
            got.append(f"{name} is {a.dtype} of shape {a.shape}"
                       + ("" if a.flags.c_contiguous else ", not contiguous"))
        elif name in _OUTPUTS[what] and not a.flags.writeable:
            got.append(f"{name} is read-only")
    need = ", ".join(f"{k} {want[k]}" for k in arrays)
    return BadInput(f"{what} needs 1-D C-contiguous arrays ({need}; outputs writable): "
                    + ("; ".join(got) or "arguments of the wrong kind"))


def check_run(name: str, buf, block_bytes: int, n_blocks: int, first_block: int,
              blocks_per_row: int, out) -> None:
    """A matvec run's block range against its buffer and output (every fixed-size type)."""
    if n_blocks < 0 or first_block < 0 or blocks_per_row < 1:
        raise BadInput(f"matvec {name}: bad block range (n_blocks={n_blocks}, "
                       f"first_block={first_block}, blocks_per_row={blocks_per_row})")
    if len(buf) < n_blocks * block_bytes:
        raise BadInput(f"matvec {name}: {n_blocks} blocks need {n_blocks * block_bytes} bytes, "
                       f"the buffer holds {len(buf)}")
    if n_blocks and (first_block + n_blocks - 1) // blocks_per_row >= len(out):
        raise BadInput(f"matvec {name}: blocks {first_block}..{first_block + n_blocks - 1} reach "
                       f"row {(first_block + n_blocks - 1) // blocks_per_row}, out has "
                       f"{len(out)} rows")


def matvec_blocks(type_id: int, int8_mode: bool, buf: np.ndarray, n_blocks: int,
                  first_block: int, blocks_per_row: int, xf: np.ndarray, xq: np.ndarray,
                  xd: np.ndarray, xs: np.ndarray, out: np.ndarray,
                  row_state: np.ndarray | None = None) -> None:
    """Add the n_blocks whole blocks in buf[:n_blocks * block_bytes] to out: they are global
    blocks first_block, first_block + 1, ... of a row-major matrix with blocks_per_row blocks a
    row (block g is column block g % blocks_per_row of row g // blocks_per_row; F32/F16/BF16
    blocks are single elements). Arithmetic: see the section header above.

    float mode: out[row] += each block's dot, block by block. int8 mode: a row's dot (ggml's
    AVX2 lanes) is added to out[row] once its last block is in; until then its lanes wait in
    row_state (default: a module-level one), and the next call must continue that row (same
    matrix, same out, first_block where this run ended), else BadInput. A run starting at a
    row's first block is always fine. out is bit-identical however the matrix is split.

    xf, xq, xd, xs are the buffers prepare_activation filled for the same type and mode; all
    four are passed whatever the type (with the right dtypes), but only those the type and mode
    read are checked for size.
    """
    matvec_runner(type_id, int8_mode, blocks_per_row, xf, xq, xd, xs, out, row_state)(
        buf, n_blocks, first_block)


def matvec_runner(type_id: int, int8_mode: bool, blocks_per_row: int, xf: np.ndarray,
                  xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray,
                  row_state: np.ndarray | None = None):
    """matvec_blocks with the matrix fixed: run(buf, n_blocks, first_block) for each run of its
    blocks. What stays the same for a whole matrix is checked once, here; each run checks only
    its own block range (a board calls this once per chunk, thousands of times per token)."""
    spec = _DOT_TYPES.get(type_id)
    if spec is None:
        _dot_type("matvec", type_id)                  # raises
    name, bs, bb = spec
    n_in = blocks_per_row * bs
    if row_state is None:
        row_state = _ROW_STATE
    arrays = dict(xf=xf, xq=xq, xd=xd, xs=xs, out=out, row_state=row_state)
    if bs == 1 or not int8_mode:
        if len(xf) < n_in:
            raise BadInput(f"matvec {name}: rows of {n_in} need xf of {n_in}, got {len(xf)}")
    elif (len(xq) < n_in or len(xd) < blocks_per_row
          or (type_id in (T_Q4_1, T_Q5_1) and len(xs) < blocks_per_row)):
        raise BadInput(f"matvec {name}: rows of {n_in} need xq of {n_in} and xd/xs of "
                       f"{blocks_per_row}, got {len(xq)}, {len(xd)}, {len(xs)}")
    if len(row_state) < ROW_STATE_SIZE:
        raise BadInput(f"matvec {name}: row_state needs {ROW_STATE_SIZE} float64s, "
                       f"got {len(row_state)}")
    kern = _matvec or _compiled("matvec")
    int8_mode = bool(int8_mode)

    def run(buf: np.ndarray, n_blocks: int, first_block: int) -> None:
        check_run(name, buf, bb, n_blocks, first_block, blocks_per_row, out)
        try:
            status = kern(type_id, int8_mode, buf, n_blocks, first_block, blocks_per_row, xf,
                          xq, xd, xs, out, row_state)
        except TypeError:
            raise _bad_arrays("matvec", buf=buf, **arrays) from None
        if status:
            raise BadInput(f"matvec {name} (int8 mode): block {first_block} is in the middle "
                           f"of row {first_block // blocks_per_row}, but the previous run did "
                           f"not end just before it in this matrix (runs of a row must follow "
                           f"each other)")
    return run


def prepare_activation(type_id: int, int8_mode: bool, x: np.ndarray, xf: np.ndarray,
                       xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    """Fill the preallocated buffers with the activation x (float32[n]) in the form the dot of
    weight type `type_id` needs; n = len(x), a multiple of 32 for block types.

    float mode: xf[:n] = x for every type.
    int8 mode (ggml's vec_dot_type): F32: xf[:n] = x; F16: xf[:n] = x rounded to fp16 (nearest
    even); BF16: rounded to bf16 (ggml_compute_fp32_to_bf16); Q4_0/Q5_0/Q8_0: Q8_0 as ggml's
    AVX2 quantize_row_q8_0: per 32-block b, d = amax/127, xd[b] = fp16(d),
    xq = round-half-even(x * (127/amax)) (0 if amax == 0); Q4_1/Q5_1: Q8_1, the same plus
    xs[b] = fp16(d * sum(xq)) with the unrounded d (quantize_row_q8_1). Finite x assumed: NaN
    lanes are not emulated exactly (they quantize to -128).
    """
    name, bs, _ = _dot_type("prepare_activation", type_id)
    n = len(x)
    int8_mode = bool(int8_mode)
    if bs > 1 and n % QK:
        raise BadInput(f"prepare_activation {name}: needs a multiple of {QK} values, got {n}")
    if bs == 1 or not int8_mode:
        if len(xf) < n:
            raise BadInput(f"prepare_activation {name}: xf holds {len(xf)} values, needs {n}")
    elif (len(xq) < n or len(xd) < n // QK
          or (type_id in (T_Q4_1, T_Q5_1) and len(xs) < n // QK)):
        raise BadInput(f"prepare_activation {name}: {n} values need xq of {n} and xd/xs of "
                       f"{n // QK}, got {len(xq)}, {len(xd)}, {len(xs)}")
    try:
        _compiled("prepare")(type_id, int8_mode, x, xf, xq, xd, xs)
    except TypeError:
        raise _bad_arrays("prepare_activation", x=x, xf=xf, xq=xq, xd=xd, xs=xs) from None


def dequantize_into(type_id: int, buf: np.ndarray, out: np.ndarray) -> None:
    """Dequantize the whole blocks in buf (uint8, a multiple of the block size in bytes) into
    out[:n] (float32, at least n = blocks * block_size long), exactly as the type table's
    dequantize (ggml's dequantize_row_*)."""
    name, bs, bb = _dot_type("dequantize_into", type_id)
    nb, rem = divmod(len(buf), bb)
    if rem:
        raise BadInput(f"dequantize_into {name}: {len(buf)} bytes are not whole {bb}-byte blocks")
    if len(out) < nb * bs:
        raise BadInput(f"dequantize_into {name}: {nb * bs} values do not fit in out of {len(out)}")
    try:
        _compiled("dequantize_into")(type_id, buf, nb, out)
    except TypeError:
        raise _bad_arrays("dequantize_into", buf=buf, out=out) from None


# =============================================================================================
# Fused quantize: F32/F16/BF16 source bytes -> block type, a few blocks at a time
#
# What a conversion runs: the source bytes of a run of rows (an mmap slice of the checkpoint)
# go straight into ggml's reference quantizers. `_quantize_from_kernel` converts a chunk of
# blocks (_CHUNK_BLOCKS x 32 elements, 8 KiB of float32: it stays in L1) to float32 with the
# intrinsics below, exactly (the values the type table's dequantize gives: F32 as is, F16 by
# the vector `fpext`, which LLVM lowers to vcvtph2ps where the host has it, BF16 by a shift),
# and each block's load also yields a bit mask of its non-finite elements. Then the chunk goes
# through `_quantize_blocks` itself, the float32 kernel the wrappers above run, viewed read-only
# so that it is the same compiled specialization (one compile of the quantizer for both paths).
# So the output is byte-identical to `quantize(dequantize(src))`, without a float32 copy of the
# input and without a separate finiteness pass: the first non-finite element stops the kernel,
# which returns its index (-1: all finite, every block written).
#
# `_quantize_from_kernel` is compiled for one explicit signature on first use (read-only
# input; the source type and the block type are run-time ints).

_CHUNK_BLOCKS = 64


def _source_block_intrinsic(src_id):
    @intrinsic
    def load_block(typingctx, src, o, xb, i):
        """xb[i:i+32] = the 32 elements at src[o:] (F32/F16/BF16 bytes) as float32; returns a
        bit mask of the non-finite ones (bit j: element j)."""
        sig = types.int64(src, types.int64, xb, types.int64)

        def codegen(context, builder, sig, args):
            ptr = _byte_ptr(context, builder, sig, args)
            w = _emit_element_weights(builder, ptr, src_id, QK)
            _store(builder, w, _data_ptr(context, builder, sig.args[2], args[2], args[3]))
            exp = builder.and_(builder.bitcast(w, _vt(_I32, QK)),
                               _const_vec(_I32, [0x7F800000] * QK))
            bad = builder.icmp_unsigned("==", exp, _const_vec(_I32, [0x7F800000] * QK))
            return builder.zext(builder.bitcast(bad, _I32), _I64)

        return sig, codegen

    return load_block


_src_f32, _src_f16, _src_bf16 = (_source_block_intrinsic(T_F32), _source_block_intrinsic(T_F16),
                                 _source_block_intrinsic(T_BF16))


@intrinsic
def _read_only(typingctx, a):
    """The same array typed read-only (no copy): a kernel compiled for read-only input then
    takes it with its existing specialization."""
    if not isinstance(a, types.Array) or a.mutable is False:
        return None
    sig = a.copy(readonly=True)(a)

    def codegen(context, builder, sig, args):
        context.nrt.incref(builder, sig.args[0], args[0])
        return args[0]

    return sig, codegen


@kernel
def _quantize_from_kernel(src, src_id, out, kind):
    """src: n elements of type src_id (F32/F16/BF16 bytes), n % 32 == 0; out: uint8 of
    n // 32 blocks of `kind`, as ggml's quantize_row_*_ref. Returns -1, or the index of the
    first non-finite element (then out is written only up to some block before it)."""
    five = kind == _Q5_0 or kind == _Q5_1
    has_min = kind == _Q4_1 or kind == _Q5_1
    bb = 2 + (2 if has_min else 0) + (4 if five else 0) + (32 if kind == _Q8_0 else 16)
    es = 2 if src_id == T_F16 or src_id == T_BF16 else 4
    nb = out.size // bb
    buf = np.empty(_CHUNK_BLOCKS * QK, np.float32)
    for c0 in range(0, nb, _CHUNK_BLOCKS):
        c1 = min(nb, c0 + _CHUNK_BLOCKS)
        for b in range(c0, c1):
            i = (b - c0) * QK
            if src_id == T_F16:
                bad = _src_f16(src, es * QK * b, buf, i)
            elif src_id == T_BF16:
                bad = _src_bf16(src, es * QK * b, buf, i)
            else:
                bad = _src_f32(src, es * QK * b, buf, i)
            if bad != 0:
                j = 0
                while (bad >> j) & 1 == 0:
                    j += 1
                return b * QK + j
        _quantize_blocks(_read_only(buf[:(c1 - c0) * QK]), out[c0 * bb:c1 * bb], kind)
    return -1


# ggml type id of a block type -> its `kind` code in `_quantize_blocks`
_KIND_OF = {T_Q4_0: _Q4_0, T_Q4_1: _Q4_1, T_Q5_0: _Q5_0, T_Q5_1: _Q5_1, T_Q8_0: _Q8_0}
# ggml type id of a source type the fused quantizer reads -> bytes per element
_SOURCE_BYTES = {T_F32: 4, T_F16: 2, T_BF16: 2}

_SIGNATURES["quantize_from"] = (_quantize_from_kernel, types.int64(
    _ro(types.uint8), types.int64, _rw(types.uint8), types.int64))


def can_quantize_from(source_id: int, type_id: int) -> bool:
    """Whether `quantize_from` runs fused for this pair (else callers dequantize first)."""
    return source_id in _SOURCE_BYTES and type_id in _KIND_OF


def quantize_from(source_id: int, type_id: int, src, out: np.ndarray | None = None):
    """F32/F16/BF16 bytes (`source_id`, a ggml type id; any buffer of whole 32-element blocks)
    -> block type `type_id`, byte-identical to quantizing the exactly dequantized values.

    Returns (out, bad): out is uint8[n // 32 * block_bytes] (`out` if given, which must be that
    size), bad is -1, or the index of the first non-finite element, in which case out is only
    partly written and must not be used.
    """
    kind = _KIND_OF.get(type_id)
    es = _SOURCE_BYTES.get(source_id)
    if kind is None or es is None:
        raise BadInput(f"quantize_from: no fused kernel from type id {source_id!r} to "
                       f"{type_id!r} (sources: F32, F16, BF16; targets: the block types)")
    raw = np.ascontiguousarray(src).reshape(-1).view(np.uint8) if isinstance(src, np.ndarray) \
        else np.frombuffer(src, dtype=np.uint8)
    name = _NAMES[kind]
    if raw.size % (QK * es):
        raise BadInput(f"quantize {name} needs whole blocks of {QK} values ({QK * es} bytes), "
                       f"got {raw.size} bytes")
    nb = raw.size // (QK * es)
    if out is None:
        out = np.empty(nb * _BLOCK_BYTES[kind], dtype=np.uint8)
    elif out.dtype != np.uint8 or out.shape != (nb * _BLOCK_BYTES[kind],):
        raise BadInput(f"quantize_from: out must be uint8[{nb * _BLOCK_BYTES[kind]}], got "
                       f"{out.dtype} of shape {out.shape}")
    try:
        bad = _compiled("quantize_from")(raw, source_id, out, kind)
    except TypeError:
        raise BadInput("quantize_from needs C-contiguous arrays and a writable out") from None
    return out, int(bad)
