"""Writer for rwkv.cpp `.bin` files, tensor for tensor what rwkv.cpp's quantizer writes."""
from __future__ import annotations

import struct

from formats.errors import BadInput
from formats.quants import QuantType

from .encode import encode
from .model import Model
from .readers.rwkv_cpp import HEADER, MAGIC, TENSOR_HEADER


def write_bin(model: Model, plan: dict[str, QuantType], target: QuantType, out, progress=None):
    """Version 101, header type = target, tensors in the source's order."""
    if target.rwkv_cpp is None:
        raise BadInput(f"rwkv.cpp files cannot hold {target.name}; write a stream (.rwks)")
    hp = model.hparams
    out.write(HEADER.pack(MAGIC, 101, hp.n_vocab, hp.n_embd, hp.n_layer, target.rwkv_cpp))
    for name in model.source_order():
        t, qtype = model[name], plan[name]
        if qtype.rwkv_cpp is None:
            raise BadInput(f"rwkv.cpp files cannot hold {qtype.name}", tensor=name)
        ne = tuple(reversed(t.shape))
        encoded = name.encode("utf-8")
        out.write(TENSOR_HEADER.pack(len(ne), len(encoded), qtype.rwkv_cpp))
        out.write(struct.pack(f"<{len(ne)}I", *ne))
        out.write(encoded)
        out.write(memoryview(encode(t, qtype)))
        if progress is not None:
            progress(t)
