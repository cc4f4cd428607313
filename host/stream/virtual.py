"""The bytes a stream file would hold, produced on demand from a checkpoint.

`read(offset, n)` quantizes only the tensors (or, for tensors larger than the cache, only the
rows) that the range touches, keeping recently encoded tensors in a memory-capped cache.
`chunks()` walks the whole stream front to back; the file writer and a serial host use it.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict

import numpy as np

from formats import stream as S

from ..encode import encode_rows, row_slices
from ..model import Model
from .layout import ROW_TABLE, RecordSpan, StreamLayout, record_header_bytes
from .variable import encode_variable_rows

DEFAULT_CACHE = 64 << 20


class VirtualStream:
    def __init__(self, model: Model, plan, *, cache_bytes: int = DEFAULT_CACHE,
                 with_index: bool = True, layout: StreamLayout | None = None):
        self.model = model
        self.cache_bytes = cache_bytes
        # calibrate's per-column importance by tensor name (make_plan(importance=...)); the
        # types with an importance-weighted quantizer use it
        self.importance = getattr(plan, "importance", None) or {}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._crc: dict[str, int] = {}
        self._headers: dict[int, bytes] = {}
        measured: dict[str, np.ndarray] = {}
        self.layout = layout or StreamLayout.for_model(model, plan, with_index=with_index,
                                                       keep=measured, keep_bytes=cache_bytes)
        for name, payload in measured.items():      # variable-size payloads, quantized once
            self._remember(name, payload)
        self.size = self.layout.total_size
        self._tail = self.layout.end_record() + (self.layout.index_record()
                                                 if self.layout.index_offset else b"")

    # -- random access ------------------------------------------------------------------
    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise ValueError("negative offset or length")
        end = min(offset + n, self.size)
        out = []
        pos = offset
        lay = self.layout
        while pos < end:
            if pos < lay.header_size:
                stop = min(end, lay.header_size)
                out.append(lay.header[pos:stop])
            elif pos >= lay.end_offset:
                stop = end
                out.append(self._tail[pos - lay.end_offset:stop - lay.end_offset])
            else:
                rec = lay.record_at(pos)
                stop = min(end, rec.end)
                out.append(self._record_slice(rec, pos - rec.offset, stop - rec.offset))
            pos = stop
        return b"".join(out)

    def _record_slice(self, rec: RecordSpan, a: int, b: int) -> bytes:
        parts = []
        h = S.RECORD_HEADER_SIZE
        if a < h:
            parts.append(self._record_header(rec)[a:min(b, h)])
        pa, pb = max(a, h) - h, min(b, h + rec.data_size) - h
        if pa < pb:
            parts.append(bytes(self._payload(rec, pa, pb)))
        ca, cb = max(a, h + rec.data_size), min(b, h + rec.data_size + 4)
        if ca < cb:
            crc = S.PayloadCrc.build(dict(data_crc=self.data_crc(rec)))
            parts.append(crc[ca - h - rec.data_size:cb - h - rec.data_size])
        za = max(a, h + rec.data_size + 4)
        if za < b:
            parts.append(bytes(b - za))
        return b"".join(parts)

    def _record_header(self, rec: RecordSpan) -> bytes:
        head = self._headers.get(rec.index)
        if head is None:
            head = self._headers[rec.index] = self._build_record_header(rec)
        return head

    def _build_record_header(self, rec: RecordSpan) -> bytes:
        return record_header_bytes(S.RecordKind.TENSOR, rec.index, rec.qtype.id, rec.shape,
                                   rec.data_size, ROW_TABLE if rec.rows is not None else 0)

    def _payload(self, rec: RecordSpan, a: int, b: int) -> np.ndarray:
        cached = self._cache.get(rec.name)
        if cached is not None:
            self._cache.move_to_end(rec.name)
            return cached[a:b]
        t = self.model[rec.name]
        if rec.data_size <= self.cache_bytes:
            data = self._encode_whole(rec)
            self._remember(rec.name, data)
            return data[a:b]
        if rec.rows is not None:
            return self._variable_slice(rec, a, b)
        rb = rec.row_bytes
        r0, r1 = a // rb, -(-b // rb)
        return self._rows(rec, r0, r1)[a - r0 * rb:b - r0 * rb]

    def _encode_whole(self, rec: RecordSpan) -> np.ndarray:
        t = self.model[rec.name]
        if rec.rows is None:
            return self._rows(rec, 0, t.n_rows)
        body = [self._rows(rec, r0, r1) for r0, r1 in row_slices(t, rec.qtype)]
        return np.concatenate([rec.rows.table()] + body)

    def _rows(self, rec: RecordSpan, r0: int, r1: int) -> np.ndarray:
        """The encoded bytes of rows [r0, r1) (variable-size types: without the table)."""
        t, imp = self.model[rec.name], self.importance.get(rec.name)
        if rec.rows is not None:
            return encode_variable_rows(t, rec.qtype, r0, r1, imp)
        return encode_rows(t, rec.qtype, r0, r1, imp)

    def _variable_slice(self, rec: RecordSpan, a: int, b: int) -> np.ndarray:
        """Bytes [a, b) of a variable-size payload: the table from the layout, rows re-quantized."""
        rows = rec.rows
        parts = []
        if a < rows.table_size:
            parts.append(rows.table()[a:min(b, rows.table_size)])
            a = rows.table_size
        if a < b:
            r0, r1 = rows.rows_touching(a, b)
            body = self._rows(rec, r0, r1)
            base = int(rows.offsets[r0])
            parts.append(body[a - base:b - base])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _remember(self, name: str, data: np.ndarray) -> None:
        self._crc[name] = S.crc32(data)
        self._cache[name] = data
        self._cached_bytes += data.size
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.size

    def data_crc(self, rec: RecordSpan) -> int:
        if rec.name not in self._crc:
            crc = 0
            for _, chunk in self._encoded_pieces(rec):
                crc = zlib.crc32(chunk, crc)
            self._crc[rec.name] = crc & 0xFFFFFFFF
        return self._crc[rec.name]

    def _encoded_pieces(self, rec: RecordSpan):
        """(row range, bytes) pieces of a record's payload, front to back."""
        cached = self._cache.get(rec.name)
        if cached is not None:
            yield (0, rec.n_rows), cached
            return
        t = self.model[rec.name]
        if rec.data_size <= self.cache_bytes:
            yield (0, rec.n_rows), self._payload(rec, 0, rec.data_size)
            return
        yield from self._slices(rec)

    # -- sequential -------------------------------------------------------------------------
    def chunks(self, progress=None):
        """The whole stream, front to back, in pieces (bytes-like); each tensor encoded once.

        Tensors are encoded in row slices straight to the consumer: nothing is cached (a
        sequential pass never reads a tensor twice), each piece is CRC'd once as it goes by.
        Tensors already in the cache (from read()) are served from it.
        """
        lay = self.layout
        yield lay.header
        for rec in lay.records:
            yield self._record_header(rec)
            known = self._crc.get(rec.name)
            crc = 0
            for piece in self._sequential_pieces(rec):
                if known is None:
                    crc = zlib.crc32(piece, crc)
                yield memoryview(piece)
            if known is None:
                self._crc[rec.name] = known = crc & 0xFFFFFFFF
            yield S.PayloadCrc.build(dict(data_crc=known))
            yield bytes(rec.end - rec.data_offset - rec.data_size - 4)
            if progress is not None:
                progress(rec)
        yield self._tail

    def _sequential_pieces(self, rec: RecordSpan):
        cached = self._cache.get(rec.name)
        if cached is not None:
            yield cached
            return
        for _, piece in self._slices(rec):
            yield piece

    def _slices(self, rec: RecordSpan):
        t = self.model[rec.name]
        if rec.rows is not None:
            yield (0, 0), rec.rows.table()
            for r0, r1 in row_slices(t, rec.qtype):
                yield (r0, r1), self._rows(rec, r0, r1)
            return
        for r0, r1 in row_slices(t, rec.qtype):
            yield (r0, r1), self._rows(rec, r0, r1)
