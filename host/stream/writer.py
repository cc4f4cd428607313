"""Writing a stream file: the virtual stream, front to back."""
from __future__ import annotations

from .virtual import VirtualStream


def write_stream(vs: VirtualStream, out, progress=None) -> int:
    written = 0
    for piece in vs.chunks(progress=progress):
        out.write(piece)
        written += len(piece)
    assert written == vs.size, (written, vs.size)
    return written
