"""One tensor in its planned type: the bytes a file or stream holds for it."""
from __future__ import annotations

import numpy as np

from formats.errors import BadInput
from formats.quants import QuantType

from .model import ModelTensor


def encode(t: ModelTensor, qtype: QuantType) -> np.ndarray:
    """uint8 bytes of `t` stored as `qtype`; source blocks of the same type pass through untouched."""
    if not t.transformed and t.source.qtype is qtype:
        return t.raw()
    values = t.values()
    try:
        return qtype.quantize(values).reshape(-1)
    except BadInput as e:
        raise BadInput(e.message, path=t.source.path, tensor=t.name) from None
