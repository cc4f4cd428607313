"""eval and calibrate (issue 8), through the real CLI, checked against independent numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, fp32_model, run_cli
from host.model import load_model
from reference_forward import layer_norm, mix

TEXT = REPO / "docs" / "quality" / "eval-text.txt"


def _eval(*args):
    proc = run_cli("eval", *args, "--json", check_status=0)
    return json.loads(proc.stdout)


def test_f32_against_f32_is_kl_zero_and_full_agreement():
    r = _eval(fp32_model("5v2-730K"), "--text", TEXT, "--quant", "F32", "--limit", "300")
    assert r["kl_mean"] == 0.0 and r["kl_max"] == 0.0
    assert r["top1_agreement"] == 1.0
    assert r["bits_per_byte"] == r["reference_bits_per_byte"]


def test_bits_per_byte_equal_cross_entropy_of_run_logits(tmp_path):
    """eval's sequence-mode logits give the same cross-entropy as `run --logits-out`, which
    feeds one token per pass: computed here with plain numpy."""
    model = fp32_model("7v0-834K")
    text = TEXT.read_bytes()[:200]
    (tmp_path / "t.txt").write_bytes(text)
    r = _eval(model, "--text", tmp_path / "t.txt", "--quant", "Q5_1", "--seq", "16")
    run_cli("run", model, "--prompt-file", tmp_path / "t.txt", "--quant", "Q5_1",
            "--logits-out", tmp_path / "l.npy", check_status=0)
    logits = np.load(tmp_path / "l.npy").astype(np.float64)
    lp = logits[:-1] - np.log(np.exp(logits[:-1] - logits[:-1].max(1, keepdims=True)).sum(1,
                              keepdims=True)) - logits[:-1].max(1, keepdims=True)
    nll = -lp[np.arange(len(text) - 1), np.frombuffer(text[1:], np.uint8)]
    assert r["tokens"] == len(text) - 1 and r["bytes"] == len(text) - 1
    assert abs(r["bits_per_byte"] - nll.mean() / np.log(2)) < 1e-5


def test_coarser_types_lose_more():
    model = fp32_model("5v2-730K")
    kl = {q: _eval(model, "--text", TEXT, "--quant", q, "--limit", "400")["kl_mean"]
          for q in ("Q8_0", "Q5_1", "Q4_0")}
    assert 0 < kl["Q8_0"] < kl["Q5_1"] < kl["Q4_0"], kl


def test_stream_model_needs_reference_for_kl(tmp_path):
    model = fp32_model("4v0-660K")
    run_cli("convert", model, "-o", tmp_path / "m.rwks", "--quant", "Q4_1", check_status=0)
    alone = _eval(tmp_path / "m.rwks", "--text", TEXT, "--limit", "100")
    assert "kl_mean" not in alone and alone["reference"] is None
    both = _eval(tmp_path / "m.rwks", "--text", TEXT, "--limit", "100", "--reference", model)
    direct = _eval(model, "--text", TEXT, "--limit", "100", "--quant", "Q4_1")
    assert both["kl_mean"] == direct["kl_mean"] > 0


def test_calibrate_is_the_mean_square_of_each_matrix_input(tmp_path):
    """Two tokens from a fresh state: the first layer's key input of v4 is computable by hand,
    xk_t = mix(LN1(LN0(emb[t])), previous, time_mix_k), previous = 0 for the first token."""
    model = fp32_model("4v0-660K")
    (tmp_path / "t.txt").write_bytes(b"ab")
    run_cli("calibrate", model, "--text", tmp_path / "t.txt", "-o", tmp_path / "s.npz",
            check_status=0)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        stats = {k: z[k] for k in z.files}
    m = load_model(model)
    v = {t.name: t.values().astype(np.float64) for t in m}
    matrices = [t.name for t in m if len(t.shape) == 2 and t.name != "emb.weight"]
    assert sorted(stats) == sorted(matrices)
    for name in matrices:
        assert stats[name].shape == (m[name].shape[-1],) and np.all(stats[name] >= 0)
    xn = [layer_norm(layer_norm(v["emb.weight"][t], v["blocks.0.ln0.weight"],
                                v["blocks.0.ln0.bias"]),
                     v["blocks.0.ln1.weight"], v["blocks.0.ln1.bias"]) for t in b"ab"]
    mk = v["blocks.0.att.time_mix_k"].reshape(-1)
    xk = [mix(xn[0], np.zeros_like(xn[0]), mk), mix(xn[1], xn[0], mk)]
    want = (xk[0] ** 2 + xk[1] ** 2) / 2
    np.testing.assert_allclose(stats["blocks.0.att.key.weight"], want, rtol=1e-4, atol=1e-7)


def test_eval_bad_text_is_one_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe abc")
    proc = run_cli("eval", fp32_model("4v0-660K"), "--text", tmp_path / "bad.txt")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert proc.stderr.decode().count("\n") == 1 and "UTF-8" in proc.stderr.decode()
