"""One tensor in its planned type: the bytes a file or stream holds for it."""
from __future__ import annotations

import numpy as np

from formats.errors import BadInput
from formats.quants import QuantType

from .model import ModelTensor


def _passthrough(t: ModelTensor, qtype: QuantType) -> bool:
    return not t.transformed and t.source.qtype is qtype


def encode(t: ModelTensor, qtype: QuantType) -> np.ndarray:
    """uint8 bytes of `t` stored as `qtype`; source blocks of the same type pass through untouched."""
    return encode_rows(t, qtype, 0, t.n_rows)


def encode_rows(t: ModelTensor, qtype: QuantType, r0: int, r1: int,
                importance=None) -> np.ndarray:
    """uint8 bytes of rows [r0, r1) of `t` stored as `qtype` (quantizing only those rows, from
    the source bytes: see ModelTensor.quantize_rows); `importance` per column: see there."""
    if _passthrough(t, qtype):
        return t.raw_rows(r0, r1)
    try:
        return t.quantize_rows(qtype, r0, r1, importance).reshape(-1)
    except BadInput as e:
        if e.tensor:
            raise
        raise BadInput(e.message, path=t.source.path, tensor=t.name) from None


def row_slices(t: ModelTensor, qtype: QuantType, max_bytes: int = 8 << 20):
    """Row ranges whose float32 values stay under `max_bytes`: quantize big tensors piecewise.

    That bounds the float32 copy of the paths that make one (transformed tensors, block-type
    sources); the fused path holds only a slice's output. 8 MiB slices keep the per-slice
    Python overhead negligible; throughput is flat from about 1 to 32 MiB.
    """
    rows_per = max(1, max_bytes // (4 * t.shape[-1]))
    for r0 in range(0, t.n_rows, rows_per):
        yield r0, min(t.n_rows, r0 + rows_per)
