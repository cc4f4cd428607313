"""The fused quantizer: F32/F16/BF16 source bytes straight into a block type (formats/kernels.py
`quantize_from`, `QuantType.quantize_from`, `ModelTensor.quantize_rows`).

It must give exactly the bytes of the path it replaces, dequantize to float32 then quantize,
for every source type and block type, and stop at the first NaN/Inf with that element's index,
which the model turns into the same error (tensor name, element, byte offset) as before.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from formats import kernels
from formats.errors import BadInput
from formats.quants import NonFiniteValue, by_name
from host.encode import encode, encode_rows, row_slices
from host.model import Model, ModelTensor
from host.plan import make_plan
from host.readers.base import SourceTensor
from host.stream import VirtualStream
from host.stream.writer import write_stream
from host.synth import SyntheticCheckpoint, synth_hparams
from formats.arch import RwkvVersion

SOURCES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# (NaN, +inf, -inf, a signalling NaN) as each source type stores them
NON_FINITE_BITS = {"F32": (np.uint32, (0x7FC00000, 0x7F800000, 0xFF800000, 0x7F800001)),
                   "F16": (np.uint16, (0x7E00, 0x7C00, 0xFC00, 0x7C01)),
                   "BF16": (np.uint16, (0x7FC0, 0x7F80, 0xFF80, 0x7F81))}


def reference(qname: str, sname: str, raw: np.ndarray) -> np.ndarray:
    """The old path: dequantize the source exactly, then the float32 quantizer."""
    src = by_name(sname)
    return by_name(qname).quantize(src.dequantize(raw, (raw.size // src.block_bytes,))).reshape(-1)


def fused(qname: str, sname: str, raw: np.ndarray) -> np.ndarray:
    out, bad = kernels.quantize_from(by_name(sname).id, by_name(qname).id, raw)
    assert bad == -1
    return out


def _finite_patterns(sname: str, rng: np.random.Generator) -> np.ndarray:
    """Source bytes holding hard cases: for the 16-bit types every finite bit pattern, shuffled
    into blocks (subnormals, +-0, the largest values, mixed magnitudes); for F32 random finite
    bits over every exponent. Plus blocks of all +0.0, all -0.0, one value among zeros, tiny
    subnormals only, and ties of |max| with opposite signs."""
    if sname == "F32":
        bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
        bits = bits[(bits & 0x7F800000) != 0x7F800000]
        special = np.array([0, 0x80000000, 1, 0x80000001, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000,
                            0x3F800000, 0xBF800000], np.uint32)
        dt = np.uint32
    else:
        exp = 0x7C00 if sname == "F16" else 0x7F80
        bits = np.arange(0x10000, dtype=np.uint32)
        bits = bits[(bits & exp) != exp]
        special = np.array([0, 0x8000, 1, 0x8001, exp - 1, 0x8000 | (exp - 1), 0x0400,
                            0x3C00 if sname == "F16" else 0x3F80], np.uint32)
        dt = np.uint16
    bits = rng.permutation(bits)
    blocks = [bits[: bits.size // 32 * 32]]
    for s in special:
        blocks.append(np.full(32, s))
        one = np.zeros(32, np.uint32)
        one[int(rng.integers(32))] = s
        blocks.append(one)
    tie = np.zeros(32, np.uint32)
    top = 0x3F800000 if sname == "F32" else (0x3C00 if sname == "F16" else 0x3F80)
    sign = 0x80000000 if sname == "F32" else 0x8000
    tie[3], tie[20] = top | sign, top
    blocks.append(tie)
    blocks.append(rng.permutation(np.tile(special, 4))[:32])
    return np.concatenate(blocks).astype(dt).view(np.uint8)


@pytest.mark.parametrize("qname", BLOCK_TYPES)
@pytest.mark.parametrize("sname", SOURCES)
def test_fused_equals_dequantize_then_quantize(sname, qname):
    raw = _finite_patterns(sname, np.random.default_rng(
        10 * SOURCES.index(sname) + BLOCK_TYPES.index(qname)))
    ref = reference(qname, sname, raw)
    np.testing.assert_array_equal(fused(qname, sname, raw), ref)
    # the QuantType method, rows of 64 values (the pattern count is a multiple of 64 or not:
    # cut it to whole rows)
    src = by_name(sname)
    n = raw.size // src.block_bytes // 64 * 64
    rows = by_name(qname).quantize_from(src, raw[: n * src.block_bytes], 64)
    assert rows.shape == (n // 64, by_name(qname).row_bytes(64))
    np.testing.assert_array_equal(rows.reshape(-1), ref[: rows.size])


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 8).map(lambda n: 32 * n),
                    elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       sname=st.sampled_from(SOURCES), qname=st.sampled_from(BLOCK_TYPES))
def test_fused_equals_reference_on_any_finite_values(x, sname, qname):
    with np.errstate(over="ignore"):
        raw = by_name(sname).quantize(x).reshape(-1)      # F16/BF16 may round up to inf
    bits = raw.view(np.uint32 if sname == "F32" else np.uint16).astype(np.uint32)
    exp = {"F32": 0x7F800000, "F16": 0x7C00, "BF16": 0x7F80}[sname]
    if ((bits & exp) == exp).any():
        return
    np.testing.assert_array_equal(fused(qname, sname, raw), reference(qname, sname, raw))


def test_any_buffer_alignment_and_one_compiled_kernel():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(32 * 40) * 0.1).astype(np.float32)
    for sname in SOURCES:
        raw = by_name(sname).quantize(x).reshape(-1)
        ref = reference("Q5_1", sname, raw)
        # at an odd address, read-only
        shifted = np.frombuffer(b"\0" + raw.tobytes(), np.uint8, offset=1)
        assert not shifted.flags.writeable
        for buf in (raw, raw.copy(), shifted, raw.tobytes(), memoryview(raw.tobytes())):
            out, bad = kernels.quantize_from(by_name(sname).id, by_name("Q5_1").id, buf)
            assert bad == -1
            np.testing.assert_array_equal(out, ref)
    out = np.empty_like(ref)
    assert kernels.quantize_from(1, by_name("Q5_1").id, raw.view(np.uint8)[:0], out[:0])[1] == -1
    # writable, read-only and unaligned inputs all ran the one compiled signature
    assert len(kernels._quantize_from_kernel.signatures) == 1


def test_one_compile_of_the_quantizer_serves_both_paths():
    """The fused kernel hands its float32 chunks to `_quantize_blocks` typed read-only, as the
    float32 wrappers do: one specialization of the quantizer, not a second compile."""
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    kernels.quantize_q4_0(x)
    kernels.quantize_from(1, by_name("Q4_0").id, x.astype(np.float16).view(np.uint8))
    assert len(kernels._quantize_blocks.signatures) == 1


def test_bad_arguments_are_refused():
    q4 = by_name("Q4_0").id
    with pytest.raises(BadInput, match="no fused kernel"):
        kernels.quantize_from(by_name("Q8_0").id, q4, np.zeros(34, np.uint8))
    with pytest.raises(BadInput, match="no fused kernel"):
        kernels.quantize_from(1, by_name("F16").id, np.zeros(64, np.uint8))
    with pytest.raises(BadInput, match="whole blocks"):
        kernels.quantize_from(1, q4, np.zeros(62, np.uint8))
    with pytest.raises(BadInput, match="out must be"):
        kernels.quantize_from(1, q4, np.zeros(64, np.uint8), np.zeros(17, np.uint8))
    with pytest.raises(BadInput, match="multiple of 32"):
        by_name("Q4_0").quantize_from(by_name("F16"), np.zeros(40, np.uint8), 20)


@pytest.mark.parametrize("sname", SOURCES)
def test_first_non_finite_element_is_reported(sname):
    dt, specials = NON_FINITE_BITS[sname]
    src = by_name(sname)
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(32 * 24) * 0.1).astype(np.float32)
    for pos in (0, 31, 32, 33, 500, x.size - 1):
        for s in specials:
            raw = src.quantize(x).reshape(-1).copy()
            vals = raw.view(dt)
            vals[pos] = s
            if pos + 40 < vals.size:
                vals[pos + 40] = specials[0]        # a later one must not be reported
            if pos >= 2:
                vals[pos - 2] = 0                   # nor a zero just before
            want = str(np.float32(src.dequantize(raw[pos * src.block_bytes:][:src.block_bytes],
                                                 (1,))[0]))
            for qname in BLOCK_TYPES:
                qt = by_name(qname)
                _, bad = kernels.quantize_from(src.id, qt.id, raw)
                assert bad == pos, (qname, pos, hex(s))
                with pytest.raises(NonFiniteValue) as e:
                    qt.quantize_from(src, raw, 64)
                assert e.value.element == pos
                assert e.value.message == f"non-finite weight {want} at element {pos}"


def test_unfused_pairs_check_too():
    """Block-type sources and non-block targets dequantize, check, quantize: same contract."""
    x = np.linspace(-1, 1, 128, dtype=np.float32)
    x[70] = np.inf
    with pytest.raises(NonFiniteValue) as e:
        by_name("F16").quantize_from(by_name("F32"), by_name("F32").quantize(x), 64)
    assert e.value.element == 70
    good = np.linspace(-1, 1, 128, dtype=np.float32)
    q8 = by_name("Q8_0").quantize(good)
    np.testing.assert_array_equal(
        by_name("Q4_0").quantize_from(by_name("Q8_0"), q8, 64),
        by_name("Q4_0").quantize(by_name("Q8_0").dequantize(q8, (2, 64))))
    np.testing.assert_array_equal(
        by_name("F16").quantize_from(by_name("F32"), by_name("F32").quantize(good), 128),
        by_name("F16").quantize(good))


# ---------------------------------------------------------------------------------------------
# Through the model: the error names the tensor, the element and the byte offset

def _tensor(sname: str, raw: np.ndarray, shape, offset=1000) -> ModelTensor:
    src = SourceTensor("blocks.0.att.key.weight", shape, by_name(sname), "model.bin", offset,
                       lambda: raw)
    return ModelTensor(src.name, shape, src, False, src.to_float32)


@pytest.mark.parametrize("sname", SOURCES)
def test_model_rows_equal_old_path_and_name_the_bad_element(sname):
    rows, cols = 48, 96
    src = by_name(sname)
    rng = np.random.default_rng(5)
    raw = src.quantize((rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)).reshape(-1)
    t = _tensor(sname, raw, (rows, cols))
    for qname in BLOCK_TYPES:
        qt = by_name(qname)
        whole = encode(t, qt)
        np.testing.assert_array_equal(whole, qt.quantize(t.values()).reshape(-1))
        parts = [encode_rows(t, qt, r0, r1) for r0, r1 in row_slices(t, qt, 4 * cols * 5)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)

    dt, specials = NON_FINITE_BITS[sname]
    bad_raw = raw.copy()
    element = 17 * cols + 41
    bad_raw.view(dt)[element] = specials[1]
    bad_raw.view(dt)[element + cols] = specials[0]
    t = _tensor(sname, bad_raw, (rows, cols))
    want = f"byte offset {1000 + element * src.block_bytes}: non-finite weight inf at element " \
           f"{element}"
    for r0, r1 in [(0, rows), (10, 20), (17, 18)]:
        with pytest.raises(BadInput) as fused_err:
            encode_rows(t, by_name("Q4_0"), r0, r1)
        with pytest.raises(BadInput) as old_err:
            by_name("Q4_0").quantize(t.values_rows(r0, r1))
        assert fused_err.value.line() == old_err.value.line()
        assert fused_err.value.tensor == "blocks.0.att.key.weight"
        assert fused_err.value.line().endswith(want), fused_err.value.line()
    encode_rows(t, by_name("Q4_0"), 0, 17)          # rows before the bad one are fine
    encode_rows(t, by_name("Q4_0"), 19, rows)


# ---------------------------------------------------------------------------------------------
# Through the stream writer: chunks() (no cache, row slices) == read() (cached or not)

@pytest.mark.parametrize("quant", ["Q5_1", "Q4_0"])
def test_chunks_equal_random_access_reads(quant, tmp_path):
    from host.bin_writer import write_bin
    from host.model import load_model
    hp = synth_hparams(RwkvVersion.V4, 64, 2, 300)
    synth = Model(SyntheticCheckpoint(hp, seed=4))
    path = tmp_path / "fp16.bin"
    with open(path, "wb") as f:
        write_bin(synth, make_plan(synth, "F16"), by_name("F16"), f)
    m = load_model(path)
    plan = make_plan(m, quant)
    out = tmp_path / "a.rwks"
    with open(out, "wb") as f:
        write_stream(VirtualStream(m, plan), f)
    data = out.read_bytes()
    assert VirtualStream(m, plan, cache_bytes=0).read(0, len(data)) == data
    # a stream whose cache already holds some tensors (and their CRCs) writes the same bytes
    vs = VirtualStream(m, plan)
    for rec in vs.layout.records[::3]:
        vs.read(rec.data_offset, 10)
    assert b"".join(bytes(p) for p in vs.chunks()) == data
    # every quantized tensor equals the old dequantize-then-quantize bytes
    for t in m:
        if plan[t.name].is_block:
            assert bytes(encode(t, plan[t.name])) == \
                bytes(plan[t.name].quantize(t.values()).reshape(-1)), t.name
    m.close()
