"""The RWKV forward pass, reading the weights in stream order (rwkv_spec.md §4).

A pass carries K columns through every layer before the next layer's weights are read: K
consecutive tokens of one sequence (sequence mode; K = 1 is the serial mode) or one token of
each of K independent sequences (batch mode). Each function consumes exactly the records its
block owns, in forward order, and works only in the board's arena buffers (arena.py), sliced
to the pass's K columns. Per layer, the state layout is rwkv.cpp's:
    v4:          [ffn_xx (C), att_xx (C), aa (C), bb (C), pp (C)]
    v5, v6, v7:  [ffn_xx (C), att_xx (C), wkv (H, S, S)]  (v5/v6 [h][key][value], v7 [h][value][key])
"""
from __future__ import annotations

import numpy as np

from formats.arch import RwkvVersion as V

from . import ops

V7_DECAY_SCALE = np.float32(0.606531)    # rwkv.cpp's constant, about exp(-0.5)


class Columns:
    """How a pass's columns relate to the recurrent state."""

    def __init__(self, b, sequence: bool):
        self.sequence = sequence
        self.layers = b.arena["state"].reshape(b.batch, b.hp.n_layer, -1)   # (B, L, per layer)

    def shift(self, st, lo: int, hi: int, xn, prev):
        """prev[j] = the normed input of the token before column j's (token shift); the state
        slot st[:, lo:hi] then holds this pass's last one(s).                 xn, prev: (K, C)"""
        if self.sequence:
            prev[0] = st[0, lo:hi]
            prev[1:] = xn[:-1]
            st[0, lo:hi] = xn[-1]
        else:
            prev[:] = st[:, lo:hi]
            st[:, lo:hi] = xn
        return prev

    def each(self, st, k: int):
        """(column, its recurrent state (per layer)) in the order the recurrence needs."""
        for j in range(k):
            yield j, st[0 if self.sequence else j]


class Buffers:
    """The arena's buffers as this pass uses them: column buffers cut to K columns."""

    def __init__(self, a, k: int):
        self.par = a["par"]                                      # (P, C) per-layer vectors
        self.x, self.xn, self.delta, self.tmp = (a[n][:k] for n in ("x", "xn", "delta", "tmp"))
        self.hidden = a["hidden"][:k]                            # (K, F)
        self.mix = a["mix"][:, :k]                               # (M, K, C)
        self.proj = a["proj"][:, :k]                             # (8, K, C)
        self.lora = a.buffers.get("lora")
        self.lora = None if self.lora is None else self.lora[:k]  # (K, LoRA width)
        self.v_first = a.buffers.get("v_first")
        self.v_first = None if self.v_first is None else self.v_first[:k]
        self.logits = a.buffers.get("logits")                    # (B, V)


def forward_pass(b, tokens, sequence: bool) -> None:
    hp = b.hp
    k = len(tokens)
    f = Buffers(b.arena, k)
    cols = Columns(b, sequence)
    b.start_pass()
    b.read_embedding(tokens, f.x)                                # x[j] = emb[tokens[j]]
    ops.layer_norm(f.x, b.vector("blocks.0.ln0.weight", f.par[0]),
                   b.vector("blocks.0.ln0.bias", f.par[1]), hp.ln_eps, out=f.x)
    time_mix, channel_mix = BLOCKS[hp.version]
    for i in range(hp.n_layer):
        st = cols.layers[:, i]                                   # (B, per layer)
        time_mix(b, f, i, st, cols)
        channel_mix(b, f, i, st, cols)
    ops.layer_norm(f.x, b.vector("ln_out.weight", f.par[0]), b.vector("ln_out.bias", f.par[1]),
                   hp.ln_eps, out=f.xn)
    if f.logits is None:  # the logits do not fit: sample over the head rows as they stream
        b.next_token = b.sample_head("head.weight", f.xn[k - 1])
    elif sequence and not b.every_logit:   # only the last token's logits are needed
        b.matvec("head.weight", f.xn[k - 1:k], f.logits[0:1])
    else:
        b.matvec("head.weight", f.xn, f.logits[:k])             # logits = head @ LN(x)


def _norm_input(b, f, i, ln: str):
    """xn = LN(x; ln_i) -- the block's input, which token shift also carries."""
    ops.layer_norm(f.x, b.vector(f"blocks.{i}.{ln}.weight", f.par[0]),
                   b.vector(f"blocks.{i}.{ln}.bias", f.par[1]), b.hp.ln_eps, out=f.xn)
    return f.xn


def _residual(b, f, name: str, y) -> None:
    """x += W_out @ y"""
    b.matvec(name, y, f.tmp)
    f.x += f.tmp


# -- RWKV-4 -----------------------------------------------------------------------------------
def time_mix_v4(b, f, i, st, cols):
    C = b.hp.n_embd
    p, par, mix = f"blocks.{i}.att.", f.par, f.mix
    r, k, v, _, _, _, _, y = f.proj
    xn = _norm_input(b, f, i, "ln1")
    prev = cols.shift(st, C, 2 * C, xn, f.delta)
    for n, m in enumerate("kvr"):                                # mix[0..2] = xk, xv, xr
        ops.token_shift_mix(xn, prev, b.vector(p + f"time_mix_{m}", par[2 + n]), out=mix[n])
    b.matvec(p + "receptance.weight", mix[2], r)
    ops.sigmoid(r, out=r)
    b.matvec(p + "key.weight", mix[0], k)
    b.matvec(p + "value.weight", mix[1], v)
    u = b.vector(p + "time_first", par[5])
    w = b.vector(p + "time_decay", par[6])                       # stored as -exp(decay)
    for j, s in cols.each(st, len(xn)):
        aa, bb, pp = s[2 * C:5 * C].reshape(3, C)
        ops.wkv_v4(k[j], v[j], u, w, aa, bb, pp, out=y[j])
    y *= r
    _residual(b, f, p + "output.weight", y)


def channel_mix_v4(b, f, i, st, cols):
    """v4 and v5: token shift by mixing, then the receptance-gated FFN"""
    C = b.hp.n_embd
    p, par, mix = f"blocks.{i}.ffn.", f.par, f.mix
    xn = _norm_input(b, f, i, "ln2")
    prev = cols.shift(st, 0, C, xn, f.delta)
    ops.token_shift_mix(xn, prev, b.vector(p + "time_mix_k", par[2]), out=mix[0])
    ops.token_shift_mix(xn, prev, b.vector(p + "time_mix_r", par[3]), out=mix[1])
    _gated_ffn(b, f, p, xk=mix[0], xr=mix[1])


def _gated_ffn(b, f, p: str, xk, xr) -> None:
    """x += sigmoid(Wr xr) * (Wv relu²(Wk xk))   (v4, v5, v6)"""
    r, h = f.proj[0], f.hidden
    b.matvec(p + "receptance.weight", xr, r)
    ops.sigmoid(r, out=r)
    b.matvec(p + "key.weight", xk, h)
    ops.relu_squared(h)
    b.matvec(p + "value.weight", h, f.tmp)
    f.tmp *= r
    f.x += f.tmp


# -- RWKV-5.1 / 5.2 ---------------------------------------------------------------------------
def time_mix_v5(b, f, i, st, cols):
    hp = b.hp
    C, H, S = hp.n_embd, hp.n_head, hp.head_size
    v52 = hp.version is V.V5_2
    p, par, mix = f"blocks.{i}.att.", f.par, f.mix
    r, k, v, g, _, _, _, y = f.proj
    xn = _norm_input(b, f, i, "ln1")
    prev = cols.shift(st, C, 2 * C, xn, f.delta)
    for n, m in enumerate("kvrg" if v52 else "kvr"):             # mix[n] = xk, xv, xr, (xg)
        ops.token_shift_mix(xn, prev, b.vector(p + f"time_mix_{m}", par[2 + n]), out=mix[n])
    b.matvec(p + "receptance.weight", mix[2], r)                 # no sigmoid in v5
    b.matvec(p + "key.weight", mix[0], k)
    b.matvec(p + "value.weight", mix[1], v)
    if v52:
        b.matvec(p + "gate.weight", mix[3], f.tmp)
        ops.silu(f.tmp, out=g)
        u = b.vector(p + "time_faaaa", par[6]).reshape(H, S)
        w = b.vector(p + "time_decay", par[7]).reshape(H, S)     # stored as exp(-exp(decay))
    else:
        # v5.1 has one u and one w per head: (H,1,1), broadcast over the head's channels
        u = _per_head(b.vector(p + "time_first", par[5]), par[5], H, S)
        w = _per_head(b.vector(p + "time_decay", par[6]), par[6], H, S)
    for j, s in cols.each(st, len(xn)):
        ops.wkv_v5(r[j].reshape(H, S), k[j].reshape(H, S), v[j].reshape(H, S), u, w,
                   s[2 * C:].reshape(H, S, S), out=y[j].reshape(H, S))
    n0 = 8 if v52 else 7
    ops.group_norm(y, b.vector(p + "ln_x.weight", par[n0]),
                   b.vector(p + "ln_x.bias", par[n0 + 1]), H, hp.gn_eps, out=y)
    if v52:
        y *= g
    _residual(b, f, p + "output.weight", y)


def _per_head(values, row, H, S):
    """row[h*S:(h+1)*S] = values[h] (in place; values is row's first H entries)"""
    row.reshape(H, S)[:] = values[:H].copy()[:, None]
    return row.reshape(H, S)


# -- RWKV-6 -----------------------------------------------------------------------------------
def time_mix_v6(b, f, i, st, cols):
    hp = b.hp
    C, H, S, D = hp.n_embd, hp.n_head, hp.head_size, hp.lora["maa"]
    p, par, mix, lora = f"blocks.{i}.att.", f.par, f.mix, f.lora
    r, k, v, g, w, _, _, y = f.proj
    xn = _norm_input(b, f, i, "ln1")
    delta = cols.shift(st, C, 2 * C, xn, f.delta)
    delta -= xn                                                  # sx = prev - x
    xxx = f.tmp
    ops.shift_lerp(xn, delta, b.vector(p + "time_maa_x", par[2]), out=xxx)
    t = b.matvec(p + "time_maa_w1", xxx, lora[:, :5 * D])
    np.tanh(t, out=t)
    b.matvec_parts(p + "time_maa_w2", [(t[:, n * D:(n + 1) * D], mix[n]) for n in range(5)])
    for n, m in enumerate("wkvrg"):                              # mix[n] = xw, xk, xv, xr, xg
        mix[n] += b.vector(p + f"time_maa_{m}", par[3 + n])
        ops.shift_lerp(xn, delta, mix[n].copy(), out=mix[n])
    b.matvec(p + "receptance.weight", mix[3], r)
    b.matvec(p + "key.weight", mix[1], k)
    b.matvec(p + "value.weight", mix[2], v)
    b.matvec(p + "gate.weight", mix[4], f.tmp)
    ops.silu(f.tmp, out=g)
    decay = b.vector(p + "time_decay", par[8])
    t = b.matvec(p + "time_decay_w1", mix[0], lora[:, :hp.lora["decay"]])
    np.tanh(t, out=t)
    b.matvec(p + "time_decay_w2", t, w)
    w += decay
    ops.exp(w, out=w)
    np.negative(w, out=w)
    ops.exp(w, out=w)                                            # w = exp(-exp(decay + lora))
    u = b.vector(p + "time_faaaa", par[9]).reshape(H, S)
    for j, s in cols.each(st, len(xn)):
        ops.wkv_v5(r[j].reshape(H, S), k[j].reshape(H, S), v[j].reshape(H, S), u,
                   w[j].reshape(H, S), s[2 * C:].reshape(H, S, S), out=y[j].reshape(H, S))
    ops.group_norm(y, b.vector(p + "ln_x.weight", par[10]), b.vector(p + "ln_x.bias", par[11]),
                   H, hp.gn_eps, out=y)
    y *= g
    _residual(b, f, p + "output.weight", y)


def channel_mix_v6(b, f, i, st, cols):
    """v6: token shift by lerp, then the receptance-gated FFN"""
    C = b.hp.n_embd
    p, par, mix = f"blocks.{i}.ffn.", f.par, f.mix
    xn = _norm_input(b, f, i, "ln2")
    delta = cols.shift(st, 0, C, xn, f.delta)
    delta -= xn
    ops.shift_lerp(xn, delta, b.vector(p + "time_maa_k", par[2]), out=mix[0])
    ops.shift_lerp(xn, delta, b.vector(p + "time_maa_r", par[3]), out=mix[1])
    _gated_ffn(b, f, p, xk=mix[0], xr=mix[1])


# -- RWKV-7 -----------------------------------------------------------------------------------
def time_mix_v7(b, f, i, st, cols):
    hp = b.hp
    C, H, S = hp.n_embd, hp.n_head, hp.head_size
    p, par, mix, lora, tmp = f"blocks.{i}.att.", f.par, f.mix, f.lora, f.tmp
    r, k, v, g, w, aa, kk, y = f.proj
    K = len(f.x)
    xn = _norm_input(b, f, i, "ln1")
    delta = cols.shift(st, C, 2 * C, xn, f.delta)
    delta -= xn
    coeffs = b.vector(p + "x_rwkvag", par[2:8]).reshape(6, C)
    for n in range(6):                                           # mix[n] = xr, xw, xk, xv, xa, xg
        ops.shift_lerp(xn, delta, coeffs[n], out=mix[n])
    xr, xw, xk, xv, xa, xg = mix
    b.matvec(p + "receptance.weight", xr, r)
    w0 = b.vector(p + "w0", par[8])
    t = b.matvec(p + "w1", xw, lora[:, :hp.lora["w"]])
    np.tanh(t, out=t)
    b.matvec(p + "w2", t, w)
    w += w0
    ops.sigmoid(w, out=w)
    w *= -V7_DECAY_SCALE
    ops.exp(w, out=w)                                            # w = exp(-0.606531 sigmoid(.))
    b.matvec(p + "key.weight", xk, k)
    b.matvec(p + "value.weight", xv, v)
    if i == 0:
        f.v_first[:] = v
    else:
        v0 = b.vector(p + "v0", par[9])
        t = b.matvec(p + "v1", xv, lora[:, :hp.lora["v"]])
        b.matvec(p + "v2", t, tmp)
        tmp += v0
        ops.sigmoid(tmp, out=tmp)
        v += (f.v_first - v) * tmp                               # value residual
    a0 = b.vector(p + "a0", par[10])
    t = b.matvec(p + "a1", xa, lora[:, :hp.lora["a"]])
    b.matvec(p + "a2", t, aa)
    aa += a0
    ops.sigmoid(aa, out=aa)                                      # in-context learning rate
    t = b.matvec(p + "g1", xg, lora[:, :hp.lora["g"]])
    ops.sigmoid(t, out=t)
    b.matvec(p + "g2", t, g)
    k_k = b.vector(p + "k_k", par[11])
    np.multiply(k, k_k, out=tmp)
    ops.l2_normalize_heads(tmp, H, out=kk)                       # kk from the unmodified k
    k_a = b.vector(p + "k_a", par[12])
    k += aa * (k * k_a) - k * k_a
    r_k = b.vector(p + "r_k", par[13]).reshape(H, S)
    alpha, beta = -kk, kk * aa
    for j, s in cols.each(st, K):
        ops.wkv_v7(r[j].reshape(H, S), w[j].reshape(H, S), k[j].reshape(H, S),
                   v[j].reshape(H, S), alpha[j].reshape(H, S), beta[j].reshape(H, S),
                   s[2 * C:].reshape(H, S, S), out=y[j].reshape(H, S))
    ops.group_norm(y, b.vector(p + "ln_x.weight", par[14]), b.vector(p + "ln_x.bias", par[15]),
                   H, hp.gn_eps, out=y)
    bonus = ((r * k).reshape(K, H, S) * r_k).sum(axis=-1, keepdims=True)
    y += (v.reshape(K, H, S) * bonus).reshape(K, C)
    y *= g
    _residual(b, f, p + "output.weight", y)


def channel_mix_v7(b, f, i, st, cols):
    C = b.hp.n_embd
    p, h, xk = f"blocks.{i}.ffn.", f.hidden, f.mix[0]
    xn = _norm_input(b, f, i, "ln2")
    delta = cols.shift(st, 0, C, xn, f.delta)
    delta -= xn
    ops.shift_lerp(xn, delta, b.vector(p + "x_k", f.par[2]), out=xk)
    b.matvec(p + "key.weight", xk, h)
    ops.relu_squared(h)
    _residual(b, f, p + "value.weight", h)


BLOCKS = {
    V.V4: (time_mix_v4, channel_mix_v4),
    V.V5_1: (time_mix_v5, channel_mix_v4),
    V.V5_2: (time_mix_v5, channel_mix_v4),
    V.V6: (time_mix_v6, channel_mix_v6),
    V.V7: (time_mix_v7, channel_mix_v7),
}
