"""The stream format, declared in construct: the single source of truth for docs/format.md.

A stream is: header, then one record per tensor in forward order, an END record, and an
optional INDEX record (the trailer). Every record starts on a 16-byte boundary with a 32-byte
header; its payload follows at once (so payloads are 16-byte aligned too), then the payload's
CRC-32 and zero padding to the next 16-byte boundary. Headers travel through construct; the
payload bytes never do (they move through numpy).
"""
from __future__ import annotations

import enum
import zlib

from construct import (Array, Bytes, Checksum, Const, Float32l, Int8ul, Int16ul, Int32ul,
                       Int64ul, PaddedString, Padding, RawCopy, Struct, this)

MAGIC = b"RWKS"
MAJOR = 1
MINOR = 0
ALIGN = 16


class RecordKind(enum.IntEnum):
    TENSOR = 1
    END = 2
    INDEX = 0x8001     # kinds >= 0x8000 are optional: a reader that does not know one skips it

    @staticmethod
    def is_optional(kind: int) -> bool:
        return kind >= 0x8000


class Tokenizer(enum.IntEnum):
    BYTES = 0          # vocabulary 256: token = byte
    WORLD = 1          # RWKV World, 65536
    NEOX_20B = 2       # GPT-NeoX 20B (RWKV-4 Pile), 50277
    UNKNOWN = 255


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def pad_to(n: int, align: int = ALIGN) -> int:
    return (-n) % align


TypeEntry = Struct(
    "id" / Int8ul,
    "flags" / Int8ul,          # bit 0: variable-size (rows start with a row-offset table)
    "block_size" / Int16ul,    # elements per block
    "block_bytes" / Int16ul,   # bytes per block (0 for variable-size types)
    "reserved" / Int16ul,
    "name" / PaddedString(16, "ascii"),
    "param0" / Int32ul,        # type-specific parameters (0 for ggml's types)
    "param1" / Int32ul,
)

HeaderFields = Struct(
    "magic" / Const(MAGIC),
    "major" / Int16ul,
    "minor" / Int16ul,
    "header_size" / Int32ul,   # bytes from offset 0 to the first record (a multiple of 16)
    "arch" / Int8ul,           # RwkvVersion: 40, 51, 52, 60, 70
    "tokenizer" / Int8ul,      # Tokenizer
    "flags" / Int16ul,         # reserved, 0
    "n_vocab" / Int32ul,
    "n_embd" / Int32ul,
    "n_layer" / Int32ul,
    "ffn_size" / Int32ul,
    "n_head" / Int32ul,        # 0 for v4
    "head_size" / Int32ul,     # 0 for v4
    "lora_maa" / Int32ul,      # v6 token-shift LoRA rank (per chunk)
    "lora_decay" / Int32ul,    # v6 decay LoRA rank
    "lora_w" / Int32ul,        # v7 decay LoRA rank
    "lora_a" / Int32ul,        # v7 in-context learning-rate LoRA rank
    "lora_v" / Int32ul,        # v7 value-residual LoRA rank
    "lora_g" / Int32ul,        # v7 gate LoRA rank
    "ln_eps" / Float32l,       # layer norm epsilon
    "gn_eps" / Float32l,       # group norm (ln_x) epsilon
    "n_tensors" / Int32ul,     # tensor records that follow
    "n_types" / Int16ul,       # entries in the type table
    "reserved0" / Int16ul,
    "emb_offset" / Int64ul,    # absolute offset of row 0 of the embedding's data
    "emb_row_bytes" / Int32ul,  # bytes per embedding row: row t starts at emb_offset + t*this
    "reserved1" / Int32ul,
    "body_size" / Int64ul,     # offset just past the END record
    "index_offset" / Int64ul,  # offset of the INDEX record, 0 if the stream has none
    "types" / Array(this.n_types, TypeEntry),
    "plan" / Array(this.n_tensors, Int8ul),   # type id of every tensor, in record order
    "plan_pad" / Padding(lambda ctx: pad_to(ctx.n_tensors, 4)),
)

StreamHeader = Struct(
    "fields" / RawCopy(HeaderFields),
    "header_crc" / Checksum(Int32ul, lambda data: crc32(data), this.fields.data),
    "pad" / Padding(lambda ctx: pad_to(len(ctx.fields.data) + 4)),
)

RecordFields = Struct(
    "kind" / Int16ul,          # RecordKind
    "tensor" / Int16ul,        # index of the tensor in forward order (0 for non-tensor records)
    "type" / Int8ul,           # type id (a TypeEntry.id); 0 for non-tensor records
    "ndim" / Int8ul,           # 1..3
    "flags" / Int16ul,         # bit 0: payload starts with a row-offset table
    "dims" / Array(3, Int32ul),  # numpy shape, outermost first; unused trailing dims are 1
    "data_size" / Int32ul,     # payload bytes (excluding the CRC and padding)
    "reserved" / Int32ul,
)

RecordHeader = Struct(
    "fields" / RawCopy(RecordFields),
    "header_crc" / Checksum(Int32ul, lambda data: crc32(data), this.fields.data),
)

# After the payload of every record: its CRC-32, then zero padding to a 16-byte boundary.
PayloadCrc = Struct("data_crc" / Int32ul)

# The INDEX record's payload: the absolute offset of every tensor record, then of the END record.
IndexEntry = Struct("offset" / Int64ul)

# Compiled twins for hot loops (validate walks thousands of record headers); same schema.
RecordHeaderFast = RecordHeader.compile()

RECORD_HEADER_SIZE = RecordHeader.sizeof()
TYPE_ENTRY_SIZE = TypeEntry.sizeof()
