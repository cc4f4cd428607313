"""The one table of tensor element types.

Every part of the project sizes tensors from this table: readers, writers, the stream layout,
the simulator. Block types keep ggml's exact byte layouts (see docs/format.md); ids are ggml's
`ggml_type` values, `rwkv_cpp` is the code rwkv.cpp's `.bin` files use for the same type.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import imatrix, kernels, kquant_dot, kquants
from . import qx
from .errors import BadInput


class NonFiniteValue(BadInput):
    """A NaN or Inf among values to quantize: `element` is its flat index in the input, `value`
    the value (float32). Callers that know the tensor re-raise it with its name and offset."""

    def __init__(self, element: int, value):
        self.element = int(element)
        self.value = np.float32(value)
        super().__init__(f"non-finite weight {self.value} at element {self.element}")


def first_non_finite(x: np.ndarray) -> int:
    """Flat index of the first NaN/Inf in float32 `x`, or -1."""
    # A float64 sum of float32 values cannot overflow, so it is finite iff every value is:
    # one cheap pass instead of a boolean mask over the array.
    if np.isfinite(np.sum(x, dtype=np.float64)):
        return -1
    return int(np.argmin(np.isfinite(x.reshape(-1))))


def _f32_quantize(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8)


def _f32_dequantize(data: np.ndarray) -> np.ndarray:
    return data.view("<f4").astype(np.float32)


def _f16_quantize(x: np.ndarray) -> np.ndarray:
    # numpy's float32->float16 cast rounds to nearest even, as ggml's GGML_FP32_TO_FP16 does.
    return np.ascontiguousarray(x, dtype=np.float32).astype("<f2").view(np.uint8)


def _f16_dequantize(data: np.ndarray) -> np.ndarray:
    return data.view("<f2").astype(np.float32)


def _bf16_quantize(x: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: round to nearest even; NaN stays NaN (quiet bit set).
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    h = np.where(nan, (u >> np.uint32(16)) | np.uint32(64), rounded).astype("<u2")
    return h.view(np.uint8)


def _bf16_dequantize(data: np.ndarray) -> np.ndarray:
    return (data.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass(frozen=True)
class BoardOps:
    """What a board runs for one type; the simulator reaches every kernel through these.

    Signatures (all buffers preallocated by the caller; see formats/kernels.py for the ggml
    types' contract, which every implementation follows):
      prepare_activation(int8_mode, x, xf, xq, xd, xs)
      matvec_blocks(int8_mode, buf, n_blocks, first_block, blocks_per_row, xf, xq, xd, xs,
                    out, row_state)
      dequantize_into(buf, out)
      count_blocks(buf, max_blocks) -> (n_blocks, n_bytes): variable-size types only -- how
          many whole blocks start `buf`, and their bytes (a block's size is in its own header).
      matvec_runner(int8_mode, blocks_per_row, xf, xq, xd, xs, out, row_state)
          -> run(buf, n_blocks, first_block): optional, matvec_blocks with the matrix's own
          arguments checked once instead of for every chunk.
    """

    prepare_activation: Callable
    matvec_blocks: Callable
    dequantize_into: Callable
    count_blocks: Callable | None = None
    matvec_runner: Callable | None = None


@functools.lru_cache(maxsize=None)
def _ggml_ops(type_id: int) -> BoardOps:
    return BoardOps(
        lambda *a: kernels.prepare_activation(type_id, *a),
        lambda *a: kernels.matvec_blocks(type_id, *a),
        lambda buf, out: kernels.dequantize_into(type_id, buf, out),
        matvec_runner=lambda *a: kernels.matvec_runner(type_id, *a))


def _kquant_ops(type_id: int) -> BoardOps:
    """The k-quants' board kernels (formats/kquant_dot.py)."""
    return BoardOps(functools.partial(kquant_dot.prepare_activation, type_id),
                    functools.partial(kquant_dot.matvec_blocks, type_id),
                    functools.partial(kquant_dot.dequantize_into, type_id))


# Ids a plug-in may take (the stream's type field is one byte; ggml's own ids stay below 64).
PLUGIN_IDS = range(192, 255)


@dataclass(frozen=True)
class QuantType:
    name: str
    id: int                      # ggml_type; also the stream's type id
    rwkv_cpp: int | None         # code in rwkv.cpp .bin files, None if rwkv.cpp lacks the type
    block_size: int              # elements per block
    block_bytes: int             # bytes per block; 0: variable-size blocks (rows of a record
                                 # start with a row-offset table, docs/format.md)
    _quantize: Callable[[np.ndarray], np.ndarray]    # float32 1-D -> uint8 1-D
    #                                                  (variable-size: float32 2-D -> payload)
    _dequantize: Callable[[np.ndarray], np.ndarray]  # uint8 1-D -> float32 1-D
    #                                                  (variable-size: (payload, shape) -> 2-D)
    ops: BoardOps | None = None  # None: ggml's kernels (formats/kernels.py) by id
    fallback: str | None = None  # the type rows that are not whole blocks get instead
    params: tuple[int, int] = (0, 0)      # the stream type table's param0/param1
    max_block_bytes: int = 0     # variable-size: the largest block (a board's chunk holds one)
    configure: Callable[[str], "QuantType"] | None = None   # "NAME:options" -> a variant
    plugin: str | None = None    # the file that registered it (user types)
    weighted: Callable | None = None  # (rows float32 2-D, importance[cols]) -> bytes: the
    #                                   quantizer that minimises importance-weighted error

    @property
    def variable(self) -> bool:
        return self.block_bytes == 0

    @property
    def board_ops(self) -> BoardOps:
        return self.ops if self.ops is not None else _ggml_ops(self.id)

    @property
    def largest_block(self) -> int:
        return self.max_block_bytes if self.variable else self.block_bytes

    @property
    def is_block(self) -> bool:
        return self.block_size > 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size

    def fits(self, n_cols: int) -> bool:
        return n_cols % self.block_size == 0

    def row_bytes(self, n_cols: int) -> int:
        if self.variable:
            raise BadInput(f"{self.name} rows have no fixed size (a variable-size type)")
        if n_cols % self.block_size:
            raise BadInput(f"{self.name} needs rows that are a multiple of {self.block_size} "
                           f"elements, got {n_cols}")
        return n_cols // self.block_size * self.block_bytes

    def nbytes(self, shape) -> int:
        shape = tuple(int(s) for s in shape)
        n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return n_rows * self.row_bytes(shape[-1] if shape else 1)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Values of any shape (last dim a multiple of the block size) -> uint8 (rows, row_bytes)."""
        x = np.asarray(x)
        if x.ndim == 0:
            x = x.reshape(1)
        if self.variable:
            if x.shape[-1] % self.block_size:
                raise BadInput(f"{self.name} needs rows that are a multiple of "
                               f"{self.block_size} elements, got {x.shape[-1]}")
            rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
            return self._quantize(rows)
        self.row_bytes(x.shape[-1])
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        out = self._quantize(flat)
        return out.reshape(-1, self.row_bytes(x.shape[-1]))

    def quantize_weighted(self, x: np.ndarray, importance) -> np.ndarray:
        """quantize() minimising sum(importance[col] * err^2) (calibrate's statistics), for the
        types that have such a quantizer; the others quantize as usual."""
        if importance is None or self.weighted is None:
            return self.quantize(x)
        x = np.asarray(x, np.float32)
        return self.weighted(x.reshape(-1, x.shape[-1]), importance)

    def quantize_from(self, source: "QuantType", data, n_cols: int) -> np.ndarray:
        """Rows of `n_cols` values stored as `source` (bytes, any buffer) -> uint8
        (rows, row_bytes) in this type (variable-size types: the 1-D record payload): the same bytes as quantize(source.dequantize(data)),
        refusing NaN/Inf with NonFiniteValue (the first one's flat element index).

        F32/F16/BF16 into a block type runs fused, block by block (formats/kernels.py
        `quantize_from`): no float32 copy of the input and no separate finiteness pass. Other
        pairs dequantize, check, then quantize.
        """
        raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
            else np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if self.variable or self.plugin:
            x = source.dequantize(raw, (raw.size // source.row_bytes(n_cols), n_cols))
            bad = first_non_finite(x)
            if bad >= 0:
                raise NonFiniteValue(bad, x.reshape(-1)[bad])
            return self.quantize(x)
        row_bytes = self.row_bytes(n_cols)
        src_row = source.row_bytes(n_cols)
        if raw.size % src_row:
            raise BadInput(f"{source.name} rows of {n_cols} values are {src_row} bytes, "
                           f"got {raw.size} bytes")
        rows = raw.size // src_row
        if kernels.can_quantize_from(source.id, self.id):
            out, bad = kernels.quantize_from(source.id, self.id, raw)
            if bad >= 0:
                eb = source.block_bytes
                raise NonFiniteValue(bad, source.dequantize(raw[bad * eb:(bad + 1) * eb], (1,))[0])
            return out.reshape(rows, row_bytes)
        x = source.dequantize(raw, (rows, n_cols))
        bad = first_non_finite(x)
        if bad >= 0:
            raise NonFiniteValue(bad, x.reshape(-1)[bad])
        return self.quantize(x)

    def dequantize(self, data, shape) -> np.ndarray:
        """Bytes (any buffer) -> float32 array of `shape`."""
        raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
            else np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if self.variable:
            return self._dequantize(raw, tuple(shape)).reshape(shape)
        need = self.nbytes(shape)
        if raw.size != need:
            raise BadInput(f"{self.name} data of shape {tuple(shape)} needs {need} bytes, "
                           f"got {raw.size}")
        return self._dequantize(raw).reshape(shape)

    # -- what a board runs (the simulator reaches the kernels through these) -------------------
    def dequantize_into(self, buf: np.ndarray, out: np.ndarray) -> None:
        """Whole blocks in `buf` -> float32 `out`, without allocating."""
        self.board_ops.dequantize_into(buf, out)

    def prepare_activation(self, int8_mode: bool, x, xf, xq, xd, xs) -> None:
        """The matmul input in the form this type's dot needs (float, fp16-rounded, Q8_0, Q8_1)."""
        self.board_ops.prepare_activation(int8_mode, x, xf, xq, xd, xs)

    def matvec_blocks(self, int8_mode: bool, buf, n_blocks: int, first_block: int,
                      blocks_per_row: int, xf, xq, xd, xs, out, row_state=None) -> None:
        """out[row] += dot(block, input) for a run of whole blocks of a row-major matrix;
        `row_state` carries a row cut by a run boundary to the next run (int8 mode)."""
        self.board_ops.matvec_blocks(int8_mode, buf, n_blocks, first_block, blocks_per_row,
                                     xf, xq, xd, xs, out, row_state)

    def matvec_runner(self, int8_mode: bool, blocks_per_row: int, xf, xq, xd, xs, out,
                      row_state=None) -> Callable:
        """run(buf, n_blocks, first_block): matvec_blocks for the runs of one matrix."""
        ops = self.board_ops
        if ops.matvec_runner is not None:
            return ops.matvec_runner(int8_mode, blocks_per_row, xf, xq, xd, xs, out, row_state)
        return lambda buf, n_blocks, first_block: ops.matvec_blocks(
            int8_mode, buf, n_blocks, first_block, blocks_per_row, xf, xq, xd, xs, out,
            row_state)

    def count_blocks(self, buf, max_blocks: int) -> tuple[int, int]:
        """(whole blocks at the start of buf, their bytes), at most max_blocks of them."""
        if not self.variable:
            n = min(max_blocks, len(buf) // self.block_bytes)
            return n, n * self.block_bytes
        return self.board_ops.count_blocks(buf, max_blocks)


BUILTIN_TYPES: tuple[QuantType, ...] = (
    QuantType("F32", 0, 0, 1, 4, _f32_quantize, _f32_dequantize),
    QuantType("F16", 1, 1, 1, 2, _f16_quantize, _f16_dequantize),
    QuantType("Q4_0", 2, 2, 32, 2 + 16, kernels.quantize_q4_0, kernels.dequantize_q4_0,
              weighted=functools.partial(imatrix.quantize_weighted, "Q4_0")),
    QuantType("Q4_1", 3, 3, 32, 2 + 2 + 16, kernels.quantize_q4_1, kernels.dequantize_q4_1,
              weighted=functools.partial(imatrix.quantize_weighted, "Q4_1")),
    QuantType("Q5_0", 6, 7, 32, 2 + 4 + 16, kernels.quantize_q5_0, kernels.dequantize_q5_0,
              weighted=functools.partial(imatrix.quantize_weighted, "Q5_0")),
    QuantType("Q5_1", 7, 8, 32, 2 + 2 + 4 + 16, kernels.quantize_q5_1, kernels.dequantize_q5_1,
              weighted=functools.partial(imatrix.quantize_weighted, "Q5_1")),
    QuantType("Q8_0", 8, 9, 32, 2 + 32, kernels.quantize_q8_0, kernels.dequantize_q8_0),
    # k-quants (256-value super-blocks); rows that are not whole super-blocks get `fallback`,
    # as llama.cpp does
    QuantType("Q2_K", 10, None, 256, 84, kquants.quantize_q2_k, kquants.dequantize_q2_k,
              ops=_kquant_ops(10), fallback="Q4_0"),
    QuantType("Q3_K", 11, None, 256, 110, kquants.quantize_q3_k, kquants.dequantize_q3_k,
              ops=_kquant_ops(11), fallback="Q4_0"),
    QuantType("Q4_K", 12, None, 256, 144, kquants.quantize_q4_k, kquants.dequantize_q4_k,
              ops=_kquant_ops(12), fallback="Q5_0"),
    QuantType("Q5_K", 13, None, 256, 176, kquants.quantize_q5_k, kquants.dequantize_q5_k,
              ops=_kquant_ops(13), fallback="Q5_1"),
    QuantType("Q6_K", 14, None, 256, 210, kquants.quantize_q6_k, kquants.dequantize_q6_k,
              ops=_kquant_ops(14), fallback="Q8_0"),
    QuantType("BF16", 30, None, 1, 2, _bf16_quantize, _bf16_dequantize),
    # QX (formats/qx.py): variable-size blocks, mixed widths + fp16 outliers; "QX:options"
    # (bpw=, err=, rel=, bs=, widths=, outliers=) gives a variant
    qx.make_type(),
)

# The table: built-in types, then types registered by plug-ins (formats/plugins.py).
TYPES: list[QuantType] = list(BUILTIN_TYPES)

_ALIASES = {"FP32": "F32", "FP16": "F16"}


def register(qtype: QuantType) -> QuantType:
    """Add a type to the table; its name and id must be new."""
    for t in TYPES:
        if t.name == qtype.name or t.id == qtype.id:
            raise BadInput(f"type {qtype.name} (id {qtype.id}) clashes with {t.name} (id {t.id})")
    TYPES.append(qtype)
    return qtype


def by_name(name: str) -> QuantType:
    """A type by name; "NAME:options" asks a configurable type (QX) for a variant."""
    base, _, options = name.partition(":")
    key = _ALIASES.get(base.upper(), base.upper())
    for t in TYPES:
        if t.name == key:
            if not options:
                return t
            if t.configure is None:
                raise BadInput(f"quant type {t.name} takes no options (got {name!r})")
            return t.configure(options)
    raise BadInput(f"unknown quant type {name!r} (known: {', '.join(t.name for t in TYPES)})")


def by_id(type_id: int) -> QuantType:
    for t in TYPES:
        if t.id == type_id:
            return t
    if type_id in PLUGIN_IDS:
        raise BadInput(f"type id {type_id} belongs to a plug-in type that is not loaded "
                       "(load it with --plugin FILE)")
    raise BadInput(f"unknown type id {type_id}")


def stream_type(entry_id: int, entry_name: str, block_size: int, block_bytes: int,
                params=(0, 0), fail: Callable[[str], None] | None = None,
                path=None, flags: int = 0) -> QuantType:
    """The loaded type a stream's type-table entry names. Every reader of a stream (validate,
    inspect, run, the board, the link host) resolves its type table here: a stream carries a
    plug-in type's name, id, block geometry and params, never its code.

    A plug-in id (PLUGIN_IDS) whose type is not loaded: BadInput (exit 2, whatever the command)
    naming the type by name and id and saying to pass --plugin. An id this tool does not know,
    or an entry whose name, block size or block bytes (for a plug-in type also params) disagree
    with the loaded type: `fail(message)` (the caller's error and offset), default BadInput."""
    def bad(message):
        if fail is not None:
            fail(message)
        raise BadInput(message, path=path)

    for t in TYPES:
        if t.id == entry_id:
            break
    else:
        if entry_id in PLUGIN_IDS:
            raise BadInput(f"the stream uses plug-in type {entry_name} (id {entry_id}), which "
                           "is not loaded, so this tool does not implement it: pass --plugin "
                           f"FILE, the file that registers {entry_name}", path=path)
        bad(f"type {entry_name!r} (id {entry_id}) is not implemented by this tool")
    params = tuple(int(p) for p in params)
    if t.configure is not None and block_size != t.block_size:
        try:
            t = t.configure(f"bs={block_size}")     # a variant of a configurable type (QX)
        except BadInput as e:
            bad(f"type table entry {entry_name!r}: {e.message}")
    if flags != (1 if t.variable else 0):           # bit 0: rows start with an offset table
        bad(f"type table entry {entry_name!r} has flags 0x{flags:x}; {t.name} has "
            f"0x{1 if t.variable else 0:x}")
    if ((t.name, t.block_size, t.block_bytes) != (entry_name, block_size, block_bytes)
            or params != tuple(t.params)):
        bad(f"type table entry {entry_name!r} (id {entry_id}, block {block_size}/{block_bytes} "
            f"bytes, params {params}) disagrees with {t.name} ({t.block_size}/{t.block_bytes}, "
            f"params {tuple(t.params)}" + (f", from {t.plugin}" if t.plugin else "") + ")")
    return t


def by_rwkv_cpp(code: int) -> QuantType:
    for t in TYPES:
        if t.rwkv_cpp == code:
            return t
    raise BadInput(f"unknown rwkv.cpp data type {code}"
                   + (" (Q4_2/Q4_3/Q4_1_O were removed from rwkv.cpp)" if code in (4, 5, 6) else ""))
