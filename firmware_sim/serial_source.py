"""A ChunkSource whose bytes come over the serial link: the board pulls byte ranges (READ).

The forward pass is unchanged: it calls `seek` and `readinto`; this source turns each read into
READ requests of at most one frame's payload, keeps up to `window` of them in flight, and when
the board reads sequentially it requests ahead (never past `limit`, the END record), so the
link stays busy while the board computes. A read elsewhere drops the read-ahead; replies to
dropped requests are discarded as duplicates.
"""
from __future__ import annotations

import numpy as np

from host.link.framing import LinkError
from host.link.protocol import OP, READ_REQ

from .sources import ChunkSource


class _Segment:
    __slots__ = ("offset", "length", "seq", "data")

    def __init__(self, offset, length, seq):
        self.offset, self.length, self.seq, self.data = offset, length, seq, None


class SerialSource(ChunkSource):
    def __init__(self, get_link, size: int, limit: int, max_payload: int, window: int,
                 handler=None):
        super().__init__()
        self._get_link = get_link          # the board's current link (it changes on reconnect)
        self.size = size
        self.limit = min(limit, size)
        self.max_payload = max_payload
        self.window = max(1, window)
        self.handler = handler             # host commands that arrive in the middle of a pass
        self.segments: list[_Segment] = []
        self.next_req = 0
        self.last_end = -1
        self.requests = 0

    def drop(self) -> None:
        link = self._get_link()
        for s in self.segments:
            if s.data is None and link is not None:
                link.cancel(s.seq)
        self.segments.clear()
        self.last_end = -1

    def _request(self, link, offset: int, upto: int) -> None:
        n = min(self.max_payload, upto - offset)
        seq = link.request(OP["READ"], READ_REQ.pack(offset, n))
        self.segments.append(_Segment(offset, n, seq))
        self.next_req = offset + n
        self.requests += 1

    def _read(self, offset: int, view) -> None:
        link = self._get_link()
        if link is None:
            raise LinkError("the host is not connected")
        n = len(view)
        sequential = offset == self.last_end
        if self.segments and self.segments[0].offset <= offset < self.next_req:
            while self.segments and self.segments[0].offset + self.segments[0].length <= offset:
                self.segments.pop(0)
        else:
            self.drop()
            self.next_req = offset
        end = offset + n
        while self.next_req < end:
            self._request(link, self.next_req, self.size)
        if sequential:
            while len(self.segments) < self.window and self.next_req < self.limit:
                self._request(link, self.next_req, self.limit)
        pos = 0
        for s in self.segments:
            if s.offset >= end:
                break
            while s.data is None:
                reply = link.take(s.seq)
                if reply is not None:
                    if len(reply.payload) != s.length:
                        raise LinkError(f"the host answered READ at {s.offset} with "
                                        f"{len(reply.payload)} bytes, not {s.length}")
                    s.data = reply.payload
                    break
                if s.seq not in link.outstanding:
                    raise LinkError(f"READ at {s.offset} was cancelled")
                link.pump(self.handler, wait=link.timeouts.reply)
            a = max(offset, s.offset) - s.offset
            b = min(end, s.offset + s.length) - s.offset
            view[pos:pos + b - a] = np.frombuffer(s.data, np.uint8, b - a, a)
            pos += b - a
        assert pos == n
        while self.segments and self.segments[0].offset + self.segments[0].length <= end:
            self.segments.pop(0)
        self.last_end = end
