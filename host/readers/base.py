"""What every checkpoint reader yields: lazy tensors that load their bytes only when asked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from formats.errors import BadInput
from formats.quants import QuantType


@dataclass
class SourceTensor:
    """One tensor of a checkpoint, as stored there (name and shape are the file's own).

    `shape` is the numpy shape (for rwkv.cpp files: ggml's ne reversed). `qtype` is the stored
    element type (F32, F16, BF16 or a ggml block type). `offset` is where the data starts in
    `path`, for error messages; `load()` returns the stored bytes as a uint8 array.
    """

    name: str
    shape: tuple[int, ...]
    qtype: QuantType
    path: str
    offset: int | None
    load: Callable[[], np.ndarray] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return self.qtype.nbytes(self.shape) if self.shape else self.qtype.block_bytes

    def raw(self) -> np.ndarray:
        """The stored bytes (uint8, 1-D)."""
        data = self.load()
        if data.size != self.nbytes:
            raise BadInput(f"expected {self.nbytes} bytes of data, found {data.size}",
                           path=self.path, tensor=self.name, offset=self.offset)
        return data

    def to_float32(self) -> np.ndarray:
        """The values as float32 in `shape` (dequantized or cast exactly)."""
        return self.qtype.dequantize(self.raw(), self.shape if self.shape else (1,)).reshape(self.shape)


class Checkpoint:
    """A checkpoint file (or set of shards) opened for lazy reading.

    Subclasses fill `self.tensors` (an ordered dict name -> SourceTensor, in file order) without
    reading any tensor data, and may keep `self.info` (format-specific header fields).
    """

    format_name = "?"
    stored_form = False   # True: tensors already have rwkv.cpp's names, shapes and transforms

    def __init__(self, path):
        self.path = str(path)
        self.tensors: dict[str, SourceTensor] = {}
        self.info: dict = {}

    def __iter__(self) -> Iterator[SourceTensor]:
        return iter(self.tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> SourceTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInput(f"no tensor named {name!r}", path=self.path) from None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
