"""Q3S: a 3-bit symmetric block type, as a plug-in (docs/plugins.md).

    rwkv-stream convert model.pth -o model-q3s.rwks --quant Q3S --plugin docs/examples/plugin_q3s.py
    rwkv-stream run model-q3s.rwks --prompt "Hello" -n 20 --plugin docs/examples/plugin_q3s.py

A block is 32 weights in 14 bytes (3.5 bits per weight):

    bytes 0-1    d, the scale, IEEE fp16 little-endian
    bytes 2-13   32 unsigned 3-bit quants q[0..31], in 4 groups of 8: group g (q[8g..8g+7]) is
                 the little-endian 24-bit integer q[8g] | q[8g+1] << 3 | ... | q[8g+7] << 21
                 in bytes 2+3g .. 4+3g

    weight i = (q[i] - 4) * d

Like ggml's Q4_0, the scale comes from the block's signed extreme m (the value of largest
magnitude): d = m / -4, so m itself is exact (q = 0) and the rest round to the nearest of the
8 levels -4d..3d. Plain numpy, vectorized over blocks.
"""
import numpy as np

from formats.plugins import register_type

QK = 32                     # weights per block
BLOCK_BYTES = 2 + 12        # fp16 scale + 32 x 3 bits
_SHIFTS = np.arange(8, dtype=np.uint32) * 3


def _pack(q: np.ndarray) -> np.ndarray:
    """uint8 quants (nb, 32), each 0..7 -> (nb, 12) bytes."""
    groups = q.reshape(-1, 4, 8).astype(np.uint32) << _SHIFTS       # (nb, 4, 8), no overlap
    bits = groups.sum(axis=2, dtype=np.uint32)                        # (nb, 4): 24 bits each
    out = np.stack([bits & 0xFF, (bits >> 8) & 0xFF, (bits >> 16) & 0xFF], axis=2)
    return out.astype(np.uint8).reshape(-1, 12)


def _unpack(packed: np.ndarray) -> np.ndarray:
    """(nb, 12) bytes -> uint8 quants (nb, 32)."""
    b = packed.reshape(-1, 4, 3).astype(np.uint32)
    bits = b[:, :, 0] | (b[:, :, 1] << 8) | (b[:, :, 2] << 16)         # (nb, 4)
    return ((bits[:, :, None] >> _SHIFTS) & 7).astype(np.uint8).reshape(-1, QK)


def _split(blocks: np.ndarray):
    """(nb, 14) bytes -> (scales float32 (nb,), quants uint8 (nb, 32))."""
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2").reshape(-1).astype(np.float32)
    return d, _unpack(blocks[:, 2:])


def quantize(x: np.ndarray) -> np.ndarray:
    """float32[n], n a multiple of 32 -> uint8[n / 32 * 14]."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, QK)
    idx = np.argmax(np.abs(x), axis=1)
    m = x[np.arange(len(x)), idx]                                     # signed extreme
    d = m / np.float32(-4)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.floor(x * inv[:, None] + np.float32(4.5)), 0, 7).astype(np.uint8)
    out = np.empty((len(x), BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _pack(q)
    return out.reshape(-1)


def dequantize(data: np.ndarray) -> np.ndarray:
    """uint8[nb * 14] -> float32[nb * 32]."""
    d, q = _split(np.asarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES))
    return ((q.astype(np.float32) - 4) * d[:, None]).reshape(-1)


def dot(blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-block dot products: blocks uint8[nb, 14], x float32[nb, 32] -> float32[nb]."""
    d, q = _split(blocks)
    return d * ((q.astype(np.float32) - 4) * x).sum(axis=1)


def dot_int8(blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What an MCU runs in --mode int8: x quantized to int8 per block (scale amax/127), an
    integer dot of the 3-bit quants with it, then one float multiply by both scales."""
    d, q = _split(blocks)
    amax = np.abs(x).max(axis=1)
    xd = (amax / np.float32(127))[:, None]
    xq = np.rint(np.divide(x, xd, out=np.zeros_like(x), where=xd > 0)).astype(np.int32)
    xd = xd[:, 0]                                                     # xq: -127..127
    acc = ((q.astype(np.int32) - 4) * xq).sum(axis=1)                 # int32, |acc| <= 32*4*127
    return (d * xd * acc).astype(np.float32)


register_type("Q3S", 200, block_size=QK, block_bytes=BLOCK_BYTES, quantize=quantize,
              dequantize=dequantize, dot=dot, dot_int8=dot_int8)
