"""The one enum of RWKV versions."""
from __future__ import annotations

import enum

from .errors import BadInput


class RwkvVersion(enum.IntEnum):
    """RWKV architecture versions as rwkv.cpp names them; the value is the stream's arch code."""

    V4 = 40
    V5_1 = 51
    V5_2 = 52
    V6 = 60
    V7 = 70

    @property
    def label(self) -> str:
        return {40: "4", 51: "5.1", 52: "5.2", 60: "6", 70: "7"}[int(self)]

    @property
    def has_heads(self) -> bool:
        return self is not RwkvVersion.V4

    @classmethod
    def parse(cls, text: str) -> "RwkvVersion":
        """Accepts '4', 'v4', '5.2', 'v5.2', '6.0' ..."""
        t = text.strip().lower().lstrip("v")
        if t.endswith(".0"):
            t = t[:-2]
        for v in cls:
            if v.label == t:
                return v
        raise BadInput(f"unknown RWKV version {text!r} (known: "
                       + ", ".join("v" + v.label for v in cls) + ")")
