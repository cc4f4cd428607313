"""Plain numbers a board needs to parse a stream without construct (and, later, a C header).

tests/test_stream_schema.py checks every one against the construct schema in formats/stream.py.
"""

STREAM_MAGIC = b"RWKS"
STREAM_MAJOR = 1
ALIGN = 16

HEADER_FIXED_SIZE = 112          # bytes before the type table
HEADER_OFFSETS = {               # field -> byte offset in the header
    "magic": 0, "major": 4, "minor": 6, "header_size": 8, "arch": 12, "tokenizer": 13,
    "flags": 14, "n_vocab": 16, "n_embd": 20, "n_layer": 24, "ffn_size": 28, "n_head": 32,
    "head_size": 36, "lora_maa": 40, "lora_decay": 44, "lora_w": 48, "lora_a": 52,
    "lora_v": 56, "lora_g": 60, "ln_eps": 64, "gn_eps": 68, "n_tensors": 72, "n_types": 76,
    "emb_offset": 80, "emb_row_bytes": 88, "body_size": 96, "index_offset": 104,
}

TYPE_ENTRY_SIZE = 32
TYPE_ENTRY_OFFSETS = {"id": 0, "flags": 1, "block_size": 2, "block_bytes": 4, "name": 8,
                      "param0": 24, "param1": 28}
TYPE_NAME_SIZE = 16
TYPE_FLAG_VARIABLE = 1

RECORD_HEADER_SIZE = 32
RECORD_OFFSETS = {"kind": 0, "tensor": 2, "type": 4, "ndim": 5, "flags": 6, "dims": 8,
                  "data_size": 20, "header_crc": 28}
RECORD_FLAG_ROW_TABLE = 1
RECORD_CRC_SIZE = 4              # the payload's CRC-32 follows the payload

KIND_TENSOR = 1
KIND_END = 2
KIND_INDEX = 0x8001
KIND_OPTIONAL_MIN = 0x8000
