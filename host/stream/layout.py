"""Every record's offset and size, computed from shapes and types before any data exists."""
from __future__ import annotations

import math
from dataclasses import dataclass

from formats import stream as S
from formats.errors import BadInput
from formats.quants import QuantType

from ..model import HParams, Model
from .variable import VariableRows, measure


def default_tokenizer(n_vocab: int) -> S.Tokenizer:
    return {256: S.Tokenizer.BYTES, 65536: S.Tokenizer.WORLD,
            50277: S.Tokenizer.NEOX_20B}.get(n_vocab, S.Tokenizer.UNKNOWN)


@dataclass(frozen=True)
class RecordSpan:
    """Where one tensor record lives in the stream."""

    index: int                 # position in forward order (= the record's `tensor` field)
    name: str
    qtype: QuantType
    shape: tuple[int, ...]
    offset: int                # record header
    data_offset: int           # payload
    data_size: int
    end: int                   # next record (after CRC and padding)

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.qtype.row_bytes(self.shape[-1])

    rows: "VariableRows | None" = None    # variable-size types: where each row is


ROW_TABLE = 1      # record and type-entry flag: rows start with a row-offset table


def record_header_bytes(kind: int, tensor: int, type_id: int, shape, data_size: int,
                        flags: int = 0) -> bytes:
    dims = list(shape) + [1] * (3 - len(shape))
    return S.RecordHeader.build(dict(fields=dict(value=dict(
        kind=kind, tensor=tensor, type=type_id, ndim=len(shape) if shape else 0, flags=flags,
        dims=dims, data_size=data_size, reserved=0)), header_crc=None))


def _record_end(data_offset: int, data_size: int) -> int:
    end = data_offset + data_size + S.PayloadCrc.sizeof()
    return end + S.pad_to(end)


class StreamLayout:
    def __init__(self, hparams: HParams, plan: dict[str, QuantType], *, with_index: bool = True,
                 tokenizer: S.Tokenizer | None = None, shapes: dict | None = None,
                 variable: dict[str, VariableRows] | None = None):
        """`variable`: the measured rows of every tensor of a variable-size type (for_model
        measures them)."""
        self.hparams = hparams
        self.plan = dict(plan)
        names = list(plan)
        if names[0] != "emb.weight":
            raise BadInput("the stream must start with the embedding")
        emb_type = plan["emb.weight"]
        if emb_type.variable:
            raise BadInput(f"the embedding needs a fixed-size type, not {emb_type.name}")
        if len(names) > 0xFFFF:
            raise BadInput(f"{len(names)} tensors is more than a stream can index")
        self.types = sorted({q.id: q for q in plan.values()}.values(), key=lambda q: q.id)
        for q in plan.values():
            other = next(t for t in self.types if t.id == q.id)
            if (q.block_size, q.params) != (other.block_size, other.params):
                raise BadInput(f"one stream cannot hold {q.name} with block sizes "
                               f"{q.block_size} and {other.block_size}")
        variable = variable or {}
        self.tokenizer = default_tokenizer(hparams.n_vocab) if tokenizer is None else tokenizer
        self.shapes = shapes or {}
        header_len = self._header_fields_size(len(self.types), len(names))
        self.header_size = header_len + 4 + S.pad_to(header_len + 4)
        self.records: list[RecordSpan] = []
        off = self.header_size
        for i, name in enumerate(names):
            q = plan[name]
            shape = tuple(self.shapes[name])
            rows = variable.get(name) if q.variable else None
            if q.variable and rows is None:
                raise BadInput(f"{name}: a {q.name} record's size is known only after "
                               "quantizing it (StreamLayout.for_model measures it)")
            size = rows.data_size if rows is not None else q.nbytes(shape)
            data_off = off + S.RECORD_HEADER_SIZE
            end = _record_end(data_off, size)
            self.records.append(RecordSpan(i, name, q, shape, off, data_off, size, end, rows))
            off = end
        self.end_offset = off
        self.body_size = off + S.RECORD_HEADER_SIZE + _record_end(0, 0)
        if with_index:
            self.index_offset = self.body_size
            index_size = 8 * (len(self.records) + 1)
            self.total_size = self.index_offset + S.RECORD_HEADER_SIZE + _record_end(0,
                                                                                      index_size)
        else:
            self.index_offset = 0
            self.total_size = self.body_size
        self.by_name = {r.name: r for r in self.records}
        self.header = self._build_header()

    @staticmethod
    def _header_fields_size(n_types: int, n_tensors: int) -> int:
        return 112 + S.TYPE_ENTRY_SIZE * n_types + n_tensors + S.pad_to(n_tensors, 4)

    @classmethod
    def for_model(cls, model: Model, plan, *, keep: dict | None = None, keep_bytes: int = 0,
                  **kw) -> "StreamLayout":
        """The layout of `model` in `plan`. Tensors of variable-size types are quantized once
        here to learn their sizes; payloads up to `keep_bytes` in all go into `keep`."""
        variable = {}
        for name, q in plan.items():
            if q.variable:
                rows, payload = measure(model[name], q, keep_bytes,
                                        (getattr(plan, "importance", None) or {}).get(name))
                variable[name] = rows
                if payload is not None and keep is not None:
                    keep[name] = payload
                    keep_bytes -= payload.size
        return cls(model.hparams, plan, shapes={t.name: t.shape for t in model},
                   variable=variable, **kw)

    def _build_header(self) -> bytes:
        hp = self.hparams
        lora = hp.lora
        emb = self.records[0]
        fields = dict(
            major=S.MAJOR, minor=S.MINOR, header_size=self.header_size, arch=int(hp.version),
            tokenizer=int(self.tokenizer), flags=0, n_vocab=hp.n_vocab, n_embd=hp.n_embd,
            n_layer=hp.n_layer, ffn_size=hp.ffn_size, n_head=hp.n_head,
            head_size=hp.head_size, lora_maa=lora.get("maa", 0),
            lora_decay=lora.get("decay", 0), lora_w=lora.get("w", 0), lora_a=lora.get("a", 0),
            lora_v=lora.get("v", 0), lora_g=lora.get("g", 0), ln_eps=hp.ln_eps,
            gn_eps=hp.gn_eps, n_tensors=len(self.records), n_types=len(self.types),
            reserved0=0, emb_offset=emb.data_offset, emb_row_bytes=emb.row_bytes, reserved1=0,
            body_size=self.body_size, index_offset=self.index_offset,
            types=[dict(id=q.id, flags=ROW_TABLE if q.variable else 0, block_size=q.block_size, block_bytes=q.block_bytes,
                        reserved=0, name=q.name, param0=q.params[0], param1=q.params[1])
                   for q in self.types],
            plan=[r.qtype.id for r in self.records])
        data = S.StreamHeader.build(dict(fields=dict(value=fields), header_crc=None))
        assert len(data) == self.header_size, (len(data), self.header_size)
        return data

    # -- non-tensor records ---------------------------------------------------------------
    def end_record(self) -> bytes:
        head = record_header_bytes(S.RecordKind.END, 0, 0, (), 0)
        return head + S.PayloadCrc.build(dict(data_crc=S.crc32(b""))) + bytes(S.pad_to(
            len(head) + 4))

    def index_record(self) -> bytes:
        offsets = [r.offset for r in self.records] + [self.end_offset]
        payload = b"".join(S.IndexEntry.build(dict(offset=o)) for o in offsets)
        head = record_header_bytes(S.RecordKind.INDEX, 0, 0, (len(offsets),), len(payload))
        tail = S.PayloadCrc.build(dict(data_crc=S.crc32(payload)))
        body = head + payload + tail
        return body + bytes(S.pad_to(len(body)))

    def record_at(self, offset: int) -> RecordSpan | None:
        """The tensor record containing `offset` (binary search), or None."""
        lo, hi = 0, len(self.records)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.records[mid].end <= offset:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self.records) and self.records[lo].offset <= offset:
            return self.records[lo]
        return None
