"""Bad input: one line naming file/tensor/offset, exit 2, no traceback, no output file."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from conftest import fixture_path, fp32_model, run_cli
from host.readers.rwkv_cpp import RwkvCppCheckpoint


def _tensor_offsets(path):
    ck = RwkvCppCheckpoint(path)
    return {t.name: (t.offset, t.shape) for t in ck}


def _assert_one_line_error(proc, *needles):
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _convert_fails(tmp_path, src, *needles):
    out = tmp_path / "out.bin"
    proc = run_cli("convert", src, "-o", out, "--quant", "Q4_0")
    _assert_one_line_error(proc, *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".rwkv-stream-")] == []


def test_missing_file(tmp_path):
    _convert_fails(tmp_path, tmp_path / "nope.bin", "nope.bin", "no such file")


def test_truncated_file(tmp_path):
    data = fp32_model("5v2-730K").read_bytes()
    for cut in (10, 30, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(data[:cut])
        _convert_fails(tmp_path, bad, str(bad))
        bad.unlink()


def test_truncated_names_tensor_and_offset(tmp_path):
    src = fp32_model("4v0-660K")
    offsets = _tensor_offsets(src)
    off, _ = offsets["head.weight"]
    bad = tmp_path / "cut.bin"
    bad.write_bytes(src.read_bytes()[:off + 100])
    _convert_fails(tmp_path, bad, "head.weight", f"byte offset {off}", "truncated")


def test_wrong_magic(tmp_path):
    bad = tmp_path / "magic.bin"
    bad.write_bytes(b"GGUF" + fp32_model("4v0-660K").read_bytes()[4:])
    _convert_fails(tmp_path, bad, "unrecognised file")


def test_unknown_type(tmp_path):
    src = fp32_model("4v0-660K")
    data = bytearray(src.read_bytes())
    struct.pack_into("<I", data, 24 + 8, 5)     # first tensor's type -> removed Q4_2 code
    bad = tmp_path / "type.bin"
    bad.write_bytes(bytes(data))
    _convert_fails(tmp_path, bad, "emb.weight", "byte offset 32", "rwkv.cpp data type 5")


def test_quantized_tensor_in_version_100(tmp_path):
    src = fp32_model("4v0-660K")    # a version-100 file
    data = bytearray(src.read_bytes())
    assert struct.unpack_from("<I", data, 4)[0] == 100
    struct.pack_into("<I", data, 24 + 8, 2)
    bad = tmp_path / "v100.bin"
    bad.write_bytes(bytes(data))
    _convert_fails(tmp_path, bad, "version-100", "emb.weight")


def test_nan_weight_names_tensor_and_offset(tmp_path):
    src = fp32_model("5v1-730K")
    off, _ = _tensor_offsets(src)["blocks.2.att.key.weight"]
    data = bytearray(src.read_bytes())
    struct.pack_into("<f", data, off + 4 * 7, float("nan"))
    bad = tmp_path / "nan.bin"
    bad.write_bytes(bytes(data))
    _convert_fails(tmp_path, bad, "blocks.2.att.key.weight", f"byte offset {off + 28}",
                   "non-finite")


def test_shape_mismatch(tmp_path):
    src = fp32_model("4v0-660K")
    data = bytearray(src.read_bytes())
    # Rewrite ln1.weight (C,) as (C/2, 2): same byte count, wrong shape for RWKV v4.
    ck = RwkvCppCheckpoint(src)
    names = list(ck.tensors)
    start = 24
    for name in names:
        n_dims, name_len, _ = struct.unpack_from("<3I", data, start)
        if name == "blocks.0.ln1.weight":
            break
        t = ck.tensors[name]
        start = t.offset + t.nbytes
    assert n_dims == 1
    c = struct.unpack_from("<I", data, start + 12)[0]
    new_header = struct.pack("<5I", 2, name_len, 0, 2, c // 2)
    data[start:start + 16] = new_header[:16]
    data[start + 16:start + 16] = new_header[16:]
    bad = tmp_path / "shape.bin"
    bad.write_bytes(bytes(data))
    _convert_fails(tmp_path, bad, "blocks.0.ln1.weight", "does not match the expected")


def test_unknown_architecture(tmp_path):
    # A valid rwkv.cpp container whose tensors are not an RWKV model.
    name = b"model.layers.0.weight"
    arr = np.zeros(32, np.float32)
    data = struct.pack("<6I", 0x67676D66, 101, 1, 32, 1, 0) + struct.pack("<4I", 1, len(name), 0,
                                                                          32) + name + arr.tobytes()
    bad = tmp_path / "llama.bin"
    bad.write_bytes(data)
    _convert_fails(tmp_path, bad, "model.layers.0.weight", "not known")


def test_unknown_quant_type_is_usage_error(tmp_path):
    proc = run_cli("convert", fp32_model("4v0-660K"), "-o", tmp_path / "x.bin", "--quant", "Q3_X")
    _assert_one_line_error(proc, "unknown quant type 'Q3_X'")


def test_bad_suffix(tmp_path):
    proc = run_cli("convert", fp32_model("4v0-660K"), "-o", tmp_path / "x.gguf", "--quant", "Q4_0")
    _assert_one_line_error(proc, "--format")


def test_inspect_json_and_text(tmp_path):
    proc = run_cli("inspect", fp32_model("6v0-3m"), "--json", check_status=0)
    info = json.loads(proc.stdout)
    assert info["version"] == "6" and info["n_head"] == 16 and info["head_size"] == 8
    assert info["lora"] == {"maa": 32, "decay": 64}
    t = {x["name"]: x for x in info["tensors"]}
    assert t["blocks.0.att.key.weight"]["type"] == "F32"
    assert t["blocks.0.att.key.weight"]["bits_per_weight"] == 32.0
    proc = run_cli("inspect", fixture_path("rwkv_cpp", "tiny-rwkv-6v0-3m-Q5_1.bin"),
                   check_status=0)
    text = proc.stdout.decode()
    assert "RWKV v6" in text
    assert [line for line in text.splitlines() if "blocks.0.att.key.weight" in line][0].split()[1] \
        == "Q5_1"


def test_version_flag():
    proc = run_cli("--version", check_status=0)
    assert proc.stdout.decode().startswith("rwkv-stream ")


@pytest.mark.parametrize("arch", ["v4", "v5.1", "v5.2", "v6", "v7"])
def test_synth_writes_a_loadable_model(arch, tmp_path):
    out = tmp_path / "s.bin"
    run_cli("synth", "--arch", arch, "--n-embd", "64", "--n-layer", "2", "--n-vocab", "100",
            "--head-size", "32", "-o", out, check_status=0)
    proc = run_cli("inspect", out, "--json", check_status=0)
    info = json.loads(proc.stdout)
    assert info["version"] == arch[1:] and info["n_layer"] == 2 and info["n_vocab"] == 100
    if arch != "v4":
        assert info["head_size"] == 32 and info["n_head"] == 2
    q = tmp_path / "q.bin"
    run_cli("convert", out, "-o", q, "--quant", "Q5_1", check_status=0)


@pytest.mark.parametrize("command", [["validate"], ["inspect"], ["run", "--prompt", "x"],
                                     ["plan", "--board", "rp2040"]])
def test_missing_files_are_one_line_for_every_command(command, tmp_path):
    missing = tmp_path / "nope.rwks"
    proc = run_cli(command[0], missing, *command[1:])
    _assert_one_line_error(proc, "nope.rwks")


def test_output_into_a_missing_folder_is_one_line(tmp_path):
    proc = run_cli("convert", fp32_model("4v0-660K"), "-o", tmp_path / "no" / "x.bin", "--quant",
                   "Q4_0")
    _assert_one_line_error(proc, "no")


def test_a_bad_stream_is_bad_input_except_for_validate(tmp_path):
    good = tmp_path / "a.rwks"
    run_cli("convert", fp32_model("4v0-660K"), "-o", good, "--quant", "Q4_0", check_status=0)
    bad = tmp_path / "cut.rwks"
    bad.write_bytes(good.read_bytes()[:5000])
    for command in (["inspect"], ["plan", "--board", "rp2040"], ["run", "--prompt", "x"]):
        _assert_one_line_error(run_cli(command[0], bad, *command[1:]), "cut.rwks")
    proc = run_cli("validate", bad)
    assert proc.returncode == 1 and b"cut.rwks" in proc.stderr
    _assert_one_line_error(run_cli("convert", good, "-o", tmp_path / "x.bin", "--quant", "Q4_0"),
                           "this is a stream")
