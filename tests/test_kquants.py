"""The k-quant kernels (formats/kquants.py): Q6_K, Q4_K, Q5_K, Q3_K, Q2_K.

Two oracles:
* quantization against golden blocks made by ggml's own C reference quantizers
  (`quantize_row_q*_K_ref`), stored in tests/golden/kquants/ with the script that made them;
  gguf-py 0.19 has no k-quant quantizer to compare with (checked below, so a future gguf-py
  that grows one shows up here);
* dequantization against gguf-py's numpy dequantizers, bit for bit, on our blocks and on
  arbitrary bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from formats import kquants
from formats.errors import BadInput

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "kquants"
TYPES = ("Q6_K", "Q4_K", "Q5_K", "Q3_K", "Q2_K")
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def quantize(name, x):
    return getattr(kquants, "quantize_" + name.lower())(x)


def dequantize(name, data):
    return getattr(kquants, "dequantize_" + name.lower())(data)


def gguf_dequantize(name, data):
    with np.errstate(all="ignore"):
        y = gguf_quants.dequantize(data, getattr(GGMLQuantizationType, name))
    return np.asarray(y, dtype=np.float32).reshape(-1)


def assert_same_bits(a, b):
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    np.testing.assert_array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


@pytest.mark.parametrize("name", TYPES)
def test_layout_matches_gguf(name):
    block_size, type_size = gguf_quants.GGML_QUANT_SIZES[getattr(GGMLQuantizationType, name)]
    assert block_size == kquants.QK_K == 256
    assert type_size == BLOCK_BYTES[name]
    assert kquants._BLOCK_BYTES[[k for k, v in kquants._NAMES.items() if v == name][0]] \
        == type_size


@pytest.mark.parametrize("name", TYPES)
def test_gguf_has_no_kquant_quantizer(name):
    # If gguf-py ever ships a k-quant quantizer, compare with it byte for byte here.
    cls = gguf_quants._type_traits[getattr(GGMLQuantizationType, name)]
    assert "quantize_blocks" not in vars(cls)


@pytest.mark.parametrize("name", TYPES)
def test_quantize_matches_ggml_golden_blocks(name):
    inputs = np.load(GOLDEN / "inputs.npy")
    golden = np.load(GOLDEN / f"{name.lower()}.npy")
    assert golden.shape == (inputs.shape[0], inputs.shape[1] // 256 * BLOCK_BYTES[name])
    for case, (x, want) in enumerate(zip(inputs, golden)):
        got = quantize(name, x)
        assert got.dtype == np.uint8
        mismatch = np.nonzero(got != want)[0]
        assert mismatch.size == 0, (f"case {case}: first differing byte {mismatch[0]} "
                                    f"(block {mismatch[0] // BLOCK_BYTES[name]})")


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_golden_blocks_matches_gguf(name):
    for blocks in np.load(GOLDEN / f"{name.lower()}.npy"):
        assert_same_bits(dequantize(name, blocks), gguf_dequantize(name, blocks))


@pytest.mark.parametrize("name", TYPES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_dequantize_arbitrary_bytes_matches_gguf(name, data):
    nb = data.draw(st.integers(1, 3))
    blocks = data.draw(hnp.arrays(np.uint8, nb * BLOCK_BYTES[name]))
    assert_same_bits(dequantize(name, blocks), gguf_dequantize(name, blocks))


finite_f32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("name", TYPES)
@settings(max_examples=30, deadline=None)
@given(x=hnp.arrays(np.float32, st.sampled_from([256, 512]), elements=finite_f32))
def test_round_trip_through_gguf(name, x):
    blocks = quantize(name, x)
    assert blocks.shape == (x.size // 256 * BLOCK_BYTES[name],)
    y = dequantize(name, blocks)
    assert_same_bits(y, gguf_dequantize(name, blocks))
    assert np.all(np.isfinite(y))


# rms error of a unit gaussian after a round trip: a guard against layout slips that keep the
# two dequantizers in agreement (the values ggml's own quantize-stats reports are close to these)
RMSE_BOUND = {"Q6_K": 0.025, "Q5_K": 0.045, "Q4_K": 0.085, "Q3_K": 0.17, "Q2_K": 0.33}


@pytest.mark.parametrize("name", TYPES)
def test_round_trip_error(name):
    x = np.random.default_rng(7).standard_normal(256 * 32).astype(np.float32)
    y = dequantize(name, quantize(name, x))
    assert float(np.sqrt(np.mean((y - x) ** 2))) < RMSE_BOUND[name]


@pytest.mark.parametrize("name", TYPES)
def test_zeros(name):
    blocks = quantize(name, np.zeros(512, np.float32))
    assert not blocks.any()
    assert not dequantize(name, blocks).any()


@pytest.mark.parametrize("name", TYPES)
def test_bad_input(name):
    with pytest.raises(BadInput, match="multiple of 256"):
        quantize(name, np.zeros(32, np.float32))
    with pytest.raises(BadInput, match="1-D float32"):
        quantize(name, np.zeros(256, np.float64))
    with pytest.raises(BadInput, match="1-D float32"):
        quantize(name, np.zeros((2, 256), np.float32))
    with pytest.raises(BadInput, match=f"multiple of {BLOCK_BYTES[name]} bytes"):
        dequantize(name, np.zeros(BLOCK_BYTES[name] + 1, np.uint8))
    with pytest.raises(BadInput, match="1-D uint8"):
        dequantize(name, [0] * BLOCK_BYTES[name])
    assert quantize(name, np.zeros(0, np.float32)).size == 0
    assert dequantize(name, np.zeros(0, np.uint8)).size == 0


def test_noncontiguous_and_readonly_input():
    x = np.random.default_rng(3).standard_normal(1024).astype(np.float32)
    want = kquants.quantize_q4_k(x[::2].copy())
    got = kquants.quantize_q4_k(x[::2])
    np.testing.assert_array_equal(got, want)
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(kquants.quantize_q6_k(ro), kquants.quantize_q6_k(x))
