"""A plain-numpy reference forward pass for RWKV v4, v5.1, v5.2, v6 and v7 (float64).

This is the test oracle for the simulator. It follows docs/rwkv_spec.md section 4 line by line:
the whole model in memory, float64 throughout, one small function per operation, and no tricks.

Input tensors are named and shaped as in rwkv.cpp `.bin` files: numpy shape = reversed ggml ne,
with the converter's transforms (spec section 3) already applied. In particular the decays are
stored pre-transformed for v4 (-exp(td)) and v5 (exp(-exp(td))), raw for v6 and v7, and v5.1's
time_first is stored as exp(time_first).

The recurrent state is a flat float64 vector in rwkv.cpp's layout (spec 4.2), layer by layer:
  v4:          [ffn_xx (C), att_xx (C), aa (C), bb (C), pp (C)]
  v5, v6, v7:  [ffn_xx (C), att_xx (C), wkv (H*S*S)]
with wkv element [h][i][j] at h*S*S + i*S + j, where i = key and j = value for v5/v6, and
i = value and j = key for v7.
"""
from __future__ import annotations

import numpy as np

VERSIONS = ("4", "5.1", "5.2", "6", "7")

LN_EPS = 1e-5            # every LayerNorm (ln0, ln1, ln2, ln_out)
GN_EPS_V5 = 1e-5         # ln_x group norm in v5.1 / v5.2 (rwkv.cpp; ChatRWKV uses 64e-5)
GN_EPS_V6_V7 = 64e-5     # ln_x group norm in v6 / v7
V4_PP_INIT = -1e30       # v4 initial pp: a finite "minus infinity"
V7_DECAY_SCALE = 0.606531  # rwkv.cpp's constant, ~exp(-0.5): w = exp(-0.606531 * sigmoid(z))


# ----------------------------------------------------------------------------------------------
# Version detection (spec section 2)

def detect_version(names) -> str:
    """rwkv.cpp's order: later tests override earlier ones."""
    names = set(names)
    version = "4"
    if "blocks.0.att.ln_x.weight" in names:
        version = "5.2" if "blocks.0.att.gate.weight" in names else "5.1"
    if "blocks.0.att.time_maa_x" in names:
        version = "6"
    if "blocks.0.att.r_k" in names:
        version = "7"
    return version


def normalize_version(version) -> str:
    """Accepts '4', 'v5.2', '6.0', 7, 5.1 ... and returns one of VERSIONS."""
    text = str(version).strip().lower().lstrip("v")
    if text.endswith(".0"):
        text = text[:-2]
    if text not in VERSIONS:
        raise ValueError(f"unknown RWKV version {version!r} (known: {', '.join(VERSIONS)})")
    return text


# ----------------------------------------------------------------------------------------------
# Common pieces (spec 4.1)

def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def relu_squared(x):
    return np.maximum(x, 0.0) ** 2


def mix(x, prev, m):
    """v4/v5 token shift: x*m + prev*(1-m)."""
    return x * m + prev * (1.0 - m)


def layer_norm(x, weight, bias, eps=LN_EPS):
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def group_norm(x, weight, bias, n_groups, eps):
    """Layer norm of each of n_groups contiguous chunks (no affine), then * weight + bias over all."""
    g = x.reshape(n_groups, -1)
    mean = g.mean(axis=1, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=1, keepdims=True)
    normed = (g - mean) / np.sqrt(var + eps)
    return normed.reshape(-1) * weight + bias


def l2_normalize_heads(x, n_heads, eps=1e-12):
    """Each head's chunk divided by max(its L2 norm, eps)."""
    g = x.reshape(n_heads, -1)
    norm = np.sqrt((g * g).sum(axis=1, keepdims=True))
    return (g / np.maximum(norm, eps)).reshape(-1)


# ----------------------------------------------------------------------------------------------
# WKV recurrences

def wkv_v4(k, v, u, w, aa, bb, pp):
    """v4 WKV (spec 4.3). u = time_first (raw), w = time_decay (stored as -exp(raw)).

    Returns (wkv, aa, bb, pp): the output uses the old state, then the state is updated.
    """
    q = np.maximum(pp, u + k)
    e1 = np.exp(pp - q)
    e2 = np.exp(u + k - q)
    out = (e1 * aa + e2 * v) / (e1 * bb + e2)

    q = np.maximum(pp + w, k)
    e1 = np.exp(pp + w - q)
    e2 = np.exp(k - q)
    new_aa = e1 * aa + e2 * v
    new_bb = e1 * bb + e2
    new_pp = q
    return out, new_aa, new_bb, new_pp


def wkv_v5(r, k, v, u, w, state):
    """v5/v6 WKV (spec 4.5). r, k, v, u, w: (H, S); state: (H, S, S) with [h][key][value].

        out[h, j]   = sum_i r[h, i] * (u[h, i] * k[h, i] * v[h, j] + state[h, i, j])
        state[h, i, j] <- w[h, i] * state[h, i, j] + k[h, i] * v[h, j]
    """
    n_heads = r.shape[0]
    out = np.zeros_like(v)
    new_state = np.zeros_like(state)
    for h in range(n_heads):
        kv = np.outer(k[h], v[h])                       # [key, value]
        out[h] = r[h] @ (u[h][:, None] * kv + state[h])
        new_state[h] = w[h][:, None] * state[h] + kv
    return out, new_state


def wkv_v7(r, w, k, v, alpha, beta, state):
    """v7 WKV (spec 4.7). All vectors (H, S); state: (H, S, S) with [h][value][key].

        sa[i]      = sum_j alpha[j] * state[i, j]                         (old state)
        state[i, j] <- state[i, j] * w[j] + v[i] * k[j] + sa[i] * beta[j]
        out[i]     = sum_j state[i, j] * r[j]                             (new state)
    """
    n_heads = r.shape[0]
    out = np.zeros_like(v)
    new_state = np.zeros_like(state)
    for h in range(n_heads):
        sa = state[h] @ alpha[h]
        new_state[h] = state[h] * w[h][None, :] + np.outer(v[h], k[h]) + np.outer(sa, beta[h])
        out[h] = new_state[h] @ r[h]
    return out, new_state


# ----------------------------------------------------------------------------------------------
# Time mixing (attention) per version. `p` is a dict of this layer's tensors without the
# "blocks.i." prefix; `x` is LN(x; ln1); `prev` is the previous token's LN(x; ln1) (att_xx).

def time_mix_v4(p, x, prev, aa, bb, pp):
    xk = mix(x, prev, p["att.time_mix_k"])
    xv = mix(x, prev, p["att.time_mix_v"])
    xr = mix(x, prev, p["att.time_mix_r"])
    r = sigmoid(p["att.receptance.weight"] @ xr)
    k = p["att.key.weight"] @ xk
    v = p["att.value.weight"] @ xv
    wkv, aa, bb, pp = wkv_v4(k, v, p["att.time_first"], p["att.time_decay"], aa, bb, pp)
    return p["att.output.weight"] @ (r * wkv), aa, bb, pp


def time_mix_v5(p, x, prev, state, n_heads, head_size, version):
    """v5.1 and v5.2 (spec 4.5). state: (H, S, S) [h][key][value]."""
    H, S = n_heads, head_size
    xk = mix(x, prev, p["att.time_mix_k"])
    xv = mix(x, prev, p["att.time_mix_v"])
    xr = mix(x, prev, p["att.time_mix_r"])
    r = (p["att.receptance.weight"] @ xr).reshape(H, S)        # no sigmoid in v5
    k = (p["att.key.weight"] @ xk).reshape(H, S)
    v = (p["att.value.weight"] @ xv).reshape(H, S)
    if version == "5.1":
        # stored (H,1,1): time_first already exp'd, time_decay already exp(-exp); one per head
        u = np.broadcast_to(p["att.time_first"].reshape(H, 1), (H, S))
        w = np.broadcast_to(p["att.time_decay"].reshape(H, 1), (H, S))
    else:
        # stored (H,S,1): time_faaaa raw, time_decay already exp(-exp)
        u = p["att.time_faaaa"].reshape(H, S)
        w = p["att.time_decay"].reshape(H, S)
    out, state = wkv_v5(r, k, v, u, w, state)
    y = group_norm(out.reshape(-1), p["att.ln_x.weight"], p["att.ln_x.bias"], H, GN_EPS_V5)
    if version == "5.2":
        g = silu(p["att.gate.weight"] @ mix(x, prev, p["att.time_mix_g"]))
        y = y * g
    return p["att.output.weight"] @ y, state


def time_mix_v6(p, x, prev, state, n_heads, head_size):
    """v6 (spec 4.6). state: (H, S, S) [h][key][value]."""
    H, S = n_heads, head_size
    sx = prev - x
    xxx = x + sx * p["att.time_maa_x"]
    w1 = p["att.time_maa_w1"]                  # (5*D, C)
    w2 = p["att.time_maa_w2"]                  # (5, C, D)
    D = w2.shape[2]
    t = np.tanh(w1 @ xxx)
    m = [w2[n] @ t[n * D:(n + 1) * D] for n in range(5)]     # chunk order: w, k, v, r, g
    xw = x + sx * (p["att.time_maa_w"] + m[0])
    xk = x + sx * (p["att.time_maa_k"] + m[1])
    xv = x + sx * (p["att.time_maa_v"] + m[2])
    xr = x + sx * (p["att.time_maa_r"] + m[3])
    xg = x + sx * (p["att.time_maa_g"] + m[4])
    r = (p["att.receptance.weight"] @ xr).reshape(H, S)
    k = (p["att.key.weight"] @ xk).reshape(H, S)
    v = (p["att.value.weight"] @ xv).reshape(H, S)
    g = silu(p["att.gate.weight"] @ xg)
    decay = p["att.time_decay"].reshape(-1) \
        + p["att.time_decay_w2"] @ np.tanh(p["att.time_decay_w1"] @ xw)
    w = np.exp(-np.exp(decay)).reshape(H, S)             # raw time_decay: transform here
    u = p["att.time_faaaa"].reshape(H, S)
    out, state = wkv_v5(r, k, v, u, w, state)
    y = group_norm(out.reshape(-1), p["att.ln_x.weight"], p["att.ln_x.bias"], H, GN_EPS_V6_V7)
    y = y * g
    return p["att.output.weight"] @ y, state


def time_mix_v7(p, x, prev, state, n_heads, head_size, v_first):
    """v7 (spec 4.7). state: (H, S, S) [h][value][key]. v_first: None in layer 0.

    Returns (out, state, v_first) where v_first is layer 0's raw v (passed on to later layers).
    """
    H, S = n_heads, head_size
    sx = prev - x
    mixes = p["att.x_rwkvag"].reshape(6, -1)
    xr, xw, xk, xv, xa, xg = (x + sx * mixes[n] for n in range(6))
    r = p["att.receptance.weight"] @ xr
    z = p["att.w0"].reshape(-1) + p["att.w2"] @ np.tanh(p["att.w1"] @ xw)
    w = np.exp(-V7_DECAY_SCALE * sigmoid(z))
    k = p["att.key.weight"] @ xk
    v = p["att.value.weight"] @ xv
    a = sigmoid(p["att.a0"].reshape(-1) + p["att.a2"] @ (p["att.a1"] @ xa))
    g = p["att.g2"] @ sigmoid(p["att.g1"] @ xg)
    kk = l2_normalize_heads(k * p["att.k_k"].reshape(-1), H)    # from the unmodified k
    k = k * (1.0 + (a - 1.0) * p["att.k_a"].reshape(-1))
    if v_first is None:
        v_first = v
    else:
        gate = sigmoid(p["att.v0"].reshape(-1) + p["att.v2"] @ (p["att.v1"] @ xv))
        v = v + (v_first - v) * gate
    out, state = wkv_v7(r.reshape(H, S), w.reshape(H, S), k.reshape(H, S), v.reshape(H, S),
                        (-kk).reshape(H, S), (kk * a).reshape(H, S), state)
    y = group_norm(out.reshape(-1), p["att.ln_x.weight"], p["att.ln_x.bias"], H, GN_EPS_V6_V7)
    bonus = (r * k * p["att.r_k"].reshape(-1)).reshape(H, S).sum(axis=1)   # one per head
    y = y + (v.reshape(H, S) * bonus[:, None]).reshape(-1)
    y = y * g
    return p["att.output.weight"] @ y, state, v_first


# ----------------------------------------------------------------------------------------------
# Channel mixing (FFN). `x` is LN(x; ln2), `prev` the previous token's LN(x; ln2) (ffn_xx).

def channel_mix_v4(p, x, prev):
    """v4, v5.1, v5.2 (spec 4.4)."""
    xk = mix(x, prev, p["ffn.time_mix_k"])
    xr = mix(x, prev, p["ffn.time_mix_r"])
    r = sigmoid(p["ffn.receptance.weight"] @ xr)
    return r * (p["ffn.value.weight"] @ relu_squared(p["ffn.key.weight"] @ xk))


def channel_mix_v6(p, x, prev):
    sx = prev - x
    xk = x + sx * p["ffn.time_maa_k"]
    xr = x + sx * p["ffn.time_maa_r"]
    r = sigmoid(p["ffn.receptance.weight"] @ xr)
    return r * (p["ffn.value.weight"] @ relu_squared(p["ffn.key.weight"] @ xk))


def channel_mix_v7(p, x, prev):
    xk = x + (prev - x) * p["ffn.x_k"].reshape(-1)
    return p["ffn.value.weight"] @ relu_squared(p["ffn.key.weight"] @ xk)


# ----------------------------------------------------------------------------------------------

class ReferenceRWKV:
    """The whole model in float64. `forward(token, state)` is pure: it never changes its inputs."""

    def __init__(self, tensors: dict, version: str | None = None):
        self.weights = {name: np.array(a, dtype=np.float64) for name, a in tensors.items()}
        self.version = normalize_version(version) if version is not None \
            else detect_version(self.weights)

        emb = self._get("emb.weight")
        if emb.ndim != 2:
            raise ValueError(f"emb.weight must be 2-D (V, C), got shape {emb.shape}")
        self.n_vocab, self.n_embd = emb.shape
        self.n_layer = 0
        while f"blocks.{self.n_layer}.ln1.weight" in self.weights:
            self.n_layer += 1
        if self.n_layer == 0:
            raise ValueError("no layers found (missing blocks.0.ln1.weight)")
        self.n_ffn = self._get("blocks.0.ffn.key.weight").shape[0]

        C = self.n_embd
        if self.version == "4":
            self.n_head, self.head_size = 0, 0
        else:
            if self.version == "7":
                self.n_head = self._get("blocks.0.att.r_k").shape[0]          # ne[1] of (S, H)
            else:
                self.n_head = self._get("blocks.0.att.time_decay").shape[0]   # ne[2]
            if C % self.n_head:
                raise ValueError(f"n_embd {C} is not a multiple of the head count {self.n_head}")
            self.head_size = C // self.n_head

        # Per-layer views with the "blocks.i." prefix removed.
        self.layers = []
        for i in range(self.n_layer):
            prefix = f"blocks.{i}."
            self.layers.append(_Layer(prefix, {n[len(prefix):]: a for n, a in self.weights.items()
                                               if n.startswith(prefix)}))

    def _get(self, name):
        try:
            return self.weights[name]
        except KeyError:
            raise KeyError(f"missing tensor {name!r} (RWKV v{self.version})") from None

    # -- state layout --------------------------------------------------------------------------

    @property
    def layer_state_size(self) -> int:
        C = self.n_embd
        if self.version == "4":
            return 5 * C
        return 2 * C + self.n_head * self.head_size * self.head_size

    @property
    def state_size(self) -> int:
        return self.n_layer * self.layer_state_size

    def init_state(self) -> np.ndarray:
        state = np.zeros(self.state_size, dtype=np.float64)
        if self.version == "4":
            C = self.n_embd
            for i in range(self.n_layer):
                base = i * self.layer_state_size
                state[base + 4 * C:base + 5 * C] = V4_PP_INIT
        return state

    # -- forward -------------------------------------------------------------------------------

    def forward(self, token: int, state) -> tuple[np.ndarray, np.ndarray]:
        """One token. Returns (logits (V,), new state), both float64; `state` is not modified."""
        if not 0 <= int(token) < self.n_vocab:
            raise ValueError(f"token {token} outside the vocabulary 0..{self.n_vocab - 1}")
        state = np.array(state, dtype=np.float64).reshape(-1)      # a copy
        if state.size != self.state_size:
            raise ValueError(f"state has {state.size} values, expected {self.state_size}")
        C, H, S = self.n_embd, self.n_head, self.head_size
        W = self.weights

        x = W["emb.weight"][int(token)]
        x = layer_norm(x, W["blocks.0.ln0.weight"], W["blocks.0.ln0.bias"])
        v_first = None
        for i, p in enumerate(self.layers):
            s = state[i * self.layer_state_size:(i + 1) * self.layer_state_size]   # a view
            ffn_xx, att_xx = s[0:C].copy(), s[C:2 * C].copy()   # previous token's LN outputs

            xa = layer_norm(x, p["ln1.weight"], p["ln1.bias"])
            if self.version == "4":
                aa, bb, pp = s[2 * C:3 * C].copy(), s[3 * C:4 * C].copy(), s[4 * C:5 * C].copy()
                dx, aa_new, bb_new, pp_new = time_mix_v4(p, xa, att_xx, aa, bb, pp)
                s[2 * C:3 * C], s[3 * C:4 * C], s[4 * C:5 * C] = aa_new, bb_new, pp_new
            else:
                wkv = s[2 * C:].reshape(H, S, S).copy()
                if self.version in ("5.1", "5.2"):
                    dx, wkv_new = time_mix_v5(p, xa, att_xx, wkv, H, S, self.version)
                elif self.version == "6":
                    dx, wkv_new = time_mix_v6(p, xa, att_xx, wkv, H, S)
                else:
                    dx, wkv_new, v_first = time_mix_v7(p, xa, att_xx, wkv, H, S, v_first)
                s[2 * C:] = wkv_new.reshape(-1)
            s[C:2 * C] = xa                       # att_xx <- LN(x; ln1) of this token
            x = x + dx

            xf = layer_norm(x, p["ln2.weight"], p["ln2.bias"])
            if self.version in ("4", "5.1", "5.2"):
                dx = channel_mix_v4(p, xf, ffn_xx)
            elif self.version == "6":
                dx = channel_mix_v6(p, xf, ffn_xx)
            else:
                dx = channel_mix_v7(p, xf, ffn_xx)
            s[0:C] = xf                           # ffn_xx <- LN(x; ln2) of this token
            x = x + dx

        x = layer_norm(x, W["ln_out.weight"], W["ln_out.bias"])
        logits = W["head.weight"] @ x
        return logits, state

    def run(self, tokens, state=None):
        """Feeds tokens one by one; returns (logits of every step (T, V), final state)."""
        state = self.init_state() if state is None else state
        rows = []
        for t in tokens:
            logits, state = self.forward(t, state)
            rows.append(logits)
        return np.array(rows), state


class _Layer(dict):
    """One layer's tensors (names without the "blocks.i." prefix), with a clear KeyError."""

    def __init__(self, prefix, tensors):
        super().__init__(tensors)
        self.prefix = prefix

    def __missing__(self, key):
        raise KeyError(f"missing tensor {self.prefix + key!r}")
