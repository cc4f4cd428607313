"""The k-quants Q2_K..Q6_K as types of the table: the board's dot kernels (formats/kquant_dot.py),
the table entries and their fallbacks (host/plan.py), and whole models converted, validated,
inspected and run on the simulator.

Oracles:
* int8 mode: a numpy transcription, written here from ggml's reference C (ggml-cpu/quants.c:
  `quantize_row_q8_K_ref`, `ggml_vec_dot_q{2,3,4,5,6}_K_q8_K_generic`, loops and bit masks as
  in C), bit for bit; and ggml's whole-row float order within float32 rounding;
* float mode: gguf-py's dequantizers and a float64 dot (1e-5 of the sum of |products|), and the
  documented float32 order bit for bit;
* models: tests/reference_forward.py on the weights dequantized from the stream's own bytes,
  which must be exactly the table's quantizer's.
(gguf-py dequantizing our blocks bit for bit is tests/test_kquants.py.)
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import fp32_model, run_cli
from firmware_sim.board import Board
from firmware_sim.profiles import get_profile
from firmware_sim.sources import BytesSource, FileSource
from formats import kquant_dot, quants
from formats.arch import RwkvVersion
from formats.errors import BadInput
from host import inspect_cmd, plan_cmd
from host.convert import convert
from host.model import Model, load_model
from host.plan import fallback_notes, make_plan, stream_fallbacks
from host.stream import VirtualStream
from host.stream.reader import StreamFile, validate
from host.stream.writer import write_stream
from host.synth import SyntheticCheckpoint, synth_hparams
from reference_forward import ReferenceRWKV

F32 = np.float32
KTYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
MODES = [False, True]


def bits(a):
    return np.asarray(a, F32).view(np.uint32)


# ---------------------------------------------------------------------------------------------
# ggml's reference C, transcribed

def nearest_int(f):
    """ggml's nearest_int on float32 values: the bits of f + 1.5 * 2**23."""
    v = (np.asarray(f, F32) + F32(12582912.0)).astype(F32)
    return (v.view(np.int32).astype(np.int64) & 0x007FFFFF) - 0x00400000


def quantize_row_q8_K_ref(x):
    """-> (qs int8[n], d float32[n / 256], bsums int64[n / 256, 16])"""
    xb = np.asarray(x, F32).reshape(-1, 256)
    qs = np.zeros(xb.shape, np.int64)
    d = np.zeros(len(xb), F32)
    bsums = np.zeros((len(xb), 16), np.int64)
    for i, blk in enumerate(xb):
        ax = np.abs(blk)
        j = int(np.argmax(ax))                     # the first of the largest |x|
        if not ax[j]:
            continue                               # d = 0, qs = 0 (bsums are not written)
        iscale = F32(-127.0) / blk[j]
        qs[i] = np.minimum(127, nearest_int(iscale * blk))
        bsums[i] = qs[i].reshape(16, 16).sum(axis=1)
        d[i] = F32(1.0) / iscale
    return qs.reshape(-1).astype(np.int8), d, bsums


def f16(b, o):
    return F32(np.frombuffer(np.asarray(b[o:o + 2], np.uint8).tobytes(), "<f2")[0])


def u32s(b, o, n):
    return [int(v) for v in np.frombuffer(np.asarray(b[o:o + 4 * n], np.uint8).tobytes(),
                                          "<u4")]


def vec_dot_parts(name, x, q8, yd, bsums):
    """One super-block x (uint8 bytes) against one block_q8_K: the integers and scales ggml's
    ggml_vec_dot_<name>_q8_K_generic computes for it."""
    x = np.asarray(x, np.uint8).astype(np.int64)
    q8 = np.asarray(q8, np.int64)
    if name == "Q2_K":
        sc, q2 = x[0:16], x[16:80]
        summs = int(sum(int(bsums[j]) * int(sc[j] >> 4) for j in range(16)))
        dall = yd * f16(x, 80)
        dmin = yd * f16(x, 82)
        isum = 0
        is_ = 0
        q8o = 0
        q2o = 0
        for _k in range(2):
            shift = 0
            for _j in range(4):
                d = int(sc[is_] & 0xF)
                is_ += 1
                isuml = int(np.sum(q8[q8o:q8o + 16] * ((q2[q2o:q2o + 16] >> shift) & 3)))
                isum += d * isuml
                d = int(sc[is_] & 0xF)
                is_ += 1
                isuml = int(np.sum(q8[q8o + 16:q8o + 32] * ((q2[q2o + 16:q2o + 32] >> shift) & 3)))
                isum += d * isuml
                shift += 2
                q8o += 32
            q2o += 32
        return dict(isum=isum, summs=summs, dall=dall, dmin=dmin)

    aux8 = np.zeros(256, np.int64)
    sumi = None
    dmin = None
    if name == "Q3_K":
        hm, q3 = x[0:32], x[32:96]
        a = 0
        m = 1
        q3o = 0
        for _j in range(2):
            for shift in (0, 2, 4, 6):
                aux8[a:a + 32] = (q3[q3o:q3o + 32] >> shift) & 3
                aux8[a:a + 32] -= np.where(hm & m, 0, 4)
                a += 32
                m <<= 1
            q3o += 32
        kmask1, kmask2 = 0x03030303, 0x0F0F0F0F
        auxs = u32s(x, 96, 3) + [0]
        tmp = auxs[2]
        auxs[2] = ((auxs[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4)
        auxs[3] = ((auxs[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4)
        auxs[0] = (auxs[0] & kmask2) | (((tmp >> 0) & kmask1) << 4)
        auxs[1] = (auxs[1] & kmask2) | (((tmp >> 2) & kmask1) << 4)
        scales = np.array(auxs, "<u4").view(np.int8).astype(np.int64) - 32
        group = 16
        d = f16(x, 108) * yd
    elif name == "Q6_K":
        ql, qh = x[0:128], x[128:192]
        for h in range(2):
            q4, qq = ql[64 * h:64 * h + 64], qh[32 * h:32 * h + 32]
            a = 128 * h
            for ll in range(32):
                aux8[a + ll] = ((q4[ll] & 0xF) | (((qq[ll] >> 0) & 3) << 4)) - 32
                aux8[a + ll + 32] = ((q4[ll + 32] & 0xF) | (((qq[ll] >> 2) & 3) << 4)) - 32
                aux8[a + ll + 64] = ((q4[ll] >> 4) | (((qq[ll] >> 4) & 3) << 4)) - 32
                aux8[a + ll + 96] = ((q4[ll + 32] >> 4) | (((qq[ll] >> 6) & 3) << 4)) - 32
        scales = x[192:208].astype(np.uint8).view(np.int8).astype(np.int64)
        group = 16
        d = f16(x, 208) * yd
    else:                                           # Q4_K, Q5_K
        five = name == "Q5_K"
        q4 = x[48:176] if five else x[16:144]
        hm = x[16:48]
        m = 1
        for j in range(4):
            aux8[64 * j:64 * j + 32] = q4[32 * j:32 * j + 32] & 0xF
            if five:
                aux8[64 * j:64 * j + 32] += np.where(hm & m, 16, 0)
                m <<= 1
            aux8[64 * j + 32:64 * j + 64] = q4[32 * j:32 * j + 32] >> 4
            if five:
                aux8[64 * j + 32:64 * j + 64] += np.where(hm & m, 16, 0)
                m <<= 1
        kmask1, kmask2, kmask3 = 0x3F3F3F3F, 0x0F0F0F0F, 0x03030303
        utmp = u32s(x, 4, 3) + [0]
        utmp[3] = ((utmp[2] >> 4) & kmask2) | (((utmp[1] >> 6) & kmask3) << 4)
        uaux = utmp[1] & kmask1
        utmp[1] = (utmp[2] & kmask2) | (((utmp[0] >> 6) & kmask3) << 4)
        utmp[2] = uaux
        utmp[0] &= kmask1
        sm = np.array(utmp, "<u4").view(np.uint8).astype(np.int64)
        scales, mins = sm[0:8], sm[8:16]
        sumi = int(sum(int(bsums[j]) * int(mins[j // 2]) for j in range(16)))
        group = 32
        d = f16(x, 0) * yd
        dmin = f16(x, 2) * yd
    aux32 = np.zeros(8, np.int64)
    for j in range(256 // group):
        for k in range(group // 8):
            e = group * j + 8 * k
            aux16 = q8[e:e + 8] * aux8[e:e + 8]
            aux32 += int(scales[j]) * aux16
    return dict(aux32=aux32, d=F32(d), sumi=sumi, dmin=dmin)


def block_value(name, p):
    """A block's value as kquant_dot documents it (ggml's result for a one-block row)."""
    if name == "Q2_K":
        return F32(F32(p["dall"] * F32(p["isum"])) - F32(p["dmin"] * F32(p["summs"])))
    v = F32(0.0)
    if p["sumi"] is not None:
        v = F32(v - F32(p["dmin"] * F32(p["sumi"])))
    for lane in p["aux32"]:
        v = F32(v + F32(p["d"] * F32(lane)))
    return v


def ggml_row(name, parts):
    """ggml's float order for a whole row (lane sums kept across blocks)."""
    sumf = F32(0.0)
    sums = np.zeros(8, F32)
    for p in parts:
        if name == "Q2_K":
            sumf = F32(sumf + block_value(name, p))
            continue
        sums = (sums + (p["d"] * p["aux32"].astype(F32)).astype(F32)).astype(F32)
        if p["sumi"] is not None:
            sumf = F32(sumf - F32(p["dmin"] * F32(p["sumi"])))
    if name != "Q2_K":
        for lane in sums:
            sumf = F32(sumf + lane)
    return sumf


def int8_reference(name, buf, rows, bpr, x):
    """(out built block by block as documented, ggml's whole-row values)"""
    qs, d, bsums = quantize_row_q8_K_ref(x)
    bb = quants.by_name(name).block_bytes
    blocks = np.asarray(buf).reshape(rows, bpr, bb)
    out = np.zeros(rows, F32)
    ggml = np.zeros(rows, F32)
    for r in range(rows):
        parts = [vec_dot_parts(name, blocks[r, c], qs[256 * c:256 * c + 256], d[c], bsums[c])
                 for c in range(bpr)]
        for p in parts:
            out[r] = F32(out[r] + block_value(name, p))
        ggml[r] = ggml_row(name, parts)
    return out, ggml


def float_reference(t, buf, rows, bpr, x):
    """(the documented float32 order on the table's dequantized weights, float64 dot of gguf's
    dequantized weights, sum of |products|)"""
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType
    n = 256 * bpr
    w = t.dequantize(buf, (rows, n))
    with np.errstate(all="ignore"):
        wg = np.asarray(gguf_quants.dequantize(np.asarray(buf), GGMLQuantizationType[t.name]),
                        F32).reshape(rows, n)
    np.testing.assert_array_equal(bits(w), bits(wg))
    out = np.zeros(rows, F32)
    for r in range(rows):
        for c in range(bpr):
            p = (w[r, 256 * c:256 * c + 256] * x[256 * c:256 * c + 256]).astype(F32).reshape(32, 8)
            lanes = np.zeros(8, F32)
            for row in p:
                lanes = (lanes + row).astype(F32)
            v = F32(F32(F32(lanes[0] + lanes[4]) + F32(lanes[2] + lanes[6]))
                    + F32(F32(lanes[1] + lanes[5]) + F32(lanes[3] + lanes[7])))
            out[r] = F32(out[r] + v)
    prod = wg.astype(np.float64) * x.astype(np.float64)
    return out, prod.sum(axis=1), np.abs(prod).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# the kernels

def buffers(n, junk=True):
    fill = 7.0 if junk else 0.0
    return (np.full(n + 3, fill, F32), np.full(n + 5, 99 if junk else 0, np.int8),
            np.full(n // 32 + 2, fill, F32), np.full(n // 32 + 2, fill, F32))


def prepare(t, int8_mode, x):
    xf, xq, xd, xs = buffers(x.size)
    t.prepare_activation(int8_mode, x, xf, xq, xd, xs)
    return xf, xq, xd, xs


def weights(rng, rows, cols, scale=1.0):
    w = (rng.standard_normal((rows, cols)) * scale).astype(F32)
    if rows > 1:
        w[1, :256] = 0.0                            # an all-zero super-block
    if rows > 2:
        w[2, 256:] = np.abs(w[2, 256:])             # all positive (Q4_K/Q5_K min 0)
    return w


def activation(rng, n):
    x = rng.standard_normal(n).astype(F32)
    x[256:512] = 0.0 if n >= 512 else x[256:512]  # an all-zero activation block (d = 0)
    return x


@pytest.mark.parametrize("name", KTYPES)
def test_prepare_int8_is_quantize_row_q8_K_ref(name):
    t = quants.by_name(name)
    rng = np.random.default_rng(1)
    x = activation(rng, 1024)
    x[5] = F32(-4.5)                                # a negative max: d < 0
    x[600] = F32(0.5)
    xf, xq, xd, xs = prepare(t, True, x)
    qs, d, bsums = quantize_row_q8_K_ref(x)
    np.testing.assert_array_equal(xq[:1024], qs)
    np.testing.assert_array_equal(bits(xd[:4]), bits(d))
    np.testing.assert_array_equal(xs[:32], bsums.reshape(-1, 2).sum(axis=1))
    assert xd[0] > 0 and xd[1] == 0 and np.all(xq[256:512] == 0)
    assert np.all(xq[1024:] == 99) and np.all(xd[4:] == 7.0)        # nothing past n
    xf, _, _, _ = prepare(t, False, x)
    np.testing.assert_array_equal(bits(xf[:1024]), bits(x))


@pytest.mark.parametrize("int8_mode", MODES)
@pytest.mark.parametrize("name", KTYPES)
def test_matvec_matches_references(name, int8_mode):
    t = quants.by_name(name)
    rng = np.random.default_rng(2)
    rows, bpr = 5, 3
    buf = t.quantize(weights(rng, rows, 256 * bpr)).reshape(-1)
    x = activation(rng, 256 * bpr)
    xf, xq, xd, xs = prepare(t, int8_mode, x)
    out = np.zeros(rows, F32)
    t.matvec_blocks(int8_mode, buf, rows * bpr, 0, bpr, xf, xq, xd, xs, out)
    if int8_mode:
        want, ggml = int8_reference(name, buf, rows, bpr, x)
        np.testing.assert_array_equal(bits(out), bits(want))
        # ggml's whole-row order differs only by float32 rounding
        qs, d, _ = quantize_row_q8_K_ref(x)
        xq64 = (qs.astype(np.float64).reshape(-1, 256) * d[:, None]).reshape(-1)
        w = t.dequantize(buf, (rows, 256 * bpr)).astype(np.float64)
        scale = np.abs(w * xq64).sum(axis=1)
        assert np.all(np.abs(out - ggml.astype(np.float64)) <= 1e-6 * scale)
        # and the integer dot is the float dot of the dequantized weights and activation
        assert np.all(np.abs(out - w @ xq64) <= 1e-5 * scale)
    else:
        want, exact, scale = float_reference(t, buf, rows, bpr, x)
        np.testing.assert_array_equal(bits(out), bits(want))
        assert np.all(np.abs(out - exact) <= 1e-5 * scale)


@pytest.mark.parametrize("int8_mode", MODES)
@pytest.mark.parametrize("name", KTYPES)
def test_any_split_gives_identical_out(name, int8_mode):
    t = quants.by_name(name)
    rng = np.random.default_rng(4)
    rows, bpr = 4, 3
    buf = t.quantize(weights(rng, rows, 256 * bpr)).reshape(-1)
    x = activation(rng, 256 * bpr)
    act = prepare(t, int8_mode, x)
    whole = np.full(rows, 0.25, F32)                 # out is added to, not overwritten
    t.matvec_blocks(int8_mode, buf, rows * bpr, 0, bpr, *act, whole)
    bb = t.block_bytes
    for cuts in ([1] * 12, [2, 5, 1, 4], [7, 5], [3, 3, 3, 3]):
        out = np.full(rows, 0.25, F32)
        first = 0
        for n in cuts:
            run = buf[first * bb:(first + n) * bb].copy()
            run.flags.writeable = False              # as a memory-mapped stream gives it
            t.matvec_blocks(int8_mode, run, n, first, bpr, *act, out, np.zeros(40))
            first += n
        np.testing.assert_array_equal(bits(out), bits(whole))


@pytest.mark.parametrize("name", KTYPES)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 3), bpr=st.integers(1, 2),
       wscale=st.sampled_from([1e-3, 1.0, 300.0]), int8_mode=st.booleans())
def test_matvec_random(name, seed, rows, bpr, wscale, int8_mode):
    t = quants.by_name(name)
    rng = np.random.default_rng(seed)
    buf = t.quantize((rng.standard_normal((rows, 256 * bpr)) * wscale).astype(F32)).reshape(-1)
    x = (rng.standard_normal(256 * bpr) * rng.choice([1e-2, 1.0, 50.0])).astype(F32)
    act = prepare(t, int8_mode, x)
    out = np.zeros(rows, F32)
    t.matvec_blocks(int8_mode, buf, rows * bpr, 0, bpr, *act, out)
    want = int8_reference(name, buf, rows, bpr, x)[0] if int8_mode \
        else float_reference(t, buf, rows, bpr, x)[0]
    np.testing.assert_array_equal(bits(out), bits(want))


@pytest.mark.parametrize("name", KTYPES)
def test_dequantize_into_matches_table(name):
    t = quants.by_name(name)
    buf = t.quantize(weights(np.random.default_rng(5), 3, 512)).reshape(-1)
    out = np.full(3 * 512 + 7, 5.0, F32)
    t.dequantize_into(buf, out)
    np.testing.assert_array_equal(bits(out[:1536]), bits(t.dequantize(buf, (1536,))))
    assert np.all(out[1536:] == 5.0)
    ro = buf.copy()
    ro.flags.writeable = False
    t.dequantize_into(ro[t.block_bytes:], out[256:1536])
    np.testing.assert_array_equal(bits(out[:1536]), bits(t.dequantize(buf, (1536,))))


def test_wrappers_validate():
    t = quants.by_name("Q4_K")
    rng = np.random.default_rng(0)
    buf = t.quantize(weights(rng, 2, 512)).reshape(-1)
    x = rng.standard_normal(512).astype(F32)
    xf, xq, xd, xs = buffers(512)
    out = np.zeros(2, F32)

    def mv(**kw):
        args = dict(type_id=t.id, int8_mode=True, buf=buf, n_blocks=4, first_block=0,
                    blocks_per_row=2, xf=xf, xq=xq, xd=xd, xs=xs, out=out)
        args.update(kw)
        kquant_dot.matvec_blocks(**args)

    kquant_dot.prepare_activation(t.id, True, x, xf, xq, xd, xs)
    mv()
    ro = np.zeros(2, F32)
    ro.flags.writeable = False
    bad = [dict(type_id=2), dict(n_blocks=-1), dict(first_block=-1), dict(blocks_per_row=0),
           dict(n_blocks=5), dict(first_block=1), dict(out=np.zeros(1, F32)),
           dict(xd=np.zeros(1, F32)), dict(xs=np.zeros(3, F32)), dict(xq=np.zeros(256, np.int8)),
           dict(int8_mode=False, xf=np.zeros(256, F32)), dict(xf=xf.astype(np.float64)),
           dict(buf=buf.astype(np.int8)), dict(out=np.zeros(4, F32)[::2]), dict(buf=bytes(buf)),
           dict(out=out.reshape(1, 2)), dict(out=ro)]
    for kw in bad:
        with pytest.raises(BadInput, match="matvec"):
            mv(**kw)
    for args in [(t.id, True, x[:300], xf, xq, xd, xs), (t.id, True, x, xf, xq, xd[:1], xs),
                 (t.id, True, x, xf, xq[:256], xd, xs), (t.id, False, x, xf[:256], xq, xd, xs),
                 (t.id, True, x, xf, xq, xd, xs[:8]), (t.id, True, x.astype(np.float64), xf,
                                                       xq, xd, xs), (99, True, x, xf, xq, xd, xs)]:
        with pytest.raises(BadInput, match="prepare_activation"):
            kquant_dot.prepare_activation(*args)
    for args in [(t.id, buf[:100], np.zeros(512, F32)), (t.id, buf, np.zeros(1000, F32)),
                 (t.id, buf, np.zeros(1024, np.float64)), (3, buf, np.zeros(1024, F32))]:
        with pytest.raises(BadInput, match="dequantize_into"):
            kquant_dot.dequantize_into(*args)


# ---------------------------------------------------------------------------------------------
# the table and the plan

def test_table_entries():
    for name, id_, bb in zip(KTYPES, range(10, 15), (84, 110, 144, 176, 210)):
        t = quants.by_name(name)
        assert (t.id, t.rwkv_cpp, t.block_size, t.block_bytes, t.largest_block) == \
            (id_, None, 256, bb, bb)
        assert quants.by_id(id_) is t and quants.by_name(name.lower()) is t
        assert t.fallback == FALLBACK[name] and quants.by_name(t.fallback).block_size == 32
        assert t.fits(512) and not t.fits(64) and t.ops is not None
        assert t.nbytes((3, 512)) == 6 * bb


def tiny_model(version=RwkvVersion.V4, n_embd=64, **kw):
    return Model(SyntheticCheckpoint(synth_hparams(version, n_embd, 1, 40, **kw), seed=1))


@pytest.mark.parametrize("name", KTYPES)
def test_plan_falls_back_for_short_rows(name):
    m = tiny_model()                                 # rows of 64, ffn.value rows of 256
    plan = make_plan(m, name)
    assert plan["blocks.0.ffn.value.weight"].name == name
    fell = {f["tensor"] for f in plan.fallbacks}
    assert fell == {n for n, t in plan.items() if t.name == FALLBACK[name]}
    assert len(fell) == 6 and all(f["n_cols"] == 64 and f["type"] == name for f in plan.fallbacks)
    assert fallback_notes(plan.fallbacks) == [
        f"6 tensors fell back from {name} to {FALLBACK[name]} (rows of 64 are not a multiple "
        "of 256)"]
    # what a stream shows without the plan
    assert stream_fallbacks((n, q, m[n].shape) for n, q in plan.items()) == plan.fallbacks
    assert make_plan(m, "Q4_0").fallbacks == []


def test_plan_without_a_fitting_type_is_bad_input():
    m = tiny_model(RwkvVersion.V5_2, head_size=16)   # time_faaaa: rows of 16
    with pytest.raises(BadInput, match="nor as its fallback Q5_0"):
        make_plan(m, "Q4_K", ["blocks.0.att.time_faaaa=Q4_K"])
    with pytest.raises(BadInput, match="cannot be stored as Q4_0"):
        make_plan(m, "Q4_K", ["blocks.0.att.time_faaaa=Q4_0"])


# ---------------------------------------------------------------------------------------------
# whole models: convert, validate, inspect, run

TOKENS = [1, 5, 9, 2, 33, 7]


def stream_weights(path):
    """name -> (type, the stream's payload bytes, shape) of every tensor record."""
    sf = StreamFile.for_input(path)
    try:
        return {r.name: (r.qtype, sf.tensor_data(r).copy(), r.shape) for r in sf.walk_as_input()
                if r.qtype is not None}
    finally:
        sf.close()


def check_stream(model, path, name):
    """The stream's blocks are exactly the table's quantizer's; returns the dequantized weights."""
    weights_ = {}
    for n, (q, data, shape) in stream_weights(path).items():
        values = model[n].values()
        if q.name == name:
            np.testing.assert_array_equal(data, q.quantize(values).reshape(-1))
        weights_[n] = q.dequantize(data, shape)
    return weights_


MODELS = [(RwkvVersion.V4, 256, 2, None), (RwkvVersion.V5_2, 512, 1, 64),
          (RwkvVersion.V7, 256, 2, 64)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name, version -> (model, stream path, reference on the stream's weights), made once."""
    cache = {}

    def get(name, version, n_embd, n_layer, head, overrides=()):
        key = (name, version)
        if key not in cache:
            hp = synth_hparams(version, n_embd, n_layer, 60, head_size=head)
            model = Model(SyntheticCheckpoint(hp, seed=11))
            src = tmp_path_factory.mktemp("kq") / "m.bin"
            with open(src, "wb") as f:
                from host.bin_writer import write_bin
                f32 = quants.by_name("F32")
                write_bin(model, make_plan(model, f32), f32, f)
            path = src.with_suffix(".rwks")
            result = convert(src, path, name, list(overrides))     # the CLI: the fixture test
            assert result["quant"] == name
            validate(path, deep=True)
            model = load_model(src)
            ref = ReferenceRWKV(check_stream(model, path, name), version.label)
            cache[key] = (model, path, ref, result)
        return cache[key]

    return get


def board_rows(path, mode, tokens, chunk=1024):
    board = Board(FileSource(path), mode=mode, chunk=chunk)
    rows = np.array([board.eval(t).copy() for t in tokens])
    state = board.state.copy()
    board.close()
    return rows, state


@pytest.mark.parametrize("name", KTYPES)
def test_v4_model_runs_every_type(converted, name):
    model, path, ref, result = converted(name, RwkvVersion.V4, 256, 2, None,
                                         ["head.weight=" + name])
    assert result["fallbacks"] == [] and result["types"]["head.weight"] == name
    assert sum(v == name for v in result["types"].values()) == 2 * 7 + 1
    want, want_state = ref.run(TOKENS)
    got, state = board_rows(path, "float", TOKENS)
    assert np.all(np.abs(got - want) <= 1e-5 * np.maximum(1, np.abs(want))), \
        np.abs(got - want).max()
    assert np.all(np.abs(state - want_state) <= 1e-5 * np.maximum(1, np.abs(want_state)))
    got8, _ = board_rows(path, "int8", TOKENS)
    # int8 mode: Q8_K activations (256-value blocks) -- within their rounding of the reference
    assert np.abs(got8 - want).max() <= 0.03 * np.abs(want).max(), np.abs(got8 - want).max()


@pytest.mark.parametrize("version,n_embd,n_layer,head", MODELS[1:],
                         ids=[m[0].label for m in MODELS[1:]])
def test_other_versions_run_q4_k(converted, version, n_embd, n_layer, head):
    model, path, ref, result = converted("Q4_K", version, n_embd, n_layer, head)
    want, _ = ref.run(TOKENS)
    got, _ = board_rows(path, "float", TOKENS, chunk=4096)
    assert np.all(np.abs(got - want) <= 1e-5 * np.maximum(1, np.abs(want))), \
        np.abs(got - want).max()
    got8, _ = board_rows(path, "int8", TOKENS, chunk=4096)
    assert np.abs(got8 - want).max() <= 0.03 * np.abs(want).max(), np.abs(got8 - want).max()
    # v7's LoRA matrices (rows of 32..) are not quantized, so nothing falls back here
    assert all(f["fallback"] == "Q5_0" for f in result["fallbacks"])


def test_quantized_on_the_fly_equals_the_file(converted):
    model, path, _, _ = converted("Q6_K", RwkvVersion.V4, 256, 2, None, ["head.weight=Q6_K"])
    buf = io.BytesIO()
    write_stream(VirtualStream(model, make_plan(model, "Q6_K", ["head.weight=Q6_K"])), buf)
    assert buf.getvalue() == path.read_bytes()
    rows, _ = board_rows(path, "int8", TOKENS[:3])
    board = Board(BytesSource(buf.getvalue()), mode="int8", chunk=300, xip=False)
    np.testing.assert_array_equal(np.array([board.eval(t).copy() for t in TOKENS[:3]]), rows)


def test_chunk_must_hold_a_super_block(converted):
    _, path, _, _ = converted("Q6_K", RwkvVersion.V4, 256, 2, None, ["head.weight=Q6_K"])
    with pytest.raises(BadInput, match="210-byte block"):
        Board(FileSource(path), chunk=200)


def test_tiny_fixture_falls_back_and_inspect_says_so(tmp_path):
    src = fp32_model("4v0-660K")
    out = tmp_path / "tiny-Q4_K.rwks"
    conv = run_cli("convert", src, "-o", out, "--quant", "Q4_K", check_status=0)
    assert b"fell back from Q4_K to Q5_0 (rows of" in conv.stderr
    run_cli("validate", out, "--deep", check_status=0)
    info = json.loads(run_cli("inspect", out, "--json", check_status=0).stdout)
    types = {r["name"]: r["type"] for r in info["records"]}
    fell = {f["tensor"] for f in info["fallbacks"]}
    assert fell and fell == {n for n, t in types.items() if t == "Q5_0"}
    assert all(f["type"] == "Q4_K" and f["n_cols"] % 256 for f in info["fallbacks"])
    assert info["fallback_notes"][0].startswith(f"{len(fell)} tensors fell back from Q4_K to "
                                                "Q5_0 (rows of ")
    assert info["fallback_notes"][0] in inspect_cmd.format_text(info)
    plans = [json.loads(run_cli("plan", src, "--board", "esp32s3", "--quant", "Q4_K",
                                "--json").stdout),
             plan_cmd.plan(out, get_profile("esp32s3"))]       # the stream: read from it
    for plan in plans:
        assert {f["tensor"] for f in plan["fallbacks"]} == fell
        assert plan["fallback_notes"] == info["fallback_notes"]
        assert info["fallback_notes"][0] in plan_cmd.format_text(plan)
    # and it runs
    m = load_model(src)
    ref = ReferenceRWKV(check_stream(m, out, "Q4_K"), "4")
    want, _ = ref.run(TOKENS)
    got, _ = board_rows(out, "float", TOKENS)
    assert np.all(np.abs(got - want) <= 1e-5 * np.maximum(1, np.abs(want)))
