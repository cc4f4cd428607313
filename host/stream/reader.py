"""Reading and validating a stream file: typed records with their offsets, or the first error.

Everything a board checks is checked here, in the same order a board meets it, so the first
error reported is the one a board would hit, with its byte offset and record name.
"""
from __future__ import annotations

import math
import mmap
import os
import zlib
from dataclasses import dataclass

import construct
import numpy as np

from formats import stream as S
from formats.arch import RwkvVersion
from formats.errors import BadInput, CheckFailed
from formats.quants import QuantType, stream_type

from ..model import HParams, expected_shapes, forward_order
from .layout import ROW_TABLE


@dataclass(frozen=True)
class Record:
    kind: int
    index: int               # tensor index for TENSOR records
    name: str                # canonical tensor name, or the kind's name
    qtype: QuantType | None
    shape: tuple[int, ...]
    offset: int              # record header
    data_offset: int
    data_size: int
    end: int


class StreamFile:
    """A stream file opened for reading; `records` is filled by `walk()`."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(path):
            raise BadInput("no such file" if not os.path.exists(path) else "not a file",
                           path=path)
        size = os.path.getsize(path)
        self.size = size
        if size == 0:
            self._fail("empty file", 0)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buf = memoryview(self._mm)
        self.header = self._parse_header()
        self.hparams = self._hparams()
        self.names = forward_order(self.hparams)
        self.shapes = expected_shapes(self.hparams)
        self.plan = self._plan()
        self.records: list[Record] = []

    @classmethod
    def for_input(cls, path) -> "StreamFile":
        """Opened as the input of a command other than validate: a bad stream is bad input
        (exit 2), not a check's finding (exit 1)."""
        try:
            return cls(path)
        except CheckFailed as e:
            raise BadInput(e.message, path=e.path, tensor=e.tensor, offset=e.offset) from None

    def walk_as_input(self) -> list[Record]:
        try:
            return self.walk()
        except CheckFailed as e:
            raise BadInput(e.message, path=e.path, tensor=e.tensor, offset=e.offset) from None

    def _fail(self, message, offset=None, record=None):
        raise CheckFailed(message, path=self.path, tensor=record, offset=offset)

    # -- header ------------------------------------------------------------------------------
    def _parse_header(self):
        buf, size = self.buf, self.size
        if size < 4 or bytes(buf[:4]) != S.MAGIC:
            self._fail(f"not an rwkv-stream stream (magic {bytes(buf[:4])!r}, expected "
                       f"{S.MAGIC!r})", 0)
        if size < 8:
            self._fail(f"truncated: {size} bytes, the header alone needs 112", size)
        major = int.from_bytes(buf[4:6], "little")
        if major != S.MAJOR:
            self._fail(f"stream major version {major} is not supported (this tool reads "
                       f"version {S.MAJOR}.x)", 4)
        if size < 112:
            self._fail(f"truncated: {size} bytes, the header alone needs 112", size)
        header_size = int.from_bytes(buf[8:12], "little")
        if header_size < 112 or header_size % S.ALIGN or header_size > size:
            self._fail(f"header_size {header_size} is impossible for a {size}-byte file", 8)
        try:
            h = S.StreamHeader.parse(bytes(buf[:header_size]))
        except construct.ChecksumError:
            n_types = int.from_bytes(buf[76:78], "little")
            n_tensors = int.from_bytes(buf[72:76], "little")
            crc_off = 112 + S.TYPE_ENTRY_SIZE * n_types + n_tensors + S.pad_to(n_tensors, 4)
            self._fail("header CRC-32 mismatch", crc_off)
        except construct.ConstructError as e:
            self._fail(f"malformed header ({type(e).__name__})", 0)
        f = h.fields.value
        actual = len(h.fields.data) + 4 + S.pad_to(len(h.fields.data) + 4)
        if actual != header_size:
            self._fail(f"header_size says {header_size} bytes but the header's tables take "
                       f"{actual}", 8)
        # Stream 1.0 gives no meaning to these; a non-zero value is a stream we cannot read right.
        if f.flags or f.reserved0 or f.reserved1:
            self._fail("reserved header fields are not zero", 14)
        for i, entry in enumerate(f.types):
            if entry.reserved:
                self._fail(f"type entry {entry.name!r} has reserved bytes that are not zero",
                           112 + S.TYPE_ENTRY_SIZE * i)
        plan_end = 112 + S.TYPE_ENTRY_SIZE * len(f.types) + len(f.plan)
        if any(buf[plan_end:len(h.fields.data)]) or any(buf[len(h.fields.data) + 4:header_size]):
            self._fail("header padding is not zero", plan_end)
        return f

    def _hparams(self) -> HParams:
        f = self.header
        try:
            version = RwkvVersion(f.arch)
        except ValueError:
            self._fail(f"unknown architecture code {f.arch}", 12)
        if min(f.n_vocab, f.n_embd, f.n_layer, f.ffn_size) == 0:
            self._fail("a dimension in the header is zero", 16)
        if version is not RwkvVersion.V4 and f.n_head * f.head_size != f.n_embd:
            self._fail(f"n_head {f.n_head} x head_size {f.head_size} != n_embd {f.n_embd}", 32)
        lora = {RwkvVersion.V6: dict(maa=f.lora_maa, decay=f.lora_decay),
                RwkvVersion.V7: dict(w=f.lora_w, a=f.lora_a, v=f.lora_v, g=f.lora_g)}
        hp = HParams(version, f.n_vocab, f.n_embd, f.n_layer, f.ffn_size,
                     f.n_head if version is not RwkvVersion.V4 else 0,
                     f.head_size if version is not RwkvVersion.V4 else 0,
                     lora.get(version, {}))
        n_expected = len(forward_order(hp))
        if f.n_tensors != n_expected:
            self._fail(f"header lists {f.n_tensors} tensors; RWKV v{version.label} with "
                       f"{f.n_layer} layers has {n_expected}", 72)
        return hp

    def _plan(self) -> list[QuantType]:
        f = self.header
        known = {}
        for i, entry in enumerate(f.types):
            off = 112 + S.TYPE_ENTRY_SIZE * i
            q = stream_type(entry.id, entry.name, entry.block_size, entry.block_bytes,
                            (entry.param0, entry.param1), lambda m: self._fail(m, off), self.path,
                            flags=entry.flags)
            known[entry.id] = q
        plan = []
        plan_off = 112 + S.TYPE_ENTRY_SIZE * len(f.types)
        for i, type_id in enumerate(f.plan):
            if type_id not in known:
                self._fail(f"type id {type_id} of tensor {i} is not in the type table",
                           plan_off + i)
            plan.append(known[type_id])
        return plan

    # -- records -----------------------------------------------------------------------------
    def _record_header(self, off: int, what: str):
        if off + S.RECORD_HEADER_SIZE > self.size:
            self._fail(f"truncated: the stream ends inside the record header of {what}",
                       off, what)
        try:
            return S.RecordHeaderFast.parse(bytes(self.buf[off:off + S.RECORD_HEADER_SIZE])).fields.value
        except construct.ChecksumError:
            self._fail("record header CRC-32 mismatch", off, what)

    def _payload(self, off: int, size: int, what: str) -> int:
        """Checks payload CRC and zero padding; returns the next record's offset."""
        data_off = off + S.RECORD_HEADER_SIZE
        crc_off = data_off + size
        end = crc_off + 4
        end += S.pad_to(end)
        if end > self.size:
            self._fail(f"truncated: the stream ends inside {what} (needs {end - off} bytes, "
                       f"{self.size - off} left)", off, what)
        stored = int.from_bytes(self.buf[crc_off:crc_off + 4], "little")
        if zlib.crc32(self.buf[data_off:crc_off]) & 0xFFFFFFFF != stored:
            self._fail("payload CRC-32 mismatch", data_off, what)
        if any(self.buf[crc_off + 4:end]):
            self._fail("padding after the payload is not zero", crc_off + 4, what)
        return end

    def walk(self, deep: bool = False) -> list[Record]:
        f, hp = self.header, self.hparams
        off = f.header_size
        records = []
        i = 0
        while True:
            what = self.names[i] if i < len(self.names) else "END"
            h = self._record_header(off, what)
            if S.RecordKind.is_optional(h.kind) and h.kind != S.RecordKind.INDEX:
                if h.data_size > self.size:
                    self._fail(f"optional record of {h.data_size} bytes is larger than the file",
                               off, f"kind 0x{h.kind:04x}")
                off = self._payload(off, h.data_size, f"optional record 0x{h.kind:04x}")
                continue
            if h.kind == S.RecordKind.END:
                if i != len(self.names):
                    self._fail(f"END record after {i} tensors; expected {len(self.names)} "
                               f"(next: {self.names[i]})", off, "END")
                if h.data_size:
                    self._fail("END record has a payload", off, "END")
                end = self._payload(off, 0, "END")
                if end != f.body_size:
                    self._fail(f"header says the body ends at {f.body_size}, END ends at {end}",
                               96)
                records.append(Record(h.kind, 0, "END", None, (), off,
                                      off + S.RECORD_HEADER_SIZE, 0, end))
                off = end
                break
            if h.kind != S.RecordKind.TENSOR:
                self._fail(f"unknown required record kind {h.kind}", off, what)
            if i >= len(self.names):
                self._fail("more tensor records than the header lists", off, f"tensor {i}")
            name = self.names[i]
            if h.tensor != i:
                self._fail(f"record for tensor {h.tensor} where tensor {i} ({name}) belongs: "
                           "records are out of forward order", off, name)
            q = self.plan[i]
            if h.type != q.id:
                self._fail(f"record type id {h.type} differs from the header's plan ({q.name})",
                           off + 4, name)
            if h.flags != (ROW_TABLE if q.variable else 0) or h.reserved:
                self._fail(f"record flags 0x{h.flags:x} do not fit a {q.name} record "
                           f"(expected 0x{ROW_TABLE if q.variable else 0:x})", off + 6, name)
            shape = tuple(h.dims[:h.ndim]) if 1 <= h.ndim <= 3 and \
                all(d == 1 for d in h.dims[h.ndim:]) else None
            if shape != self.shapes[name]:
                self._fail(f"shape {shape} does not match {self.shapes[name]} implied by the "
                           "header", off + 8, name)
            if shape[-1] % q.block_size:
                need = -1
            elif q.variable:
                need = h.data_size if h.data_size >= 4 * (math.prod(shape[:-1]) + 1) else -1
            else:
                need = q.nbytes(shape)
            if h.data_size != need:
                self._fail(f"data_size {h.data_size} != {need} bytes for {q.name} {shape}",
                           off + 20, name)
            end = self._payload(off, h.data_size, name)
            rec = Record(h.kind, i, name, q, shape, off, off + S.RECORD_HEADER_SIZE,
                         h.data_size, end)
            if q.variable:
                self._check_rows(rec)
            if i == 0:
                if f.emb_offset != rec.data_offset or f.emb_row_bytes != q.row_bytes(shape[-1]):
                    self._fail("header's embedding offset/row size disagree with the embedding "
                               "record", 80)
            if deep:
                self._check_finite(rec)
            records.append(rec)
            off = end
            i += 1
        if f.index_offset:
            if f.index_offset != off:
                self._fail(f"index_offset {f.index_offset} but the body ends at {off}", 104)
            h = self._record_header(off, "INDEX")
            if h.kind != S.RecordKind.INDEX:
                self._fail(f"expected the INDEX record, found kind {h.kind}", off, "INDEX")
            n = len(records)
            if h.data_size != 8 * n:
                self._fail(f"INDEX holds {h.data_size} bytes, expected {8 * n}", off + 20,
                           "INDEX")
            end = self._payload(off, h.data_size, "INDEX")
            got = np.frombuffer(self.buf, "<u8", n, off + S.RECORD_HEADER_SIZE)
            want = [r.offset for r in records]
            for k, (a, b) in enumerate(zip(got, want)):
                if int(a) != b:
                    self._fail(f"INDEX entry {k} says {int(a)}, the record is at {b}",
                               off + S.RECORD_HEADER_SIZE + 8 * k, "INDEX")
            records.append(Record(h.kind, 0, "INDEX", None, (), off, off + 32, h.data_size,
                                  end))
            off = end
        if off != self.size:
            self._fail(f"{self.size - off} unexpected bytes after the end of the stream", off)
        self.records = records
        return records

    def _check_rows(self, rec: Record) -> None:
        """A variable-size record: its row-offset table, and every row made of exactly its
        blocks (each row decodes front to back to its own end)."""
        n_rows = math.prod(rec.shape[:-1])
        table = np.frombuffer(self.buf, "<u4", n_rows + 1, rec.data_offset).astype(np.int64)
        if table[0] != 4 * (n_rows + 1):
            self._fail(f"row-offset table starts at {table[0]}, expected {4 * (n_rows + 1)}",
                       rec.data_offset, rec.name)
        if table[-1] != rec.data_size:
            self._fail(f"row-offset table ends at {table[-1]}, the payload holds "
                       f"{rec.data_size} bytes", rec.data_offset + 4 * n_rows, rec.name)
        back = np.flatnonzero(np.diff(table) < 0)
        if back.size:
            self._fail(f"row-offset table goes backwards at row {back[0] + 1}",
                       rec.data_offset + 4 * (back[0] + 1), rec.name)
        q, per_row = rec.qtype, rec.shape[-1] // rec.qtype.block_size
        data = np.frombuffer(self.buf, np.uint8, rec.data_size, rec.data_offset)
        for r in range(n_rows):
            row = data[table[r]:table[r + 1]]
            try:
                got, used = q.count_blocks(row, per_row)
            except BadInput as e:
                got, used = -1, e.message
            if got != per_row or used != row.size:
                self._fail(f"row {r} holds {row.size} bytes that do not decode to {per_row} "
                           f"{q.name} blocks", rec.data_offset + int(table[r]), rec.name)

    def _check_finite(self, rec: Record) -> None:
        data = np.frombuffer(self.buf, np.uint8, rec.data_size, rec.data_offset)
        values = rec.qtype.dequantize(data, rec.shape)
        ok = np.isfinite(values)
        if not ok.all():
            k = int(np.argmin(ok.reshape(-1)))
            self._fail(f"non-finite value at element {k}", rec.data_offset, rec.name)

    def tensor_data(self, rec: Record) -> np.ndarray:
        return np.frombuffer(self.buf, np.uint8, rec.data_size, rec.data_offset)

    def close(self):
        try:
            self.buf.release()
            self._mm.close()
        except BufferError:
            pass        # arrays handed out still view the map; the GC closes it after them


def validate(path, deep: bool = False) -> dict:
    """Raises CheckFailed with the first problem; returns a summary when the stream is good."""
    sf = StreamFile(path)
    try:
        records = sf.walk(deep=deep)
        tensors = [r for r in records if r.kind == S.RecordKind.TENSOR]
        return dict(ok=True, file=str(path), version=sf.hparams.version.label,
                    major=sf.header.major, minor=sf.header.minor, bytes=sf.size,
                    tensors=len(tensors), index=bool(sf.header.index_offset),
                    weights=sum(math.prod(r.shape) for r in tensors), deep=deep)
    finally:
        sf.close()
