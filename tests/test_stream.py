"""The stream: round trips, random-access virtual stream, validate on damaged streams."""
from __future__ import annotations

import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import MODELS, fp32_model, mutated, run_cli
from formats import stream as S
from formats.arch import RwkvVersion
from formats.errors import CheckFailed
from host.convert import convert_model
from host.encode import encode
from host.model import Model, load_model
from host.plan import make_plan
from host.stream import VirtualStream
from host.stream.reader import StreamFile, validate
from host.stream.writer import write_stream
from host.synth import SyntheticCheckpoint, synth_hparams

TYPES = ("F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def _synthetic(version=RwkvVersion.V5_2, n_embd=32, n_layer=1, n_vocab=16, **kw):
    return Model(SyntheticCheckpoint(synth_hparams(version, n_embd, n_layer, n_vocab, **kw)))


def _write(model, quant, path, overrides=(), **kw):
    vs = VirtualStream(model, make_plan(model, quant, overrides), **kw)
    with open(path, "wb") as f:
        write_stream(vs, f)
    return vs


@pytest.fixture(scope="module")
def small_stream(tmp_path_factory):
    """A synthetic v5.2 stream of a few KiB."""
    path = tmp_path_factory.mktemp("s") / "small.rwks"
    _write(_synthetic(RwkvVersion.V4, ffn_size=32), "Q4_0", path,
           ["emb.weight=Q4_0", "head.weight=Q4_0"])
    return path.read_bytes()


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_every_fixture_and_type(model, tmp_path):
    m = load_model(fp32_model(model))
    for quant in TYPES:
        path = tmp_path / f"{quant}.rwks"
        convert_model(m, path, quant)
        plan = make_plan(m, quant)
        sf = StreamFile(path)
        records = sf.walk(deep=True)
        tensors = [r for r in records if r.kind == S.RecordKind.TENSOR]
        assert [r.name for r in tensors] == list(plan)
        for r in tensors:
            assert r.qtype is plan[r.name]
            assert bytes(sf.tensor_data(r)) == bytes(encode(m[r.name], plan[r.name])), r.name
        sf.close()


def test_stream_blocks_equal_rwkv_cpp_quantized_file(tmp_path):
    # The convert test proves the .bin equals rwkv.cpp's; the stream must carry the same blocks.
    from host.convert import convert
    src = fp32_model("5v1-730K")
    convert(src, tmp_path / "q.bin", "Q5_0")
    convert(src, tmp_path / "q.rwks", "Q5_0")
    binm = load_model(tmp_path / "q.bin")
    sf = StreamFile(tmp_path / "q.rwks")
    for r in sf.walk():
        if r.kind == S.RecordKind.TENSOR:
            assert bytes(sf.tensor_data(r)) == bytes(binm[r.name].raw()), r.name


@pytest.mark.parametrize("cache", [0, 4096, 64 << 20])
def test_virtual_stream_random_ranges_equal_file(cache, tmp_path):
    m = load_model(fp32_model("6v0-3m"))
    path = tmp_path / "v6.rwks"
    _write(m, "Q5_1", path)
    data = path.read_bytes()
    vs = VirtualStream(m, make_plan(m, "Q5_1"), cache_bytes=cache)
    assert vs.size == len(data)
    rng = np.random.default_rng(7)
    for _ in range(300):
        a = int(rng.integers(0, len(data)))
        n = int(rng.choice([1, 3, 31, 32, 33, 500, 70000]))
        assert vs.read(a, n) == data[a:a + n], (a, n)
    emb = vs.layout.records[0]
    row = emb.row_bytes
    hdr = S.StreamHeader.parse(data)
    assert hdr.fields.value.emb_offset == emb.data_offset
    for tok in (0, 1, 255):
        off = emb.data_offset + tok * row
        assert vs.read(off, row) == data[off:off + row]


def test_stdout_stream_equals_file(tmp_path):
    src = fp32_model("4v0-660K")
    out = tmp_path / "a.rwks"
    run_cli("convert", src, "-o", out, "--quant", "Q4_1", check_status=0)
    proc = run_cli("convert", src, "-o", "-", "--quant", "Q4_1", "--format", "stream",
                   check_status=0)
    assert proc.stdout == out.read_bytes()
    proc = run_cli("validate", out, "--deep", check_status=0)
    assert proc.stdout.startswith(b"OK")


def _validate_bytes(tmp_path, data: bytes, deep=True):
    path = tmp_path / "m.rwks"
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        validate(path, deep=deep)
        ok, err = True, None
    except CheckFailed as e:
        ok, err = False, e
    assert time.perf_counter() - t0 < 1.0
    return ok, err


def test_truncation_at_every_offset(small_stream, tmp_path):
    assert 2000 < len(small_stream) < 9000
    for cut in range(len(small_stream)):
        ok, err = _validate_bytes(tmp_path, small_stream[:cut], deep=False)
        assert not ok, cut
        assert err.offset is not None and err.offset <= cut, (cut, err.line())
        assert "\n" not in err.line()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutations_end_in_ok_or_a_clear_error(small_stream, tmp_path, data):
    buf = mutated(small_stream, data, 4)
    ok, err = _validate_bytes(tmp_path, buf)
    if buf != small_stream:
        assert not ok      # every byte is covered by a CRC, a length or the end of file
        assert err.line().startswith(str(tmp_path / "m.rwks"))


def test_other_major_version_is_refused(small_stream, tmp_path):
    buf = bytearray(small_stream)
    buf[4:6] = (2).to_bytes(2, "little")
    ok, err = _validate_bytes(tmp_path, bytes(buf))
    assert not ok and "major version 2" in err.message and err.offset == 4
    proc = run_cli("validate", tmp_path / "m.rwks")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert b"major version 2" in proc.stderr


def test_garbage_and_other_files_are_refused(tmp_path):
    ok, err = _validate_bytes(tmp_path, bytes(range(256)) * 8)
    assert not ok and "magic" in err.message
    ok, err = _validate_bytes(tmp_path, fp32_model("4v0-660K").read_bytes()[:5000])
    assert not ok and "magic" in err.message


def test_unknown_optional_record_is_skipped(small_stream, tmp_path):
    """Insert an optional record (kind 0x8123) before END; fix up the header so it stays valid."""
    sf_path = tmp_path / "in.rwks"
    sf_path.write_bytes(small_stream)
    sf = StreamFile(sf_path)
    records = sf.walk()
    end = [r for r in records if r.name == "END"][0]
    payload = b"future extension"
    head = S.RecordHeader.build(dict(fields=dict(value=dict(
        kind=0x8123, tensor=0, type=0, ndim=1, flags=0, dims=[len(payload), 1, 1],
        data_size=len(payload), reserved=0)), header_crc=None))
    rec = head + payload + zlib.crc32(payload).to_bytes(4, "little")
    rec += bytes(S.pad_to(len(rec)))
    fields = dict(sf.header)
    fields.pop("_io", None)
    fields["body_size"] += len(rec)
    fields["index_offset"] = 0          # drop the trailer: its offsets would all move
    new_header = S.StreamHeader.build(dict(fields=dict(value=fields), header_crc=None))
    data = new_header + small_stream[len(new_header):end.offset] + rec + \
        small_stream[end.offset:end.end]
    ok, err = _validate_bytes(tmp_path, data)
    assert ok, err and err.line()
    # The same record with a required kind is refused.
    bad = bytearray(data)
    pos = end.offset
    bad[pos:pos + 2] = (0x0123).to_bytes(2, "little")
    bad[pos + 28:pos + 32] = zlib.crc32(bytes(bad[pos:pos + 28])).to_bytes(4, "little")
    ok, err = _validate_bytes(tmp_path, bytes(bad))
    assert not ok and "unknown required record kind" in err.message


def test_validate_reports_record_name_and_offset(tmp_path):
    m = load_model(fp32_model("4v0-660K"))
    path = tmp_path / "a.rwks"
    vs = _write(m, "Q8_0", path)
    rec = vs.layout.by_name["blocks.1.ffn.key.weight"]
    buf = bytearray(path.read_bytes())
    buf[rec.data_offset + 100] ^= 0x40
    ok, err = _validate_bytes(tmp_path, bytes(buf))
    assert not ok
    assert err.tensor == "blocks.1.ffn.key.weight" and err.offset == rec.data_offset
    assert "CRC" in err.message


def test_deep_finds_non_finite_values(tmp_path):
    m = load_model(fp32_model("4v0-660K"))
    path = tmp_path / "a.rwks"
    vs = _write(m, "F32", path)
    rec = vs.layout.by_name["blocks.2.att.time_first"]
    buf = bytearray(path.read_bytes())
    buf[rec.data_offset + 8:rec.data_offset + 12] = np.float32(np.inf).tobytes()
    payload = bytes(buf[rec.data_offset:rec.data_offset + rec.data_size])
    crc_at = rec.data_offset + rec.data_size
    buf[crc_at:crc_at + 4] = zlib.crc32(payload).to_bytes(4, "little")
    ok, err = _validate_bytes(tmp_path, bytes(buf))
    assert not ok and "non-finite" in err.message and err.tensor == rec.name
    path.write_bytes(bytes(buf))
    validate(path, deep=False)      # CRCs are right: only --deep sees it
