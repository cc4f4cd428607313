"""Reader for safetensors files and sharded safetensors checkpoints (no `safetensors` package).

A safetensors file is

    u64 little-endian N | N bytes of UTF-8 JSON header | data buffer

The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data buffer) plus an optional "__metadata__" object of string -> string.
As in the reference implementation, tensors must tile the data buffer exactly: no overlaps,
no holes, nothing after the last tensor. A sharded checkpoint is a `*.safetensors.index.json`
whose "weight_map" maps every tensor name to a shard file in the same folder.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from formats.errors import BadInput
from formats.quants import QuantType, by_name

from .base import Checkpoint, SourceTensor

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
SUPPORTED = ("F32", "F16", "BF16")
KNOWN_DTYPES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3",
                "F6_E3M2", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64",
                "U64", "C64")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


class _SafetensorsFile:
    """One mapped `.safetensors` file: its metadata and (name, shape, qtype, offset, nbytes)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise BadInput(f"cannot read: {e.strerror or e}", path=path) from None
        if size < 8:
            raise BadInput(f"file is {size} bytes, shorter than the 8-byte header length",
                           path=path, offset=0)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buf = memoryview(self._mm)
        (n,) = struct.unpack_from("<Q", self.buf, 0)
        if n > MAX_HEADER:
            raise BadInput(f"header length {n} is implausible (limit {MAX_HEADER}); not a "
                           "safetensors file?", path=path, offset=0)
        if 8 + n > size:
            raise BadInput(f"header length {n} runs past the end of the {size}-byte file "
                           "(truncated?)", path=path, offset=0)
        raw = bytes(self.buf[8:8 + n])
        if not raw.lstrip(b" ").startswith(b"{"):
            raise BadInput("header is not a JSON object", path=path, offset=8)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError:
            raise BadInput("header is not UTF-8", path=path, offset=8) from None
        except ValueError as e:
            raise BadInput(f"header is not valid JSON ({e})", path=path, offset=8) from None
        if not isinstance(header, dict):
            raise BadInput("header is not a JSON object", path=path, offset=8)
        self.data_start = 8 + n
        data_len = size - self.data_start
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(
                isinstance(v, str) for v in meta.values())):
            raise BadInput("__metadata__ must be an object of string values", path=path,
                           offset=8)
        self.metadata = dict(meta or {})
        entries = []
        for order, (name, spec) in enumerate(header.items()):
            entries.append(self._entry(name, spec, data_len, order))
        # File order = data order; tensors must tile the buffer exactly.
        entries.sort(key=lambda e: (e[3], e[3] + e[4], e[5]))
        pos = 0
        for name, _shape, _q, begin, nbytes, _ in entries:
            if begin < pos:
                raise BadInput(f"data_offsets [{begin}, {begin + nbytes}] overlap the previous "
                               f"tensor (which ends at {pos})", path=path, tensor=name,
                               offset=self.data_start + begin)
            if begin > pos:
                raise BadInput(f"data bytes [{pos}, {begin}) belong to no tensor (hole before "
                               "this tensor)", path=path, tensor=name,
                               offset=self.data_start + pos)
            pos = begin + nbytes
        if pos != data_len:
            raise BadInput(f"the data buffer is {data_len} bytes but tensors cover only {pos}",
                           path=path, offset=self.data_start + pos)
        self.entries = [(name, shape, q, self.data_start + begin, nbytes)
                        for name, shape, q, begin, nbytes, _ in entries]

    def _entry(self, name, spec, data_len: int, order: int):
        path = self.path
        if not isinstance(spec, dict):
            raise BadInput("header entry is not an object", path=path, tensor=name, offset=8)
        dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str):
            raise BadInput(f"missing or malformed dtype {dtype!r}", path=path, tensor=name,
                           offset=8)
        if dtype not in SUPPORTED:
            what = "unsupported" if dtype in KNOWN_DTYPES else "unknown"
            raise BadInput(f"{what} dtype {dtype}: only {', '.join(SUPPORTED)} tensors can be "
                           "read", path=path, tensor=name, offset=8)
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise BadInput(f"malformed shape {shape!r}", path=path, tensor=name, offset=8)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise BadInput(f"malformed data_offsets {offs!r}", path=path, tensor=name, offset=8)
        begin, end = offs
        if not 0 <= begin <= end:
            raise BadInput(f"data_offsets [{begin}, {end}] are not an increasing pair",
                           path=path, tensor=name, offset=8)
        if end > data_len:
            raise BadInput(f"data_offsets [{begin}, {end}] run past the {data_len}-byte data "
                           "buffer (truncated file?)", path=path, tensor=name,
                           offset=self.data_start + begin)
        qtype: QuantType = by_name(dtype)
        shape = tuple(shape)
        n = 1
        for d in shape:
            n *= d
        nbytes = n * qtype.block_bytes
        if end - begin != nbytes:
            raise BadInput(f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but a "
                           f"{dtype} tensor of shape {list(shape)} needs {nbytes}",
                           path=path, tensor=name, offset=self.data_start + begin)
        return name, shape, qtype, begin, nbytes, order

    def load(self, offset: int, nbytes: int) -> np.ndarray:
        if nbytes == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(self.buf, np.uint8, nbytes, offset)


class SafetensorsCheckpoint(Checkpoint):
    format_name = "safetensors"

    def __init__(self, path):
        super().__init__(path)
        p = Path(path)
        if p.name.endswith(".index.json"):
            self._open_index(p)
        else:
            f = _SafetensorsFile(str(p))
            self.info = dict(metadata=f.metadata)
            self._add(f, None)

    def _add(self, f: _SafetensorsFile, wanted: dict | None) -> None:
        for name, shape, qtype, offset, nbytes in f.entries:
            if wanted is not None:
                if name not in wanted:
                    raise BadInput("tensor is in this shard but not in the index's weight_map",
                                   path=f.path, tensor=name, offset=offset)
                if wanted[name] != Path(f.path).name:
                    raise BadInput(f"tensor is in this shard but the index maps it to "
                                   f"{wanted[name]!r}", path=f.path, tensor=name, offset=offset)
            if name in self.tensors:
                raise BadInput("tensor appears twice", path=f.path, tensor=name, offset=offset)
            self.tensors[name] = SourceTensor(
                name, shape, qtype, f.path, offset,
                load=lambda f=f, o=offset, n=nbytes: f.load(o, n))

    def _open_index(self, index: Path) -> None:
        try:
            text = index.read_bytes().decode("utf-8")
        except OSError as e:
            raise BadInput(f"cannot read: {e.strerror or e}", path=index) from None
        except UnicodeDecodeError:
            raise BadInput("index is not UTF-8 JSON", path=index) from None
        try:
            doc = json.loads(text, object_pairs_hook=_no_duplicates)
        except ValueError as e:
            raise BadInput(f"index is not valid JSON ({e})", path=index) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
            raise BadInput('index has no "weight_map" object', path=index)
        weight_map = doc["weight_map"]
        if not weight_map:
            raise BadInput('index "weight_map" is empty', path=index)
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or shard in (".", "..") \
                    or "/" in shard or "\\" in shard or shard != shard.strip():
                raise BadInput(f"weight_map entry {shard!r} is not a file name in the index's "
                               "folder", path=index, tensor=name)
        shards = sorted(set(weight_map.values()))
        meta = doc.get("metadata")
        self.info = dict(metadata=meta if isinstance(meta, dict) else {}, shards=shards,
                         shard_metadata={})
        for shard in shards:
            shard_path = index.parent / shard
            if not shard_path.is_file():
                missing = next(n for n, s in weight_map.items() if s == shard)
                raise BadInput(f"shard {shard!r} named in the index is missing", path=index,
                               tensor=missing)
            f = _SafetensorsFile(str(shard_path))
            self.info["shard_metadata"][shard] = f.metadata
            self._add(f, weight_map)
        for name, shard in weight_map.items():
            if name not in self.tensors:
                raise BadInput(f"tensor listed in the index is not in shard {shard!r}",
                               path=index.parent / shard, tensor=name)

    def close(self) -> None:
        # Arrays handed out may still view the maps; let the GC close them when they are gone.
        self.tensors = {}
