"""Tests for the torch-free PyTorch zip reader and the safetensors reader.

Fixture checkpoints live outside the project: $RWKV_STREAM_FIXTURES, default
<repo root>/../shared/fixtures. Tests that need them skip (with the reason) when absent.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from formats.errors import BadInput
from host.readers import open_checkpoint
from host.readers.pytorch import PytorchCheckpoint
from host.readers.safetensors import SafetensorsCheckpoint

REPO = Path(__file__).resolve().parents[1]


def _default_fixtures_dir() -> Path:
    return Path(os.environ.get("RWKV_STREAM_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture
def fx_dir(request) -> Path:
    """The fixtures folder: tests/conftest.py's `fixtures_dir` if it has one, else our own."""
    try:
        d = request.getfixturevalue("fixtures_dir")
    except pytest.FixtureLookupError:
        d = _default_fixtures_dir()
    d = Path(d)
    if not (d / "pytorch").is_dir():
        pytest.skip(f"fixture checkpoints not found in {d / 'pytorch'} "
                    "(set RWKV_STREAM_FIXTURES)")
    return d


def _fixture_params(pattern: str):
    names = sorted(p.name for p in (_default_fixtures_dir() / "pytorch").glob(pattern))
    if names:
        return names
    return [pytest.param(None, marks=pytest.mark.skip(
        reason=f"no pytorch/{pattern} in {_default_fixtures_dir()} (set RWKV_STREAM_FIXTURES)"))]


PTH = _fixture_params("tiny-rwkv-*-fp32.pth") + _fixture_params("tiny-rwkv-*-bf16.pth")
PTH_FP32 = _fixture_params("tiny-rwkv-*-fp32.pth")


def _bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (the values here are all finite)."""
    u = np.ascontiguousarray(x, dtype="<f4").reshape(-1).view("<u4").astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


# --- a torch.save imitation: zip layout and protocol-2 pickle, written by hand -------------------
#
# Mimics the fixture files exactly: members <archive>/data.pkl, .format_version, .storage_alignment,
# byteorder, data/<key>..., version, .data/serialization_id; ZIP_STORED, general-purpose flags 0x808
# (UTF-8 names + data descriptor), zero crc/sizes in the local header followed by a PK\x07\x08
# descriptor, a local "FB" extra field of 'Z' padding that aligns each member's data to 64 bytes,
# and no extra field in the central directory (so local and central extra lengths differ).

def write_torch_zip(path, pkl: bytes, storages: dict[str, bytes], archive: str = "archive",
                    drop: tuple[str, ...] = ()) -> Path:
    members = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little")]
    members += [(f"data/{k}", v) for k, v in storages.items()]
    members += [("version", b"3\n"), (".data/serialization_id", b"0" * 40)]
    out = bytearray()
    central = []
    for rel, data in members:
        if rel in drop:
            continue
        name = f"{archive}/{rel}".encode()
        off = len(out)
        pad = -(off + 30 + len(name) + 4) % 64
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, 0x808, 0, 0, 0, 0, 0, 0,
                           len(name), len(extra)) + name + extra
        assert len(out) % 64 == 0
        out += data
        crc = zlib.crc32(data)
        out += struct.pack("<4sIII", b"PK\x07\x08", crc, len(data), len(data))
        central.append((name, crc, len(data), off))
    cd = len(out)
    for name, crc, n, off in central:
        out += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, 0x808, 0, 0, 0, crc, n, n,
                           len(name), 0, 0, 0, 0, 0, off) + name
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(central), len(central),
                       len(out) - cd, cd, 0)
    Path(path).write_bytes(bytes(out))
    return Path(path)


def _p(x) -> bytes:
    """Protocol-2 opcodes for a str / int / bool / tuple / raw-bytes value."""
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        b = x.encode()
        return b"X" + struct.pack("<I", len(b)) + b
    if isinstance(x, bool):
        return b"\x88" if x else b"\x89"
    if isinstance(x, int):
        return b"J" + struct.pack("<i", x)
    if isinstance(x, tuple):
        return b"(" + b"".join(_p(e) for e in x) + b"t"
    raise TypeError(x)


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def tensor_ops(key: str, numel: int, offset: int, size, stride,
               storage_type: str = "FloatStorage", storage_module: str = "torch") -> bytes:
    """What torch.save emits for one tensor: _rebuild_tensor_v2(persistent storage, ...)."""
    storage = b"(" + _p("storage") + _global(storage_module, storage_type) + _p(key) + \
        _p("cpu") + _p(numel) + b"tQ"
    hooks = _global("collections", "OrderedDict") + b")R"
    return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _p(offset)
            + _p(tuple(size)) + _p(tuple(stride)) + _p(False) + hooks + b"tR")


def dict_ops(items) -> bytes:
    return b"}(" + b"".join(_p(k) + _p(v) for k, v in items) + b"u"


def state_dict_pickle(items) -> bytes:
    return b"\x80\x02" + dict_ops(items) + b"."


# --- fixture checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("name", PTH)
def test_fixture_pth_opens(fx_dir, name):
    path = fx_dir / "pytorch" / name
    with open_checkpoint(path) as ck:
        assert isinstance(ck, PytorchCheckpoint) and ck.format_name == "pytorch"
        expect = "BF16" if name.endswith("-bf16.pth") else "F32"
        tensors = list(ck)
        assert len(tensors) > 10
        names = [t.name for t in tensors]
        for required in ("emb.weight", "head.weight", "ln_out.weight", "blocks.0.ln1.weight"):
            assert required in ck
        n_vocab, n_embd = ck["emb.weight"].shape
        assert ck["head.weight"].shape == (n_vocab, n_embd)
        assert ck["ln_out.weight"].shape == (n_embd,)
        assert names[0] == "emb.weight" and names[-1] == "head.weight"
        assert ck.info["byteorder"] == "little"
        raw_file = path.read_bytes()
        for t in tensors:
            assert t.qtype.name == expect, t.name
            assert 1 <= len(t.shape) <= 3 and all(d >= 1 for d in t.shape), (t.name, t.shape)
            data = t.raw()
            assert data.dtype == np.uint8 and data.size == t.nbytes
            assert not data.flags.writeable and not data.flags.owndata  # a view of the map
            # `offset` is where the tensor really starts in the file
            assert raw_file[t.offset:t.offset + t.nbytes] == data.tobytes()
            assert np.isfinite(t.to_float32()).all()


@pytest.mark.parametrize("name", PTH_FP32)
def test_fixture_fp32_rounds_to_bf16(fx_dir, name):
    f32 = open_checkpoint(fx_dir / "pytorch" / name)
    b16 = open_checkpoint(fx_dir / "pytorch" / name.replace("-fp32.pth", "-bf16.pth"))
    assert list(f32.tensors) == list(b16.tensors)
    for t in f32:
        other = b16[t.name]
        assert other.shape == t.shape
        np.testing.assert_array_equal(_bf16_rne(t.to_float32()), other.raw().view("<u2"),
                                      err_msg=t.name)


def test_fixture_truncated_pth(fx_dir, tmp_path):
    src = sorted((fx_dir / "pytorch").glob("tiny-rwkv-*-bf16.pth"))[0]
    data = src.read_bytes()
    for keep in (len(data) - 1, len(data) - 22, len(data) // 2, 100, 5):
        cut = tmp_path / f"cut{keep}.pth"
        cut.write_bytes(data[:keep])
        with pytest.raises(BadInput) as e:
            open_checkpoint(cut)
        assert str(cut) in str(e.value) and "\n" not in str(e.value)


def test_readers_never_import_torch_or_safetensors(fx_dir, tmp_path, monkeypatch):
    write_safetensors(tmp_path / "m.safetensors", {"w": ("F32", [2], b"\0" * 8)})
    for mod in ("torch", "safetensors"):
        monkeypatch.setitem(sys.modules, mod, None)  # any import of them now fails
    import importlib
    import host.readers as readers
    for mod in ("pytorch", "safetensors"):
        monkeypatch.delitem(sys.modules, f"host.readers.{mod}")  # re-import under the block
        monkeypatch.setattr(readers, mod, getattr(readers, mod, None), raising=False)
    pt = importlib.import_module("host.readers.pytorch")
    st = importlib.import_module("host.readers.safetensors")
    pth = sorted((fx_dir / "pytorch").glob("*.pth"))[0]
    for t in pt.PytorchCheckpoint(pth):
        t.raw()
    for t in st.SafetensorsCheckpoint(tmp_path / "m.safetensors"):
        t.raw()


# --- malicious pickles ------------------------------------------------------------------------

def _cmd_touch(marker: Path) -> str:
    return f"{sys.executable} -c \"open(r'{marker}', 'w').close()\""


class _SystemReduce:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _payload_os_system(marker: Path) -> tuple[bytes, str]:
    # Hand-written opcodes: GLOBAL 'os system', one-argument tuple, REDUCE.
    return b"\x80\x02" + _global("os", "system") + _p(_cmd_touch(marker)) + b"\x85R.", "os.system"


def _payload_eval(marker: Path) -> tuple[bytes, str]:
    code = f"open(r'{marker}', 'w').close()"
    body = dict_ops([("x", _global("builtins", "eval") + _p(code) + b"\x85R")])
    return b"\x80\x02" + body + b".", "builtins.eval"


def _payload_reduce_p2(marker: Path) -> tuple[bytes, str]:
    obj = {"emb.weight": _SystemReduce(_cmd_touch(marker))}
    return pickle.dumps(obj, protocol=2), f"{os.system.__module__}.system"


def _payload_reduce_p4(marker: Path) -> tuple[bytes, str]:
    # Protocol 4 uses STACK_GLOBAL instead of GLOBAL: must be caught the same way.
    obj = {"emb.weight": _SystemReduce(_cmd_touch(marker))}
    return pickle.dumps(obj, protocol=4), f"{os.system.__module__}.system"


def _payload_after_valid_tensor(marker: Path) -> tuple[bytes, str]:
    good = tensor_ops("0", 4, 0, (4,), (1,))
    bad = _global("os", "system") + _p(_cmd_touch(marker)) + b"\x85R"
    return b"\x80\x02" + dict_ops([("a", good), ("b", bad)]) + b".", "os.system"


def _payload_as_storage_type(marker: Path) -> tuple[bytes, str]:
    # A forbidden global in the storage-type slot of a persistent id.
    return state_dict_pickle([("a", tensor_ops("0", 4, 0, (4,), (1,), storage_type="system",
                                               storage_module="os"))]), "os.system"


PAYLOADS = [_payload_os_system, _payload_eval, _payload_reduce_p2, _payload_reduce_p4,
            _payload_after_valid_tensor, _payload_as_storage_type]


@pytest.mark.parametrize("make", PAYLOADS, ids=lambda f: f.__name__[len("_payload_"):])
def test_malicious_pickle_refused(tmp_path, make):
    # First prove the payload is live: plain pickle really runs it.
    live = tmp_path / "live-marker"
    payload, _ = make(live)
    # (Skipped where a torch global precedes the payload: plain pickle stops there without torch.)
    if make not in (_payload_as_storage_type, _payload_after_valid_tensor):
        try:
            pickle.loads(payload)
        except Exception:  # noqa: BLE001 - e.g. the persistent id without persistent_load
            pass
        assert live.exists(), "test payload does not actually run code"

    marker = tmp_path / "marker"
    payload, global_name = make(marker)
    path = write_torch_zip(tmp_path / "evil.pth", payload, {"0": b"\0" * 16})
    with pytest.raises(BadInput) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert f"forbidden pickle global '{global_name}'" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_build_cannot_tamper_with_allowed_globals(tmp_path):
    # BUILD on the DoubleStorage stand-in, trying to make float64 data pass as float32.
    evil = b"\x80\x02" + _global("torch", "DoubleStorage") + \
        b"N" + b"}" + _p("qtype") + _p("F32") + b"s" + b"\x86b0" + \
        state_dict_pickle([("a", tensor_ops("0", 2, 0, (2,), (1,), "DoubleStorage"))])[2:]
    path = write_torch_zip(tmp_path / "evil.pth", evil, {"0": b"\0" * 16})
    with pytest.raises(BadInput, match="malformed"):
        PytorchCheckpoint(path)
    # ... and the stand-in is untouched for the next file
    ok = write_torch_zip(tmp_path / "f64.pth",
                         state_dict_pickle([("a", tensor_ops("0", 2, 0, (2,), (1,),
                                                             "DoubleStorage"))]),
                         {"0": b"\0" * 16})
    with pytest.raises(BadInput, match="float64"):
        PytorchCheckpoint(ok)


# --- crafted torch.save files -----------------------------------------------------------------

def test_crafted_zip_matches_fixture_layout(fx_dir, tmp_path):
    """Our imitation has the same member list, flags and alignment as a real torch.save file."""
    src = sorted((fx_dir / "pytorch").glob("*.pth"))[0]
    real = zipfile.ZipFile(src)
    archive = real.namelist()[0].split("/")[0]
    keys = [n.rsplit("/", 1)[1] for n in real.namelist() if "/data/" in n]
    fake = write_torch_zip(tmp_path / "x.pth", b"\x80\x02}.",
                           {k: b"\0" * 4 for k in keys}, archive=archive)
    mine = zipfile.ZipFile(fake)
    assert mine.namelist() == real.namelist()
    for a, b in zip(mine.infolist(), real.infolist()):
        assert (a.flag_bits, a.compress_type, a.extra) == (b.flag_bits, b.compress_type, b.extra)
    assert mine.testzip() is None


def test_strided_tensors(tmp_path):
    base = np.arange(24, dtype="<f4") * 1.5 - 7
    half = (np.arange(12, dtype="<f2") - 3) / 4
    bf = np.arange(0x3F80, 0x3F80 + 12, dtype="<u2")  # bf16 bits
    item = {"0": 4, "1": 2, "2": 2}
    src = {"0": base, "1": half, "2": bf}
    specs = [  # name, key, storage type, storage offset, size, stride
        ("base", "0", "FloatStorage", 0, (4, 6), (6, 1)),
        ("transposed", "0", "FloatStorage", 0, (6, 4), (1, 6)),
        ("every_other_col", "0", "FloatStorage", 1, (4, 3), (6, 2)),
        ("permuted3d", "0", "FloatStorage", 0, (4, 2, 3), (1, 12, 4)),
        ("row_slice", "0", "FloatStorage", 6, (2, 6), (6, 1)),
        ("unit_dim_odd_stride", "0", "FloatStorage", 6, (1, 6), (99, 1)),
        ("broadcast", "0", "FloatStorage", 3, (3, 2), (0, 1)),
        ("scalar", "0", "FloatStorage", 5, (), ()),
        ("empty", "0", "FloatStorage", 0, (0, 6), (6, 1)),
        ("half_T", "1", "HalfStorage", 0, (4, 3), (1, 4)),
        ("bf16_T", "2", "BFloat16Storage", 2, (2, 5), (1, 2)),
    ]
    pkl = state_dict_pickle([(n, tensor_ops(k, src[k].size, off, size, stride, st))
                             for n, k, st, off, size, stride in specs])
    path = write_torch_zip(tmp_path / "strided.pth", pkl, {k: v.tobytes() for k, v in src.items()})
    ck = open_checkpoint(path)
    assert list(ck.tensors) == [s[0] for s in specs]
    assert ck.info["shared_storages"]["0"][:2] == ["base", "transposed"]
    qt = {"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16"}
    raw_file = path.read_bytes()
    for name, key, st, off, size, stride in specs:
        t = ck[name]
        arr = src[key]
        want = np.lib.stride_tricks.as_strided(
            arr[off:], shape=size, strides=tuple(s * arr.itemsize for s in stride))
        assert t.shape == size and t.qtype.name == qt[st]
        got = t.raw()
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name
        if size and 0 not in size:
            first = raw_file[t.offset:t.offset + item[key]]
            assert first == arr[off:off + 1].tobytes(), name
    np.testing.assert_array_equal(ck["transposed"].to_float32(), base.reshape(4, 6).T)
    np.testing.assert_array_equal(ck["half_T"].to_float32(),
                                  half.reshape(3, 4).T.astype(np.float32))
    assert ck["scalar"].to_float32() == base[5]
    # contiguous tensors are zero-copy views of the map, strided ones are fresh gathers
    assert not ck["row_slice"].raw().flags.owndata
    assert not ck["unit_dim_odd_stride"].raw().flags.writeable


def test_unwraps_state_dict_and_records_extras(tmp_path):
    inner = dict_ops([("w", tensor_ops("0", 4, 0, (2, 2), (2, 1))), ("step", 7)])
    pkl = b"\x80\x02" + dict_ops([("epoch", 3), ("state_dict", inner), ("note", "hi")]) + b"."
    ck = PytorchCheckpoint(write_torch_zip(tmp_path / "wrapped.pth", pkl,
                                           {"0": np.arange(4, dtype="<f4").tobytes()}))
    assert list(ck.tensors) == ["w"]
    assert ck.info["unwrapped"] == "state_dict"
    assert ck.info["extra"]["epoch"] == 3 and ck.info["extra"]["note"] == "hi"
    assert ck.info["extra"]["state_dict.step"] == 7
    np.testing.assert_array_equal(ck["w"].to_float32(), [[0, 1], [2, 3]])


def _zip_with(path, members: dict[str, bytes], compress=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return Path(path)


ONE = state_dict_pickle([("w", tensor_ops("0", 6, 0, (2, 3), (3, 1)))])
SIX = np.arange(6, dtype="<f4").tobytes()


@pytest.mark.parametrize("case, match", [
    ("missing_storage", "storage member 'archive/data/0' is missing"),
    ("past_storage", "extends past its storage"),
    ("short_storage", "declares 6 float32 elements"),
    ("no_data_pkl", "no <archive>/data.pkl"),
    ("plain_zip", "no <archive>/data.pkl"),
    ("compressed", "compressed"),
    ("float64", "dtype float64"),
    ("int64", "dtype int64"),
    ("not_a_dict", "expected a dict of tensors"),
    ("bad_persistent_id", "persistent id"),
    ("garbage_pickle", "malformed archive/data.pkl"),
    ("legacy", "legacy (pre-zip) PyTorch pickle"),
    ("not_zip", "not a PyTorch zip checkpoint"),
    ("empty", "too short"),
    ("truncated", "truncated"),
    ("torchscript", "TorchScript"),
    ("huge_memo", "memo index"),
    ("huge_broadcast", "broadcast view"),
])
def test_bad_pth(tmp_path, case, match):
    path = tmp_path / f"{case}.pth"
    if case == "missing_storage":
        write_torch_zip(path, ONE, {})
    elif case == "past_storage":
        write_torch_zip(path, state_dict_pickle([("w", tensor_ops("0", 6, 1, (2, 3), (3, 1)))]),
                        {"0": SIX})
    elif case == "short_storage":
        write_torch_zip(path, ONE, {"0": SIX[:20]})
    elif case == "no_data_pkl":
        write_torch_zip(path, ONE, {"0": SIX}, drop=("data.pkl",))
    elif case == "plain_zip":
        _zip_with(path, {"hello.txt": b"hi"})
    elif case == "compressed":
        _zip_with(path, {"archive/data.pkl": ONE, "archive/data/0": SIX}, zipfile.ZIP_DEFLATED)
    elif case == "float64":
        write_torch_zip(path, state_dict_pickle(
            [("w", tensor_ops("0", 6, 0, (6,), (1,), "DoubleStorage"))]), {"0": SIX * 2})
    elif case == "int64":
        write_torch_zip(path, state_dict_pickle(
            [("w", tensor_ops("0", 6, 0, (6,), (1,), "LongStorage"))]), {"0": SIX * 2})
    elif case == "not_a_dict":
        write_torch_zip(path, b"\x80\x02]" + b"(" + tensor_ops("0", 6, 0, (6,), (1,)) + b"e.",
                        {"0": SIX})
    elif case == "bad_persistent_id":
        write_torch_zip(path, b"\x80\x02" + _p(("x", 1)) + b"Q.", {})
    elif case == "garbage_pickle":
        write_torch_zip(path, b"\x80\x02}(X\xff\xff\xff\x7f", {})
    elif case == "legacy":
        path.write_bytes(pickle.dumps({"w": 1}, protocol=2) + b"\0" * 32)
    elif case == "not_zip":
        path.write_bytes(b"hello, this is not a checkpoint at all")
    elif case == "empty":
        path.write_bytes(b"PK")
    elif case == "truncated":
        write_torch_zip(path, ONE, {"0": SIX})
        path.write_bytes(path.read_bytes()[:-30])
    elif case == "torchscript":
        _zip_with(path, {"model/constants.pkl": b"\x80\x02).", "model/code/__torch__.py": b""})
    elif case == "huge_memo":  # the C unpickler would allocate a 16 GiB memo table first
        write_torch_zip(path, b"\x80\x02}r" + struct.pack("<I", 2**31 - 1) + b".", {})
    elif case == "huge_broadcast":  # stride-0 view of 6 floats claiming 2**40 elements
        write_torch_zip(path, state_dict_pickle(
            [("w", tensor_ops("0", 6, 0, (1 << 20, 1 << 20), (0, 0)))]), {"0": SIX})
    with pytest.raises(BadInput) as e:
        PytorchCheckpoint(path)
    msg = str(e.value)
    assert match in msg and str(path) in msg and "\n" not in msg
    if case in ("legacy", "not_zip"):
        with pytest.raises(BadInput):
            open_checkpoint(path)
    if case in ("missing_storage", "past_storage", "float64"):
        assert "tensor 'w'" in msg


def _strided_example(tmp_path) -> tuple[bytes, bytes]:
    base = np.arange(24, dtype="<f4")
    pkl = state_dict_pickle([("a", tensor_ops("0", 24, 0, (4, 6), (6, 1))),
                             ("b", tensor_ops("0", 24, 1, (4, 3), (6, 2))),
                             ("c", tensor_ops("1", 12, 0, (4, 3), (1, 4), "HalfStorage"))])
    return pkl, write_torch_zip(tmp_path / "ex.pth", pkl,
                                {"0": base.tobytes(), "1": base[:6].tobytes()}).read_bytes()


def test_mutated_files_only_raise_badinput(tmp_path):
    """Random byte edits / truncations: every failure is a one-line BadInput, never a crash."""
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    pkl, pth = _strided_example(tmp_path)
    sft = write_safetensors(tmp_path / "ex.safetensors", {
        "w": ("F32", [2, 2], np.arange(4, dtype="<f4").tobytes()),
        "v": ("BF16", [3], b"\x80\x3f" * 3)}, {"k": "v"}).read_bytes()
    target = tmp_path / "m"

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(["pickle", "pth", "safetensors"]),
           st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1,
                    max_size=4),
           st.one_of(st.none(), st.integers(0, 1 << 20)))
    def check(kind, edits, cut):
        data = bytearray({"pickle": pkl, "pth": pth, "safetensors": sft}[kind])
        for pos, value in edits:
            data[pos % len(data)] = value
        if cut is not None:
            data = data[:cut % len(data)]
        if kind == "pickle":  # a valid zip around a damaged pickle reaches the unpickler
            write_torch_zip(target, bytes(data), {"0": pth[:96], "1": pth[:24]})
            cls = PytorchCheckpoint
        else:
            target.write_bytes(bytes(data))
            cls = PytorchCheckpoint if kind == "pth" else SafetensorsCheckpoint
        try:
            for t in cls(target):
                t.to_float32()
        except BadInput as e:
            assert "\n" not in str(e)

    check()


# --- safetensors ------------------------------------------------------------------------------

def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Hand-written safetensors: tensors = name -> (dtype, shape, raw bytes), in data order."""
    header, blobs, pos = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # the reference writer pads the header to 8 bytes
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    return Path(path)


def _safetensors_bf16(path, tensors: dict[str, np.ndarray], metadata=None) -> Path:
    """Write BF16 (given as uint16 bit arrays) with the safetensors package's own writer."""
    st = pytest.importorskip("safetensors")
    arrays = {k: np.ascontiguousarray(v, dtype="<u2") for k, v in tensors.items()}
    try:  # safetensors >= 0.7
        specs = {k: st.TensorSpec(dtype="bfloat16", shape=list(a.shape), data_ptr=a.ctypes.data,
                                  data_len=a.nbytes) for k, a in arrays.items()}
        blob = st.serialize(specs, metadata=metadata)
    except (AttributeError, TypeError):  # older: dicts of dtype/shape/data
        blob = st.serialize({k: {"dtype": "bfloat16", "shape": list(a.shape),
                                 "data": a.tobytes()} for k, a in arrays.items()},
                            metadata=metadata)
    Path(path).write_bytes(bytes(blob))
    return Path(path)


def test_safetensors_numpy_roundtrip(tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    arrays = {
        "emb.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "blocks.0.att.time_mix_k": rng.standard_normal((1, 1, 8)).astype(np.float32),
        "ln.bias": rng.standard_normal(8).astype(np.float16),
        "special": np.array([np.inf, -0.0, np.nan, 6e-8, 65504], dtype=np.float16),
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((0, 8), dtype=np.float32),
    }
    path = tmp_path / "model.safetensors"
    sn.save_file(arrays, str(path), metadata={"format": "np", "note": "x"})
    ck = open_checkpoint(path)
    assert isinstance(ck, SafetensorsCheckpoint) and ck.format_name == "safetensors"
    assert ck.info["metadata"] == {"format": "np", "note": "x"}
    assert set(ck.tensors) == set(arrays)
    offsets = [t.offset for t in ck]
    assert offsets == sorted(offsets)  # file order
    raw_file = path.read_bytes()
    for name, a in arrays.items():
        t = ck[name]
        assert t.shape == a.shape
        assert t.qtype.name == {np.float32: "F32", np.float16: "F16"}[a.dtype.type]
        assert t.raw().tobytes() == a.tobytes()
        assert raw_file[t.offset:t.offset + t.nbytes] == a.tobytes()
        np.testing.assert_array_equal(t.to_float32(), a.astype(np.float32))
    assert not ck["emb.weight"].raw().flags.owndata


def test_safetensors_bf16_roundtrip(tmp_path):
    bits = {"w": np.array([[0x3F80, 0xC000, 0x7F80], [0x0001, 0x8000, 0x4049]], "<u2"),
            "b": np.array([0x3F00], "<u2")}
    path = _safetensors_bf16(tmp_path / "bf.safetensors", bits, metadata={"k": "v"})
    ck = SafetensorsCheckpoint(path)
    assert ck.info["metadata"] == {"k": "v"}
    for name, b in bits.items():
        assert ck[name].qtype.name == "BF16" and ck[name].shape == b.shape
        assert ck[name].raw().tobytes() == b.tobytes()
    want = (bits["w"].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(ck["w"].to_float32(), want)
    # our hand writer produces what the reference parser accepts (used by the corrupt cases)
    st = pytest.importorskip("safetensors")
    mine = write_safetensors(tmp_path / "mine.safetensors",
                             {"w": ("BF16", [2, 3], bits["w"].tobytes())})
    assert st.deserialize(mine.read_bytes())[0][1]["dtype"] == "BF16"
    assert SafetensorsCheckpoint(mine)["w"].raw().tobytes() == bits["w"].tobytes()


def test_safetensors_from_fixture_roundtrip(fx_dir, tmp_path):
    """A fixture .pth written out as safetensors (f32 via numpy API) reads back bit-exactly."""
    sn = pytest.importorskip("safetensors.numpy")
    src = sorted((fx_dir / "pytorch").glob("tiny-rwkv-*-fp32.pth"))[0]
    ck = open_checkpoint(src)
    arrays = {t.name: t.to_float32() for t in ck}
    sn.save_file(arrays, str(tmp_path / "m.safetensors"))
    back = open_checkpoint(tmp_path / "m.safetensors")
    for t in ck:
        assert back[t.name].raw().tobytes() == t.raw().tobytes()


def test_safetensors_sharded(tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    shard1 = {"a": rng.standard_normal((4, 4)).astype(np.float32),
              "b": rng.standard_normal(4).astype(np.float16)}
    shard2 = {"c": rng.standard_normal((2, 3)).astype(np.float32)}
    n1, n2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    sn.save_file(shard1, str(tmp_path / n1))
    sn.save_file(shard2, str(tmp_path / n2))
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {"c": n2, "a": n1, "b": n1}
    index.write_text(json.dumps({"metadata": {"total_size": 98}, "weight_map": weight_map}))
    ck = open_checkpoint(index)
    assert isinstance(ck, SafetensorsCheckpoint)
    assert ck.info["shards"] == [n1, n2] and ck.info["metadata"] == {"total_size": 98}
    assert set(ck.tensors) == {"a", "b", "c"}
    for name, a in {**shard1, **shard2}.items():
        assert ck[name].raw().tobytes() == a.tobytes()
        assert ck[name].path == str(tmp_path / weight_map[name])

    def broken(doc, remove=None):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        bad.mkdir()
        for n in (n1, n2):
            if n != remove:
                shutil.copy(tmp_path / n, bad / n)
        (bad / "model.safetensors.index.json").write_text(json.dumps(doc))
        with pytest.raises(BadInput) as e:
            open_checkpoint(bad / "model.safetensors.index.json")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "missing" in broken({"weight_map": weight_map}, remove=n2)
    assert "not in shard" in broken({"weight_map": {**weight_map, "zz": n1}})
    assert "not in the index" in broken({"weight_map": {"a": n1, "c": n2}})
    assert "maps it to" in broken({"weight_map": {"a": n1, "b": n2, "c": n2}})
    assert "not a file name" in broken({"weight_map": {**weight_map, "a": "../" + n1}})
    assert "weight_map" in broken({"metadata": {}})
    assert "weight_map" in broken([1, 2])


F4 = np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize("case, match", [
    ("short", "shorter than the 8-byte"),
    ("header_past_end", "runs past the end"),
    ("huge_header", "implausible"),
    ("not_json", "not valid JSON"),
    ("json_list", "not a JSON object"),
    ("not_utf8", "not UTF-8"),
    ("duplicate", "duplicate key"),
    ("offsets_past_end", "run past the"),
    ("offsets_reversed", "not an increasing pair"),
    ("offsets_overlap", "overlap"),
    ("hole", "belong to no tensor"),
    ("trailing", "cover only"),
    ("size_mismatch", "needs 16"),
    ("bad_shape", "malformed shape"),
    ("bad_offsets", "malformed data_offsets"),
    ("unsupported_dtype", "unsupported dtype I64"),
    ("unknown_dtype", "unknown dtype Q4"),
    ("bad_metadata", "__metadata__"),
    ("truncated", "run past the"),
])
def test_bad_safetensors(tmp_path, case, match):
    path = tmp_path / f"{case}.safetensors"

    def hdr(entries, data=F4, **kw):
        h = json.dumps(entries).encode()
        h += b" " * (-len(h) % 8)
        path.write_bytes(struct.pack("<Q", kw.get("n", len(h))) + h + data)

    w = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    if case == "short":
        path.write_bytes(b"\x10\0\0")
    elif case == "header_past_end":
        hdr({"w": w}, data=b"", n=10_000)
    elif case == "huge_header":
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 8) + b'{"w": [}' + F4)
    elif case == "json_list":
        hdr([1, 2])
    elif case == "not_utf8":
        path.write_bytes(struct.pack("<Q", 7) + b'{"\xff":1}' + F4)
    elif case == "duplicate":
        h = b'{"w":' + json.dumps(w).encode() + b',"w":' + json.dumps(w).encode() + b"}"
        path.write_bytes(struct.pack("<Q", len(h)) + h + F4)
    elif case == "offsets_past_end":
        hdr({"w": {**w, "data_offsets": [0, 32], "shape": [8]}})
    elif case == "offsets_reversed":
        hdr({"w": {**w, "data_offsets": [16, 0]}})
    elif case == "offsets_overlap":
        hdr({"w": {**w, "shape": [2], "data_offsets": [0, 8]},
             "v": {**w, "shape": [2], "data_offsets": [4, 12]}})
    elif case == "hole":
        hdr({"w": {**w, "shape": [2], "data_offsets": [8, 16]}})
    elif case == "trailing":
        hdr({"w": {**w, "shape": [2], "data_offsets": [0, 8]}})
    elif case == "size_mismatch":
        hdr({"w": {**w, "data_offsets": [0, 8]}}, data=F4[:8])
    elif case == "bad_shape":
        hdr({"w": {**w, "shape": [4, -1]}})
    elif case == "bad_offsets":
        hdr({"w": {**w, "data_offsets": [0]}})
    elif case == "unsupported_dtype":
        hdr({"w": {**w, "dtype": "I64", "shape": [2]}})
    elif case == "unknown_dtype":
        hdr({"w": {**w, "dtype": "Q4"}})
    elif case == "bad_metadata":
        hdr({"__metadata__": {"n": 1}, "w": w})
    elif case == "truncated":
        hdr({"w": w}, data=F4[:-3])
    with pytest.raises(BadInput) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert match in msg and str(path) in msg and "\n" not in msg
    if case in ("unsupported_dtype", "offsets_past_end", "size_mismatch", "truncated"):
        assert "tensor 'w'" in msg


def test_safetensors_refuses_numpy_int_and_uint16(tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    sn.save_file({"ok": np.zeros(2, np.float32), "ids": np.zeros(3, np.uint16)},
                 str(tmp_path / "m.safetensors"))
    with pytest.raises(BadInput, match=r"tensor 'ids'.*unsupported dtype U16"):
        open_checkpoint(tmp_path / "m.safetensors")


def test_safetensors_roundtrip_random_shapes(tmp_path):
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st
    sn = pytest.importorskip("safetensors.numpy")

    shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
    dtypes = st.sampled_from([np.float32, np.float16])

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.lists(st.tuples(shapes, dtypes), min_size=1, max_size=5), st.integers(0, 2**32 - 1))
    def check(specs, seed):
        rng = np.random.default_rng(seed)
        arrays = {f"t{i}": np.asarray(rng.standard_normal(s) * 100).astype(d) for i, (s, d) in
                  enumerate(specs)}
        path = tmp_path / "h.safetensors"
        sn.save_file(arrays, str(path))
        ck = SafetensorsCheckpoint(path)
        for name, a in arrays.items():
            assert ck[name].shape == a.shape
            assert ck[name].raw().tobytes() == a.tobytes()

    check()
