"""Importance-weighted quantizers (formats/imatrix.py): the blocks are ordinary ggml blocks,
and weighting moves the error away from the columns that matter."""
from __future__ import annotations

import numpy as np
import pytest

from formats.errors import BadInput
from formats.imatrix import quantize_weighted
from formats.quants import by_name

WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _rows(seed=0, rows=128, cols=256):
    rng = np.random.default_rng(seed)
    # heavy-tailed columns, as real weight matrices have
    return (rng.standard_normal((rows, cols)) * rng.gamma(1.0, 1.0, cols)).astype(np.float32)


@pytest.mark.parametrize("name", WEIGHTED)
def test_important_columns_get_less_error(name):
    q = by_name(name)
    x = _rows()
    imp = np.full(x.shape[1], 0.01, np.float32)
    hot = np.arange(0, x.shape[1], 8)            # one column in eight matters 100x more
    imp[hot] = 1.0
    plain = q.dequantize(q.quantize(x), x.shape)
    weighted = q.dequantize(quantize_weighted(name, x, imp), x.shape)
    err_plain, err_weighted = (plain - x) ** 2, (weighted - x) ** 2
    assert err_weighted[:, hot].sum() < 0.8 * err_plain[:, hot].sum()
    assert (err_weighted * imp).sum() < (err_plain * imp).sum()


@pytest.mark.parametrize("name", WEIGHTED)
def test_uniform_importance_is_no_worse_than_the_reference(name):
    q = by_name(name)
    x = _rows(1)
    ones = np.ones(x.shape[1], np.float32)
    plain = q.dequantize(q.quantize(x), x.shape)
    weighted = q.dequantize(q.quantize_weighted(x, ones), x.shape)
    # the weighted search optimises a (|x|-weighted) squared error; the reference rounds
    assert ((weighted - x) ** 2).sum() <= 1.02 * ((plain - x) ** 2).sum()


def test_all_zero_and_constant_blocks():
    x = np.zeros((2, 64), np.float32)
    x[1, 32:] = 0.5
    for name in WEIGHTED:
        q = by_name(name)
        out = q.dequantize(quantize_weighted(name, x, np.ones(64, np.float32)), x.shape)
        assert np.array_equal(out[0], x[0]), name
        assert np.abs(out[1] - x[1]).max() <= 0.5 / 8, name


def test_types_without_a_weighted_path_quantize_as_usual():
    x = _rows(2, 4, 64)
    q8 = by_name("Q8_0")
    assert np.array_equal(q8.quantize_weighted(x, np.ones(64, np.float32)), q8.quantize(x))


def test_bad_importance_is_refused():
    x = _rows(3, 2, 64)
    with pytest.raises(BadInput, match="64 finite non-negative"):
        quantize_weighted("Q4_0", x, np.ones(32, np.float32))
    with pytest.raises(BadInput):
        quantize_weighted("Q4_0", x, np.full(64, np.nan, np.float32))
