"""The fused dequantize-and-dot kernels (formats/kernels.py: prepare_activation, matvec_blocks,
dequantize_into) against the numpy twins in tests/naive_kernels.py.

* prepare_activation: xf / xq / xd / xs equal the twin's bit for bit (fp16 / bf16 rounding, ggml's
  AVX2 Q8_0 / Q8_1 quantization with round-half-to-even and the unrounded d in s).
* matvec_blocks, both modes: within 1e-5 of the float64 twin relative to the row's sum of
  |terms|, and bit-identical to the twin's float32 emulation of the documented arithmetic
  (float mode: block by block into the row sum; int8 mode: ggml's AVX2 vec_dot, 8 or 32 FMA
  lanes and its horizontal sums, a row landing in `out` when its last block is in).
* Splitting a matrix into runs of whole blocks (random split points, mid-row starts, one block
  at a time, everything at once) gives a bit-identical `out`.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import kernels, quants
from formats.errors import BadInput

try:
    from tests import naive_kernels as naive
except ImportError:  # tests/ is not a package and only tests/ is on sys.path
    import naive_kernels as naive

F32 = np.float32
# the types whose kernels are formats/kernels.py's (the k-quants': tests/test_kquant_types.py)
TYPES = [t.name for t in quants.TYPES if t.ops is None]
MODES = [False, True]


def bits(a):
    return np.asarray(a, F32).view(np.uint32)


def buffers(n: int):
    """Preallocated activation buffers, a little larger than needed, filled with junk."""
    n_b = -(-n // 32)
    return (np.full(n + 5, 7.0, F32), np.full(n_b * 32 + 3, 99, np.int8),
            np.full(n_b + 2, 7.0, F32), np.full(n_b + 2, 7.0, F32))


def prepared(t, int8_mode, x):
    xf, xq, xd, xs = buffers(x.size)
    kernels.prepare_activation(t.id, int8_mode, x, xf, xq, xd, xs)
    return {"xf": xf, "xq": xq, "xd": xd, "xs": xs}


def activation(rng, n, scale=1.0):
    """Random values with a few special 32-blocks: all zero, exact .5 ties, -0.0, one spike."""
    x = (rng.standard_normal(n) * scale).astype(F32)
    if n >= 128:
        x[:32] = 0.0
        x[32:64] = np.arange(-16, 16) + F32(0.5)
        x[32] = F32(127.0)                            # amax 127 -> id 1: x*id = k + 0.5, ties
        x[96:128] = -0.0
        x[100] = F32(3e-3)
    return x


def matrix(rng, t, rows, cols, scale=1.0):
    w = (rng.standard_normal((rows, cols)) * scale).astype(F32)
    if rows > 1 and cols >= 32:
        w[1, :32] = 0.0                               # an all-zero block (d = 0)
    return np.ascontiguousarray(t.quantize(w).reshape(-1))


def run(t, int8_mode, buf, n_blocks, first, bpr, act, out):
    kernels.matvec_blocks(t.id, int8_mode, buf, n_blocks, first, bpr, act["xf"], act["xq"],
                          act["xd"], act["xs"], out)


def check_against_twins(t, int8_mode, buf, n_blocks, first, bpr, act, out0):
    out = out0.copy()
    run(t, int8_mode, buf, n_blocks, first, bpr, act, out)
    ref, scale = naive.matvec_reference(t.id, int8_mode, buf, n_blocks, first, bpr, act, out0)
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(err <= 1e-5 * scale + 1e-30), (err / np.maximum(scale, 1e-30)).max()
    emu = naive.matvec_float32(t.id, int8_mode, buf, n_blocks, first, bpr, act, out0)
    np.testing.assert_array_equal(bits(out), bits(emu))
    return out


# ---------------------------------------------------------------------------------------------
# prepare_activation

@pytest.mark.parametrize("int8_mode", MODES)
@pytest.mark.parametrize("name", TYPES)
def test_prepare_matches_twin(name, int8_mode):
    t = quants.by_name(name)
    rng = np.random.default_rng(11)
    for n, scale in ((256, 1.0), (64, 1e-3), (96, 3e4), (32, 1e-30)):
        x = activation(rng, n, scale)
        got = prepared(t, int8_mode, x)
        for key, want in naive.prepare(t.id, int8_mode, x).items():
            have = got[key][:want.size]
            if key == "xq":
                np.testing.assert_array_equal(have, want, err_msg=f"{key} n={n} scale={scale}")
            else:
                np.testing.assert_array_equal(bits(have), bits(want),
                                              err_msg=f"{key} n={n} scale={scale}")
            assert np.all(got[key][want.size:] == (99 if key == "xq" else 7.0))  # tail untouched


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_prepare_q8_random(data):
    n = 32 * data.draw(st.integers(1, 4))
    x = np.asarray(data.draw(st.lists(
        st.floats(-1e4, 1e4, width=32, allow_subnormal=True) | st.sampled_from([0.0, -0.0, 0.5]),
        min_size=n, max_size=n)), F32)
    for name in ("Q4_0", "Q5_1"):
        t = quants.by_name(name)
        got = prepared(t, True, x)
        for key, want in naive.prepare(t.id, True, x).items():
            np.testing.assert_array_equal(got[key][:want.size].view(np.uint8),
                                          want.view(np.uint8), err_msg=key)


def test_q8_rounds_half_to_even_with_fp16_scale():
    x = np.zeros(32, F32)
    x[:6] = [127.0, 2.5, -2.5, 3.5, 0.5, -0.5]        # amax 127 -> id = 1 exactly
    got = prepared(quants.by_name("Q4_1"), True, x)
    assert got["xq"][:6].tolist() == [127, 2, -2, 4, 0, 0]     # roundf would give 3, -3, 1, -1
    assert got["xd"][0] == F32(1.0)
    assert got["xs"][0] == F32(131.0)                  # fp16(1.0 * (127 + 2 - 2 + 4))
    # d = amax/127 is rounded to fp16 for xd, but s = fp16(d * sum) uses the unrounded d
    x = np.zeros(32, F32)
    x[0], x[1] = F32(1.0), F32(8.0) / F32(127.0)     # q = 127, 8: sum 135
    got = prepared(quants.by_name("Q5_1"), True, x)
    assert got["xq"][:3].tolist() == [127, 8, 0]
    d = F32(1.0) / F32(127.0)
    assert got["xd"][0] == F32(np.float16(d))
    assert got["xs"][0] == F32(np.float16(d * F32(135))) == F32(1.0634766)
    assert F32(np.float16(F32(np.float16(d)) * F32(135))) == F32(1.0625)   # not this


def test_q8_subnormal_amax_overflowing_inverse():
    """127/amax = inf: x*inf -> cvtps2dq's INT32_MIN -> -128, 0*inf = NaN -> -128."""
    x = np.zeros(32, F32)
    x[3] = F32(1e-45)
    got = prepared(quants.by_name("Q4_1"), True, x)
    want = naive.prepare(3, True, x)
    np.testing.assert_array_equal(got["xq"][:32], want["xq"])
    assert np.all(got["xq"][:32] == -128)
    np.testing.assert_array_equal(bits(got["xs"][:1]), bits(want["xs"]))


# ---------------------------------------------------------------------------------------------
# matvec_blocks against the twins

@pytest.mark.parametrize("int8_mode", MODES)
@pytest.mark.parametrize("name", TYPES)
def test_matvec_whole_matrix(name, int8_mode):
    t = quants.by_name(name)
    rng = np.random.default_rng(5)
    rows, cols = 9, 256
    buf = matrix(rng, t, rows, cols)
    act = prepared(t, int8_mode, activation(rng, cols))
    bpr = cols // t.block_size
    check_against_twins(t, int8_mode, buf, rows * bpr, 0, bpr, act, np.zeros(rows, F32))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(TYPES), int8_mode=st.booleans(), rows=st.integers(1, 5),
       bpr=st.integers(1, 6), wscale=st.sampled_from([1.0, 1e-3, 50.0]),
       xscale=st.sampled_from([1.0, 1e-4, 1e3]), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_matvec_random_runs(name, int8_mode, rows, bpr, wscale, xscale, seed, data):
    """Random shapes and values, a random run (possibly starting mid-row) added to a random
    starting `out`."""
    t = quants.by_name(name)
    rng = np.random.default_rng(seed)
    cols = bpr * 32 if t.is_block else data.draw(st.integers(1, 70))
    per_row = cols // t.block_size
    buf = matrix(rng, t, rows, cols, wscale)
    act = prepared(t, int8_mode, (rng.standard_normal(cols) * xscale).astype(F32))
    total = rows * per_row
    first = data.draw(st.integers(0, total - 1))
    n = data.draw(st.integers(1, total - first))
    bb = t.block_bytes
    out0 = (rng.standard_normal(rows) * wscale * xscale).astype(F32)
    if not naive.lanes_mode(t.id, int8_mode):
        check_against_twins(t, int8_mode, buf[first * bb:(first + n) * bb], n, first, per_row,
                            act, out0)
        return
    # int8 mode: a row's lanes carry over between runs, so a run may start mid-row only right
    # after the run before it; feed the row's start first, then the run
    start = first - first % per_row
    out = out0.copy()
    run(t, int8_mode, buf[start * bb:first * bb], first - start, start, per_row, act, out)
    run(t, int8_mode, buf[first * bb:(first + n) * bb], n, first, per_row, act, out)
    whole = check_against_twins(t, int8_mode, buf[start * bb:(first + n) * bb], first + n - start,
                                start, per_row, act, out0)
    np.testing.assert_array_equal(bits(out), bits(whole))


@pytest.mark.parametrize("int8_mode", MODES)
@pytest.mark.parametrize("name", TYPES)
def test_any_split_gives_identical_out(name, int8_mode):
    """Streaming through a chunk buffer (runs of whole blocks, random split points) gives the
    very bits of a single call over the whole matrix."""
    t = quants.by_name(name)
    rng = np.random.default_rng(23)
    rows, cols = 7, 160 if t.is_block else 37
    buf = matrix(rng, t, rows, cols)
    act = prepared(t, int8_mode, activation(rng, cols))
    bpr = cols // t.block_size
    total = rows * bpr
    bb = t.block_bytes
    whole = np.zeros(rows, F32)
    run(t, int8_mode, buf, total, 0, bpr, act, whole)

    chunk = np.full(13 * bb, 0xA5, np.uint8)      # the simulator's reused buffer, stale tail
    splits = [np.arange(1, total)]                 # one block at a time
    splits += [np.sort(rng.choice(np.arange(1, total), size=k, replace=False))
               for k in (1, 3, 9, total // 2)]
    splits += [np.arange(bpr, total, bpr),        # row by row
               np.arange(13, total, 13)]          # full chunks
    for cuts in splits:
        out = np.zeros(rows, F32)
        edges = [0, *cuts.tolist(), total]
        for a, b in zip(edges[:-1], edges[1:]):
            if b - a <= 13:
                view = chunk[:(b - a) * bb]
                view[:] = buf[a * bb:b * bb]
            else:
                view = buf[a * bb:b * bb]
            run(t, int8_mode, view, b - a, a, bpr, act, out)
        np.testing.assert_array_equal(bits(out), bits(whole), err_msg=str(edges))


def test_q4_1_uses_min_and_q8_1_sum():
    """A hand-checked Q4_1 block: every weight 1 (d = 0, m = 1) dotted with x gives m*s."""
    block = np.zeros(20, np.uint8)
    block[2:4] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)     # m = 1, d = 0
    x = np.arange(32, dtype=F32)                                        # amax 31
    t = quants.by_name("Q4_1")
    act = prepared(t, True, x)
    out = np.zeros(1, F32)
    run(t, True, block, 1, 0, 1, act, out)
    assert out[0] == act["xs"][0]
    assert abs(out[0] - x.sum()) < 0.5
    out = np.zeros(1, F32)
    run(t, False, block, 1, 0, 1, prepared(t, False, x), out)
    assert out[0] == x.sum()


def test_int8_lanes_accumulate_with_fma():
    """Two Q8_0 blocks whose only nonzero lane is lane 0 (elements 0..3): ggml's AVX2 dot gives
    fma(d2, lane2, d1*lane1); rounding each block's d*sumi and adding them (ggml's scalar
    generic code) gives a different float32."""
    halves = np.array([14379, 12283, 14597, 14907], np.uint16).view(np.float16)
    dw1, dx1, dw2, dx2 = halves
    blocks = np.zeros(2 * 34, np.uint8)
    xf, xq, xd, xs = buffers(64)
    xq[:64] = 0
    for b, (dw, qw, qx) in enumerate([(dw1, [127, 127, 8, 0], [127, 49, 7, 0]),      # 22408
                                      (dw2, [127, 127, 127, 83], [127, 127, 38, 1])]):  # 37167
        blocks[34 * b:34 * b + 2] = np.frombuffer(dw.tobytes(), np.uint8)
        blocks[34 * b + 2:34 * b + 6] = np.array(qw, np.int8).view(np.uint8)
        xq[32 * b:32 * b + 4] = qx
    xd[:2] = [dx1, dx2]
    d1, d2 = F32(dw1) * F32(dx1), F32(dw2) * F32(dx2)
    fused = naive.fma32(d2, F32(37167), d1 * F32(22408))
    separate = F32(d1 * F32(22408)) + F32(d2 * F32(37167))
    assert fused != separate
    out = np.zeros(1, F32)
    kernels.matvec_blocks(8, True, blocks, 2, 0, 2, xf, xq, xd, xs, out)
    assert out[0] == fused


def test_twin_fma32_rounds_once():
    """The twin's FMA against exact rationals, including sums that land exactly halfway
    between two float32s in float64 (where rounding twice would go wrong)."""
    from fractions import Fraction

    def exact(a, b, c):
        v = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
        f = F32(float(v))
        near = [np.nextafter(f, F32(-np.inf)), f, np.nextafter(f, F32(np.inf))]
        return min(near, key=lambda y: (abs(Fraction(float(y)) - v), int(bits(y)) & 1))

    a = F32(1 + 2.0**-15)
    cases = [(a, F32(2.0**-24 * (1 - 2.0**-15)), F32(1 + 2.0**-23)),          # halfway, down
             (a, F32(-2.0**-24 * (1 - 2.0**-15)), F32(1 + 3 * 2.0**-23))]     # halfway, up
    for x, y, z in cases:
        assert naive.fma32(x, y, z) == exact(x, y, z) == z
        assert F32(np.float64(x) * np.float64(y) + np.float64(z)) != z      # double rounding
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2, 300)).astype(F32)
    z = (rng.standard_normal(300) * 10.0 ** rng.integers(-8, 8, 300)).astype(F32)
    z[:100] = -(x[:100].astype(np.float64) * y[:100]).astype(F32)            # cancellation
    got = naive.fma32(x, y, z)
    assert all(got[i] == exact(x[i], y[i], z[i]) for i in range(300))


def test_int8_runs_must_continue_their_row():
    t = quants.by_name("Q4_0")
    rng = np.random.default_rng(8)
    buf = matrix(rng, t, 3, 128)
    act = prepared(t, True, activation(rng, 128))
    whole = np.zeros(3, F32)
    run(t, True, buf, 12, 0, 4, act, whole)
    bb = t.block_bytes
    out = np.zeros(3, F32)
    with pytest.raises(BadInput, match="middle of row"):
        run(t, True, buf[2 * bb:], 3, 2, 4, act, out)           # nothing before it
    run(t, True, buf, 2, 0, 4, act, out)
    with pytest.raises(BadInput, match="middle of row"):
        run(t, True, buf[3 * bb:], 3, 3, 4, act, out)           # skips a block
    with pytest.raises(BadInput, match="middle of row"):
        run(t, True, buf[2 * bb:], 3, 2, 4, act, np.zeros(3, F32))   # another out
    run(t, True, buf[2 * bb:], 10, 2, 4, act, out)
    np.testing.assert_array_equal(bits(out), bits(whole))
    # float mode never carries anything between runs
    out = np.zeros(3, F32)
    run(t, False, buf[2 * bb:], 3, 2, 4, prepared(t, False, activation(rng, 128)), out)


def test_two_matrices_interleaved_with_their_own_row_state():
    """Callers that interleave matrices (or threads) pass a row_state each."""
    rng = np.random.default_rng(9)
    outs, states, jobs = [], [], []
    for name in ("Q5_1", "F16"):
        t = quants.by_name(name)
        cols = 96
        buf = matrix(rng, t, 4, cols)
        act = prepared(t, True, activation(rng, cols))
        bpr = cols // t.block_size
        whole = np.zeros(4, F32)
        run(t, True, buf, 4 * bpr, 0, bpr, act, whole)
        jobs.append((t, buf, act, bpr, whole))
        outs.append(np.zeros(4, F32))
        states.append(np.zeros(kernels.ROW_STATE_SIZE))
    step = [5, 50]
    pos = [0, 0]
    while any(p < 4 * j[3] for p, j in zip(pos, jobs)):
        for i, (t, buf, act, bpr, _) in enumerate(jobs):
            n = min(step[i], 4 * bpr - pos[i])
            if n:
                bb = t.block_bytes
                kernels.matvec_blocks(t.id, True, buf[pos[i] * bb:(pos[i] + n) * bb], n, pos[i],
                                      bpr, act["xf"], act["xq"], act["xd"], act["xs"], outs[i],
                                      row_state=states[i])
                pos[i] += n
    for out, job in zip(outs, jobs):
        np.testing.assert_array_equal(bits(out), bits(job[4]))


def test_larger_matrix_both_modes():
    """A 64 x 1024 matrix per block type: int8 mode stays within the activation rounding of
    float mode (a sanity check of the scales), float mode matches float64."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1024).astype(F32)
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        t = quants.by_name(name)
        buf = matrix(rng, t, 64, 1024)
        outs = []
        for int8_mode in MODES:
            outs.append(check_against_twins(t, int8_mode, buf, 64 * 32, 0, 32,
                                            prepared(t, int8_mode, x), np.zeros(64, F32)))
        w = t.dequantize(buf, (64, 1024)).astype(np.float64)
        assert np.abs(outs[1] - outs[0]).max() < 0.02 * (np.abs(w) @ np.abs(x)).max()


# ---------------------------------------------------------------------------------------------
# dequantize_into

@pytest.mark.parametrize("name", TYPES)
def test_dequantize_into_matches_table(name):
    t = quants.by_name(name)
    rng = np.random.default_rng(2)
    buf = matrix(rng, t, 3, 96)
    out = np.full(3 * 96 + 7, 5.0, F32)
    kernels.dequantize_into(t.id, buf, out)
    np.testing.assert_array_equal(bits(out[:288]), bits(t.dequantize(buf, (288,))))
    assert np.all(out[288:] == 5.0)
    ro = buf.copy()
    ro.flags.writeable = False                                          # a read-only buffer
    kernels.dequantize_into(t.id, ro[t.block_bytes:], out[t.block_size:288])
    np.testing.assert_array_equal(bits(out[:288]), bits(t.dequantize(buf, (288,))))


# ---------------------------------------------------------------------------------------------
# validation: BadInput, and no recompiles

def test_kernel_type_table_matches_quants():
    assert kernels._DOT_TYPES == {t.id: (t.name, t.block_size, t.block_bytes)
                                  for t in quants.TYPES if t.ops is None}


def test_wrappers_validate():
    t = quants.by_name("Q4_1")
    rng = np.random.default_rng(0)
    buf = matrix(rng, t, 2, 64)
    x = rng.standard_normal(64).astype(F32)
    xf, xq, xd, xs = buffers(64)
    kernels.prepare_activation(t.id, True, x, xf, xq, xd, xs)
    out = np.zeros(2, F32)

    def mv(**kw):
        args = dict(type_id=t.id, int8_mode=True, buf=buf, n_blocks=4, first_block=0,
                    blocks_per_row=2, xf=xf, xq=xq, xd=xd, xs=xs, out=out)
        args.update(kw)
        kernels.matvec_blocks(**args)

    mv()
    bad = [dict(type_id=4), dict(n_blocks=-1), dict(first_block=-1), dict(blocks_per_row=0),
           dict(n_blocks=5), dict(first_block=1), dict(out=np.zeros(1, F32)),
           dict(blocks_per_row=4, n_blocks=4), dict(xd=np.zeros(1, F32)),
           dict(xs=np.zeros(1, F32)), dict(xq=np.zeros(32, np.int8)),
           dict(int8_mode=False, xf=np.zeros(32, F32)),
           dict(xf=xf.astype(np.float64)), dict(buf=buf.astype(np.int8)),
           dict(out=np.zeros(4, F32)[::2]), dict(buf=bytes(buf)), dict(out=out.reshape(1, 2))]
    ro = np.zeros(2, F32)
    ro.flags.writeable = False
    bad += [dict(out=ro), dict(row_state=np.zeros(kernels.ROW_STATE_SIZE - 1)),
            dict(row_state=np.zeros(kernels.ROW_STATE_SIZE, F32))]
    for kw in bad:
        with pytest.raises(BadInput):
            mv(**kw)

    for args in [(4, True, x, xf, xq, xd, xs), (t.id, True, x[:40], xf, xq, xd, xs),
                 (t.id, True, x, xf, xq[:32], xd, xs), (t.id, True, x, xf, xq, xd[:1], xs),
                 (t.id, True, x, xf, xq, xd, xs[:1]), (t.id, False, x, xf[:63], xq, xd, xs),
                 (t.id, True, x.astype(np.float64), xf, xq, xd, xs),
                 (t.id, True, x, xf, xq.view(np.uint8), xd, xs),
                 (0, False, x, xf[:63], xq, xd, xs)]:
        with pytest.raises(BadInput):
            kernels.prepare_activation(*args)
    kernels.prepare_activation(0, True, x[:37], xf, xq, xd, xs)        # any n for F32

    for args in [(99, buf, np.zeros(64, F32)), (t.id, buf[:-1], np.zeros(64, F32)),
                 (t.id, buf, np.zeros(63, F32)), (t.id, buf, np.zeros(64, np.float64))]:
        with pytest.raises(BadInput):
            kernels.dequantize_into(*args)


def test_one_compiled_version_each():
    """Writable and read-only inputs, slices, numpy scalars: all dispatch to the one compiled
    signature per kernel (no silent recompiles per call site)."""
    t = quants.by_name("Q8_0")
    rng = np.random.default_rng(0)
    buf = matrix(rng, t, 2, 64)
    x = rng.standard_normal(64).astype(F32)
    xf, xq, xd, xs = buffers(64)
    kernels.prepare_activation(np.int64(t.id), np.bool_(True), x[:], xf, xq, xd, xs)
    ro = buf.copy()
    ro.flags.writeable = False
    out = np.zeros(2, F32)
    for b in (buf, ro, buf[:], ro[:]):
        kernels.matvec_blocks(t.id, 1, b, np.int32(4), 0, 2, xf, xq, xd, xs, out)
    for fn in (kernels._matvec_kernel, kernels._prepare_kernel):
        assert len(fn.signatures) == 1, fn.signatures
