"""Checkpoint readers: each opens a file lazily and yields SourceTensors one at a time."""
from __future__ import annotations

import os
from pathlib import Path

from formats.errors import BadInput

from .base import Checkpoint, SourceTensor
from .rwkv_cpp import RwkvCppCheckpoint, looks_like_rwkv_cpp

__all__ = ["Checkpoint", "SourceTensor", "open_checkpoint"]


def open_checkpoint(path) -> Checkpoint:
    """Open an rwkv.cpp `.bin`, a PyTorch `.pth` or a safetensors file / shard index."""
    path = Path(path)
    if not path.exists():
        raise BadInput("no such file", path=path)
    if path.is_dir():
        raise BadInput("is a directory, expected a model file", path=path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"RWKS"):
        raise BadInput("this is a stream (.rwks), not a checkpoint: streams go to run, validate, "
                       "inspect, plan and install", path=path, offset=0)
    if looks_like_rwkv_cpp(head):
        return RwkvCppCheckpoint(path)
    if head.startswith(b"PK\x03\x04"):
        from .pytorch import PytorchCheckpoint
        return PytorchCheckpoint(path)
    if path.name.endswith(".safetensors.index.json") or path.suffix == ".safetensors":
        from .safetensors import SafetensorsCheckpoint
        return SafetensorsCheckpoint(path)
    if head[:1] == b"\x80":
        raise BadInput("legacy (pre-zip) PyTorch pickle; re-save it with a torch newer than 1.6",
                       path=path, offset=0)
    if len(head) < 4:
        raise BadInput(f"file is {os.path.getsize(path)} bytes: too short to be a model", path=path,
                       offset=0)
    raise BadInput("unrecognised file: not an rwkv.cpp .bin, a PyTorch zip checkpoint or "
                   "safetensors", path=path, offset=0)
