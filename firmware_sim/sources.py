"""Where a board's stream bytes come from. The forward pass sees only `seek` and `readinto`.

A source reads into the board's own chunk buffer: a file, bytes in memory, or a virtual stream
over a checkpoint (quantizing on the fly). The serial link is one more source of the same shape.
Every source counts the bytes it delivered, for the cost report.
"""
from __future__ import annotations

import numpy as np

from formats.errors import BadInput


class ChunkSource:
    size: int = 0

    def __init__(self):
        self.pos = 0
        self.bytes_read = 0
        self.seeks = 0

    def seek(self, offset: int) -> None:
        if offset != self.pos:
            self.seeks += 1
        self.pos = offset

    def readinto(self, view) -> None:
        """Fill `view` completely from the current position, or raise BadInput at the end."""
        n = len(view)
        if self.pos + n > self.size:
            raise BadInput(f"stream ends at byte {self.size}; the board needed {n} bytes at "
                           f"{self.pos}", path=getattr(self, "path", None), offset=self.pos)
        self._read(self.pos, view)
        self.pos += n
        self.bytes_read += n

    def _read(self, offset: int, view) -> None:
        raise NotImplementedError

    # Memory-mapped sources (a stream installed in XIP flash) can hand out their own bytes: a
    # board reads weights in place there instead of copying them into its chunk buffer.
    mapped = False

    def view(self, n: int) -> np.ndarray:
        """The next n bytes in place (read-only), for mapped sources."""
        if self.pos + n > self.size:
            raise BadInput(f"stream ends at byte {self.size}; the board needed {n} bytes at "
                           f"{self.pos}", offset=self.pos)
        out = self._view(self.pos, n)
        self.pos += n
        self.bytes_read += n
        return out

    def peek(self, n: int) -> np.ndarray:
        """The next n bytes in place, without moving past them (mapped sources)."""
        if self.pos + n > self.size:
            raise BadInput(f"stream ends at byte {self.size}; the board needed {n} bytes at "
                           f"{self.pos}", offset=self.pos)
        return self._view(self.pos, n)

    def _view(self, offset: int, n: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileSource(ChunkSource):
    mapped = True

    def __init__(self, path):
        super().__init__()
        self.path = str(path)
        self._f = open(path, "rb", buffering=0)
        self.size = self._f.seek(0, 2)
        self._at = None
        self._map = None

    def _view(self, offset, n):
        if self._map is None:
            import mmap
            self._map = np.frombuffer(mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ),
                                      np.uint8)
        return self._map[offset:offset + n]

    def _read(self, offset, view):
        if self._at != offset:
            self._f.seek(offset)
        got = self._f.readinto(view)
        while got < len(view):
            more = self._f.readinto(view[got:])
            if not more:
                raise BadInput("file shrank while reading", path=self.path, offset=offset + got)
            got += more
        self._at = offset + len(view)

    def close(self):
        self._f.close()


class BytesSource(ChunkSource):
    mapped = True

    def __init__(self, data):
        super().__init__()
        self._data = memoryview(data).cast("B")
        self.size = len(self._data)

    def _view(self, offset, n):
        return np.frombuffer(self._data, np.uint8, n, offset)

    def _read(self, offset, view):
        view[:] = self._data[offset:offset + len(view)]


class VirtualSource(ChunkSource):
    """A stream that exists only as a checkpoint plus a type plan (host.stream.VirtualStream)."""

    def __init__(self, virtual_stream):
        super().__init__()
        self.vs = virtual_stream
        self.size = virtual_stream.size

    def _read(self, offset, view):
        view[:] = np.frombuffer(self.vs.read(offset, len(view)), np.uint8)
