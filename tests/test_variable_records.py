"""Records of variable-size types (row-offset table + self-delimiting blocks), end to end:
layout measured by quantizing once, the virtual stream's random ranges, the writer, validate,
and the board reading them front to back through any chunk. Uses the plain test type of
tests/variable_type.py, so the stream side is tested apart from QX's own kernels."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

import variable_type
from conftest import fp32_model, mutated
from firmware_sim.board import Board
from firmware_sim.sources import BytesSource
from formats import stream as S
from formats.errors import BadInput, CheckFailed
from host.model import load_model
from host.plan import make_plan
from host.stream import VirtualStream
from host.stream.reader import StreamFile, validate
from host.stream.writer import write_stream
from reference_forward import ReferenceRWKV

VT = variable_type.ensure_registered()
PROMPT = b'"in the'


def _stream(model, quant="VT", overrides=(), **kw) -> bytes:
    buf = io.BytesIO()
    write_stream(VirtualStream(model, make_plan(model, quant, overrides), **kw), buf)
    return buf.getvalue()


@pytest.fixture(scope="module", params=["5v2-730K", "7v0-834K", "4v0-660K"])
def vt_model(request):
    m = load_model(fp32_model(request.param))
    return m, _stream(m, "VT", ["head.weight=VT"])


def test_stream_carries_the_quantizer_payloads(vt_model, tmp_path):
    m, data = vt_model
    path = tmp_path / "vt.rwks"
    path.write_bytes(data)
    assert validate(path, deep=True)["ok"]
    sf = StreamFile(path)
    kinds = set()
    for r in sf.walk():
        if r.kind == S.RecordKind.TENSOR and r.qtype is VT:
            payload = bytes(sf.tensor_data(r))
            assert payload == bytes(VT.quantize(m[r.name].values())), r.name
            codes = set()
            table = np.frombuffer(payload, "<u4", r.shape[0] + 1)
            assert table[0] == 4 * (r.shape[0] + 1) and table[-1] == len(payload)
            o = int(table[0])
            while o < len(payload):
                codes.add(payload[o])
                o += variable_type.SIZES[payload[o]]
            kinds |= codes
    sf.close()
    assert {1, 2} <= kinds          # the test type really varies its block sizes


@pytest.mark.parametrize("cache", [0, 5000, 64 << 20])
def test_virtual_stream_ranges_equal_the_file(vt_model, cache):
    m, data = vt_model
    vs = VirtualStream(m, make_plan(m, "VT", ["head.weight=VT"]), cache_bytes=cache)
    assert vs.size == len(data)
    rng = np.random.default_rng(11)
    for _ in range(150):
        a = int(rng.integers(0, len(data)))
        n = int(rng.choice([1, 4, 35, 65, 700, 20000]))
        assert vs.read(a, n) == data[a:a + n], (a, n)


def test_board_reads_rows_through_any_chunk_and_matches_the_reference(vt_model, tmp_path):
    m, data = vt_model
    weights = {}
    path = tmp_path / "vt.rwks"
    path.write_bytes(data)
    sf = StreamFile(path)
    for r in sf.walk():
        if r.kind == S.RecordKind.TENSOR:
            weights[r.name] = r.qtype.dequantize(sf.tensor_data(r), r.shape).astype(np.float64)
    sf.close()
    ref = ReferenceRWKV({k: v.reshape(m[k].shape) for k, v in weights.items()},
                        m.version.label)
    want = ref.run(list(PROMPT))[0][-1]
    got = {}
    for chunk, xip in ((96, False), (96, True), (1000, False), (65536, False)):
        board = Board(BytesSource(data), chunk=chunk, xip=xip)
        for t in PROMPT:
            logits = board.eval(t)
        got[chunk, xip] = logits.copy()
    first = got[96, False]
    for key, logits in got.items():
        assert np.array_equal(logits, first), key
    assert np.all(np.abs(first - want) <= 1e-5 * np.maximum(1, np.abs(want))), \
        np.abs(first - want).max()


def test_embedding_of_a_variable_type_is_refused():
    m = load_model(fp32_model("5v2-730K"))
    with pytest.raises(BadInput, match="fixed-size type"):
        _stream(m, "VT", ["emb.weight=VT"])


# -- bad rows ---------------------------------------------------------------------------------
def _first_vt_record(data: bytes):
    hdr = S.StreamHeader.parse(data).fields.value
    off = hdr.header_size
    while True:
        kind, tensor, type_id = struct.unpack_from("<HHB", data, off)
        size, = struct.unpack_from("<I", data, off + 20)
        if type_id == VT.id:
            return off, size
        end = off + S.RECORD_HEADER_SIZE + size + 4
        off = end + (-end) % 16


def _with_payload(data: bytes, off: int, size: int, mutate) -> bytes:
    """Mutate a record's payload and fix its CRC, so the structure checks are what fail."""
    out = bytearray(data)
    p0 = off + S.RECORD_HEADER_SIZE
    payload = bytearray(out[p0:p0 + size])
    mutate(payload)
    out[p0:p0 + size] = payload
    struct.pack_into("<I", out, p0 + size, zlib.crc32(payload) & 0xFFFFFFFF)
    return bytes(out)


@pytest.mark.parametrize("case,message", [
    ("first", "row-offset table starts at"),
    ("last", "row-offset table ends at"),
    ("backwards", "goes backwards"),
    ("block", "do not decode to"),
])
def test_validate_names_the_bad_row(tmp_path, case, message):
    m = load_model(fp32_model("5v2-730K"))
    data = _stream(m)
    off, size = _first_vt_record(data)
    n_rows = struct.unpack_from("<I", data, off + S.RECORD_HEADER_SIZE)[0] // 4 - 1

    def mutate(p):
        table = np.frombuffer(bytes(p[:4 * (n_rows + 1)]), "<u4").copy()
        if case == "first":
            table[0] += 1
        elif case == "last":
            table[-1] -= 1
        elif case == "backwards":
            table[2], table[3] = table[3], table[2]
        else:                      # a block code that changes the row's decoded length
            p[int(table[1])] = 0
            return
        p[:4 * (n_rows + 1)] = table.tobytes()

    path = tmp_path / "bad.rwks"
    path.write_bytes(_with_payload(data, off, size, mutate))
    with pytest.raises(CheckFailed, match=message) as e:
        validate(path)
    assert e.value.offset is not None and off <= e.value.offset < off + 32 + size


def test_board_refuses_a_block_that_runs_past_its_record():
    m = load_model(fp32_model("5v2-730K"))
    data = _stream(m)
    off, size = _first_vt_record(data)
    n_rows = struct.unpack_from("<I", data, off + S.RECORD_HEADER_SIZE)[0] // 4 - 1

    def mutate(p):       # the last block claims fp16 data (65 bytes) it does not have
        last = int(np.frombuffer(bytes(p[:4 * (n_rows + 1)]), "<u4")[-2])
        o = last
        while o < len(p):
            code = p[o]
            step = variable_type.SIZES[code]
            if o + step == len(p):
                p[o] = 2 if code != 2 else 2
                if code == 2:
                    p[o] = 9             # an unknown code: count_blocks stops before it
            o += step

    bad = _with_payload(data, off, size, mutate)
    board = Board(BytesSource(bad), chunk=4096)
    with pytest.raises(BadInput):
        for t in PROMPT:
            board.eval(t)


# -- fuzzing a real QX stream -------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from host.synth import SyntheticCheckpoint, synth_hparams  # noqa: E402
from formats.arch import RwkvVersion  # noqa: E402


@pytest.fixture(scope="module")
def qx_stream():
    from host.model import Model
    m = Model(SyntheticCheckpoint(synth_hparams(RwkvVersion.V5_2, 64, 1, 32, ffn_size=64)))
    return _stream(m, "QX:bpw=3.5", ["head.weight=QX:bpw=3.5"])


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_qx_stream_mutations_end_in_ok_or_a_clear_error(qx_stream, tmp_path_factory, data):
    buf = mutated(qx_stream, data, 3)
    path = tmp_path_factory.mktemp("m") / "m.rwks"
    path.write_bytes(buf)
    try:
        validate(path, deep=True)
        assert buf == qx_stream
    except CheckFailed as e:
        assert "\n" not in e.line()
    board_ok = True
    try:
        board = Board(BytesSource(buf), chunk=256)
        board.eval(1)
    except BadInput as e:
        board_ok = False
        assert "\n" not in e.line()
    assert board_ok or buf != qx_stream


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_qx_payload_damage_behind_a_good_crc_is_caught(qx_stream, tmp_path_factory, data):
    """Bytes changed inside a QX payload with its CRC fixed: validate decodes every row and the
    board every block, so a damaged structure is an error (or, where the damage only changes
    values, a stream that still decodes)."""
    off, size = None, None
    hdr = S.StreamHeader.parse(qx_stream).fields.value
    o = hdr.header_size
    while off is None:
        kind, tensor, type_id = struct.unpack_from("<HHB", qx_stream, o)
        n, = struct.unpack_from("<I", qx_stream, o + 20)
        if type_id == 128:
            off, size = o, n
        end = o + S.RECORD_HEADER_SIZE + n + 4
        o = end + (-end) % 16
    i = data.draw(st.integers(0, size - 1))
    v = data.draw(st.integers(0, 255))
    bad = _with_payload(qx_stream, off, size, lambda p: p.__setitem__(i, v))
    path = tmp_path_factory.mktemp("m") / "m.rwks"
    path.write_bytes(bad)
    try:
        validate(path, deep=True)
        structurally_ok = True
    except CheckFailed as e:
        structurally_ok = False
        assert off <= e.offset < off + 32 + size + 4, e.line()
    try:
        board = Board(BytesSource(bad), chunk=256)     # a raw 64-block is 129 bytes
        board.eval(3)
        board_ok = True
    except BadInput as e:
        board_ok = False
        assert "\n" not in e.line()
    # the board walks the blocks, not the row table: it may accept a stream whose table alone
    # is damaged, but never one whose blocks do not decode
    assert board_ok or not structurally_ok


@pytest.mark.parametrize("quant", ["QX", "QX:bs=64,bpw=3.5", "QX:err=0.02"])
@pytest.mark.parametrize("model_name", ["5v2-730K", "7v0-834K"])
def test_qx_round_trip_through_stream_and_board(model_name, quant, tmp_path):
    """A fixture in QX: the stream holds exactly the quantizer's payloads, validates deep, and
    the board (float mode, any chunk) matches the float64 reference forward on the dequantized
    weights; int8 mode stays close to float mode."""
    m = load_model(fp32_model(model_name))
    plan = make_plan(m, quant, ["head.weight=" + quant])
    path = tmp_path / "qx.rwks"
    with open(path, "wb") as f:
        write_stream(VirtualStream(m, plan), f)
    assert validate(path, deep=True)["ok"]
    sf = StreamFile(path)
    weights = {}
    for r in sf.walk():
        if r.kind != S.RecordKind.TENSOR:
            continue
        data = sf.tensor_data(r)
        if r.qtype.variable:
            assert bytes(data) == bytes(plan[r.name].quantize(m[r.name].values())), r.name
        weights[r.name] = r.qtype.dequantize(data, r.shape).astype(np.float64)
    sf.close()
    want = ReferenceRWKV(weights, m.version.label).run(list(PROMPT))[0][-1]
    for chunk in (160, 65536):
        board = Board(BytesSource(path.read_bytes()), chunk=chunk)
        for t in PROMPT:
            got = board.eval(t)
        assert np.all(np.abs(got - want) <= 1e-5 * np.maximum(1, np.abs(want))), \
            (chunk, np.abs(got - want).max())
    int8 = Board(BytesSource(path.read_bytes()), mode="int8")
    for t in PROMPT:
        got8 = int8.eval(t)
    assert np.abs(got8 - want).max() <= 0.05 * np.abs(want).max()
