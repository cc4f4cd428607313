"""Importance-weighted quantizers for ggml's 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1).

ggml's `quantize_row_q*_impl` (ggml-quants.c), the path llama-quantize takes with an importance
matrix: each weight's squared error counts `imp[col] * sqrt(sigma2 + x^2)` (sigma2 the row's
mean square), and the block's scale (and min) is searched to minimise that weighted error --
`make_qx_quants(rmse_type 1, weights)` for the symmetric types, `make_qkx3_quants(-0.9, 0.05,
36 steps)` for those with a min. The blocks are the types' ordinary ggml layouts, decoded by the
ordinary dequantizers: only the choice of scale and quants changes.

Vectorised over all blocks of the rows with numpy, in float32 like ggml; sums run in numpy's
order, not C's, so a result may differ from llama-quantize's in the last bit of a scale (there
is no reference output of ggml's weighted path here to be exact against). Q8_0 has no weighted
path in ggml either.
"""
from __future__ import annotations

import numpy as np

from .errors import BadInput

QK = 32
_F = np.float32


def _nearest(v: np.ndarray) -> np.ndarray:
    # ggml's nearest_int (the 1.5 * 2**23 trick) rounds half to even, as rint does
    return np.rint(v).astype(np.int32)


def _weights(x: np.ndarray, importance: np.ndarray, n_cols: int) -> np.ndarray:
    """(rows, blocks, 32) weights: imp * sqrt(sigma2 + x^2), sigma2 per row."""
    rows = x.reshape(x.shape[0], -1)
    sigma2 = (rows * rows).sum(axis=1, dtype=_F) / _F(n_cols)
    w = importance.astype(_F).reshape(1, -1, QK) * np.sqrt(sigma2[:, None, None] + x * x)
    return w.astype(_F)


def _make_qx(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(32, nmax, x, L, 1, w) for every block: (scale, L + nmax)."""
    ax = np.abs(x)
    idx = np.argmax(ax, axis=-1)
    mx = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    zero = np.take_along_axis(ax, idx[..., None], -1)[..., 0] < _F(1e-15)
    safe = np.where(zero, _F(1), mx)

    def trial(iscale):
        l = np.clip(_nearest(iscale[..., None] * x), -nmax, nmax - 1)
        lf = l.astype(_F)
        return l, (w * x * lf).sum(-1, dtype=_F), (w * lf * lf).sum(-1, dtype=_F)

    L, sumlx, suml2 = trial(_F(-nmax) / safe)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0)).astype(_F)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, slx, sl2 = trial(-(_F(nmax) + _F(0.1) * _F(step)) / safe)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better[..., None], l, L)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, slx / sl2, scale).astype(_F)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, _F(0), scale)
    L = np.where(zero[..., None], 0, L + nmax)
    return scale, L.astype(np.uint8)


def _make_qkx3(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """make_qkx3_quants(32, nmax, x, w, L, &the_min, Laux, -0.9, 0.05, 36, false): (scale, min,
    L); ggml's the_min is -min and the block stores m = -the_min = min."""
    mn = np.minimum(x.min(-1), _F(0))
    mx = x.max(-1)
    flat = mx <= mn
    span = np.where(flat, _F(1), mx - mn)
    sum_w = w.sum(-1, dtype=_F)
    sum_x = (w * x).sum(-1, dtype=_F)
    iscale = _F(nmax) / span
    scale = _F(1) / iscale
    L = np.clip(_nearest(iscale[..., None] * (x - mn[..., None])), 0, nmax)
    diff = scale[..., None] * L.astype(_F) + mn[..., None] - x
    best = (w * diff * diff).sum(-1, dtype=_F)
    for step in range(37):
        isc = (_F(-0.9) + _F(0.05) * _F(step) + _F(nmax)) / span
        l = np.clip(_nearest(isc[..., None] * (x - mn[..., None])), 0, nmax)
        lf = l.astype(_F)
        sum_l = (w * lf).sum(-1, dtype=_F)
        sum_l2 = (w * lf * lf).sum(-1, dtype=_F)
        sum_xl = (w * lf * x).sum(-1, dtype=_F)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(_F)
            this_min = np.where(pos, _F(0), this_min).astype(_F)
        d = this_scale[..., None] * lf + this_min[..., None] - x
        mad = (w * d * d).sum(-1, dtype=_F)
        better = (D > 0) & (mad < best)
        L = np.where(better[..., None], l, L)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, _F(0), scale)
    L = np.where(flat[..., None], 0, L)
    return scale.astype(_F), mn.astype(_F), L.astype(np.uint8)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").view(np.uint8).reshape(*v.shape, 2)


def _nibbles(L: np.ndarray) -> np.ndarray:
    return (L[..., :16] & 0xF) | ((L[..., 16:] & 0xF) << 4)


def _qh(L: np.ndarray) -> np.ndarray:
    bits = ((L >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(*L.shape[:-1], 4)


def quantize_weighted(type_name: str, x: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Rows x (float32, (rows, cols)) with importance (float32, (cols,)) -> uint8 (rows,
    row_bytes) in the type's ggml layout."""
    rows, n = x.shape
    if n % QK:
        raise BadInput(f"{type_name} needs rows that are a multiple of {QK} elements, got {n}")
    importance = np.asarray(importance, _F).reshape(-1)
    if importance.size != n or not np.all(np.isfinite(importance)) or np.any(importance < 0):
        raise BadInput(f"importance for rows of {n} needs {n} finite non-negative values, got "
                       f"{importance.size}")
    xb = np.ascontiguousarray(x, _F).reshape(rows, n // QK, QK)
    w = _weights(xb, importance, n)
    if type_name in ("Q4_0", "Q5_0"):
        nmax = 8 if type_name == "Q4_0" else 16
        d, L = _make_qx(xb, nmax, w)
        parts = [_f16(d)] + ([_qh(L)] if type_name == "Q5_0" else []) + [_nibbles(L)]
    elif type_name in ("Q4_1", "Q5_1"):
        nmax = 15 if type_name == "Q4_1" else 31
        d, m, L = _make_qkx3(xb, nmax, w)
        parts = [_f16(d), _f16(m)] + ([_qh(L)] if type_name == "Q5_1" else []) + [_nibbles(L)]
    else:
        raise BadInput(f"{type_name} has no importance-weighted quantizer")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
