"""The host end: open the port, handshake, refuse what the board cannot run, then install a
stream into the board's flash or serve it live (quantizing on the fly), and evaluate tokens."""
from __future__ import annotations

import errno
import struct
import time
import zlib

import numpy as np
import serial

from firmware_sim.arena import BudgetExceeded, buffer_plan, place
from firmware_sim.board import read_stream_info
from formats import board_constants as K
from formats.errors import BadInput, UsageError
from formats.quants import TYPES

from . import protocol as P
from .framing import Frame, Link, LinkError
from .protocol import OP

END_RECORD_SIZE = 48


def open_port(url: str, baud: int | None = None):
    """A pyserial port for a tty, a pty path, socket://HOST:PORT or rwkvsim://BOARD (an
    in-process simulated board), or one clear error."""
    if "host.link" not in serial.protocol_handler_packages:
        serial.protocol_handler_packages.append("host.link")
    try:
        port = serial.serial_for_url(url, baudrate=baud or P.NOMINAL_BAUD, timeout=0,
                                     write_timeout=10, exclusive=True, do_not_open=True)
        port.open()
    except serial.SerialException as e:
        n = getattr(e, "errno", None)
        text = str(e)
        if n == errno.ENOENT or "No such file" in text:
            raise LinkError(f"{url}: no such port (is the board plugged in?)") from None
        if n == errno.EACCES or "Permission denied" in text:
            raise LinkError(f"{url}: permission denied (add yourself to the 'dialout' group, "
                            "or check the device's owner)") from None
        if n in (errno.EBUSY, errno.EAGAIN) or "busy" in text.lower() or \
                "lock" in text.lower():
            raise LinkError(f"{url}: the port is busy (another program has it open)") from None
        if "Connection refused" in text or n == errno.ECONNREFUSED:
            raise LinkError(f"{url}: connection refused (no simulated board listening)") from None
        raise LinkError(f"{url}: cannot open the port ({text})") from None
    except ValueError as e:
        raise UsageError(f"{url}: not a port URL ({e})") from None
    return port


def read_range(source, offset: int, n: int) -> bytes:
    buf = np.empty(n, np.uint8)
    source.seek(offset)
    source.readinto(buf)
    return buf.tobytes()


def stream_crc(source, piece: int = 1 << 20) -> int:
    crc, pos = 0, 0
    while pos < source.size:
        n = min(piece, source.size - pos)
        crc = zlib.crc32(read_range(source, pos, n), crc)
        pos += n
    return crc & 0xFFFFFFFF


class StreamFacts:
    """What the host knows of the stream it is about to send."""

    def __init__(self, source):
        self.source = source
        self.size = source.size
        self.info = read_stream_info(source, np.zeros(K.HEADER_FIXED_SIZE, np.uint8),
                                     np.zeros(4096, np.uint8))
        body = struct.unpack("<Q", read_range(source, K.HEADER_OFFSETS["body_size"], 8))[0]
        self.data_end = body - END_RECORD_SIZE
        self.hp = self.info.hparams


def check_fits(facts: StreamFacts, info: P.BoardInfo, mode: str) -> None:
    """Refuse, before sending a byte of the stream, what the board cannot run."""
    board = f"the board {info.name!r}"
    lacking = sorted(q.name for q in facts.info.types.values() if q.id not in info.types)
    if lacking:
        has = ", ".join(next((q.name for q in TYPES if q.id == t), f"id {t}") for t in info.types)
        raise BadInput(f"{board} does not implement {', '.join(lacking)} (it has {has}): "
                       "choose another --quant")
    link_ram = info.window * (info.max_payload + P.frame_overhead(info.max_payload)) \
        if mode == "live" else 0
    plan = buffer_plan(facts.hp, info.chunk)
    try:
        place(plan, max(0, info.ram - link_ram), info.psram)
    except BudgetExceeded as e:
        raise BadInput(f"{board} lacks the RAM for this model: {e.message}"
                       + (f" (after {link_ram:,} bytes of link buffers)" if link_ram else "")) \
            from None
    if mode == "install":
        if not info.caps & P.CAP_INSTALL:
            raise BadInput(f"{board} has no storage to install into: use `serve` (live)")
        if facts.size > info.flash:
            raise BadInput(f"the stream is {facts.size:,} bytes; {board} can store "
                           f"{info.flash:,}: choose a smaller --quant or use `serve` (live)")
    elif mode == "live" and not info.caps & P.CAP_LIVE:
        raise BadInput(f"{board} does not run live: use `install`")


class HostSession:
    def __init__(self, url: str, baud: int | None = None, *, trace=None,
                 timeouts: P.Timeouts | None = None, scale: float = 1.0):
        self.url = url
        self.baud = baud
        self.scale = scale
        self.port = open_port(url, baud)
        self.link = Link(self.port, timeouts or P.timeouts_for(baud, scale=scale), trace=trace,
                         peer="board")
        self._fixed_timeouts = timeouts is not None
        self.source = None
        self.info: P.BoardInfo | None = None
        self.served = 0
        self.progress = None
        self.n_vocab = None

    def close(self):
        try:
            self.port.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests from the board -----------------------------------------------------------
    def handle(self, frame: Frame) -> None:
        if frame.op != OP["READ"]:
            self.link.error(frame, P.ERR["UNKNOWN_OPCODE"], frame.name)
            return
        off, n = P.READ_REQ.unpack_from(frame.payload)
        if self.source is None or off + n > self.source.size or n > self.info.max_payload:
            self.link.error(frame, P.ERR["RANGE"], f"{off}+{n}")
            return
        self.link.reply(frame, OP["READ"], read_range(self.source, off, n))
        self.served += n
        if self.progress:
            self.progress(off, n)

    def command(self, name: str, payload=b"", **kw) -> bytes:
        return self.link.command(OP[name], payload, self.handle, **kw)

    # -- the session -----------------------------------------------------------------------
    def hello(self) -> P.BoardInfo:
        try:
            reply = self.command("HELLO", P.HELLO_REQ.pack(P.PROTOCOL_VERSION, 0,
                                                           P.DEFAULT_MAX_PAYLOAD),
                                 wait=self.link.timeouts.handshake,
                                 retries=P.HANDSHAKE_RETRIES)
        except LinkError as e:
            if self.link.garbage and not self.link.stats["frames_in"]:
                raise LinkError(f"{self.url}: the device sends garbage, not frames "
                                f"({self.link.garbage} bytes): wrong --baud, or not an "
                                "rwkv-stream board") from None
            raise LinkError(f"{self.url}: no rwkv-stream board answered ({e.message})") from None
        info = P.BoardInfo.unpack(reply)
        if info.version != P.PROTOCOL_VERSION:
            raise LinkError(f"the board speaks protocol {info.version}; this host speaks "
                            f"{P.PROTOCOL_VERSION}")
        self.info = info
        if not self._fixed_timeouts:
            self.link.timeouts = P.timeouts_for(self.baud, info.max_payload, info.window,
                                                self.scale)
        return info

    def set_baud(self, baud: int) -> None:
        self.command("SET_BAUD", P.BAUD_REQ.pack(baud))
        self.port.flush()
        self.port.baudrate = baud
        self.baud = baud
        try:
            self.hello()
        except LinkError:
            raise LinkError(f"the board stopped answering after switching to {baud} baud") \
                from None

    def install(self, source, progress=None) -> dict:
        facts = StreamFacts(source)
        check_fits(facts, self.info, "install")
        crc = stream_crc(source)
        self.source, self.served, self.progress = source, 0, progress
        t0 = time.perf_counter()
        rep = self.command("INSTALL", P.INSTALL_REQ.pack(facts.size, crc), extend=True)
        resumed, size, got = P.INSTALL_REP.unpack(rep)
        if got != crc:
            raise LinkError(f"the board reports CRC-32 {got:08x} over flash; the stream's is "
                            f"{crc:08x}")
        return dict(board=self.info.name, size=size, crc32=f"{crc:08x}", resumed_from=resumed,
                    sent=self.served, seconds=round(time.perf_counter() - t0, 4))

    def live(self, source) -> StreamFacts:
        facts = StreamFacts(source)
        check_fits(facts, self.info, "live")
        self.source = source
        rep = self.command("LIVE", P.LIVE_REQ.pack(facts.size, facts.data_end), extend=True)
        self.n_vocab = P.MODEL_REP.unpack_from(rep)[0]
        return facts

    def run_flash(self) -> None:
        if not self.info.caps & P.CAP_INSTALLED:
            raise LinkError(f"the board {self.info.name!r} has no installed model: run "
                            "`rwkv-stream install` first")
        rep = self.command("RUN_FLASH", extend=True)
        self.n_vocab = P.MODEL_REP.unpack_from(rep)[0]

    def eval(self, tokens, n_generate: int = 0, position: int | None = None) -> list[int]:
        pos = self.info.tokens if position is None else position
        payload = P.EVAL_REQ.pack(pos, len(tokens), n_generate, 0) + \
            struct.pack(f"<{len(tokens)}I", *tokens)
        rep = self.command("EVAL", payload, extend=True)
        after, n = P.EVAL_REP.unpack_from(rep)
        self.info.tokens = after
        return list(struct.unpack_from(f"<{n}I", rep, P.EVAL_REP.size))

    def logits(self) -> np.ndarray:
        total, out, off = 4 * self.n_vocab, bytearray(), 0
        while off < total:
            n = min(self.info.max_payload, total - off)
            out += self.command("LOGITS", P.LOGITS_REQ.pack(off, n))
            off += n
        return np.frombuffer(bytes(out), "<f4").copy()

    def reset(self) -> None:
        self.command("RESET")
        self.info.tokens = 0
