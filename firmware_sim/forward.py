"""The RWKV forward pass for one token, reading the weights in stream order (rwkv_spec.md §4).

Each function below consumes exactly the records its block owns, in forward order, and works
only in the board's arena buffers (firmware_sim/arena.py). Per layer, the state layout is
rwkv.cpp's:
    v4:          [ffn_xx (C), att_xx (C), aa (C), bb (C), pp (C)]
    v5, v6, v7:  [ffn_xx (C), att_xx (C), wkv (H, S, S)]  (v5/v6 [h][key][value], v7 [h][value][key])
"""
from __future__ import annotations

import numpy as np

from formats.arch import RwkvVersion as V

from . import ops

V7_DECAY_SCALE = np.float32(0.606531)    # rwkv.cpp's constant, about exp(-0.5)


def forward_token(b, token: int) -> None:
    hp, a = b.hp, b.arena
    x, par = a["x"], a["par"]
    b.start_pass()
    b.read_embedding(token, x)                                   # x = emb[token]
    ops.layer_norm(x, b.vector("blocks.0.ln0.weight", par[0]),
                   b.vector("blocks.0.ln0.bias", par[1]), hp.ln_eps, out=x)
    per_layer = b.state.reshape(hp.n_layer, -1)
    time_mix, channel_mix = BLOCKS[hp.version]
    for i in range(hp.n_layer):
        time_mix(b, i, per_layer[i])
        channel_mix(b, i, per_layer[i])
    xn = a["xn"]
    ops.layer_norm(x, b.vector("ln_out.weight", par[0]), b.vector("ln_out.bias", par[1]),
                   hp.ln_eps, out=xn)
    b.matvec("head.weight", xn, a["logits"])                     # logits = head @ LN(x)


def _norm_input(b, i, ln: str) -> np.ndarray:
    """xn = LN(x; ln_i) -- the block's input, which token shift also carries."""
    a = b.arena
    ops.layer_norm(a["x"], b.vector(f"blocks.{i}.{ln}.weight", a["par"][0]),
                   b.vector(f"blocks.{i}.{ln}.bias", a["par"][1]), b.hp.ln_eps, out=a["xn"])
    return a["xn"]


def _residual(b, name: str, y) -> None:
    """x += W_out @ y"""
    tmp = b.arena["tmp"]
    b.matvec(name, y, tmp)
    x = b.arena["x"]
    x += tmp


# -- RWKV-4 -----------------------------------------------------------------------------------
def time_mix_v4(b, i, st):
    C = b.hp.n_embd
    a, p = b.arena, f"blocks.{i}.att."
    par, mix, (r, k, v, _, _, _, _, y) = a["par"], a["mix"], a["proj"]
    ffn_xx, att_xx, aa, bb, pp = st.reshape(5, C)
    xn = _norm_input(b, i, "ln1")
    for n, m in enumerate("kvr"):                                # mix[0..2] = xk, xv, xr
        ops.token_shift_mix(xn, att_xx, b.vector(p + f"time_mix_{m}", par[2 + n]), out=mix[n])
    att_xx[:] = xn
    b.matvec(p + "receptance.weight", mix[2], r)
    ops.sigmoid(r, out=r)
    b.matvec(p + "key.weight", mix[0], k)
    b.matvec(p + "value.weight", mix[1], v)
    u = b.vector(p + "time_first", par[5])
    w = b.vector(p + "time_decay", par[6])                       # stored as -exp(decay)
    ops.wkv_v4(k, v, u, w, aa, bb, pp, out=y)
    y *= r
    _residual(b, p + "output.weight", y)


def channel_mix_v4(b, i, st):
    """v4 and v5: sigmoid(Wr xr) * (Wv relu²(Wk xk))"""
    C = b.hp.n_embd
    a, p = b.arena, f"blocks.{i}.ffn."
    par, mix, r, h = a["par"], a["mix"], a["proj"][0], a["hidden"]
    ffn_xx = st[:C]
    xn = _norm_input(b, i, "ln2")
    ops.token_shift_mix(xn, ffn_xx, b.vector(p + "time_mix_k", par[2]), out=mix[0])
    ops.token_shift_mix(xn, ffn_xx, b.vector(p + "time_mix_r", par[3]), out=mix[1])
    ffn_xx[:] = xn
    b.matvec(p + "receptance.weight", mix[1], r)
    ops.sigmoid(r, out=r)
    b.matvec(p + "key.weight", mix[0], h)
    ops.relu_squared(h)
    tmp = a["tmp"]
    b.matvec(p + "value.weight", h, tmp)
    tmp *= r
    x = a["x"]
    x += tmp


# -- RWKV-5.1 / 5.2 ---------------------------------------------------------------------------
def time_mix_v5(b, i, st):
    hp = b.hp
    C, H, S = hp.n_embd, hp.n_head, hp.head_size
    v52 = hp.version is V.V5_2
    a, p = b.arena, f"blocks.{i}.att."
    par, mix, (r, k, v, g, _, _, _, y) = a["par"], a["mix"], a["proj"]
    att_xx, wkv = st[C:2 * C], st[2 * C:].reshape(H, S, S)
    xn = _norm_input(b, i, "ln1")
    mixes = "kvrg" if v52 else "kvr"                             # mix[n] = xk, xv, xr, (xg)
    for n, m in enumerate(mixes):
        ops.token_shift_mix(xn, att_xx, b.vector(p + f"time_mix_{m}", par[2 + n]), out=mix[n])
    att_xx[:] = xn
    b.matvec(p + "receptance.weight", mix[2], r)                 # no sigmoid in v5
    b.matvec(p + "key.weight", mix[0], k)
    b.matvec(p + "value.weight", mix[1], v)
    if v52:
        tmp = a["tmp"]
        b.matvec(p + "gate.weight", mix[3], tmp)
        ops.silu(tmp, out=g)
        u = b.vector(p + "time_faaaa", par[6]).reshape(H, S)
        w = b.vector(p + "time_decay", par[7]).reshape(H, S)     # stored as exp(-exp(decay))
    else:
        # v5.1 has one u and one w per head: (H,1,1), broadcast over the head's channels
        u = _per_head(b.vector(p + "time_first", par[5]), par[5], H, S)
        w = _per_head(b.vector(p + "time_decay", par[6]), par[6], H, S)
    ops.wkv_v5(r.reshape(H, S), k.reshape(H, S), v.reshape(H, S), u, w, wkv,
               out=y.reshape(H, S))
    n0 = 8 if v52 else 7
    ops.group_norm(y, b.vector(p + "ln_x.weight", par[n0]), b.vector(p + "ln_x.bias",
                                                                     par[n0 + 1]),
                   H, hp.gn_eps, out=y)
    if v52:
        y *= g
    _residual(b, p + "output.weight", y)


def _per_head(values, row, H, S):
    """row[h*S:(h+1)*S] = values[h] (in place; values is row's first H entries)"""
    row.reshape(H, S)[:] = values[:H].copy()[:, None]
    return row.reshape(H, S)


# -- RWKV-6 -----------------------------------------------------------------------------------
def time_mix_v6(b, i, st):
    hp = b.hp
    C, H, S, D = hp.n_embd, hp.n_head, hp.head_size, hp.lora["maa"]
    a, p = b.arena, f"blocks.{i}.att."
    par, mix, lora = a["par"], a["mix"], a["lora"]
    r, k, v, g, w, _, _, y = a["proj"]
    att_xx, wkv = st[C:2 * C], st[2 * C:].reshape(H, S, S)
    delta = a["delta"]
    xn = _norm_input(b, i, "ln1")
    np.subtract(att_xx, xn, out=delta)                           # sx = prev - x
    att_xx[:] = xn
    xxx = a["tmp"]
    ops.shift_lerp(xn, delta, b.vector(p + "time_maa_x", par[2]), out=xxx)
    t = b.matvec(p + "time_maa_w1", xxx, lora[:5 * D])
    np.tanh(t, out=t)
    b.matvec_parts(p + "time_maa_w2", [(t[n * D:(n + 1) * D], mix[n]) for n in range(5)])
    for n, m in enumerate("wkvrg"):                              # mix[n] = xw, xk, xv, xr, xg
        mix[n] += b.vector(p + f"time_maa_{m}", par[3 + n])
        ops.shift_lerp(xn, delta, mix[n].copy(), out=mix[n])
    b.matvec(p + "receptance.weight", mix[3], r)
    b.matvec(p + "key.weight", mix[1], k)
    b.matvec(p + "value.weight", mix[2], v)
    tmp = a["tmp"]
    b.matvec(p + "gate.weight", mix[4], tmp)
    ops.silu(tmp, out=g)
    decay = b.vector(p + "time_decay", par[8])
    Dw = hp.lora["decay"]
    t = b.matvec(p + "time_decay_w1", mix[0], lora[:Dw])
    np.tanh(t, out=t)
    b.matvec(p + "time_decay_w2", t, w)
    w += decay
    ops.exp(w, out=w)
    np.negative(w, out=w)
    ops.exp(w, out=w)                                            # w = exp(-exp(decay + lora))
    u = b.vector(p + "time_faaaa", par[9]).reshape(H, S)
    ops.wkv_v5(r.reshape(H, S), k.reshape(H, S), v.reshape(H, S), u, w.reshape(H, S), wkv,
               out=y.reshape(H, S))
    ops.group_norm(y, b.vector(p + "ln_x.weight", par[10]), b.vector(p + "ln_x.bias", par[11]),
                   H, hp.gn_eps, out=y)
    y *= g
    _residual(b, p + "output.weight", y)


def channel_mix_v6(b, i, st):
    C = b.hp.n_embd
    a, p = b.arena, f"blocks.{i}.ffn."
    par, mix, r, h, delta = a["par"], a["mix"], a["proj"][0], a["hidden"], a["delta"]
    ffn_xx = st[:C]
    xn = _norm_input(b, i, "ln2")
    np.subtract(ffn_xx, xn, out=delta)
    ffn_xx[:] = xn
    ops.shift_lerp(xn, delta, b.vector(p + "time_maa_k", par[2]), out=mix[0])
    ops.shift_lerp(xn, delta, b.vector(p + "time_maa_r", par[3]), out=mix[1])
    b.matvec(p + "receptance.weight", mix[1], r)
    ops.sigmoid(r, out=r)
    b.matvec(p + "key.weight", mix[0], h)
    ops.relu_squared(h)
    tmp = a["tmp"]
    b.matvec(p + "value.weight", h, tmp)
    tmp *= r
    x = a["x"]
    x += tmp


# -- RWKV-7 -----------------------------------------------------------------------------------
def time_mix_v7(b, i, st):
    hp = b.hp
    C, H, S = hp.n_embd, hp.n_head, hp.head_size
    a, p = b.arena, f"blocks.{i}.att."
    par, mix, lora, tmp = a["par"], a["mix"], a["lora"], a["tmp"]
    r, k, v, g, w, aa, kk, y = a["proj"]
    att_xx, wkv = st[C:2 * C], st[2 * C:].reshape(H, S, S)
    delta = a["delta"]
    xn = _norm_input(b, i, "ln1")
    np.subtract(att_xx, xn, out=delta)
    att_xx[:] = xn
    coeffs = b.vector(p + "x_rwkvag", par[2:8]).reshape(6, C)
    for n in range(6):                                           # mix[n] = xr, xw, xk, xv, xa, xg
        ops.shift_lerp(xn, delta, coeffs[n], out=mix[n])
    xr, xw, xk, xv, xa, xg = mix
    b.matvec(p + "receptance.weight", xr, r)
    w0 = b.vector(p + "w0", par[8])
    t = b.matvec(p + "w1", xw, lora[:hp.lora["w"]])
    np.tanh(t, out=t)
    b.matvec(p + "w2", t, w)
    w += w0
    ops.sigmoid(w, out=w)
    w *= -V7_DECAY_SCALE
    ops.exp(w, out=w)                                           # w = exp(-0.606531 sigmoid(.))
    b.matvec(p + "key.weight", xk, k)
    b.matvec(p + "value.weight", xv, v)
    if i == 0:
        a["v_first"][:] = v
    else:
        v0 = b.vector(p + "v0", par[9])
        t = b.matvec(p + "v1", xv, lora[:hp.lora["v"]])
        b.matvec(p + "v2", t, tmp)
        tmp += v0
        ops.sigmoid(tmp, out=tmp)
        v += (a["v_first"] - v) * tmp                            # value residual
    a0 = b.vector(p + "a0", par[10])
    t = b.matvec(p + "a1", xa, lora[:hp.lora["a"]])
    b.matvec(p + "a2", t, aa)
    aa += a0
    ops.sigmoid(aa, out=aa)                                      # in-context learning rate
    t = b.matvec(p + "g1", xg, lora[:hp.lora["g"]])
    ops.sigmoid(t, out=t)
    b.matvec(p + "g2", t, g)
    k_k = b.vector(p + "k_k", par[11])
    np.multiply(k, k_k, out=tmp)
    ops.l2_normalize_heads(tmp, H, out=kk)                       # kk from the unmodified k
    k_a = b.vector(p + "k_a", par[12])
    k += aa * (k * k_a) - k * k_a
    r_k = b.vector(p + "r_k", par[13]).reshape(H, S)
    ops.wkv_v7(r.reshape(H, S), w.reshape(H, S), k.reshape(H, S), v.reshape(H, S),
               (-kk).reshape(H, S), (kk * aa).reshape(H, S), wkv, out=y.reshape(H, S))
    ops.group_norm(y, b.vector(p + "ln_x.weight", par[14]), b.vector(p + "ln_x.bias", par[15]),
                   H, hp.gn_eps, out=y)
    bonus = (r * k).reshape(H, S) * r_k
    y += (v.reshape(H, S) * bonus.sum(axis=1, keepdims=True)).reshape(C)
    y *= g
    _residual(b, p + "output.weight", y)


def channel_mix_v7(b, i, st):
    C = b.hp.n_embd
    a, p = b.arena, f"blocks.{i}.ffn."
    h, delta, xk = a["hidden"], a["delta"], a["mix"][0]
    ffn_xx = st[:C]
    xn = _norm_input(b, i, "ln2")
    np.subtract(ffn_xx, xn, out=delta)
    ffn_xx[:] = xn
    ops.shift_lerp(xn, delta, b.vector(p + "x_k", a["par"][2]), out=xk)
    b.matvec(p + "key.weight", xk, h)
    ops.relu_squared(h)
    _residual(b, p + "value.weight", h)


BLOCKS = {
    V.V4: (time_mix_v4, channel_mix_v4),
    V.V5_1: (time_mix_v5, channel_mix_v4),
    V.V5_2: (time_mix_v5, channel_mix_v4),
    V.V6: (time_mix_v6, channel_mix_v6),
    V.V7: (time_mix_v7, channel_mix_v7),
}
