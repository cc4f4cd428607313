"""Records of variable-size types (QX): a row-offset table, then self-contained rows.

A variable-size record's payload is `uint32 row_offset[n_rows + 1]` (little-endian, from the
payload start; the first is the table's own size, the last the payload size) followed by the
rows back to back. Its size exists only after quantizing, so the layout measures each such
tensor once, in row slices, keeping every row's offset; any byte range of the payload is then
produced again by quantizing only the rows it touches (quantizers are deterministic).
"""
from __future__ import annotations

import numpy as np

from formats.errors import BadInput

from ..encode import encode_rows, row_slices
from ..model import ModelTensor


def split_payload(payload: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A payload (table + rows) -> (row offsets relative to the first row, int64 (n_rows+1,);
    the rows' bytes)."""
    head = 4 * (n_rows + 1)
    table = payload[:head].view("<u4").astype(np.int64)
    if len(table) != n_rows + 1 or table[0] != head or table[-1] != payload.size or \
            np.any(np.diff(table) < 0):
        raise BadInput(f"malformed row-offset table for {n_rows} rows")
    return table - head, payload[head:]


class VariableRows:
    """Where each row of one variable-size record lives in its payload."""

    def __init__(self, row_starts: np.ndarray):
        """row_starts: int64 (n_rows + 1,), offsets of the rows relative to the first row."""
        self.n_rows = len(row_starts) - 1
        self.table_size = 4 * (self.n_rows + 1)
        self.offsets = row_starts + self.table_size         # payload-relative
        self.data_size = int(self.offsets[-1])
        if self.data_size >= 1 << 32:
            raise BadInput(f"a variable-size record of {self.data_size} bytes does not fit the "
                           "stream's 32-bit sizes")

    def table(self) -> np.ndarray:
        return self.offsets.astype("<u4").view(np.uint8)

    def rows_touching(self, a: int, b: int) -> tuple[int, int]:
        """Rows [r0, r1) whose bytes meet the payload range [a, b) (a >= table_size)."""
        r0 = int(np.searchsorted(self.offsets, a, side="right")) - 1
        r1 = int(np.searchsorted(self.offsets, b, side="left"))
        return max(r0, 0), min(max(r1, r0 + 1), self.n_rows)


def encode_variable_rows(t: ModelTensor, qtype, r0: int, r1: int,
                         importance=None) -> np.ndarray:
    """The bytes of rows [r0, r1) without a table."""
    _, body = split_payload(encode_rows(t, qtype, r0, r1, importance), r1 - r0)
    return body


def measure(t: ModelTensor, qtype, keep_bytes: int,
            importance=None) -> tuple[VariableRows, np.ndarray | None]:
    """Quantize `t` once, in row slices: its row offsets, and its whole payload when that is at
    most `keep_bytes` (else None: the caller re-quantizes rows when it needs them)."""
    starts = [np.zeros(1, np.int64)]
    bodies = []
    base = 0
    kept = 0
    for r0, r1 in row_slices(t, qtype):
        rel, body = split_payload(encode_rows(t, qtype, r0, r1, importance), r1 - r0)
        starts.append(rel[1:] + base)
        base += body.size
        kept += body.size
        bodies = bodies + [body] if kept <= keep_bytes else []
    rows = VariableRows(np.concatenate(starts))
    if bodies and kept <= keep_bytes:
        return rows, np.concatenate([rows.table()] + bodies)
    return rows, None
