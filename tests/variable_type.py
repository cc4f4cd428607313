"""A deliberately simple variable-size type for testing the stream's row-offset tables apart
from QX: each 32-value block is one code byte then its data --
  0: all zero (1 byte);  1: fp16 scale + 32 int8 (35 bytes);  2: 32 fp16 values (65 bytes).
Code 1 is chosen unless the block has an outlier (a magnitude over 3x the mean).
Plain numpy: slow, fine for the tiny fixtures.
"""
from __future__ import annotations

import numpy as np

from formats import quants
from formats.quants import BoardOps, QuantType

B = 32
SIZES = {0: 1, 1: 35, 2: 65}


def _encode_block(x: np.ndarray) -> bytes:
    amax = float(np.max(np.abs(x)))
    if amax == 0:
        return b"\x00"
    d = np.float16(amax / 127)
    if d == 0:                                          # below fp16's range: keep the values
        return b"\x02" + x.astype("<f2").tobytes()
    q = np.clip(np.round(x / np.float32(d)), -127, 127).astype(np.int8)
    if amax <= 3 * float(np.mean(np.abs(x))):          # no outlier: int8 is enough
        return b"\x01" + d.tobytes() + q.tobytes()
    return b"\x02" + x.astype("<f2").tobytes()


def _decode_block(buf, o: int) -> tuple[np.ndarray, int]:
    code = int(buf[o])
    if code == 0:
        return np.zeros(B, np.float32), o + 1
    if code == 1:
        d = np.frombuffer(bytes(buf[o + 1:o + 3]), "<f2")[0].astype(np.float32)
        return np.frombuffer(bytes(buf[o + 3:o + 35]), np.int8).astype(np.float32) * d, o + 35
    if code == 2:
        return np.frombuffer(bytes(buf[o + 1:o + 65]), "<f2").astype(np.float32), o + 65
    raise quants.BadInput(f"bad block code {code}")


def quantize(rows: np.ndarray) -> np.ndarray:
    n_rows, n = rows.shape
    bodies = [b"".join(_encode_block(r[c:c + B]) for c in range(0, n, B)) for r in rows]
    table = np.cumsum([4 * (n_rows + 1)] + [len(b) for b in bodies]).astype("<u4")
    return np.frombuffer(table.tobytes() + b"".join(bodies), np.uint8).copy()


def dequantize(payload: np.ndarray, shape) -> np.ndarray:
    n = shape[-1]
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    out = np.empty((n_rows, n), np.float32)
    o = 4 * (n_rows + 1)
    for r in range(n_rows):
        for c in range(0, n, B):
            out[r, c:c + B], o = _decode_block(payload, o)
    return out


def count_blocks(buf, max_blocks: int) -> tuple[int, int]:
    o = nb = 0
    while nb < max_blocks and o < len(buf) and o + SIZES.get(int(buf[o]), 1 << 30) <= len(buf):
        o += SIZES[int(buf[o])]
        nb += 1
    return nb, o


def dequantize_into(buf, out) -> None:
    o = k = 0
    while o < len(buf):
        out[k:k + B], o = _decode_block(buf, o)
        k += B


def prepare_activation(int8_mode, x, xf, xq, xd, xs) -> None:
    xf[:len(x)] = x


def matvec_blocks(int8_mode, buf, n_blocks, first_block, blocks_per_row, xf, xq, xd, xs, out,
                  row_state) -> None:
    o = 0
    for g in range(first_block, first_block + n_blocks):
        w, o = _decode_block(buf, o)
        c = (g % blocks_per_row) * B
        out[g // blocks_per_row] += np.dot(w, xf[c:c + B])


VT = QuantType("VT", 250, None, B, 0, quantize, dequantize,
               ops=BoardOps(prepare_activation, matvec_blocks, dequantize_into, count_blocks),
               max_block_bytes=65)


def ensure_registered() -> QuantType:
    try:
        return quants.by_name("VT")
    except quants.BadInput:
        return quants.register(VT)
