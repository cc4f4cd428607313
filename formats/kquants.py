"""numba kernels for ggml's k-quant super-block types Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.

Every type packs QK_K = 256 values into one super-block, in ggml's exact byte layouts
(ggml-common.h; all fp16 fields little-endian, rounded to nearest even):

  Q2_K  84 bytes = scales[16] (4-bit scale | 4-bit min << 4) + qs[64] (2-bit) + d + dmin
  Q3_K 110 bytes = hmask[32] (high bit) + qs[64] (low 2 bits) + scales[12] (16 x 6-bit) + d
  Q4_K 144 bytes = d + dmin + scales[12] (8 x 6-bit scale, 8 x 6-bit min) + qs[128] (4-bit)
  Q5_K 176 bytes = d + dmin + scales[12] + qh[32] (5th bit) + qs[128] (low 4 bits)
  Q6_K 210 bytes = ql[128] (low 4 bits) + qh[64] (high 2 bits) + scales[16] (int8) + d

Quantization follows ggml's reference quantizers (ggml-quants.c: `quantize_row_q*_K_ref`, the
path `quantize_q*_K` takes without an importance matrix) and their helpers `nearest_int`,
`make_qx_quants` (rmse_type 1, no weights), `make_q3_quants` (do_rmse), `make_qkx2_quants` and
`get_scale_min_k4`, including ggml's GROUP_MAX_EPS (1e-15) all-zero test. The arithmetic is
float32 with C's evaluation order, one rounding per operation and no FMA (formats/jit.py turns
fastmath off). numba promotes Python floats and int*float32 to float64, so every constant and
every int operand of a float operation below is an explicit np.float32. Dequantization is
ggml's `dequantize_row_q*_K`, which is also what gguf-py's numpy dequantizers compute.

As in formats/kernels.py there are just two kernels, `_quantize_blocks` and
`_dequantize_blocks`, taking the type as a small int, so numba compiles one function per
direction (cold: about 6 s to quantize, 1.3 s to dequantize, then cached in __pycache__). The
per-type bodies are written inside them; only ggml's shared helpers are separate small kernels,
each compiled once (make_qkx2_quants takes its parameters from `kind` rather than literals, so
it is not specialized three times). Integer conversions the C code does
implicitly (int -> uint8_t / int8_t stores) are done explicitly as two's-complement wraps.
Rows must be whole super-blocks (a multiple of 256 values); callers fall back to another type
for tensors whose rows are not.
"""
from __future__ import annotations

import numpy as np

from .jit import kernel
from .kernels import (_f16_bits_to_f32, _f32_bits, _f32_to_f16_bits, run_dequantize,
                      run_quantize)

QK_K = 256

# Type codes for the two kernels and the block layouts (bytes per 256-value super-block).
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = 0, 1, 2, 3, 4
_BLOCK_BYTES = {
    _Q2_K: QK_K // 16 + QK_K // 4 + 2 + 2,            # 84
    _Q3_K: QK_K // 8 + QK_K // 4 + 12 + 2,            # 110
    _Q4_K: 2 + 2 + 12 + QK_K // 2,                    # 144
    _Q5_K: 2 + 2 + 12 + QK_K // 8 + QK_K // 2,        # 176
    _Q6_K: QK_K // 2 + QK_K // 4 + QK_K // 16 + 2,    # 210
}
_NAMES = {_Q2_K: "Q2_K", _Q3_K: "Q3_K", _Q4_K: "Q4_K", _Q5_K: "Q5_K", _Q6_K: "Q6_K"}

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_EPS = np.float32(1e-15)          # GROUP_MAX_EPS
_MAGIC = np.float32(12582912.0)   # 1.5 * 2**23


# ---------------------------------------------------------------------------------------------
# ggml helpers

@kernel
def _nearest_int(f):
    """ggml's nearest_int: the float32 bits of f + 1.5*2**23 (round half to even for
    |f| <= 4194303; outside that range the same bit formula, as C computes it)."""
    i = np.int64(_f32_bits(f + _MAGIC))
    return (i & 0x007FFFFF) - 0x00400000


@kernel
def _put_f16(out, o, f):
    h = _f32_to_f16_bits(f)
    out[o] = h & 0xFF
    out[o + 1] = h >> 8


@kernel
def _get_f16(data, o):
    return _f16_bits_to_f32(np.int64(data[o]) | (np.int64(data[o + 1]) << 8))


@kernel
def _signed_max(x):
    """(the first value of largest magnitude, its magnitude), as ggml's make_q*_quants scan."""
    mx = _F0
    amax = _F0
    for i in range(x.size):
        ax = np.abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    return mx, amax


@kernel
def _make_qx_quants(x, nmax, L):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): weights x*x. L gets l + nmax."""
    n = x.size
    mx, amax = _signed_max(x)
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = np.float32(nmax)
    iscale = -fnmax / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != _F0 else _F0
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(fnmax + np.float32(0.1) * np.float32(is_)) / mx
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
            w = x[i] * x[i]
            fl = np.float32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > _F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@kernel
def _make_q3_quants(x, nmax, L):
    """make_q3_quants(n, nmax, x, L, do_rmse=true). L gets l + nmax (0 if all ~zero)."""
    n = x.size
    mx, amax = _signed_max(x)
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = -np.float32(nmax) / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fL = np.float32(L[i])
            slx = sumlx - w * x[i] * fL
            if slx > _F0:
                sl2 = suml2 - w * fL * fL
                new_l = max(-nmax, min(nmax - 1, _nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > _F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > _F0 else _F0


@kernel
def _make_qkx2_quants(x, weights, L, Laux, kind):
    """make_qkx2_quants with the arguments each type's reference passes (one compile for all
    three: the parameters come from the runtime `kind`, not from literals): returns
    (scale, the_min) with the_min = -min >= 0."""
    if kind == _Q2_K:
        nmax, rmin, rdelta, nstep, use_mad = 3, np.float32(-0.5), np.float32(0.1), 15, True
    elif kind == _Q4_K:
        nmax, rmin, rdelta, nstep, use_mad = 15, np.float32(-1.0), np.float32(0.1), 20, False
    else:
        nmax, rmin, rdelta, nstep, use_mad = 31, np.float32(-0.5), np.float32(0.1), 15, False
    n = x.size
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > _F0:
        mn = _F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _F0, -mn
    fnmax = np.float32(nmax)
    iscale = fnmax / (mx - mn)
    scale = _F1 / iscale
    best_error = _F0
    for i in range(n):
        l = max(0, min(nmax, _nearest_int(iscale * (x[i] - mn))))
        L[i] = l
        diff = scale * np.float32(l) + mn - x[i]
        diff = np.abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(is_) + fnmax) / (mx - mn)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            l = max(0, min(nmax, _nearest_int(iscale * (x[i] - mn))))
            Laux[i] = l
            w = weights[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            cur_error = _F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = np.abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@kernel
def _scale_min_k4(j, q, o):
    """get_scale_min_k4 on the 12 scale bytes at q[o:o+12]: (scale, min), 6 bits each."""
    if j < 4:
        return np.int64(q[o + j]) & 63, np.int64(q[o + j + 4]) & 63
    sc = (np.int64(q[o + j + 4]) & 0xF) | ((np.int64(q[o + j - 4]) >> 6) << 4)
    m = (np.int64(q[o + j + 4]) >> 4) | ((np.int64(q[o + j]) >> 6) << 4)
    return sc, m


@kernel
def _q3_scale(q, o, j):
    """The j-th 6-bit Q3_K scale (0..63, stored with +32) from the 12 bytes at q[o:o+12]."""
    lo = (np.int64(q[o + j]) & 0xF) if j < 8 else (np.int64(q[o + j - 8]) >> 4)
    return lo | (((np.int64(q[o + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# The kernels

@kernel
def _quantize_blocks(src, out, kind):
    """src: float32[nb * 256]; out: uint8[nb * block_bytes]. ggml quantize_row_q*_K_ref, one
    super-block x at a time. The four per-type bodies are written inline rather than as
    helper kernels: numba optimizes each jitted function together with everything it calls,
    so every extra layer of calls re-optimizes the helpers below it (cold compile ~8.5 s with
    a helper per type)."""
    if kind == _Q2_K:
        bb = 84
    elif kind == _Q3_K:
        bb = 110
    elif kind == _Q4_K:
        bb = 144
    elif kind == _Q5_K:
        bb = 176
    else:
        bb = 210
    L = np.zeros(QK_K, dtype=np.int64)
    Laux = np.zeros(32, dtype=np.int64)
    weights = np.zeros(32, dtype=np.float32)
    scales = np.zeros(16, dtype=np.float32)
    mins = np.zeros(16, dtype=np.float32)
    for b in range(src.size // QK_K):
        x = src[b * QK_K:(b + 1) * QK_K]
        o = b * bb
        if kind == _Q6_K:
            # ---- quantize_row_q6_K_ref
            max_scale = _F0
            max_abs_scale = _F0
            for ib in range(16):
                scale = _make_qx_quants(x[16 * ib:16 * ib + 16], 32, L[16 * ib:16 * ib + 16])
                scales[ib] = scale
                abs_scale = np.abs(scale)
                if abs_scale > max_abs_scale:
                    max_abs_scale = abs_scale
                    max_scale = scale
            if max_abs_scale < _EPS:
                for k in range(210):
                    out[o + k] = 0
                continue
            iscale = np.float32(-128.0) / max_scale
            _put_f16(out, o + 208, _F1 / iscale)
            for ib in range(16):
                out[o + 192 + ib] = min(127, _nearest_int(iscale * scales[ib])) & 0xFF
            dd = _get_f16(out, o + 208)
            for j in range(16):
                sc = np.int64(out[o + 192 + j])
                sc = sc - 256 if sc >= 128 else sc
                d = dd * np.float32(sc)
                if d == _F0:
                    continue
                for ii in range(16):
                    l = max(-32, min(31, _nearest_int(x[16 * j + ii] / d)))
                    L[16 * j + ii] = l + 32
            for h in range(2):
                j = 128 * h
                ql = o + 64 * h
                qh = o + 128 + 32 * h
                for l in range(32):
                    v0 = L[j + l]
                    v1 = L[j + l + 32]
                    v2 = L[j + l + 64]
                    v3 = L[j + l + 96]
                    out[ql + l] = (v0 & 0xF) | ((v2 & 0xF) << 4)
                    out[ql + l + 32] = (v1 & 0xF) | ((v3 & 0xF) << 4)
                    out[qh + l] = ((v0 >> 4) | ((v1 >> 4) << 2) | ((v2 >> 4) << 4)
                                   | ((v3 >> 4) << 6)) & 0xFF
        elif kind == _Q4_K or kind == _Q5_K:
            # ---- quantize_row_q4_K_ref / quantize_row_q5_K_ref
            five = kind == _Q5_K
            nmax = 31 if five else 15
            max_scale = _F0
            max_min = _F0
            for j in range(8):
                xs = x[32 * j:32 * j + 32]
                sum_x2 = _F0
                for l in range(32):
                    sum_x2 += xs[l] * xs[l]
                av_x = np.sqrt(sum_x2 / np.float32(32.0))
                for l in range(32):
                    weights[l] = av_x + np.abs(xs[l])
                scale, mn = _make_qkx2_quants(xs, weights, L[32 * j:32 * j + 32], Laux, kind)
                scales[j] = scale
                mins[j] = mn
                if scale > max_scale:
                    max_scale = scale
                if mn > max_min:
                    max_min = mn
            inv_scale = np.float32(63.0) / max_scale if max_scale > _F0 else _F0
            inv_min = np.float32(63.0) / max_min if max_min > _F0 else _F0
            s = o + 4
            for j in range(8):
                ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
                lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
                if j < 4:
                    out[s + j] = ls
                    out[s + j + 4] = lm
                else:
                    out[s + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                    out[s + j - 4] |= (ls >> 4) << 6
                    out[s + j] |= (lm >> 4) << 6
            _put_f16(out, o, max_scale / np.float32(63.0))
            _put_f16(out, o + 2, max_min / np.float32(63.0))
            dd = _get_f16(out, o)
            dmin = _get_f16(out, o + 2)
            for j in range(8):
                sc, m = _scale_min_k4(j, out, s)
                d = dd * np.float32(sc)
                if d == _F0:
                    continue
                dm = dmin * np.float32(m)
                for ii in range(32):
                    l = _nearest_int((x[32 * j + ii] + dm) / d)
                    L[32 * j + ii] = max(0, min(nmax, l))
            if five:
                qh = o + 16
                ql = o + 48
                for j in range(32):
                    out[qh + j] = 0
                for h in range(4):
                    n = 64 * h
                    for j in range(32):
                        l1 = L[n + j]
                        if l1 > 15:
                            l1 -= 16
                            out[qh + j] |= 1 << (2 * h)
                        l2 = L[n + j + 32]
                        if l2 > 15:
                            l2 -= 16
                            out[qh + j] |= 2 << (2 * h)
                        out[ql + 32 * h + j] = (l1 | (l2 << 4)) & 0xFF
            else:
                q = o + 16
                for h in range(4):
                    for l in range(32):
                        out[q + 32 * h + l] = (L[64 * h + l] | (L[64 * h + l + 32] << 4)) & 0xFF
        elif kind == _Q3_K:
            # ---- quantize_row_q3_K_ref
            max_scale = _F0
            amax = _F0
            for j in range(16):
                scales[j] = _make_q3_quants(x[16 * j:16 * j + 16], 4, L[16 * j:16 * j + 16])
                scale = np.abs(scales[j])
                if scale > amax:
                    amax = scale
                    max_scale = scales[j]
            s = o + 96
            for k in range(12):
                out[s + k] = 0
            if max_scale != _F0:
                iscale = np.float32(-32.0) / max_scale
                for j in range(16):
                    l = _nearest_int(iscale * scales[j])
                    l = ((l + 128) & 0xFF) - 128                     # int8_t l = nearest_int(...)
                    l = max(-32, min(31, l)) + 32
                    if j < 8:
                        out[s + j] = l & 0xF
                    else:
                        out[s + j - 8] |= (l & 0xF) << 4
                    l >>= 4
                    out[s + j % 4 + 8] |= l << (2 * (j // 4))
                _put_f16(out, o + 108, _F1 / iscale)
            else:
                _put_f16(out, o + 108, _F0)
            dd = _get_f16(out, o + 108)
            for j in range(16):
                sc = _q3_scale(out, s, j) - 32
                d = dd * np.float32(sc)
                if d == _F0:
                    continue
                for ii in range(16):
                    l = max(-4, min(3, _nearest_int(x[16 * j + ii] / d)))
                    L[16 * j + ii] = l + 4
            for k in range(32):
                out[o + k] = 0
            for j in range(256):         # high bit of value j: hmask[j % 32], bit j // 32
                if L[j] > 3:
                    out[o + j % 32] |= 1 << (j // 32)
                    L[j] -= 4
            for h in range(2):
                j = 128 * h
                for l in range(32):
                    out[o + 32 + 32 * h + l] = (L[j + l] | (L[j + l + 32] << 2)
                                                | (L[j + l + 64] << 4)
                                                | (L[j + l + 96] << 6)) & 0xFF
        else:
            # ---- quantize_row_q2_K_ref
            q4scale = np.float32(15.0)
            max_scale = _F0
            max_min = _F0
            for j in range(16):
                xs = x[16 * j:16 * j + 16]
                for l in range(16):
                    weights[l] = np.abs(xs[l])
                scale, mn = _make_qkx2_quants(xs, weights[:16], L[16 * j:16 * j + 16], Laux, kind)
                scales[j] = scale
                mins[j] = mn
                if scale > max_scale:
                    max_scale = scale
                if mn > max_min:
                    max_min = mn
            if max_scale > _F0:
                iscale = q4scale / max_scale
                for j in range(16):
                    out[o + j] = _nearest_int(iscale * scales[j]) & 0xFF
                _put_f16(out, o + 80, max_scale / q4scale)
            else:
                for j in range(16):
                    out[o + j] = 0
                _put_f16(out, o + 80, _F0)
            if max_min > _F0:
                iscale = q4scale / max_min
                for j in range(16):
                    out[o + j] |= (_nearest_int(iscale * mins[j]) << 4) & 0xFF
                _put_f16(out, o + 82, max_min / q4scale)
            else:
                _put_f16(out, o + 82, _F0)
            dd = _get_f16(out, o + 80)
            dmin = _get_f16(out, o + 82)
            for j in range(16):
                sc = np.int64(out[o + j])
                d = dd * np.float32(sc & 0xF)
                if d == _F0:
                    continue
                dm = dmin * np.float32(sc >> 4)
                for ii in range(16):
                    l = _nearest_int((x[16 * j + ii] + dm) / d)
                    L[16 * j + ii] = max(0, min(3, l))
            for h in range(2):
                j = 128 * h
                for l in range(32):
                    out[o + 16 + 32 * h + l] = (L[j + l] | (L[j + l + 32] << 2)
                                                | (L[j + l + 64] << 4)
                                                | (L[j + l + 96] << 6)) & 0xFF


@kernel
def _dequantize_blocks(data, out, kind):
    """data: uint8[nb * block_bytes]; out: float32[nb * 256]. ggml dequantize_row_q*_K."""
    if kind == _Q2_K:
        bb = 84
    elif kind == _Q3_K:
        bb = 110
    elif kind == _Q4_K:
        bb = 144
    elif kind == _Q5_K:
        bb = 176
    else:
        bb = 210
    for b in range(data.size // bb):
        o = b * bb
        y = b * QK_K
        if kind == _Q6_K:
            d = _get_f16(data, o + 208)
            for h in range(2):
                ql = o + 64 * h
                qh = o + 128 + 32 * h
                sc = o + 192 + 8 * h
                for l in range(32):
                    is_ = l // 16
                    lo0 = np.int64(data[ql + l])
                    lo1 = np.int64(data[ql + l + 32])
                    hi = np.int64(data[qh + l])
                    q1 = ((lo0 & 0xF) | (((hi >> 0) & 3) << 4)) - 32
                    q2 = ((lo1 & 0xF) | (((hi >> 2) & 3) << 4)) - 32
                    q3 = ((lo0 >> 4) | (((hi >> 4) & 3) << 4)) - 32
                    q4 = ((lo1 >> 4) | (((hi >> 6) & 3) << 4)) - 32
                    s1 = np.int64(data[sc + is_])
                    s2 = np.int64(data[sc + is_ + 2])
                    s3 = np.int64(data[sc + is_ + 4])
                    s4 = np.int64(data[sc + is_ + 6])
                    s1 = s1 - 256 if s1 >= 128 else s1
                    s2 = s2 - 256 if s2 >= 128 else s2
                    s3 = s3 - 256 if s3 >= 128 else s3
                    s4 = s4 - 256 if s4 >= 128 else s4
                    yy = y + 128 * h + l
                    out[yy] = d * np.float32(s1) * np.float32(q1)
                    out[yy + 32] = d * np.float32(s2) * np.float32(q2)
                    out[yy + 64] = d * np.float32(s3) * np.float32(q3)
                    out[yy + 96] = d * np.float32(s4) * np.float32(q4)
        elif kind == _Q4_K or kind == _Q5_K:
            d = _get_f16(data, o)
            dmin = _get_f16(data, o + 2)
            five = kind == _Q5_K
            qs = o + 48 if five else o + 16
            for h in range(4):
                sc, m = _scale_min_k4(2 * h, data, o + 4)
                d1 = d * np.float32(sc)
                m1 = dmin * np.float32(m)
                sc, m = _scale_min_k4(2 * h + 1, data, o + 4)
                d2 = d * np.float32(sc)
                m2 = dmin * np.float32(m)
                for l in range(32):
                    byte = np.int64(data[qs + 32 * h + l])
                    v1 = byte & 0xF
                    v2 = byte >> 4
                    if five:
                        hb = np.int64(data[o + 16 + l])
                        v1 += ((hb >> (2 * h)) & 1) << 4
                        v2 += ((hb >> (2 * h + 1)) & 1) << 4
                    out[y + 64 * h + l] = d1 * np.float32(v1) - m1
                    out[y + 64 * h + 32 + l] = d2 * np.float32(v2) - m2
        elif kind == _Q3_K:
            d_all = _get_f16(data, o + 108)
            for j in range(16):                     # 16 groups of 16 values
                dl = d_all * np.float32(_q3_scale(data, o + 96, j) - 32)
                h = j // 8                          # which 128-value half
                shift = 2 * ((j % 8) // 2)
                bit = 4 * h + (j % 8) // 2          # hmask bit
                base = 16 * (j % 2)
                for l in range(16):
                    q = (np.int64(data[o + 32 + 32 * h + base + l]) >> shift) & 3
                    if (np.int64(data[o + base + l]) >> bit) & 1 == 0:
                        q -= 4
                    out[y + 16 * j + l] = dl * np.float32(q)
        else:
            d = _get_f16(data, o + 80)
            dmin = _get_f16(data, o + 82)
            for j in range(16):
                sc = np.int64(data[o + j])
                dl = d * np.float32(sc & 0xF)
                ml = dmin * np.float32(sc >> 4)
                h = j // 8
                shift = 2 * ((j % 8) // 2)
                base = 16 * (j % 2)
                for l in range(16):
                    q = (np.int64(data[o + 16 + 32 * h + base + l]) >> shift) & 3
                    out[y + 16 * j + l] = dl * np.float32(q) - ml


# ---------------------------------------------------------------------------------------------
# Public wrappers: validate, allocate, call

def _quantize(kind: int, x) -> np.ndarray:
    return run_quantize(_quantize_blocks, kind, _NAMES[kind], QK_K, _BLOCK_BYTES[kind], x)


def _dequantize(kind: int, data) -> np.ndarray:
    return run_dequantize(_dequantize_blocks, kind, _NAMES[kind], QK_K, _BLOCK_BYTES[kind],
                          data)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 256 == 0) -> uint8[n / 256 * 210], as ggml's quantize_row_q6_K_ref."""
    return _quantize(_Q6_K, x)


def dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 210] -> float32[nb * 256], as ggml's dequantize_row_q6_K."""
    return _dequantize(_Q6_K, data)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 256 == 0) -> uint8[n / 256 * 144], as ggml's quantize_row_q4_K_ref."""
    return _quantize(_Q4_K, x)


def dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 144] -> float32[nb * 256], as ggml's dequantize_row_q4_K."""
    return _dequantize(_Q4_K, data)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 256 == 0) -> uint8[n / 256 * 176], as ggml's quantize_row_q5_K_ref."""
    return _quantize(_Q5_K, x)


def dequantize_q5_k(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 176] -> float32[nb * 256], as ggml's dequantize_row_q5_K."""
    return _dequantize(_Q5_K, data)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 256 == 0) -> uint8[n / 256 * 110], as ggml's quantize_row_q3_K_ref."""
    return _quantize(_Q3_K, x)


def dequantize_q3_k(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 110] -> float32[nb * 256], as ggml's dequantize_row_q3_K."""
    return _dequantize(_Q3_K, data)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """float32[n] (n % 256 == 0) -> uint8[n / 256 * 84], as ggml's quantize_row_q2_K_ref."""
    return _quantize(_Q2_K, x)


def dequantize_q2_k(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 84] -> float32[nb * 256], as ggml's dequantize_row_q2_K."""
    return _dequantize(_Q2_K, data)
