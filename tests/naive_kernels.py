"""Slow, obviously correct numpy twins of the fused dot kernels in formats/kernels.py.

Written from the block layouts (docs/rwkv_spec.md 1.3) and ggml's arithmetic (4.8 and the
"Arithmetic that rwkv.cpp/ggml uses" notes of the rwkv.cpp fixtures), not from the kernels:

* `prepare(type_id, int8_mode, x)`: the activation as ggml's vec_dot_type (fp16/bf16 rounding,
  Q8_0 / Q8_1 as the AVX2 quantize_row_q8_0/1: d = amax/127, q = round-half-even(x*127/amax)).
* `block_terms(...)`: every block's contribution in float64 from exact integer dots (int8 mode)
  or from the type table's dequantized weights (float mode), and the sum of |products| that
  bounds float32 rounding error.
* `matvec_reference(...)`: a run of blocks added into `out` in float64.
* `matvec_float32(...)`: the same run in float32 with the arithmetic the kernels document
  (float mode: block by block into the row sum; int8 mode: ggml's AVX2 vec_dot lanes, FMA and
  horizontal sums), for a bit-exact check.
"""
from __future__ import annotations

import numpy as np

from formats import quants

F32 = np.float32
QK = 32
Q8_0_TYPES = (2, 6, 8)          # Q4_0, Q5_0, Q8_0: activation as Q8_0
Q8_1_TYPES = (3, 7)             # Q4_1, Q5_1: activation as Q8_1
ELEMENT_TYPES = (0, 1, 30)      # F32, F16, BF16


def f16_round(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):                       # overflow -> inf, as ggml
        return np.asarray(x, F32).astype(np.float16).astype(F32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Nearest-even bf16 (ggml_compute_fp32_to_bf16), NaN -> quiet NaN."""
    u = np.asarray(x, F32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    h = np.where(nan, (u >> 16) | 64, ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)
    return (h << 16).astype(np.uint32).view(F32)


def quantize_q8(x: np.ndarray):
    """AVX2 quantize_row_q8_1 (Q8_0 is the same without s): per 32-block -> (q int8[n],
    d = fp16(amax/127) as float32, s = fp16(d_unrounded * sum(q)) as float32)."""
    xb = np.asarray(x, F32).reshape(-1, QK)
    amax = np.abs(xb).max(axis=1)
    d = amax / F32(127)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(amax != 0, F32(127) / np.where(amax != 0, amax, F32(1)), F32(0))
        inv = inv.astype(F32)
        r = np.rint(xb * inv[:, None])                     # float32 product, half to even
    # cvtps2dq: NaN or out of int32 range -> INT32_MIN; then saturating packs to int8
    ok = np.isfinite(r) & (np.abs(r) < 2.0**31)
    v = np.where(ok, np.where(ok, r, 0).astype(np.int64), -2**31)
    q = np.clip(v, -128, 127).astype(np.int8).reshape(-1)
    total = (v.sum(axis=1) + 2**31) % 2**32 - 2**31        # int32 sum, wrapping
    return q, f16_round(d), f16_round(d * total.astype(F32))


def prepare(type_id: int, int8_mode: bool, x: np.ndarray) -> dict:
    """What prepare_activation must write: {buffer name: expected contents}."""
    x = np.asarray(x, F32)
    if not int8_mode or type_id == 0:
        return {"xf": x.copy()}
    if type_id == 1:
        return {"xf": f16_round(x)}
    if type_id == 30:
        return {"xf": bf16_round(x)}
    q, d, s = quantize_q8(x)
    out = {"xq": q, "xd": d}
    if type_id in Q8_1_TYPES:
        out["xs"] = s
    return out


def _f16s(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(F32).reshape(-1)


def block_quants(type_id: int, buf: np.ndarray, n_blocks: int):
    """The integer quants of n_blocks blocks, decoded from the bytes: (q int64[nb, 32] as the
    dot uses them (offset removed for Q4_0/Q5_0, unsigned for Q4_1/Q5_1), d, m or None)."""
    name = quants.by_id(type_id).name
    bb = quants.by_id(type_id).block_bytes
    blocks = np.asarray(buf, np.uint8)[:n_blocks * bb].reshape(n_blocks, bb)
    d = _f16s(blocks[:, 0:2])
    if name == "Q8_0":
        return blocks[:, 2:34].view(np.int8).astype(np.int64), d, None
    qs_off = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[name]
    qs = blocks[:, qs_off:qs_off + 16].astype(np.int64)
    q = np.concatenate([qs & 15, qs >> 4], axis=1)         # element j: low nibble of qs[j],
    if name in ("Q5_0", "Q5_1"):                           # element j+16: its high nibble
        qh_off = 2 if name == "Q5_0" else 4
        qh = np.ascontiguousarray(blocks[:, qh_off:qh_off + 4]).view("<u4").astype(np.int64)
        q = q | (((qh >> np.arange(32)) & 1) << 4)
    m = _f16s(blocks[:, 2:4]) if name in ("Q4_1", "Q5_1") else None
    q = q - {"Q4_0": 8, "Q5_0": 16}.get(name, 0)
    return q, d, m


def _act_blocks(act: dict, key: str, blocks_per_row: int) -> np.ndarray:
    """The activation buffer `key` as (blocks_per_row, 32) (the buffers may be longer)."""
    return act[key][:blocks_per_row * QK].reshape(-1, QK)


def _columns(n_blocks: int, first_block: int, blocks_per_row: int):
    g = first_block + np.arange(n_blocks)
    return g // blocks_per_row, g % blocks_per_row


def block_terms(type_id, int8_mode, buf, n_blocks, first_block, blocks_per_row, act: dict):
    """float64 contributions of the n_blocks blocks, and sum |product| of each (for F32/F16/
    BF16 a block is one element)."""
    t = quants.by_id(type_id)
    rows, cols = _columns(n_blocks, first_block, blocks_per_row)
    if t.block_size == 1:
        w = t.dequantize(np.asarray(buf, np.uint8)[:n_blocks * t.block_bytes], (n_blocks,))
        p = w.astype(np.float64) * act["xf"][cols].astype(np.float64)
        return rows, p, np.abs(p)
    if not int8_mode:
        w = t.dequantize(np.asarray(buf, np.uint8)[:n_blocks * t.block_bytes], (n_blocks, QK))
        x = _act_blocks(act, "xf", blocks_per_row)[cols]
        p = w.astype(np.float64) * x.astype(np.float64)
        return rows, p.sum(axis=1), np.abs(p).sum(axis=1)
    q, d, m = block_quants(type_id, buf, n_blocks)
    qx = _act_blocks(act, "xq", blocks_per_row)[cols].astype(np.int64)
    sumi = (q * qx).sum(axis=1)                                        # exact
    a = d.astype(np.float64) * act["xd"][cols].astype(np.float64) * sumi
    b = 0.0 if m is None else m.astype(np.float64) * act["xs"][cols].astype(np.float64)
    return rows, a + b, np.abs(a) + np.abs(b)


def lanes_mode(type_id: int, int8_mode: bool) -> bool:
    """int8 mode sums rows in ggml's AVX2 lanes (all types but BF16), and so do F32/F16 in
    float mode: a row lands in `out` only when its last block has been processed."""
    return (int8_mode and type_id != 30) or type_id in (0, 1)


def matvec_reference(type_id, int8_mode, buf, n_blocks, first_block, blocks_per_row, act,
                     out0: np.ndarray):
    """out0 + the run's contributions in float64, and the per-row sum of |terms| (in lanes
    mode only the rows the run completes are added)."""
    rows, contrib, size = block_terms(type_id, int8_mode, buf, n_blocks, first_block,
                                      blocks_per_row, act)
    if lanes_mode(type_id, int8_mode):
        done = (first_block + n_blocks) // blocks_per_row          # rows before this are done
        keep = rows < done
        rows, contrib, size = rows[keep], contrib[keep], size[keep]
    out = out0.astype(np.float64)
    scale = np.abs(out0).astype(np.float64)
    np.add.at(out, rows, contrib)
    np.add.at(scale, rows, size)
    return out, scale


def fma32(a, b, c):
    """float32 a*b + c rounded once (what an FMA instruction gives), elementwise.

    a*b is exact in float64, and TwoSum gives s = fl64(a*b + c) and its exact error. Rounding
    s to float32 gives the right answer unless s is exactly halfway between two float32s with
    a nonzero error: then the exact sum lies on the error's side."""
    a, b, c = (np.asarray(v, F32).astype(np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)                           # s + err == a*b + c exactly
    r = s.astype(F32)
    below = np.where(r.astype(np.float64) <= s, r, np.nextafter(r, F32(-np.inf)))
    above = np.where(r.astype(np.float64) >= s, r, np.nextafter(r, F32(np.inf)))
    halfway = (below.astype(np.float64) + above.astype(np.float64)) / 2     # exact
    fix = (s == halfway) & (below != above) & (err != 0)
    return np.where(fix, np.where(err > 0, above, below), r).astype(F32)


def hsum_float_8(lanes):
    """ggml's hsum_float_8: (hi128 + lo128), then movehl, then movehdup."""
    r = lanes[4:8] + lanes[0:4]
    return F32(F32(r[0] + r[2]) + F32(r[1] + r[3]))


def f32x8_reduce(lanes):
    """GGML_F32x8_REDUCE of 4 accumulators x 8 lanes (lanes[8j:8j+8] = accumulator j)."""
    acc = lanes.reshape(4, 8)
    x = (acc[0] + acc[2]) + (acc[1] + acc[3])
    t = x[0:4] + x[4:8]
    return F32(F32(t[0] + t[1]) + F32(t[2] + t[3]))


def _row_lanes_int8(t, raw, n_blocks, first_block, blocks_per_row, act, out):
    """ggml's AVX2 vec_dot for whole rows, block by block (lanes mode of matvec_float32)."""
    assert first_block % blocks_per_row == 0, "lanes mode starts at a row"
    rows, cols = _columns(n_blocks, first_block, blocks_per_row)
    if t.block_size == 1:
        w = t.dequantize(raw, (n_blocks,))
        n_simd = blocks_per_row & ~31
        for k in range(n_blocks):
            r, c = rows[k], cols[k]
            if c == 0:
                lanes, total = np.zeros(32, F32), None
            x = act["xf"][c]
            if c < n_simd:
                lanes[c % 32] = fma32(w[k], x, lanes[c % 32])
            else:
                if c == n_simd:
                    total = f32x8_reduce(lanes)
                    total = F32(total) if t.name == "F32" else np.float64(total)
                if t.name == "F32":
                    total = fma32(w[k], x, total)           # gcc contracts sumf += x*y
                else:
                    total = total + np.float64(F32(w[k] * x))
            if c == blocks_per_row - 1:
                v = f32x8_reduce(lanes) if total is None else F32(total)
                out[r] = F32(out[r] + v)
        return out
    q, d, m = block_quants(t.id, raw, n_blocks)
    qx = _act_blocks(act, "xq", blocks_per_row)[cols].astype(np.int64)
    lane_sums = (q * qx).reshape(n_blocks, 8, 4).sum(axis=2).astype(F32)   # exact
    dd = d * act["xd"][cols]                                               # exact
    for k in range(n_blocks):
        r, c = rows[k], cols[k]
        if c == 0:
            lanes, summs = np.zeros(8, F32), F32(0)
        lanes = fma32(dd[k], lane_sums[k], lanes)
        if m is not None:
            summs = F32(summs + F32(m[k] * act["xs"][c]))
        if c == blocks_per_row - 1:
            v = hsum_float_8(lanes)
            if m is not None:
                v = F32(v + summs)
            out[r] = F32(out[r] + v)
    return out


def matvec_float32(type_id, int8_mode, buf, n_blocks, first_block, blocks_per_row, act,
                   out0: np.ndarray) -> np.ndarray:
    """The run in float32 with the arithmetic the kernels document: float mode (and BF16 in
    int8 mode) block by block into out[row]; int8 mode ggml's AVX2 lanes per whole row."""
    t = quants.by_id(type_id)
    raw = np.asarray(buf, np.uint8)[:n_blocks * t.block_bytes]
    out = np.array(out0, dtype=F32)
    if lanes_mode(type_id, int8_mode):
        return _row_lanes_int8(t, raw, n_blocks, first_block, blocks_per_row, act, out)
    rows, cols = _columns(n_blocks, first_block, blocks_per_row)
    if t.block_size == 1:
        contrib = t.dequantize(raw, (n_blocks,)) * act["xf"][cols]             # float32
    else:
        p = t.dequantize(raw, (n_blocks, QK)) * _act_blocks(act, "xf", blocks_per_row)[cols]
        s = p[:, :16] + p[:, 16:]                        # p[j] + p[j+16]
        for half in (8, 4, 2, 1):
            s = s[:, :half] + s[:, half:2 * half]
        contrib = s[:, 0]
    for r, v in zip(rows, contrib.astype(F32)):
        out[r] = F32(out[r] + v)
    return out
