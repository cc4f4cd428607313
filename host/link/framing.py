"""Frames on the wire and the reliability layer both ends share.

A frame is `opcode u8, flags u8, seq u16, payload, crc32 u32`, COBS-encoded and closed by one
zero byte, so a receiver resynchronises at the next zero after any garbage. `Link` keeps a set
of requests in flight (the window), retransmits on timeout (with back-off) or NAK, drops
duplicate replies, and gives up with LinkTimeout after the retry budget. `Link.command` is the
one call that frames, sends, matches the reply and retries (like esptool's loader).
"""
from __future__ import annotations

import random
import select
import time
import zlib
from collections import Counter
from dataclasses import dataclass

from cobs import cobs
from serial import SerialException

from formats.errors import BadInput

from .protocol import (BACKOFF, DELIMITER, ERROR_REP, FLAG_REPLY, FRAME_CRC_SIZE, FRAME_HEADER,
                       MAX_WAIT, OP, OP_NAME, Timeouts, error_text)


class LinkError(BadInput):
    """The link failed: no answer, garbage, a lost connection or an error code from the board."""


class LinkTimeout(LinkError):
    pass


class LinkLost(LinkError):
    """The port or connection went away."""


class BoardError(LinkError):
    def __init__(self, code: int, text: str = ""):
        self.code = code
        super().__init__(f"the board answered {error_text(code)}" + (f" ({text})" if text else ""))


@dataclass
class Frame:
    op: int
    flags: int
    seq: int
    payload: bytes

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def name(self) -> str:
        return OP_NAME.get(self.op, f"0x{self.op:02x}")


def encode_frame(op: int, flags: int, seq: int, payload=b"") -> bytes:
    raw = FRAME_HEADER.pack(op, flags, seq & 0xFFFF) + bytes(payload)
    raw += (zlib.crc32(raw) & 0xFFFFFFFF).to_bytes(4, "little")
    return cobs.encode(raw) + DELIMITER


def decode_frame(data: bytes) -> Frame | None:
    """One frame's bytes without the delimiter; None if COBS or the CRC-32 says it is corrupt."""
    try:
        raw = cobs.decode(data)
    except cobs.DecodeError:
        return None
    if len(raw) < FRAME_HEADER.size + FRAME_CRC_SIZE:
        return None
    body, crc = raw[:-FRAME_CRC_SIZE], int.from_bytes(raw[-FRAME_CRC_SIZE:], "little")
    if zlib.crc32(body) & 0xFFFFFFFF != crc:
        return None
    op, flags, seq = FRAME_HEADER.unpack_from(body)
    return Frame(op, flags, seq, body[FRAME_HEADER.size:])


@dataclass
class Pending:
    op: int
    frame: bytes
    wait: float            # current timeout
    deadline: float
    extend: bool           # any valid frame from the peer pushes the deadline out
    tries: int = 0
    last_sent: float = 0.0
    retries: int = 0


def hexdump(prefix: str, data: bytes, width: int = 32) -> str:
    return "\n".join(f"{prefix} {i:06x}  {data[i:i + width].hex(' ')}"
                     for i in range(0, len(data), width)) or prefix


class Link:
    """One end of the link over an open pyserial port (timeout 0: reads return what is there)."""

    def __init__(self, port, timeouts: Timeouts, *, trace=None, peer: str = "board"):
        self.port = port
        self.timeouts = timeouts
        self.trace = trace
        self.peer = peer
        self.rx = bytearray()
        self.outstanding: dict[int, Pending] = {}
        self.replies: dict[int, Frame] = {}
        self._seq = random.randrange(1 << 16)
        self.stats = Counter()
        self.garbage = 0             # bytes in frames that failed their check
        port.timeout = 0

    # -- sending --------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.trace:
            self.trace(hexdump(">>", data))
        try:
            self.port.write(data)
        except (SerialException, OSError) as e:
            raise LinkLost(f"connection to the {self.peer} lost while writing ({e})") from None
        self.stats["wire_out"] += len(data)

    def send(self, op: int, payload=b"", seq: int = 0, flags: int = 0) -> None:
        self._write(encode_frame(op, flags, seq, payload))
        self.stats["frames_out"] += 1
        self.stats["payload_out"] += len(payload)

    def reply(self, req: Frame, op: int, payload=b"") -> None:
        self.send(op, payload, req.seq, FLAG_REPLY)

    def error(self, req: Frame, code: int, text: str = "") -> None:
        self.reply(req, OP["ERROR"], ERROR_REP.pack(code) + text.encode("utf-8")[:200])

    def request(self, op: int, payload=b"", *, wait: float | None = None,
                extend: bool = False, retries: int | None = None) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) & 0xFFFF
        wait = wait or self.timeouts.reply
        frame = encode_frame(op, 0, seq, payload)
        now = time.monotonic()
        self.outstanding[seq] = Pending(op, frame, wait, now + wait, extend, 0, now,
                                        self.timeouts.retries if retries is None else retries)
        self._write(frame)
        self.stats["frames_out"] += 1
        self.stats["payload_out"] += len(payload)
        return seq

    def cancel(self, seq: int) -> None:
        self.outstanding.pop(seq, None)
        self.replies.pop(seq, None)

    def _retransmit(self, seq: int, p: Pending, now: float, timed_out: bool) -> None:
        if timed_out:
            p.tries += 1
            if p.tries > p.retries:
                self.outstanding.clear()
                raise LinkTimeout(
                    f"no answer from the {self.peer} to {OP_NAME.get(p.op, p.op)} after "
                    f"{p.retries} retransmissions")
            p.wait = min(p.wait * BACKOFF, max(MAX_WAIT, p.wait))
            p.deadline = now + p.wait       # an early resend (NAK, gap) keeps the timer running
        p.last_sent = now
        self._write(p.frame)
        self.stats["retransmits"] += 1

    def _retransmit_all(self, now: float) -> None:
        """After a NAK or a corrupt frame: resend what has been in flight for a while."""
        holdoff = self.timeouts.reply / 4
        for seq, p in list(self.outstanding.items()):
            if now - p.last_sent >= holdoff:
                self._retransmit(seq, p, now, timed_out=False)

    # -- receiving ------------------------------------------------------------------------
    def _read(self, wait: float) -> bytes:
        try:
            if wait > 0:
                ready, _, _ = select.select([self.port.fileno()], [], [], wait)
                if not ready:
                    return b""
            data = self.port.read(1 << 16)
        except (SerialException, OSError, ValueError) as e:
            raise LinkLost(f"connection to the {self.peer} lost ({e})") from None
        if data:
            self.stats["wire_in"] += len(data)
            if self.trace:
                self.trace(hexdump("<<", data))
        return data

    def pump(self, handler=None, wait: float = 0.0) -> int:
        """Read what arrives within `wait` seconds, act on every complete frame, retransmit
        what timed out. Requests from the peer go to handler(frame). Returns frames handled."""
        now = time.monotonic()
        if self.outstanding:
            wait = max(0.0, min(wait, min(p.deadline for p in self.outstanding.values()) - now))
        self.rx += self._read(wait)
        handled = 0
        while True:
            end = self.rx.find(0)
            if end < 0:
                break
            chunk = bytes(self.rx[:end])
            del self.rx[:end + 1]
            if not chunk:
                continue
            frame = decode_frame(chunk)
            now = time.monotonic()
            if frame is None:
                self.garbage += len(chunk) + 1
                self.stats["corrupt"] += 1
                self.send(OP["NAK"])
                self._retransmit_all(now)
                continue
            handled += 1
            self.stats["frames_in"] += 1
            for p in self.outstanding.values():
                if p.extend:
                    p.deadline = max(p.deadline, now + p.wait)
            if frame.op == OP["NAK"]:
                self.stats["naks_in"] += 1
                self._retransmit_all(now)
            elif frame.is_reply and frame.op == OP["WORKING"]:
                p = self.outstanding.get(frame.seq)     # still executing: keep waiting
                if p is not None:
                    p.tries, p.deadline = 0, now + p.wait
                    self.stats["working"] += 1
            elif frame.is_reply:
                p = self.outstanding.get(frame.seq)
                if p is None or (frame.op != p.op and frame.op != OP["ERROR"]):
                    self.stats["duplicates"] += 1
                    continue
                del self.outstanding[frame.seq]
                self.replies[frame.seq] = frame
                self.stats["payload_in"] += len(frame.payload)
                # Fast retransmit: a peer answers in order, so a request sent before this one
                # and still unanswered was lost (or overtaken): send it again now.
                for q in list(self.outstanding.values()):
                    if q.last_sent < p.last_sent and not q.extend:
                        self._retransmit(None, q, now, timed_out=False)
                        self.stats["fast_retransmits"] += 1
            elif handler is not None:
                self.stats["payload_in"] += len(frame.payload)
                handler(frame)
            else:
                self.stats["ignored"] += 1
        if len(self.rx) > (1 << 20):            # a megabyte without a delimiter: garbage
            self.garbage += len(self.rx)
            self.rx.clear()
        now = time.monotonic()
        for seq, p in list(self.outstanding.items()):
            if seq in self.outstanding and now >= p.deadline:
                self._retransmit(seq, p, now, timed_out=True)
        return handled

    def take(self, seq: int) -> Frame | None:
        """The reply to `seq` if it has arrived (an ERROR reply is raised as BoardError)."""
        frame = self.replies.pop(seq, None)
        if frame is not None and frame.op == OP["ERROR"]:
            code, = ERROR_REP.unpack_from(frame.payload)
            raise BoardError(code, frame.payload[ERROR_REP.size:].decode("utf-8", "replace"))
        return frame

    def wait_reply(self, seq: int, handler=None) -> Frame:
        while True:
            frame = self.take(seq)
            if frame is not None:
                return frame
            if seq not in self.outstanding:
                raise LinkError("request cancelled")
            self.pump(handler, wait=self.timeouts.reply)

    def command(self, op: int, payload=b"", handler=None, *, wait: float | None = None,
                extend: bool = False, retries: int | None = None) -> bytes:
        """Send a request, serve the peer's requests meanwhile, return the reply's payload."""
        return self.wait_reply(self.request(op, payload, wait=wait, extend=extend,
                                            retries=retries), handler).payload
