"""Checks of the float64 reference forward pass (tests/reference_forward.py).

1. Against rwkv.cpp: the FP32 tiny models reproduce rwkv.cpp's `tests/expected-logits-*.bin`
   (prompt b'"in') and the per-token logits and final state of a 49-byte prompt
   (fixtures/rwkv_cpp_logits, see its README.md), to max abs 1e-4.
2. On synthetic models of other shapes (H != S, several v7 heads, F != 4C, other LoRA sizes),
   structural properties that a wrong implementation can break: the hyper-parameters and state
   layout, token shift carrying LN outputs, the first WKV state being k (x) v in the documented
   orientation, heads / channels / layers not leaking into each other's state, heads being
   isolated in the output (per-head group norm, v7 kk normalisation and bonus), forward() being
   a pure function of (token, state), and every tensor (and every LoRA/mix chunk) being used.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.reference_forward import (ReferenceRWKV, detect_version, layer_norm, sigmoid)
except ImportError:  # tests/ is not a package and only tests/ is on sys.path
    from reference_forward import ReferenceRWKV, detect_version, layer_norm, sigmoid

from conftest import FIXTURES  # noqa: E402
PROMPT_3 = b'"in'
PROMPT_49 = b'The quick brown fox jumps over the lazy dog. "in\n'
TOL = 1e-4

# model, version, FP32 file, n_embd, n_layer, heads, head size (from the fixtures README)
MODELS = [
    ("tiny-rwkv-4v0-660K", "4", "tiny-rwkv-4v0-660K-FP32.bin", 128, 4, 0, 0),
    ("tiny-rwkv-5v1-730K", "5.1", "tiny-rwkv-5v1-730K-FP32.bin", 64, 12, 8, 8),
    ("tiny-rwkv-5v2-730K", "5.2", "tiny-rwkv-5v2-730K-FP32.bin", 64, 12, 8, 8),
    ("tiny-rwkv-6v0-3m", "6", "tiny-rwkv-6v0-3m-FP32-from-Q5_1.bin", 128, 12, 16, 8),
    ("tiny-rwkv-7v0-834K", "7", "tiny-rwkv-7v0-834K-FP32.bin", 64, 12, 1, 64),
]
MODEL_IDS = [m[0] for m in MODELS]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} not found (set RWKV_STREAM_FIXTURES to the fixtures directory)")
    return path


@functools.lru_cache(maxsize=None)
def _reference(filename: str):
    """(ReferenceRWKV, header info) for an rwkv.cpp file, read with the project's reader."""
    from host.readers.rwkv_cpp import RwkvCppCheckpoint

    with RwkvCppCheckpoint(_need(FIXTURES / "rwkv_cpp" / filename)) as ck:
        info = dict(ck.info)
        tensors = {t.name: t.to_float32() for t in ck}
    return ReferenceRWKV(tensors), info


@functools.lru_cache(maxsize=None)
def _run(filename: str, prompt: bytes):
    ref, _ = _reference(filename)
    return ref.run(prompt)


# ----------------------------------------------------------------------------------------------
# Against rwkv.cpp

@pytest.mark.parametrize("model, version, filename, n_embd, n_layer, n_head, head_size", MODELS,
                         ids=MODEL_IDS)
def test_fixture_hyper_parameters(model, version, filename, n_embd, n_layer, n_head, head_size):
    ref, info = _reference(filename)
    assert ref.version == version
    assert (ref.n_vocab, ref.n_embd, ref.n_layer) == (info["n_vocab"], info["n_embed"],
                                                       info["n_layer"]) == (256, n_embd, n_layer)
    assert (ref.n_head, ref.head_size) == (n_head, head_size)
    state_file = _need(FIXTURES / "rwkv_cpp_logits" / f"{model}-FP32.state.f32")
    assert ref.state_size * 4 == state_file.stat().st_size


@pytest.mark.parametrize("model, version, filename", [
    pytest.param(m, v, f, marks=pytest.mark.skip(
        reason="expected-logits-6v0-3m.bin belongs to the original FP32 v6 model, which is not "
               "available; the FP32 file here is dequantized from Q5_1 (differs by ~7.6e-2)"))
    if v == "6" else pytest.param(m, v, f, id=m)
    for m, v, f, *_ in MODELS], ids=MODEL_IDS)
def test_expected_logits_3_bytes(model, version, filename):
    tag = model.removeprefix("tiny-rwkv-")
    expected = np.fromfile(_need(FIXTURES / "rwkv_cpp" / f"expected-logits-{tag}.bin"), "<f4")
    logits, _ = _run(filename, PROMPT_3)
    diff = np.abs(logits[-1] - expected).max()
    assert diff <= TOL, f"{model}: max |logits - expected| = {diff:.3g} after {PROMPT_3!r}"


@pytest.mark.parametrize("model, version, filename", [m[:3] for m in MODELS], ids=MODEL_IDS)
def test_rwkv_cpp_logits_and_state_49_bytes(model, version, filename):
    base = FIXTURES / "rwkv_cpp_logits" / f"{model}-FP32"
    expected_logits = np.fromfile(_need(Path(f"{base}.logits.f32")), "<f4").reshape(49, 256)
    expected_state = np.fromfile(_need(Path(f"{base}.state.f32")), "<f4")
    logits, state = _run(filename, PROMPT_49)
    row_diff = np.abs(logits - expected_logits).max(axis=1)
    bad = np.flatnonzero(row_diff > TOL)
    assert bad.size == 0, (f"{model}: logits differ in rows {bad.tolist()[:10]} "
                           f"(max {row_diff.max():.3g} in row {row_diff.argmax()})")
    assert state.shape == expected_state.shape
    state_diff = np.abs(state - expected_state)
    assert state_diff.max() <= TOL, (f"{model}: final state differs by {state_diff.max():.3g} "
                                     f"at flat index {state_diff.argmax()}")


# ----------------------------------------------------------------------------------------------
# Synthetic models (stored form: rwkv.cpp names, numpy shapes and transforms of spec section 3)

SYN_C, SYN_L, SYN_V, SYN_F = 48, 3, 40, 80
# (H, S): H != S, and S not a multiple of H, so that a group norm over S groups of H (H and S
# swapped) would straddle heads and be caught.
SYN_HEADS = {"5.1": (6, 8), "5.2": (3, 16), "6": (3, 16), "7": (3, 16)}
V6_D, V6_DW = 8, 12                 # v6 time_maa LoRA size, decay LoRA size
V7_D = dict(w=8, a=12, v=6, g=10)   # v7 LoRA sizes
ALL_VERSIONS = ["4", "5.1", "5.2", "6", "7"]


def make_synthetic(version: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    C, L, V, F = SYN_C, SYN_L, SYN_V, SYN_F
    H, S = SYN_HEADS.get(version, (0, 0))

    def mat(rows, cols):
        return rng.standard_normal((rows, cols)) / np.sqrt(cols)

    def unit(*shape):
        return rng.uniform(0.05, 0.95, shape)

    def ln(name, n=C):
        return {f"{name}.weight": 1.0 + 0.2 * rng.standard_normal(n),
                f"{name}.bias": 0.2 * rng.standard_normal(n)}

    t = {"emb.weight": rng.standard_normal((V, C)), "head.weight": mat(V, C)}
    t |= ln("blocks.0.ln0") | ln("ln_out")
    for i in range(L):
        b = f"blocks.{i}."
        t |= ln(b + "ln1") | ln(b + "ln2")
        for m in ("key", "value", "receptance", "output"):
            t[b + f"att.{m}.weight"] = mat(C, C)
        t[b + "ffn.key.weight"] = mat(F, C)
        t[b + "ffn.value.weight"] = mat(C, F)
        if version != "7":
            t[b + "ffn.receptance.weight"] = mat(C, C)
        if version in ("5.1", "5.2", "6", "7"):
            t |= ln(b + "att.ln_x")
        if version in ("5.2", "6"):
            t[b + "att.gate.weight"] = mat(C, C)

        if version in ("4", "5.1", "5.2"):
            for m in ("k", "v", "r") + (("g",) if version == "5.2" else ()):
                t[b + f"att.time_mix_{m}"] = unit(C)
            t[b + "ffn.time_mix_k"] = unit(C)
            t[b + "ffn.time_mix_r"] = unit(C)
        if version == "4":
            t[b + "att.time_decay"] = -np.exp(0.5 * rng.standard_normal(C))     # -exp(td)
            t[b + "att.time_first"] = 0.5 * rng.standard_normal(C)
        elif version == "5.1":
            t[b + "att.time_decay"] = np.exp(-np.exp(rng.standard_normal((H, 1, 1))))
            t[b + "att.time_first"] = np.exp(0.5 * rng.standard_normal((H, 1, 1)))
        elif version == "5.2":
            t[b + "att.time_decay"] = np.exp(-np.exp(rng.standard_normal((H, S, 1))))
            t[b + "att.time_faaaa"] = 0.5 * rng.standard_normal((H, S, 1))
        elif version == "6":
            for m in ("x", "w", "k", "v", "r", "g"):
                t[b + f"att.time_maa_{m}"] = unit(C)
            t[b + "att.time_maa_w1"] = 0.5 * mat(5 * V6_D, C)
            t[b + "att.time_maa_w2"] = 0.5 * rng.standard_normal((5, C, V6_D)) / np.sqrt(V6_D)
            t[b + "att.time_decay"] = rng.standard_normal((H, S, 1)) - 0.5   # raw
            t[b + "att.time_decay_w1"] = 0.5 * mat(V6_DW, C)
            t[b + "att.time_decay_w2"] = 0.5 * mat(C, V6_DW)
            t[b + "att.time_faaaa"] = 0.5 * rng.standard_normal((H, S, 1))
            t[b + "ffn.time_maa_k"] = unit(C)
            t[b + "ffn.time_maa_r"] = unit(C)
        elif version == "7":
            t[b + "att.x_rwkvag"] = unit(6, 1, C)
            for m in ("w", "a", "g") + (("v",) if i >= 1 else ()):
                t[b + f"att.{m}1"] = mat(V7_D[m], C)
                t[b + f"att.{m}2"] = mat(C, V7_D[m])
            for m in ("w0", "a0") + (("v0",) if i >= 1 else ()):
                t[b + f"att.{m}"] = 0.5 * rng.standard_normal((1, 1, C))
            t[b + "att.k_k"] = 0.5 + unit(1, 1, C)
            t[b + "att.k_a"] = unit(1, 1, C)
            t[b + "att.r_k"] = 0.5 * rng.standard_normal((H, S))
            t[b + "ffn.x_k"] = unit(1, 1, C)
    return t


@functools.lru_cache(maxsize=None)
def _synthetic(version: str) -> ReferenceRWKV:
    return ReferenceRWKV(make_synthetic(version))


def _layer_slice(ref: ReferenceRWKV, i: int) -> slice:
    return slice(i * ref.layer_state_size, (i + 1) * ref.layer_state_size)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_synthetic_hyper_parameters_and_initial_state(version):
    tensors = make_synthetic(version)
    assert detect_version(tensors) == version
    ref = ReferenceRWKV(tensors)
    assert ref.version == version
    assert ReferenceRWKV(tensors, version="v" + version).version == version
    assert (ref.n_vocab, ref.n_embd, ref.n_layer, ref.n_ffn) == (SYN_V, SYN_C, SYN_L, SYN_F)
    C = SYN_C
    state = ref.init_state()
    assert state.dtype == np.float64
    if version == "4":
        assert (ref.n_head, ref.head_size) == (0, 0)
        assert state.size == 5 * C * SYN_L
        layers = state.reshape(SYN_L, 5, C)
        assert np.all(layers[:, :4] == 0) and np.all(layers[:, 4] == -1e30)
    else:
        H, S = SYN_HEADS[version]
        assert (ref.n_head, ref.head_size) == (H, S)
        assert state.size == (2 + S) * C * SYN_L
        assert np.all(state == 0)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_synthetic_token_shift_carries_layer_norm_outputs(version):
    """att_xx / ffn_xx of every layer hold LN outputs: (xx - bias) / weight has mean 0 and
    variance var/(var + 1e-5) ~ 1. Layer 0's att_xx is exactly LN(LN(emb[t]; ln0); ln1)."""
    ref = _synthetic(version)
    W, C = ref.weights, ref.n_embd
    state = ref.init_state()
    for token in (7, 31, 2):
        _, state = ref.forward(token, state)
    for i in range(ref.n_layer):
        s = state[_layer_slice(ref, i)]
        for name, xx in (("ln2", s[:C]), ("ln1", s[C:2 * C])):
            z = (xx - W[f"blocks.{i}.{name}.bias"]) / W[f"blocks.{i}.{name}.weight"]
            assert abs(z.mean()) < 1e-9, (i, name)
            assert 0.99 < z.var() <= 1.0, (i, name, z.var())
    x0 = layer_norm(W["emb.weight"][2], W["blocks.0.ln0.weight"], W["blocks.0.ln0.bias"])
    np.testing.assert_allclose(state[C:2 * C], layer_norm(x0, W["blocks.0.ln1.weight"],
                                                          W["blocks.0.ln1.bias"]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_synthetic_first_token_wkv_state_layout(version):
    """From the initial state, layer 0's WKV state after one token is just k (x) v, laid out as
    the spec says: v4 aa = v, bb = 1, pp = k; v5/v6 [h][key][value]; v7 [h][value][key]."""
    ref = _synthetic(version)
    W, C, H, S = ref.weights, ref.n_embd, ref.n_head, ref.head_size
    token = 11
    _, state = ref.forward(token, ref.init_state())
    s0 = state[_layer_slice(ref, 0)]
    b = "blocks.0."
    x = layer_norm(W["emb.weight"][token], W[b + "ln0.weight"], W[b + "ln0.bias"])
    x = layer_norm(x, W[b + "ln1.weight"], W[b + "ln1.bias"])   # previous token's shift is 0
    if version in ("4", "5.1", "5.2"):
        k = W[b + "att.key.weight"] @ (x * W[b + "att.time_mix_k"])
        v = W[b + "att.value.weight"] @ (x * W[b + "att.time_mix_v"])
    elif version == "6":
        sx = -x
        lora = np.tanh(W[b + "att.time_maa_w1"] @ (x + sx * W[b + "att.time_maa_x"]))
        m_k = W[b + "att.time_maa_w2"][1] @ lora[V6_D:2 * V6_D]
        m_v = W[b + "att.time_maa_w2"][2] @ lora[2 * V6_D:3 * V6_D]
        k = W[b + "att.key.weight"] @ (x + sx * (W[b + "att.time_maa_k"] + m_k))
        v = W[b + "att.value.weight"] @ (x + sx * (W[b + "att.time_maa_v"] + m_v))
    else:
        mixes = W[b + "att.x_rwkvag"].reshape(6, C)               # r, w, k, v, a, g
        xk, xv, xa = x * (1 - mixes[2]), x * (1 - mixes[3]), x * (1 - mixes[4])
        a = sigmoid(W[b + "att.a0"].reshape(C) + W[b + "att.a2"] @ (W[b + "att.a1"] @ xa))
        k = W[b + "att.key.weight"] @ xk
        k = k * (1 + (a - 1) * W[b + "att.k_a"].reshape(C))
        v = W[b + "att.value.weight"] @ xv
    if version == "4":
        aa, bb, pp = s0[2 * C:3 * C], s0[3 * C:4 * C], s0[4 * C:5 * C]
        np.testing.assert_allclose(aa, v, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bb, 1.0, rtol=1e-12)
        np.testing.assert_allclose(pp, k, rtol=1e-12, atol=1e-12)
        return
    wkv = s0[2 * C:].reshape(H, S, S)
    k, v = k.reshape(H, S), v.reshape(H, S)
    if version == "7":
        expected = np.einsum("hi,hj->hij", v, k)     # [h][value][key]
    else:
        expected = np.einsum("hi,hj->hij", k, v)     # [h][key][value]
    np.testing.assert_allclose(wkv, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_synthetic_state_blocks_do_not_leak(version):
    """Perturb one block of the last layer's recurrent state (head 0's WKV matrix; for v4 one
    channel of aa): after a token, the other heads/channels of that layer and every earlier
    layer's state are bit-identical, while the perturbed block and the logits change."""
    ref = _synthetic(version)
    C, L = ref.n_embd, ref.n_layer
    state = ref.init_state()
    for token in (5, 17):
        _, state = ref.forward(token, state)
    last = _layer_slice(ref, L - 1)
    perturbed = state.copy()
    if version == "4":
        block = np.zeros(5 * C, bool)
        block[2 * C] = True                                           # aa[0]
    else:
        block = np.zeros(ref.layer_state_size, bool)
        block[2 * C:2 * C + ref.head_size ** 2] = True                # head 0's S x S matrix
    # Random, not constant: a constant added to a head's matrix shifts that head's output
    # uniformly, which the group norm removes exactly.
    perturbed[last][block] += np.random.default_rng(2).uniform(-1, 1, block.sum())
    logits_a, new_a = ref.forward(23, state)
    logits_b, new_b = ref.forward(23, perturbed)

    assert np.array_equal(new_a[:last.start], new_b[:last.start]), "earlier layers changed"
    la, lb = new_a[last], new_b[last]
    recurrent = np.zeros(ref.layer_state_size, bool)
    recurrent[2 * C:] = True
    assert np.array_equal(la[recurrent & ~block], lb[recurrent & ~block]), \
        "other heads/channels of the perturbed layer changed"
    assert not np.array_equal(la[block], lb[block])
    assert np.array_equal(la[C:2 * C], lb[C:2 * C]), "att_xx depends on the layer's own state"
    assert np.abs(logits_a - logits_b).max() > 1e-9


def _perturb_head(ref: ReferenceRWKV, tensors, state, layer: int, head: int, seed: int):
    """Randomly changes everything of one head in one layer: its WKV state matrix, its rows of
    Wr/Wk/Wv, its chunk of ln_x and of the per-head/per-channel att vectors."""
    rng = np.random.default_rng(seed)
    C, S = ref.n_embd, ref.head_size
    hs = slice(head * S, (head + 1) * S)
    b = f"blocks.{layer}.att."
    tensors = {name: a.copy() for name, a in tensors.items()}
    state = state.copy()

    def shake(name, index):
        part = tensors[b + name][index]
        tensors[b + name][index] = part + 0.3 * rng.standard_normal(np.shape(part)) \
            * max(np.abs(part).max(), 0.1)

    for m in ("key", "value", "receptance"):
        shake(f"{m}.weight", hs)
    shake("ln_x.weight", hs)
    shake("ln_x.bias", hs)
    if ref.version == "5.1":
        shake("time_first", head)
    elif ref.version in ("5.2", "6"):
        shake("time_faaaa", head)
        shake("time_decay", head)
    else:
        shake("r_k", head)
        for m in ("k_k", "k_a", "w0", "a0"):
            shake(m, (..., hs))
    block = slice(layer * ref.layer_state_size + 2 * C + head * S * S,
                  layer * ref.layer_state_size + 2 * C + (head + 1) * S * S)
    state[block] += rng.uniform(-1, 1, S * S)
    return tensors, state


@pytest.mark.parametrize("version", ["5.1", "5.2", "6", "7"])
def test_synthetic_heads_are_isolated_in_the_output(version):
    """With head 1's columns of the last layer's output matrix set to zero, nothing that
    belongs to head 1 (its state, r/k/v rows, ln_x chunk, u/decay, v7 r_k/k_k/k_a chunks) can
    reach the logits: group norm, kk normalisation and the v7 bonus must all be per head.
    The same changes made to head 0 do change the logits."""
    tensors = make_synthetic(version)
    ref = _synthetic(version)
    last, S = ref.n_layer - 1, ref.head_size
    tensors[f"blocks.{last}.att.output.weight"][:, S:2 * S] = 0.0
    base = ReferenceRWKV(tensors)
    _, state = base.run([9, 21])
    logits, _ = base.forward(30, state)
    for head, should_change in ((1, False), (0, True)):
        t2, s2 = _perturb_head(base, tensors, state, last, head, seed=head)
        logits2, _ = ReferenceRWKV(t2).forward(30, s2)
        diff = np.abs(logits2 - logits).max()
        if should_change:
            assert diff > 1e-6, "perturbing head 0 did not change the logits"
        else:
            assert diff <= 1e-12, f"head 1 leaked into the logits ({diff:.3g})"


def test_synthetic_group_norm_removes_a_per_head_shift():
    """v5/v6/v7: adding a constant to one head's WKV matrix shifts that head's output by a
    constant, which a per-head group norm removes exactly; a random change does not vanish."""
    for version in ("5.1", "5.2", "6", "7"):
        ref = _synthetic(version)
        C, S, L = ref.n_embd, ref.head_size, ref.n_layer
        _, state = ref.run([9, 21])
        logits, _ = ref.forward(30, state)
        block = slice((L - 1) * ref.layer_state_size + 2 * C + S * S,
                      (L - 1) * ref.layer_state_size + 2 * C + 2 * S * S)    # last layer, head 1
        shifted, shaken = state.copy(), state.copy()
        shifted[block] += 0.75
        shaken[block] += np.random.default_rng(3).uniform(-1, 1, S * S)
        assert np.abs(ref.forward(30, shifted)[0] - logits).max() <= 1e-10, version
        assert np.abs(ref.forward(30, shaken)[0] - logits).max() > 1e-6, version


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_synthetic_forward_is_a_function_of_token_and_state(version):
    """Nothing is carried inside the object or written into the caller's state: interleaving
    two sequences on one model, or resuming a saved state on a fresh model, gives identical
    results to running straight through; and a different history gives different logits."""
    tensors = make_synthetic(version)
    ref = _synthetic(version)
    seq_a, seq_b = [3, 14, 15, 9, 26, 5], [27, 18, 28, 1, 8, 28]
    straight_a, final_a = ref.run(seq_a)
    straight_b, _ = ref.run(seq_b)

    sa, sb = ref.init_state(), ref.init_state()
    for t, (ta, tb) in enumerate(zip(seq_a, seq_b)):
        before = sa.copy()
        la, sa_new = ref.forward(ta, sa)
        assert np.array_equal(sa, before), "forward() modified the state it was given"
        lb, sb = ref.forward(tb, sb)
        sa = sa_new
        assert np.array_equal(la, straight_a[t]) and np.array_equal(lb, straight_b[t])
    assert np.array_equal(sa, final_a)

    _, mid = ref.run(seq_a[:3])
    saved = np.frombuffer(mid.tobytes(), dtype=np.float64)       # through raw bytes
    resumed, resumed_final = ReferenceRWKV(tensors).run(seq_a[3:], saved)
    assert np.array_equal(resumed, straight_a[3:])
    assert np.array_equal(resumed_final, final_a)

    _, other_mid = ref.run(seq_b[:3])
    other, _ = ref.run(seq_a[3:], other_mid)
    assert np.abs(other[0] - straight_a[3]).max() > 1e-6, "the state carries no history"


def _perturbations(tensors):
    """(label, name, index) for every tensor, plus every chunk of the stacked mix/LoRA tensors."""
    for name, a in tensors.items():
        yield name, name, ...
        if name.endswith(("att.x_rwkvag", "att.time_maa_w2")):
            for n in range(a.shape[0]):
                yield f"{name}[{n}]", name, n
        if name.endswith("att.time_maa_w1"):
            for n in range(5):
                yield f"{name}[chunk {n}]", name, slice(n * V6_D, (n + 1) * V6_D)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_synthetic_every_tensor_is_used(version):
    """Changing any single tensor, or any one chunk of x_rwkvag / time_maa_w1 / time_maa_w2,
    changes the logits of a 3-token prompt (so no tensor, chunk or term is silently ignored)."""
    tensors = make_synthetic(version)
    prompt = [4, 33, 12]
    base, _ = ReferenceRWKV(tensors).run(prompt)
    rng = np.random.default_rng(1)
    unused = []
    for label, name, index in _perturbations(tensors):
        changed = dict(tensors)
        changed[name] = tensors[name].copy()
        part = changed[name][index]
        changed[name][index] = part + 0.05 * rng.standard_normal(np.shape(part)) \
            * max(np.abs(part).max(), 1e-3)
        logits, _ = ReferenceRWKV(changed).run(prompt)
        if not np.abs(logits - base).max() > 1e-9:
            unused.append(label)
    assert not unused, f"changing these did not change the logits: {unused}"
