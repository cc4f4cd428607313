"""The canonical model is the same whatever the checkpoint format."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_path, fp32_model, run_cli
from formats.quants import by_name
from host.convert import convert
from host.model import load_model

PTH_MODELS = ["4v0-660K", "5v1-730K", "5v2-730K", "7v0-834K"]   # no v6 .pth exists


def _bits(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("model", PTH_MODELS)
def test_pth_fp32_equals_bin_fp32_bit_for_bit(model):
    pth = load_model(fixture_path("pytorch", f"tiny-rwkv-{model}-fp32.pth"))
    binm = load_model(fp32_model(model))
    assert pth.version == binm.version and pth.hparams == binm.hparams
    assert list(pth.tensors) == list(binm.tensors)
    assert pth.source_order() == binm.source_order()
    for name in binm.tensors:
        a, b = pth[name].values(), binm[name].values()
        assert a.shape == b.shape and np.array_equal(_bits(a), _bits(b)), name


@pytest.mark.parametrize("model", PTH_MODELS)
def test_pth_converts_to_the_rwkv_cpp_file(model, tmp_path):
    """pth -> .bin FP32 is rwkv.cpp's converter output except the header version (101)."""
    out = tmp_path / "a.bin"
    convert(fixture_path("pytorch", f"tiny-rwkv-{model}-fp32.pth"), out, "F32")
    ours, theirs = out.read_bytes(), fp32_model(model).read_bytes()
    assert len(ours) == len(theirs)
    assert ours[:4] == theirs[:4] and ours[8:20] == theirs[8:20] and ours[24:] == theirs[24:]


@pytest.mark.parametrize("model", PTH_MODELS)
def test_pth_bf16_is_the_bf16_rounding(model):
    bf = load_model(fixture_path("pytorch", f"tiny-rwkv-{model}-bf16.pth"))
    fp = load_model(fixture_path("pytorch", f"tiny-rwkv-{model}-fp32.pth"))
    bf16 = by_name("BF16")
    checked = 0
    for name, t in fp.tensors.items():
        if t.transformed:
            continue
        want = bf16.dequantize(bf16.quantize(t.values()), t.shape)
        assert np.array_equal(_bits(bf[name].values()), _bits(want)), name
        checked += 1
    assert checked > 10


def test_bf16_pth_converts_with_fp16_matrices(tmp_path):
    out = tmp_path / "q.bin"
    convert(fixture_path("pytorch", "tiny-rwkv-7v0-834K-bf16.pth"), out, "Q5_0")
    m = load_model(out)
    assert m["emb.weight"].source.qtype.name == "F16"       # as rwkv.cpp's FP16 converter
    assert m["blocks.3.att.w1"].source.qtype.name == "F16"
    assert m["blocks.3.att.key.weight"].source.qtype.name == "Q5_0"
    assert m["blocks.3.ln1.weight"].source.qtype.name == "F32"


def test_safetensors_round_trip_through_convert(tmp_path):
    from safetensors.numpy import save_file
    fp = load_model(fixture_path("pytorch", "tiny-rwkv-5v2-730K-fp32.pth"))
    raw = {t.name: t.to_float32() for t in fp.checkpoint}
    save_file(raw, str(tmp_path / "m.safetensors"))
    st = load_model(tmp_path / "m.safetensors")
    for name, t in fp.tensors.items():
        assert np.array_equal(_bits(st[name].values()), _bits(t.values())), name
    proc = run_cli("inspect", tmp_path / "m.safetensors", "--json", check_status=0)
    assert b'"format": "safetensors"' in proc.stdout


def test_hugging_face_names_map_to_canonical(tmp_path):
    from safetensors.numpy import save_file
    from host.names import NAMES
    fp = load_model(fixture_path("pytorch", "tiny-rwkv-4v0-660K-fp32.pth"))
    to_hf = {}
    for canon, hf, _ in NAMES:
        if hf is None:
            continue
        for t in fp.checkpoint:
            import re
            pat = "^" + re.escape(canon).replace(re.escape("{i}"), r"(\d+)") + "$"
            mm = re.match(pat, t.name)
            if mm:
                to_hf[t.name] = hf.replace("{i}", mm.group(1)) if mm.groups() else hf
    assert len(to_hf) == len(fp.checkpoint.tensors)
    save_file({to_hf[t.name]: t.to_float32() for t in fp.checkpoint},
              str(tmp_path / "hf.safetensors"))
    hf = load_model(tmp_path / "hf.safetensors")
    for name, t in fp.tensors.items():
        assert np.array_equal(_bits(hf[name].values()), _bits(t.values())), name
