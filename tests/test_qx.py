"""QX (formats/qx.py): mixed per-block widths with sparse fp16 outliers, a variable-size type.

The oracle is a plain numpy decoder written from the layout in docs/format.md ("QX blocks"),
not from the kernels: it parses every block, and from it come the dequantized values, the
float-mode and int8-mode dot products (float64), and the block sizes count_blocks must find.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import kernels, qx, quants
from formats.errors import BadInput

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# The reference decoder (docs/format.md)

def f16(b: np.ndarray, o: int) -> np.float32:
    return np.frombuffer(bytes(b[o:o + 2]), "<f2")[0].astype(F32)


def decode_block(b: np.ndarray, o: int, B: int) -> dict:
    h = int(b[o])
    c, S, k = h & 15, (h >> 4) & 1, h >> 5
    if c == 15:
        vals = np.frombuffer(bytes(b[o + 1:o + 1 + 2 * B]), "<f2").astype(F32)
        return dict(c=c, S=S, k=0, size=1 + 2 * B, raw=vals)
    assert c <= 8, h
    p = o + 1
    d = m = F32(0)
    if c > 0:
        d = f16(b, p)
        p += 2
    if S == 0:
        m = f16(b, p)
        p += 2
    pos = [int(v) for v in b[p:p + k]]
    val = [f16(b, p + k + 2 * j) for j in range(k)]
    p += 3 * k
    q = np.zeros(B, np.int64)
    for g in range(B // 32):
        planes = b[p + 4 * c * g:p + 4 * c * (g + 1)].astype(np.int64)
        for e in range(32):
            if c == 8:
                q[32 * g + e] = planes[e]
                continue
            off = shift = 0
            for bits in (4, 2, 1):
                if c & bits:
                    nb = 4 * bits
                    part = (planes[off + e % nb] >> (bits * (e // nb))) & ((1 << bits) - 1)
                    q[32 * g + e] |= part << shift
                    off += nb
                    shift += bits
    size = p + B * c // 8 - o
    return dict(c=c, S=S, k=k, d=d, m=m, pos=pos, val=val, q=q, size=size)


def block_values(blk: dict, B: int) -> np.ndarray:
    if blk["c"] == 15:
        return blk["raw"]
    c, d, m = blk["c"], blk["d"], blk["m"]
    if blk["S"]:
        z = 1 << (c - 1) if c else 0
        w = (blk["q"] - z).astype(F32) * d if c else np.zeros(B, F32)
    else:
        w = blk["q"].astype(F32) * d + m if c else np.full(B, m, F32)
    w = w.astype(F32)
    for p, v in zip(blk["pos"], blk["val"]):
        w[p] = v
    return w


def decode_payload(payload: np.ndarray, rows: int, cols: int, B: int):
    off = payload[:4 * (rows + 1)].view("<u4").astype(np.int64)
    assert off[0] == 4 * (rows + 1) and off[-1] == payload.size
    out = np.zeros((rows, cols), F32)
    blocks = []
    for r in range(rows):
        o = int(off[r])
        for cb in range(cols // B):
            blk = decode_block(payload, o, B)
            out[r, cb * B:(cb + 1) * B] = block_values(blk, B)
            blocks.append(blk)
            o += blk["size"]
        assert o == off[r + 1], (r, o, off[r + 1])
    return out, blocks


def q8_0(x: np.ndarray, B: int = 32):
    """ggml's AVX2 quantize_row_q8_0 arithmetic per B values (B = 32: Q8_0 itself): d =
    amax/127 (fp16), q = rint(x*127/amax)."""
    xb = x.reshape(-1, B)
    amax = np.abs(xb).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, F32(127) / np.where(amax != 0, amax, F32(1)), F32(0)).astype(F32)
    q = np.clip(np.rint(xb * inv[:, None]), -128, 127).astype(np.int8).reshape(-1)
    return q, (amax / F32(127)).astype(np.float16).astype(F32)


def ref_dots(blocks, first, bpr, B, x, int8_mode):
    """{row: (dot in float64, sum of |terms|)} for a run of decoded blocks (int8 mode: the
    activation quantized per block of B)."""
    xq, xd = q8_0(x, B)
    res = {}
    for i, blk in enumerate(blocks):
        g = first + i
        row, x0 = g // bpr, (g % bpr) * B
        xs = x[x0:x0 + B].astype(np.float64)
        w = block_values(blk, B).astype(np.float64)
        if not int8_mode or blk["c"] == 15:
            terms = w * xs
        else:
            terms = []
            outl = set(blk["pos"])
            idx = [e for e in range(B) if e not in outl]
            qx_ = xq[x0 + np.array(idx, int)].astype(np.int64) if idx else np.zeros(0, int)
            qw = blk["q"][idx] if blk["c"] else np.zeros(len(idx), np.int64)
            isum, xsum = int((qw * qx_).sum()), int(qx_.sum())
            dd = float(xd[x0 // B])
            if blk["S"]:
                z = (1 << (blk["c"] - 1)) if blk["c"] else 0
                terms.append(dd * float(blk["d"]) * (isum - z * xsum))
            else:
                terms.append(dd * (float(blk["d"]) * isum + float(blk["m"]) * xsum))
            for p, v in zip(blk["pos"], blk["val"]):
                terms.append(float(v) * float(x[x0 + p]))
            terms = np.array(terms)
        s, a = res.get(row, (0.0, 0.0))
        res[row] = (s + terms.sum(), a + np.abs(terms).sum())
    return res


def matrix(rng, rows, cols, scale=1.0, spikes=True):
    w = (rng.standard_normal((rows, cols)) * scale).astype(F32)
    if spikes and w.size >= 64:
        idx = rng.choice(w.size, max(1, w.size // 50), replace=False)
        w.reshape(-1)[idx] *= F32(12)
    if rows > 1 and cols >= 32:
        w[1, :32] = 0                                      # an all-zero block
        if cols >= 64:
            w[1, 32:64] = F32(0.25)                        # a constant block
    return w


# ---------------------------------------------------------------------------------------------
# The type table entry and options

def test_table_entry_and_variants():
    t = quants.by_name("QX")                     # the default: 64-blocks
    assert (t.id, t.name, t.block_size, t.block_bytes, t.params) == (128, "QX", 64, 0, (64, 0))
    assert t.variable and t.max_block_bytes == qx.max_block_bytes(64) == 129
    assert quants.by_id(128) is t
    v = quants.by_name("QX:bs=32,bpw=3.5,widths=2,3,4,5,6,8,outliers=4")
    assert (v.id, v.name, v.block_size, v.params, v.max_block_bytes) == (128, "QX", 32, (32, 0),
                                                                          65)
    s = qx.parse_options("bs=32,bpw=3.5,widths=2,3,4,5,6,8,outliers=4")
    assert s == qx.QXSettings(32, 3.5, None, None, (2, 3, 4, 5, 6, 8), 4)
    assert qx.parse_options("err=0.01") == qx.QXSettings(err=0.01, bpw=None)
    assert qx.parse_options("rel=0.05,outliers=0").rel == 0.05
    assert qx.parse_options(s.options()) == s
    # a variant's own variant keeps its settings
    assert v.configure("bs=64").block_size == 64
    for bad in ("bs=48", "bpw=-1", "widths=9", "outliers=8", "foo=1", "bpw=x", "3"):
        with pytest.raises(BadInput):
            quants.by_name("QX:" + bad)


# ---------------------------------------------------------------------------------------------
# Round trip and the payload table

@pytest.mark.parametrize("opts", ["bpw=4.5", "bs=64,bpw=3.5,widths=2,3,4,5,6,8,outliers=4",
                                  "err=0.02", "rel=0.05,bs=64", "bpw=2,outliers=0",
                                  "bpw=9,widths=8"])
def test_round_trip_and_table(opts):
    t = quants.by_name("QX:" + opts)
    B = t.block_size
    rng = np.random.default_rng(len(opts))
    rows, cols = 5, 4 * 64
    w = matrix(rng, rows, cols)
    payload = t.quantize(w)
    assert payload.dtype == np.uint8 and payload.ndim == 1
    off = qx.row_offsets(payload, rows)
    assert off[0] == 4 * (rows + 1) and off[-1] == payload.size
    ref, blocks = decode_payload(payload, rows, cols, B)
    got = t.dequantize(payload, (rows, cols))
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert np.all([blk["size"] <= t.max_block_bytes for blk in blocks])
    # outliers: strictly increasing positions below B
    for blk in blocks:
        assert blk.get("pos", []) == sorted(set(blk.get("pos", []))) and \
            all(p < B for p in blk.get("pos", []))
    rms = np.sqrt(np.mean((got - w) ** 2))
    assert rms < (0.5 if "bpw=2" in opts else 0.35) * np.sqrt(np.mean(w ** 2)), rms
    # a 3-D shape: rows are all dims but the last
    p3 = t.quantize(w.reshape(5, 1, cols))
    np.testing.assert_array_equal(p3, payload)
    assert t.dequantize(p3, (5, 1, cols)).shape == (5, 1, cols)


def test_payload_checks():
    t = quants.by_name("QX")
    w = matrix(np.random.default_rng(1), 3, 64)
    p = t.quantize(w)
    for cut in (p[:-1], p[:10]):
        with pytest.raises(BadInput):
            t.dequantize(cut, (3, 64))
    bad = p.copy()
    bad[:4] = np.array([0, 0, 0, 0], np.uint8)
    with pytest.raises(BadInput):
        t.dequantize(bad, (3, 64))
    with pytest.raises(BadInput):
        t.quantize(np.ones((2, 48), F32))
    x = w.copy()
    x[2, 7] = np.nan
    with pytest.raises(quants.NonFiniteValue):
        t.quantize(x)
    with pytest.raises(BadInput):
        t.quantize(np.full((1, 32), 1e5, F32))
    with pytest.raises(BadInput):
        qx.quantize_rows(w, "bpw=4", importance=np.ones(63, F32))


def test_quantize_from_f16_source():
    t = quants.by_name("QX:bs=32,err=0.01")
    w = matrix(np.random.default_rng(2), 4, 96).astype(np.float16)
    got = t.quantize_from(quants.by_name("F16"), w.tobytes(), 96)
    np.testing.assert_array_equal(got, t.quantize(w.astype(F32)))


# ---------------------------------------------------------------------------------------------
# Error-bound mode

def _tolerance(x, err, rel):
    x = x.astype(np.float64)
    if rel:
        floor = np.sqrt(np.mean(x ** 2))
        return rel * np.maximum(np.abs(x), floor)
    return np.full(x.shape, err)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), nb=st.integers(1, 4), bs=st.sampled_from([32, 64]),
       scale=st.sampled_from([1e-3, 0.1, 1.0, 30.0]), spikes=st.integers(0, 6),
       bound=st.sampled_from([("err", 0.3), ("err", 0.02), ("err", 1e-3), ("rel", 0.05),
                              ("rel", 0.01), ("rel", 0.2)]),
       outliers=st.integers(0, 7), seed=st.integers(0, 2**32 - 1))
def test_error_bound_holds_on_every_weight(rows, nb, bs, scale, spikes, bound, outliers, seed):
    rng = np.random.default_rng(seed)
    cols = nb * bs
    x = (rng.standard_normal((rows, cols)) * scale).astype(F32)
    for _ in range(spikes):                                  # sparse large outliers
        x[rng.integers(rows), rng.integers(cols)] = F32(rng.choice([-1, 1]) * scale * 50)
    kind, value = bound
    value = value * scale if kind == "err" else value
    s = qx.parse_options(f"bs={bs},{kind}={value!r},outliers={outliers}")
    payload = qx.quantize_rows(x, s)
    y = qx.dequantize_payload(payload, x.shape, bs)
    err = np.abs(y.astype(np.float64) - x)
    fp16_err = np.abs(x.astype(np.float16).astype(np.float64) - x)
    tol = _tolerance(x, value if kind == "err" else 0, value if kind == "rel" else 0)
    assert np.all(err <= np.maximum(tol, fp16_err)), (err - tol).max()


def test_error_bound_takes_cheapest_width():
    """A block that fits in few bits gets few bits; a tighter bound never gives fewer bytes."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 256))).astype(F32)
    sizes = [qx.quantize_rows(x, f"err={e}").size for e in (0.5, 0.1, 0.02, 0.004)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # integers 0..3 are exact with 2 bits: every block 1 + 2 + 2 + 8 bytes at most
    ints = rng.integers(0, 4, (2, 64)).astype(F32)
    p = qx.quantize_rows(ints, "bs=32,err=1e-6")
    _, blocks = decode_payload(p, 2, 64, 32)
    assert all(b["c"] <= 2 for b in blocks)
    np.testing.assert_array_equal(qx.dequantize_payload(p, ints.shape, 32), ints)


def test_outliers_make_blocks_cheaper():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((4, 128)) * 0.1).astype(F32)
    x[:, ::32] = 20.0                                        # one spike per block
    with_o = qx.quantize_rows(x, "bs=32,err=0.01")
    without = qx.quantize_rows(x, "bs=32,err=0.01,outliers=0")
    assert with_o.size < without.size
    _, blocks = decode_payload(with_o, 4, 128, 32)
    assert all(b["k"] >= 1 for b in blocks)


# ---------------------------------------------------------------------------------------------
# Target-size mode

@pytest.mark.parametrize("opts", ["bpw=3.5", "bs=32,bpw=4.5", "err=0.02"])
def test_threads_change_no_byte(opts, monkeypatch):
    """quantize_rows analyses row ranges on threads: one thread and one per row range (and
    more ranges than this machine has cores) give the same payload."""
    x = matrix(np.random.default_rng(21), 96, 512)
    monkeypatch.setattr(qx, "_MIN_THREAD_WEIGHTS", 1 << 40)
    one = qx.quantize_rows(x, opts)
    monkeypatch.setattr(qx, "_MIN_THREAD_WEIGHTS", 1)
    monkeypatch.setattr(qx.os, "cpu_count", lambda: 7)
    np.testing.assert_array_equal(qx.quantize_rows(x, opts), one)


@pytest.mark.parametrize("bs", [32, 64])
@pytest.mark.parametrize("bpw", [1.5, 2.5, 3.0, 4.5, 6.0, 8.5])
def test_target_size_met_within_one_block(bs, bpw):
    rng = np.random.default_rng(int(bpw * 10) + bs)
    rows, cols = 16, 512
    x = matrix(rng, rows, cols)
    p = qx.quantize_rows(x, f"bs={bs},bpw={bpw}")
    target = int(np.floor(bpw * rows * cols / 8))
    assert p.size <= target
    assert target - p.size < qx.max_block_bytes(bs)


def test_more_bits_less_error():
    rng = np.random.default_rng(5)
    x = matrix(rng, 8, 512)
    errs = [np.mean((qx.dequantize_payload(qx.quantize_rows(x, f"bpw={b}"), x.shape) - x) ** 2)
            for b in (2.0, 3.0, 4.5, 6.0)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.05 * errs[0]


def test_qx_beats_q4_0_on_spiky_weights_at_same_size():
    rng = np.random.default_rng(6)
    x = matrix(rng, 32, 512)
    q4 = quants.by_name("Q4_0")
    e4 = np.mean((q4.dequantize(q4.quantize(x), x.shape) - x) ** 2)
    p = qx.quantize_rows(x, "bpw=4.5")
    ex = np.mean((qx.dequantize_payload(p, x.shape) - x) ** 2)
    assert ex < e4, (ex, e4)


@pytest.mark.parametrize("mode", ["bpw=3", "err=0.05"])
def test_importance_shifts_error_to_weighted_columns(mode):
    rng = np.random.default_rng(7)
    rows, cols = 16, 256
    x = (rng.standard_normal((rows, cols))).astype(F32)
    imp = np.ones(cols, F32)
    imp[:128] = 100.0                                       # the first four blocks of a row
    plain = qx.dequantize_payload(qx.quantize_rows(x, mode), x.shape)
    weighted = qx.dequantize_payload(qx.quantize_rows(x, mode, importance=imp), x.shape)
    via_table = quants.by_name("QX:" + mode).quantize_weighted(x, imp)
    np.testing.assert_array_equal(via_table, qx.quantize_rows(x, mode, importance=imp))
    e0 = ((plain - x) ** 2)
    e1 = ((weighted - x) ** 2)
    if mode.startswith("bpw"):
        assert e1[:, :128].mean() < 0.7 * e0[:, :128].mean()
        assert e1[:, 128:].mean() > e0[:, 128:].mean()
    else:                                                   # the bound still holds everywhere
        assert np.abs(weighted - x).max() <= 0.05
        assert (e1 * imp).sum() <= (e0 * imp).sum() * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# count_blocks

@pytest.mark.parametrize("bs", [32, 64])
def test_count_blocks_on_every_cut(bs):
    rng = np.random.default_rng(8)
    rows, cols = 3, 4 * bs
    x = matrix(rng, rows, cols)
    x[0, :bs] = (rng.standard_normal(bs) * 1e-4).astype(F32)
    t = quants.by_name(f"QX:bs={bs},err=0.003")
    p = t.quantize(x)
    body = p[4 * (rows + 1):]
    _, blocks = decode_payload(p, rows, cols, bs)
    ends = np.cumsum([b["size"] for b in blocks])
    assert ends[-1] == body.size
    for cut in range(body.size + 1):
        n_whole = int(np.searchsorted(ends, cut, side="right"))
        used = int(ends[n_whole - 1]) if n_whole else 0
        assert t.count_blocks(body[:cut], 10**6) == (n_whole, used), cut
        for mb in (0, 1, 2):
            k = min(mb, n_whole)
            assert t.count_blocks(body[:cut], mb) == (k, int(ends[k - 1]) if k else 0)
    with pytest.raises(BadInput):
        t.count_blocks(np.array([9, 0, 0], np.uint8), 5)        # width code 9


# ---------------------------------------------------------------------------------------------
# Board kernels against the reference

def _acts(x, int8_mode, B=32):
    n = x.size
    xf, xq = np.full(n + 3, 7, F32), np.full(n + 3, 5, np.int8)
    xd, xs = np.full(n // B + 2, 7, F32), np.full(n // B + 2, 7, F32)
    qx.prepare_activation(int8_mode, x, xf, xq, xd, xs, block_size=B)
    return xf, xq, xd, xs


@pytest.mark.parametrize("B", [32, 64])
@pytest.mark.parametrize("int8_mode", [False, True])
def test_prepare_activation(int8_mode, B):
    """int8 mode: Q8 per weight block (B = 32 is ggml's Q8_0, as the ggml types get it)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(256).astype(F32)
    x[:B] = 0
    x[B + 5] = F32(-30.0)
    xf, xq, xd, xs = _acts(x, int8_mode, B)
    np.testing.assert_array_equal(xf[:256], x)
    if int8_mode:
        q, d = q8_0(x, B)
        nb = 256 // B
        np.testing.assert_array_equal(xq[:256], q)
        np.testing.assert_array_equal(xd[:nb], d)
        np.testing.assert_array_equal(xs[:nb], q.reshape(nb, B).astype(np.int64).sum(1))
        assert xq[B + 5] == -127 and xd[1] == F32(np.float16(F32(30.0) / F32(127)))
        if B == 32:                  # the ggml types' own Q8_0
            kq, kd = np.zeros(256, np.int8), np.zeros(8, F32)
            kernels.prepare_activation(kernels.T_Q8_0, True, x, np.zeros(256, F32), kq, kd,
                                       np.zeros(8, F32))
            np.testing.assert_array_equal(xq[:256], kq)
            np.testing.assert_array_equal(xd[:8], kd)


@settings(max_examples=40, deadline=None)
@given(int8_mode=st.booleans(), bs=st.sampled_from([32, 64]), rows=st.integers(1, 5),
       bpr=st.integers(1, 5), opts=st.sampled_from(["bpw=4.5", "bpw=2", "err=0.01",
                                                     "err=0.3", "bpw=12", "rel=0.01"]),
       xscale=st.sampled_from([1.0, 1e-3, 300.0]), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_matvec_matches_reference(int8_mode, bs, rows, bpr, opts, xscale, seed, data):
    rng = np.random.default_rng(seed)
    cols = bpr * bs
    t = quants.by_name(f"QX:bs={bs},{opts}")
    w = matrix(rng, rows, cols)
    payload = t.quantize(w)
    body = np.ascontiguousarray(payload[4 * (rows + 1):])
    _, blocks = decode_payload(payload, rows, cols, bs)
    ends = np.concatenate([[0], np.cumsum([b["size"] for b in blocks])])
    x = (rng.standard_normal(cols) * xscale).astype(F32)
    xf, xq, xd, xs = _acts(x, int8_mode, bs)
    total = rows * bpr
    first = data.draw(st.integers(0, total - 1))
    n = data.draw(st.integers(1, total - first))
    out0 = rng.standard_normal(rows).astype(F32)
    out = out0.copy()
    t.matvec_blocks(int8_mode, body[ends[first]:ends[first + n]], n, first, bpr, xf, xq, xd, xs,
                    out)
    ref = ref_dots(blocks[first:first + n], first, bpr, bs, x, int8_mode)
    for r in range(rows):
        s, a = ref.get(r, (0.0, 0.0))
        want = float(out0[r]) + s
        assert abs(float(out[r]) - want) <= 2e-6 * (a + abs(float(out0[r]))) + 1e-30, (r, out[r],
                                                                                    want)
    # any split of the run into pieces gives the same bits
    whole = out0.copy()
    t.matvec_blocks(int8_mode, body[ends[0]:ends[total]], total, 0, bpr, xf, xq, xd, xs, whole)
    pieces = out0.copy()
    g = 0
    while g < total:
        k = int(rng.integers(1, total - g + 1))
        t.matvec_blocks(int8_mode, body[ends[g]:ends[g + k]], k, g, bpr, xf, xq, xd, xs, pieces)
        g += k
    np.testing.assert_array_equal(pieces.view(np.uint32), whole.view(np.uint32))


def _tree(v: np.ndarray) -> F32:
    """The kernels' fixed tree sum of float32 lanes: [0, n/2) + [n/2, n), repeated."""
    while v.size > 1:
        h = v.size // 2
        v = (v[:h] + v[h:]).astype(F32)
    return v[0]


def exact_dots(blocks, first, bpr, B, xf, xq, xd, xs, out, int8_mode):
    """out (float32) after matvec_blocks over the decoded blocks, bit for bit: the arithmetic of
    the matvec_blocks docstring in numpy float32 scalars (each operation rounded once), the
    integer sums exact. Outlier positions are taken mod B, each one applied (as the kernel)."""
    out = out.copy()
    for n, blk in enumerate(blocks):
        g0 = first + n
        row, x0 = g0 // bpr, (g0 % bpr) * B
        t = F32(0)
        if blk["c"] == 15:
            for g in range(B // 32):
                s = slice(x0 + 32 * g, x0 + 32 * g + 32)
                t = F32(t + _tree((blk["raw"][32 * g:32 * g + 32] * xf[s]).astype(F32)))
            out[row] = F32(out[row] + t)
            continue
        c, S, d, m = blk["c"], blk["S"], F32(blk["d"]), F32(blk["m"])
        z = (1 << (c - 1)) if (S and c) else 0
        q = blk["q"]
        if c == 0:
            w = np.full(B, m if not S else F32(0), F32)
        elif S:
            w = ((q - z).astype(F32) * d).astype(F32)
        else:
            w = ((q.astype(F32) * d).astype(F32) + m).astype(F32)
        pos = [p & (B - 1) for p in blk["pos"]]
        if not int8_mode:
            for g in range(B // 32):
                s = slice(x0 + 32 * g, x0 + 32 * g + 32)
                t = F32(t + _tree((w[32 * g:32 * g + 32] * xf[s]).astype(F32)))
            for p, v in zip(pos, blk["val"]):
                t = F32(t + F32(F32(v) - w[p]) * xf[x0 + p])
        else:
            b = x0 // B                        # the activation block is the weight block
            X = int(xs[b])
            Isum = int(np.dot(q, xq[x0:x0 + B].astype(np.int64))) if c else 0
            for p in pos:
                X -= int(xq[x0 + p])
                if c:
                    Isum -= int(q[p]) * int(xq[x0 + p])
            if S:
                t = F32(t + xd[b] * F32(d * F32(Isum - z * X)))
            else:
                t = F32(t + xd[b] * F32(F32(d * F32(Isum)) + F32(m * F32(X))))
            for p, v in zip(pos, blk["val"]):
                t = F32(t + F32(v) * xf[x0 + p])
        out[row] = F32(out[row] + t)
    return out


def random_blocks(rng, n, B, tame=True):
    """n QX blocks with valid headers (every width, S, outlier count, raw) and random bodies:
    tame = finite fp16 scales and values and distinct positions below B; otherwise random
    bytes there (positions repeated or >= B: the kernel takes them mod B)."""
    parts = []
    for _ in range(n):
        c = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 15]))
        S = int(rng.integers(0, 2)) if c != 15 else 0
        k = int(rng.integers(0, 8)) if c != 15 else 0
        size = qx.block_bytes(c, S, k, B)
        blk = rng.integers(0, 256, size).astype(np.uint8)
        blk[0] = c | S << 4 | k << 5
        if tame:
            h = rng.standard_normal(B + 8).astype(np.float16).view(np.uint8)
            if c == 15:
                blk[1:] = h[:2 * B]
            else:
                p = 1 + 2 * (c > 0) + 2 * (S == 0)
                blk[1:p] = h[:p - 1]
                blk[p:p + k] = np.sort(rng.choice(B, k, replace=False))
                blk[p + k:p + 3 * k] = h[2 * B - 2 * k:2 * B]
        parts.append(blk)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


@pytest.mark.parametrize("bs", [32, 64])
@pytest.mark.parametrize("int8_mode", [False, True])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_matvec_is_bit_exact(bs, int8_mode, seed):
    """Blocks of every kind (and quantizer output) against exact_dots, bit for bit, whole runs
    and runs cut anywhere."""
    rng = np.random.default_rng(100 + seed)
    rows, bpr = int(rng.integers(1, 6)), int(rng.integers(1, 9))
    cols = bpr * bs
    if seed % 3 == 2:
        w = matrix(rng, rows, cols, scale=float(rng.choice([1e-3, 1.0, 50.0])))
        opts = ["bpw=4.5", "bpw=3,outliers=7,widths=1,2,3,4,5,6,7,8", "err=0.02", "bpw=12"]
        body = quants.by_name(f"QX:bs={bs},{opts[seed % 4]}").quantize(w)[4 * (rows + 1):]
    else:
        body = random_blocks(rng, rows * bpr, bs, tame=seed % 3 == 0)
    body = np.ascontiguousarray(body)
    blocks, ends = [], [0]
    for _ in range(rows * bpr):
        blocks.append(decode_block(body, ends[-1], bs))
        ends.append(ends[-1] + blocks[-1]["size"])
    assert ends[-1] == body.size
    x = (rng.standard_normal(cols) * rng.choice([1e-3, 1.0, 300.0])).astype(F32)
    x[rng.integers(0, cols)] = 0
    x[rng.integers(0, cols)] = -0.0
    xf, xq, xd, xs = _acts(x, int8_mode, bs)
    out0 = rng.standard_normal(rows).astype(F32)
    out0[0] = -0.0
    t = quants.by_name(f"QX:bs={bs}")
    total = rows * bpr
    for first, n in [(0, total)] + [(f, int(rng.integers(1, total - f + 1)))
                                    for f in rng.integers(0, total, 4)]:
        got = out0.copy()
        t.matvec_blocks(int8_mode, body[ends[first]:ends[first + n]], n, int(first), bpr, xf,
                        xq, xd, xs, got)
        want = exact_dots(blocks[first:first + n], first, bpr, bs, xf, xq, xd, xs, out0,
                          int8_mode)
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), (first, n, got, want)     # NaN payloads aside: bit for bit


def test_matvec_error_leaves_earlier_rows():
    """A run that overruns its buffer: BadInput naming the block, the rows before it done (and
    a row cut where the buffer ends, up to that point)."""
    rng = np.random.default_rng(14)
    bs, rows, bpr = 32, 4, 3
    body = random_blocks(rng, rows * bpr, bs)
    blocks, ends = [], [0]
    for _ in range(rows * bpr):
        blocks.append(decode_block(body, ends[-1], bs))
        ends.append(ends[-1] + blocks[-1]["size"])
    x = rng.standard_normal(bpr * bs).astype(F32)
    t = quants.by_name("QX:bs=32")
    for int8_mode in (False, True):
        xf, xq, xd, xs = _acts(x, int8_mode, bs)
        for cut_block in (0, 4, 6, 11):
            for extra in (0, 1):              # the buffer ends at a block / inside it
                got = np.zeros(rows, F32)
                with pytest.raises(BadInput, match=f"block {cut_block} "):
                    t.matvec_blocks(int8_mode, body[:ends[cut_block] + extra], rows * bpr, 0,
                                    bpr, xf, xq, xd, xs, got)
                want = exact_dots(blocks[:cut_block], 0, bpr, bs, xf, xq, xd, xs,
                                  np.zeros(rows, F32), int8_mode)
                full = cut_block // bpr            # rows finished before the bad block
                np.testing.assert_array_equal(got[:full].view(np.uint32),
                                              want[:full].view(np.uint32))
                if extra == 0:                     # header past the end: the row so far too
                    np.testing.assert_array_equal(got[full:full + 1].view(np.uint32),
                                                  want[full:full + 1].view(np.uint32))
                assert np.all(got[full + 1:] == 0)


def test_matvec_float_mode_is_dequantized_dot():
    """Float mode: the dot of the dequantized block with xf (fp32 sums, so close to float64)."""
    rng = np.random.default_rng(10)
    rows, cols = 16, 256
    w = matrix(rng, rows, cols)
    x = rng.standard_normal(cols).astype(F32)
    for bs in (32, 64):
        t = quants.by_name(f"QX:bs={bs},bpw=4.5")
        p = t.quantize(w)
        xf, xq, xd, xs = _acts(x, False, bs)
        out = np.zeros(rows, F32)
        t.matvec_blocks(False, p[4 * (rows + 1):], rows * cols // bs, 0, cols // bs, xf, xq, xd,
                        xs, out)
        deq = t.dequantize(p, (rows, cols)).astype(np.float64)
        np.testing.assert_allclose(out, deq @ x, rtol=1e-5, atol=1e-4)


def test_matvec_validates():
    t = quants.by_name("QX")
    rng = np.random.default_rng(11)
    p = t.quantize(matrix(rng, 2, 64))
    body = p[12:]
    xf, xq, xd, xs = _acts(rng.standard_normal(64).astype(F32), True)
    out = np.zeros(2, F32)
    with pytest.raises(BadInput):                   # more blocks than the buffer holds
        t.matvec_blocks(True, body[:-1], 4, 0, 2, xf, xq, xd, xs, out)
    with pytest.raises(BadInput):                   # rows beyond out
        t.matvec_blocks(True, body, 4, 0, 2, xf, xq, xd, xs, out[:1])
    with pytest.raises(BadInput):                   # activation too short
        t.matvec_blocks(False, body, 4, 0, 2, xf[:32], xq, xd, xs, out)
    with pytest.raises(BadInput):
        t.matvec_blocks(False, np.array([0x0B, 0, 0, 0], np.uint8), 1, 0, 2, xf, xq, xd, xs, out)


@pytest.mark.parametrize("bs", [32, 64])
def test_dequantize_into_matches_table(bs):
    rng = np.random.default_rng(12)
    t = quants.by_name(f"QX:bs={bs},bpw=3.5")
    rows, cols = 4, 256
    w = matrix(rng, rows, cols)
    p = t.quantize(w)
    want = t.dequantize(p, (rows, cols)).reshape(-1)
    body = p[4 * (rows + 1):]
    out = np.full(rows * cols + 5, 9, F32)
    t.dequantize_into(body, out)
    np.testing.assert_array_equal(out[:rows * cols].view(np.uint32), want.view(np.uint32))
    assert np.all(out[rows * cols:] == 9)
    ro = body.copy()
    ro.flags.writeable = False
    n, used = t.count_blocks(ro, 3)
    t.dequantize_into(ro[:used], out)
    np.testing.assert_array_equal(out[:3 * bs], want[:3 * bs])
    with pytest.raises(BadInput):
        t.dequantize_into(body[:used - 1], out)
    with pytest.raises(BadInput):
        t.dequantize_into(body, out[:10])


def test_target_below_the_smallest_encoding_gives_the_smallest():
    x = matrix(np.random.default_rng(13), 4, 128)
    p = qx.quantize_rows(x, "bs=32,bpw=0.01")
    _, blocks = decode_payload(p, 4, 128, 32)
    assert all(b["size"] == 1 for b in blocks)           # S = 1, c = 0: an all-zero block


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=400), bs=st.sampled_from([32, 64]),
       int8_mode=st.booleans())
def test_garbage_bytes_never_crash(data, bs, int8_mode):
    """Arbitrary bytes: count_blocks, matvec_blocks and dequantize_into either work or raise
    BadInput (bounds are checked from the headers, never trusted)."""
    t = quants.by_name(f"QX:bs={bs}")
    buf = np.frombuffer(data, np.uint8)
    try:
        n, used = t.count_blocks(buf, 10**6)
    except BadInput:
        return
    assert 0 <= used <= buf.size
    bpr = 2
    x = np.linspace(-1, 1, bpr * bs).astype(F32)
    xf, xq, xd, xs = _acts(x, int8_mode, bs)
    out = np.zeros(n // bpr + 1, F32)
    t.matvec_blocks(int8_mode, buf[:used], n, 0, bpr, xf, xq, xd, xs, out)
    deq = np.zeros(n * bs, F32)
    t.dequantize_into(buf[:used], deq)
    with pytest.raises(BadInput):
        if used < buf.size:
            t.dequantize_into(buf, np.zeros(n * bs + 2 * bs, F32))
        else:
            raise BadInput("nothing left over")
