"""`convert` reproduces rwkv.cpp's own quantizer byte for byte (SHA-256 from the fixtures README)."""
from __future__ import annotations

import hashlib
import re

import pytest

from conftest import MODELS, QUANTS, fixture_path, fp32_model, run_cli
from host.convert import convert


def _expected_sha() -> dict[str, str]:
    text = fixture_path("rwkv_cpp_logits", "README.md").read_text()
    return {name: sha for sha, name in re.findall(r"^([0-9a-f]{64})\s+(\S+\.bin)$", text, re.M)}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_file_matches_rwkv_cpp(model, quant, tmp_path):
    expected = _expected_sha()
    assert len([n for n in expected if re.fullmatch(r"tiny-rwkv-[^-]+-[^-]+-Q\d_\d\.bin", n)]) == 25
    out = tmp_path / f"tiny-rwkv-{model}-{quant}.bin"
    convert(fp32_model(model), out, quant)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected[out.name]


def test_cli_convert_to_stdout_equals_file(tmp_path):
    src = fp32_model("7v0-834K")
    out = tmp_path / "a.bin"
    run_cli("convert", src, "-o", out, "--quant", "Q5_0", check_status=0)
    proc = run_cli("convert", src, "-o", "-", "--quant", "Q5_0", "--format", "rwkv.cpp",
                   check_status=0)
    assert proc.stdout == out.read_bytes()


def test_fp16_file_quantizes_like_rwkv_cpp_from_fp16(tmp_path):
    # rwkv.cpp quantizes FP16 files too; emb/head stay FP16, the matrices come out identical
    # to quantizing the FP32 values rounded to FP16.
    from host.model import load_model
    from formats.quants import by_name
    src = fixture_path("rwkv_cpp", "tiny-rwkv-5v2-730K-FP16.bin")
    out = tmp_path / "q.bin"
    convert(src, out, "Q4_1")
    m_src, m_out = load_model(src), load_model(out)
    assert m_out["emb.weight"].source.qtype.name == "F16"
    key = "blocks.3.att.key.weight"
    assert m_out[key].source.qtype.name == "Q4_1"
    assert bytes(m_out[key].raw()) == bytes(
        by_name("Q4_1").quantize(m_src[key].values()).reshape(-1))


def test_tensor_type_override(tmp_path):
    from host.model import load_model
    out = tmp_path / "o.bin"
    convert(fp32_model("4v0-660K"), out, "Q4_0", ["head.weight=Q8_0", "blocks.*.ffn.*.weight=Q5_1"])
    m = load_model(out)
    assert m["head.weight"].source.qtype.name == "Q8_0"
    assert m["blocks.2.ffn.key.weight"].source.qtype.name == "Q5_1"
    assert m["blocks.2.att.key.weight"].source.qtype.name == "Q4_0"
    assert m["blocks.2.ln1.weight"].source.qtype.name == "F32"
