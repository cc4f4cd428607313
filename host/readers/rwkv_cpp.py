"""Reader for rwkv.cpp `.bin` model files (versions 100 and 101), see rwkv_spec.md section 1."""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from formats.errors import BadInput
from formats.quants import by_rwkv_cpp

from .base import Checkpoint, SourceTensor

MAGIC = 0x67676D66           # "fmgg" on disk
VERSIONS = (100, 101)
HEADER = struct.Struct("<6I")  # magic, version, n_vocab, n_embed, n_layer, data_type
TENSOR_HEADER = struct.Struct("<3I")  # n_dims, name_len, type


def looks_like_rwkv_cpp(head: bytes) -> bool:
    return len(head) >= 4 and struct.unpack_from("<I", head)[0] == MAGIC


class RwkvCppCheckpoint(Checkpoint):
    format_name = "rwkv.cpp"
    stored_form = True

    def __init__(self, path):
        super().__init__(path)
        size = os.path.getsize(path)
        if size < HEADER.size:
            raise BadInput(f"file is {size} bytes, shorter than the {HEADER.size}-byte header",
                           path=path, offset=0)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._mm)
        magic, version, n_vocab, n_embed, n_layer, data_type = HEADER.unpack_from(self._buf, 0)
        if magic != MAGIC:
            raise BadInput(f"not an rwkv.cpp model (magic 0x{magic:08x}, expected 0x{MAGIC:08x})",
                           path=path, offset=0)
        if version not in VERSIONS:
            raise BadInput(f"unsupported rwkv.cpp file version {version} (known: 100, 101)",
                           path=path, offset=4)
        main_type = by_rwkv_cpp(data_type) if data_type not in (4, 5, 6) else None
        if main_type is None:
            raise BadInput(f"data type {data_type} was removed from rwkv.cpp", path=path, offset=20)
        self.info = dict(version=version, n_vocab=n_vocab, n_embed=n_embed, n_layer=n_layer,
                         data_type=main_type.name)
        self._parse_records(size)

    def _parse_records(self, size: int) -> None:
        off = HEADER.size
        buf = self._buf
        while off < size:
            start = off
            if off + TENSOR_HEADER.size > size:
                raise BadInput("truncated tensor header", path=self.path, offset=start)
            n_dims, name_len, code = TENSOR_HEADER.unpack_from(buf, off)
            off += TENSOR_HEADER.size
            if not 1 <= n_dims <= 3:
                raise BadInput(f"tensor has {n_dims} dimensions (rwkv.cpp allows 1 to 3)",
                               path=self.path, offset=start)
            if name_len > 4096 or off + 4 * n_dims + name_len > size:
                raise BadInput("truncated tensor header", path=self.path, offset=start)
            ne = struct.unpack_from(f"<{n_dims}I", buf, off)
            off += 4 * n_dims
            try:
                name = bytes(buf[off:off + name_len]).decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput("tensor name is not UTF-8", path=self.path, offset=off) from None
            off += name_len
            try:
                qtype = by_rwkv_cpp(code)
            except BadInput as e:
                raise BadInput(e.message, path=self.path, tensor=name, offset=start + 8) from None
            if code > 1 and self.info["version"] == 100:
                raise BadInput(f"{qtype.name} tensor in a version-100 file; rwkv.cpp requires "
                               "version 101 for quantized data", path=self.path, tensor=name,
                               offset=start)
            shape = tuple(reversed(ne))
            if any(d == 0 for d in shape):
                raise BadInput(f"tensor has an empty dimension {shape}", path=self.path,
                               tensor=name, offset=start)
            try:
                nbytes = qtype.nbytes(shape)
            except BadInput as e:
                raise BadInput(e.message, path=self.path, tensor=name, offset=start) from None
            if off + nbytes > size:
                raise BadInput(f"data truncated: needs {nbytes} bytes, file has {size - off} left",
                               path=self.path, tensor=name, offset=off)
            if name in self.tensors:
                raise BadInput("tensor appears twice", path=self.path, tensor=name, offset=start)
            data_off = off
            self.tensors[name] = SourceTensor(
                name, shape, qtype, self.path, data_off,
                load=lambda o=data_off, n=nbytes: np.frombuffer(self._buf, np.uint8, n, o))
            off += nbytes

    def close(self) -> None:
        # Arrays handed out may still view the map; let the GC close it when they are gone.
        self.tensors = {}
