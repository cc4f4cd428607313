"""The elementwise operations of the RWKV forward pass, one function each.

Every function writes into a buffer the caller carved from the board's arena (`out`), so a
token allocates nothing the board does not own. Vectors are float32 like a board's; norms
accumulate their statistics in float64, as ggml does.
"""
from __future__ import annotations

import numpy as np


def layer_norm(x, w, b, eps, out):
    """out = (x - mean) / sqrt(var + eps) * w + b over the last axis    x, out: (..., C); w, b: (C,)

    As ggml_norm: mean and sum of squares accumulate in double, everything else is float32.
    """
    n = x.shape[-1]
    mean = (np.sum(x, axis=-1, keepdims=True, dtype=np.float64) / n).astype(np.float32)
    np.subtract(x, mean, out=out)
    variance = (np.sum(out * out, axis=-1, keepdims=True, dtype=np.float64) / n).astype(
        np.float32)
    out *= np.float32(1.0) / np.sqrt(variance + np.float32(eps))
    out *= w
    out += b


def group_norm(x, w, b, n_groups, eps, out):
    """layer_norm on each of n_groups contiguous chunks of the last axis, then * w + b"""
    shape = x.shape
    layer_norm(x.reshape(*shape[:-1], n_groups, -1), np.float32(1), np.float32(0), eps,
               out.reshape(*shape[:-1], n_groups, -1))
    out *= w
    out += b


def exp(x, out):
    """float32 exp, correctly rounded (via float64) like glibc's expf, which ggml calls; numpy's
    own float32 exp can differ in the last bit, and one bit can flip a later Q8 rounding."""
    np.copyto(out, np.exp(x.astype(np.float64)), casting="same_kind")


def token_shift_mix(x, prev, m, out):
    """v4/v5: out = x*m + prev*(1-m), evaluated as rwkv.cpp does: x*m + (prev - prev*m)"""
    np.multiply(prev, m, out=out)
    np.subtract(prev, out, out=out)
    out += x * m


def shift_lerp(x, delta, m, out):
    """v6/v7: out = x + delta*m, with delta = prev - x"""
    np.multiply(delta, m, out=out)
    out += x


def sigmoid(x, out):
    """out = 1 / (1 + exp(-x))"""
    np.negative(x, out=out)
    exp(out, out=out)
    out += np.float32(1.0)
    np.divide(np.float32(1.0), out, out=out)


def silu(x, out):
    """out = x / (1 + exp(-x)), the form ggml evaluates (out must not alias x)"""
    np.negative(x, out=out)
    exp(out, out=out)
    out += np.float32(1.0)
    np.divide(x, out, out=out)


def relu_squared(x):
    """in place: x = max(x, 0)^2"""
    np.maximum(x, np.float32(0.0), out=x)
    np.square(x, out=x)


def wkv_v4(k, v, u, w, aa, bb, pp, out):
    """RWKV-4 attention (numerically stable form); updates aa, bb, pp in place. All (C,)"""
    e1, e2 = np.empty_like(k), np.empty_like(k)
    ww = u + k
    q = np.maximum(pp, ww)
    exp(pp - q, e1)
    exp(ww - q, e2)
    np.divide(e1 * aa + e2 * v, e1 * bb + e2, out=out)
    ww = pp + w
    q = np.maximum(ww, k)
    exp(ww - q, e1)
    exp(k - q, e2)
    aa *= e1
    aa += e2 * v
    bb *= e1
    bb += e2
    pp[:] = q


def _fma(a, b, c):
    """float32 a*b + c rounded once, as the FMA instructions ggml's kernels use (a product of
    two float32 is exact in float64)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def wkv_v5(r, k, v, u, w, state, out):
    """RWKV-5/6 linear attention per head; state (H, S_key, S_value) updated in place.

    out[h,j] = sum_i r[h,i] * (u[h,i]*k[h,i]*v[h,j] + S[h,i,j]);  S = w[h,i]*S + k[h,i]*v[h,j]
    r, k, v, u, w, out: (H, S). Evaluated in ggml's rwkv_wkv6 order: key by key, each step
    three fused multiply-adds, so the state matches rwkv.cpp's to the last bit where it can.
    """
    out[:] = 0
    for i in range(k.shape[1]):
        prev = state[:, i, :]
        kv = v * k[:, i:i + 1]                                   # (H, S_value), float32
        temp = _fma(kv, u[:, i:i + 1], prev)
        out[:] = _fma(temp, r[:, i:i + 1], out)
        state[:, i, :] = _fma(prev, w[:, i:i + 1], kv)


def wkv_v7(r, w, k, v, alpha, beta, state, out):
    """RWKV-7 generalized delta rule per head; state (H, S_value, S_key) updated in place.

    sa = S @ alpha;  S = S*w + v k^T + sa beta^T;  out = S @ r       all vectors (H, S)
    """
    sa = np.einsum("hij,hj->hi", state, alpha)
    state *= w[:, None, :]
    state += v[:, :, None] * k[:, None, :] + sa[:, :, None] * beta[:, None, :]
    out[:] = np.einsum("hij,hj->hi", state, r)


def l2_normalize_heads(x, n_heads, out):
    """out_h = x_h / max(||x_h||, 1e-12) for each head           x, out: (..., C)"""
    h = x.reshape(*x.shape[:-1], n_heads, -1)
    norm = np.sqrt((h.astype(np.float64) ** 2).sum(axis=-1, keepdims=True))
    out.reshape(h.shape)[:] = (h / np.maximum(norm, 1e-12)).astype(np.float32)
