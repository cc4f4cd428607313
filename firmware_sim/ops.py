"""The elementwise operations of the RWKV forward pass, one function each.

Every function writes into a buffer the caller carved from the board's arena (`out`), so a
token allocates nothing the board does not own. Vectors are float32 like a board's; norms
accumulate their statistics in float64, as ggml does.
"""
from __future__ import annotations

import numpy as np


def layer_norm(x, w, b, eps, out):
    """out = (x - mean) / sqrt(var + eps) * w + b          x, w, b, out: (C,)"""
    x64 = x.astype(np.float64)
    mean = x64.mean()
    var = ((x64 - mean) ** 2).mean()
    np.subtract(x, np.float32(mean), out=out)
    out *= np.float32(1.0 / np.sqrt(var + eps))
    out *= w
    out += b


def group_norm(x, w, b, n_groups, eps, out):
    """layer_norm on each of n_groups contiguous chunks, then * w + b       x, out: (C,)"""
    g = x.reshape(n_groups, -1).astype(np.float64)
    mean = g.mean(axis=1, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=1, keepdims=True)
    out.reshape(n_groups, -1)[:] = ((g - mean) / np.sqrt(var + eps)).astype(np.float32)
    out *= w
    out += b


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
    np.negative(x, out=out)
    np.exp(out, out=out)
    out += np.float32(1.0)
    np.reciprocal(out, out=out)


def silu(x, out):
    """out = x * sigmoid(x) (out must not alias x)"""
    sigmoid(x, out)
    out *= x


def relu_squared(x):
    """in place: x = max(x, 0)^2"""
    np.maximum(x, np.float32(0.0), out=x)
    np.square(x, out=x)


def wkv_v4(k, v, u, w, aa, bb, pp, out):
    """RWKV-4 attention (numerically stable form); updates aa, bb, pp in place. All (C,)"""
    q = np.maximum(pp, u + k)
    e1 = np.exp(pp - q)
    e2 = np.exp(u + k - q)
    np.divide(e1 * aa + e2 * v, e1 * bb + e2, out=out)
    q = np.maximum(pp + w, k)
    e1 = np.exp(pp + w - q)
    e2 = np.exp(k - q)
    aa *= e1
    aa += e2 * v
    bb *= e1
    bb += e2
    pp[:] = q


def wkv_v5(r, k, v, u, w, state, out):
    """RWKV-5/6 linear attention per head; state (H, S_key, S_value) updated in place.

    out[h,j] = sum_i r[h,i] * (u[h,i]*k[h,i]*v[h,j] + S[h,i,j]);  S = w[h,i]*S + k[h,i]*v[h,j]
    r, k, v, u, w, out: (H, S)
    """
    kv = k[:, :, None] * v[:, None, :]
    out[:] = np.einsum("hi,hij->hj", r, u[:, :, None] * kv + state)
    state *= w[:, :, None]
    state += kv


def wkv_v7(r, w, k, v, alpha, beta, state, out):
    """RWKV-7 generalized delta rule per head; state (H, S_value, S_key) updated in place.

    sa = S @ alpha;  S = S*w + v k^T + sa beta^T;  out = S @ r       all vectors (H, S)
    """
    sa = np.einsum("hij,hj->hi", state, alpha)
    state *= w[:, None, :]
    state += v[:, :, None] * k[:, None, :] + sa[:, :, None] * beta[:, None, :]
    out[:] = np.einsum("hij,hj->hi", state, r)


def l2_normalize_heads(x, n_heads, out):
    """out_h = x_h / max(||x_h||, 1e-12) for each head         x, out: (C,)"""
    h = x.reshape(n_heads, -1)
    norm = np.sqrt((h.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    out.reshape(n_heads, -1)[:] = (h / np.maximum(norm, 1e-12)).astype(np.float32)
