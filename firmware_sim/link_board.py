"""A simulated board at the end of a real serial port or socket (`rwkv-stream board-sim`).

It answers the host's handshake, installs a stream into a simulated flash file (resuming from
the last verified offset, ending with a whole-stream CRC-32 it reports back) or runs live,
pulling byte ranges for every pass through SerialSource; then it evaluates tokens. The forward
pass is the simulator's own (board.py): only the ChunkSource differs.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import zlib
from dataclasses import dataclass, field, replace
from urllib.parse import urlparse

import numpy as np
import serial

from formats.errors import BadInput, RwkvStreamError
from formats.quants import TYPES, by_name
from host.link import protocol as P
from host.link.framing import Frame, Link, LinkError, LinkLost, encode_frame
from host.link.protocol import ERR, OP

from .arena import BudgetExceeded
from .board import Board
from .serial_source import SerialSource
from .sources import ChunkSource

KIB, MIB = 1024, 1024 * 1024
ALL_TYPES = tuple(t.name for t in TYPES)


@dataclass(frozen=True)
class LinkProfile:
    name: str
    ram: int
    psram: int = 0
    flash: int = 0                       # bytes of storage an install may use (0: live only)
    types: tuple[str, ...] = ALL_TYPES
    max_payload: int = P.DEFAULT_MAX_PAYLOAD
    window: int = P.DEFAULT_WINDOW
    chunk: int = 4096


# Link parameters per board; RAM and flash come from firmware_sim/profiles.py.
LINK_DEFAULTS = {"rp2040": dict(max_payload=2048, window=4,
                                types=("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")),
                 "nrf52840": dict(max_payload=2048, window=4)}
SIM = LinkProfile("sim", 64 * MIB, 0, 1 << 30)


def profile(name: str, *, ram=None, psram=None, flash=None, types=None, chunk=None,
            max_payload=None, window=None) -> LinkProfile:
    """A board profile by name (firmware_sim/profiles.py, or "sim": 64 MiB, every type) with
    the link's frame size and window, any field overridden."""
    if name == "sim":
        base = SIM
    else:
        from .profiles import get_profile
        bp = get_profile(name)
        base = LinkProfile(bp.name, bp.sram, bp.psram, bp.flash,
                           **LINK_DEFAULTS.get(bp.name, {}))
    over = dict(ram=ram, psram=psram, flash=flash, chunk=chunk, max_payload=max_payload,
                window=window, types=tuple(types) if types else None)
    return replace(base, **{k: v for k, v in over.items() if v is not None})


# -- a socket as a port ------------------------------------------------------------------------
class SocketPort:
    """The little of pyserial's interface the link uses, over a connected socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = 0
        self.baudrate = P.NOMINAL_BAUD

    def fileno(self):
        return self.sock.fileno()

    def read(self, n):
        if not select.select([self.sock], [], [], 0)[0]:
            return b""
        data = self.sock.recv(n)
        if not data:
            raise serial.SerialException("socket disconnected")
        return data

    def write(self, data):
        self.sock.sendall(data)
        return len(data)

    def flush(self):
        pass

    def close(self):
        self.sock.close()


# -- flash ---------------------------------------------------------------------------------------
FLASH_RECORD = struct.Struct("<4sIQIQI")     # magic, state, size, crc, verified, record crc
FLASH_MAGIC = b"RWKF"
FLASH_DATA = 4096                             # the stream starts one sector in
EMPTY, PARTIAL, COMPLETE = 0, 1, 2


class SimFlash:
    """A flash chip as a file: an install record in sector 0, the stream from FLASH_DATA."""

    def __init__(self, path, capacity: int):
        self.path = str(path)
        self.capacity = capacity
        exists = os.path.exists(self.path)
        self.f = open(self.path, "r+b" if exists else "w+b", buffering=0)
        if self.f.seek(0, 2) < FLASH_DATA:
            self.f.truncate(FLASH_DATA)
        self.state, self.size, self.crc, self.verified = self._load()

    def _load(self):
        self.f.seek(0)
        raw = self.f.read(FLASH_RECORD.size)
        if len(raw) == FLASH_RECORD.size:
            magic, state, size, crc, verified, rcrc = FLASH_RECORD.unpack(raw)
            if magic == FLASH_MAGIC and rcrc == zlib.crc32(raw[:-4]) & 0xFFFFFFFF:
                return state, size, crc, verified
        return EMPTY, 0, 0, 0

    def save(self, state, size, crc, verified):
        body = FLASH_RECORD.pack(FLASH_MAGIC, state, size, crc, verified, 0)[:-4]
        self.f.seek(0)
        self.f.write(body + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "little"))
        self.state, self.size, self.crc, self.verified = state, size, crc, verified

    def write(self, offset, data):
        self.f.seek(FLASH_DATA + offset)
        self.f.write(data)

    def crc32(self, size) -> int:
        self.f.seek(FLASH_DATA)
        crc, left = 0, size
        while left:
            piece = self.f.read(min(left, 1 << 20))
            if not piece:
                break
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
        return crc & 0xFFFFFFFF

    def close(self):
        self.f.close()


class FlashSource(ChunkSource):
    """The installed stream; between reads the board still answers the link (poll)."""

    def __init__(self, flash: SimFlash, poll=None):
        super().__init__()
        self.flash = flash
        self.size = flash.size
        self.poll = poll

    def _read(self, offset, view):
        if self.poll:
            self.poll()
        self.flash.f.seek(FLASH_DATA + offset)
        got = self.flash.f.readinto(view)
        if got != len(view):
            raise BadInput("flash read past the end", offset=offset)


class Fail(Exception):
    def __init__(self, code, text=""):
        self.code, self.text = code, text


# -- the board -----------------------------------------------------------------------------------
@dataclass
class LinkBoard:
    profile: LinkProfile
    flash_path: str | None = None
    mode: str = "float"
    live: bool = True
    timeouts: P.Timeouts | None = None
    log: object = None
    link: Link | None = field(default=None, init=False)

    def __post_init__(self):
        p = self.profile
        self.flash = SimFlash(self.flash_path, p.flash) if self.flash_path and p.flash else None
        self.type_ids = tuple(by_name(t).id for t in p.types)
        self.board: Board | None = None
        self.model_key = None
        self.busy = None
        self.last_key, self.last_reply = None, None
        self.stats = {"evals": 0, "aborted_passes": 0, "installs": 0}

    # -- serving ---------------------------------------------------------------------------
    def serve(self, port, stop=None) -> None:
        """Answer the host on `port` until the connection is lost or `stop` is set."""
        self.link = Link(port, self.timeouts or P.timeouts_for(getattr(port, "baudrate", None),
                                                               self.profile.max_payload,
                                                               self.profile.window), peer="host")
        self.last_key = None
        try:
            while stop is None or not stop.is_set():
                try:
                    self.link.pump(self.handle, wait=0.05)
                except LinkLost:
                    return
                except LinkError as e:
                    self._say(f"link: {e.message}")
        finally:
            self.link = None

    def _poll(self):
        if self.link is not None:
            self.link.pump(self.handle, 0)

    def _say(self, msg):
        if self.log:
            self.log(msg)

    def info(self) -> P.BoardInfo:
        p, f = self.profile, self.flash
        caps = (P.CAP_LIVE if self.live else 0) | (P.CAP_INSTALL if f else 0) | \
            (P.CAP_INSTALLED if f and f.state == COMPLETE else 0)
        return P.BoardInfo(P.PROTOCOL_VERSION, caps, p.max_payload, p.window, self.type_ids,
                           p.ram, p.psram, p.chunk, f.capacity - FLASH_DATA if f else 0,
                           self.board.tokens if self.board else 0,
                           f.size if f and f.state else 0, f.crc if f and f.state else 0,
                           f.verified if f and f.state else 0, p.name)

    def handle(self, frame: Frame) -> None:
        key = (frame.seq, frame.op, zlib.crc32(frame.payload))
        if frame.op in P.NOT_IDEMPOTENT and key == self.last_key:
            self.link._write(self.last_reply)           # a repeat: answer again, do not re-run
            return
        if self.busy is not None:
            if key == self.busy:                        # the host asks again: still at it
                self.link.reply(frame, OP["WORKING"])
            else:
                self.link.error(frame, ERR["BUSY"])
            return
        handler = getattr(self, "do_" + frame.name.lower(), None)
        after = None
        try:
            if handler is None:
                raise Fail(ERR["UNKNOWN_OPCODE"], f"opcode 0x{frame.op:02x}")
            self.busy = key
            try:
                payload = handler(frame.payload)
            finally:
                self.busy = None
            if isinstance(payload, tuple):
                payload, after = payload
            reply = encode_frame(frame.op, P.FLAG_REPLY, frame.seq, payload)
        except Fail as e:
            reply = encode_frame(OP["ERROR"], P.FLAG_REPLY, frame.seq,
                                 P.ERROR_REP.pack(e.code) + e.text.encode()[:200])
        except struct.error as e:
            reply = encode_frame(OP["ERROR"], P.FLAG_REPLY, frame.seq,
                                 P.ERROR_REP.pack(ERR["BAD_REQUEST"]) + str(e).encode()[:200])
        if frame.op in P.NOT_IDEMPOTENT:
            self.last_key, self.last_reply = key, reply
        if self.link is not None:
            self.link._write(reply)
            self.link.stats["frames_out"] += 1
        if after:
            after()

    # -- commands ---------------------------------------------------------------------------
    def do_hello(self, payload):
        version, _, _host_max = P.HELLO_REQ.unpack_from(payload)
        if version != P.PROTOCOL_VERSION:
            raise Fail(ERR["VERSION"], f"board speaks {P.PROTOCOL_VERSION}, host {version}")
        self.last_key = None
        return self.info().pack()

    def do_set_baud(self, payload):
        baud, = P.BAUD_REQ.unpack_from(payload)
        if baud < 1200:
            raise Fail(ERR["BAUD"], str(baud))
        port = self.link.port

        def switch():
            port.flush()
            port.baudrate = baud
        return b"", switch

    def _load(self, source, key):
        old = self.board
        try:
            board = Board(source, ram=self.profile.ram, psram=self.profile.psram,
                          chunk=self.profile.chunk, mode=self.mode)
        except LinkLost:
            raise
        except BudgetExceeded as e:
            raise Fail(ERR["NO_RAM"], e.message) from None
        except LinkError as e:
            raise Fail(ERR["LINK"], e.message) from None
        except RwkvStreamError as e:
            code = ERR["UNSUPPORTED_TYPE"] if "implement" in e.message else ERR["BAD_STREAM"]
            raise Fail(code, e.message) from None
        lacking = [q.name for q in board.info.types.values() if q.id not in self.type_ids]
        if lacking:
            raise Fail(ERR["UNSUPPORTED_TYPE"], ", ".join(lacking))
        key = (key, board.info.header_size, source.size)
        if old is not None and self.model_key == key:       # the same model again: keep state
            board.load_state(old.state)
            board.tokens = old.tokens
        self.board, self.model_key = board, key
        return P.MODEL_REP.pack(board.hp.n_vocab, board.info.tokenizer, board.hp.version.value, 0)

    def do_live(self, payload):
        if not self.live:
            raise Fail(ERR["UNKNOWN_OPCODE"], "this board runs from flash only")
        size, limit = P.LIVE_REQ.unpack_from(payload)
        p = self.profile
        source = SerialSource(lambda: self.link, size, limit, p.max_payload, p.window,
                              handler=self.handle)
        header = source_header_crc(source)
        return self._load(source, ("live", header))

    def do_run_flash(self, payload):
        f = self.flash
        if f is None or f.state != COMPLETE:
            raise Fail(ERR["NOT_INSTALLED"])
        return self._load(FlashSource(f, self._poll), ("flash", f.crc))

    def do_install(self, payload):
        f = self.flash
        if f is None:
            raise Fail(ERR["NO_FLASH"])
        size, crc = P.INSTALL_REQ.unpack_from(payload)
        if size > f.capacity - FLASH_DATA:
            raise Fail(ERR["TOO_BIG"], f"{size} bytes, flash holds {f.capacity - FLASH_DATA}")
        if (f.size, f.crc) != (size, crc) or f.state == EMPTY:
            if self.board is not None and isinstance(self.board.source, FlashSource):
                self.board = None                      # the flash is about to change under it
            f.save(PARTIAL, size, crc, 0)
        resumed = f.verified if f.state == PARTIAL else size
        p = self.profile
        pos = resumed
        inflight: list[tuple[int, int, int]] = []
        link = self.link
        since_save = 0
        while pos < size or inflight:
            while len(inflight) < p.window and pos < size:
                n = min(p.max_payload, size - pos)
                inflight.append((link.request(OP["READ"], P.READ_REQ.pack(pos, n)), pos, n))
                pos += n
            seq, off, n = inflight[0]
            try:
                reply = link.take(seq)
                if reply is None:
                    link.pump(self.handle, wait=link.timeouts.reply)
                    continue
            except LinkError as e:
                f.save(PARTIAL, size, crc, f.verified)
                if isinstance(e, LinkLost):
                    raise
                raise Fail(ERR["LINK"], e.message) from None
            if len(reply.payload) != n:
                raise Fail(ERR["BAD_REQUEST"], f"READ at {off}: {len(reply.payload)} bytes")
            f.write(off, reply.payload)
            inflight.pop(0)
            since_save += n
            if since_save >= 16 * p.max_payload or off + n == size:
                f.save(PARTIAL, size, crc, off + n)      # written before it is marked verified
                since_save = 0
        got = f.crc32(size)
        self.stats["installs"] += 1
        if got != crc:
            f.save(EMPTY, 0, 0, 0)
            raise Fail(ERR["CRC_MISMATCH"], f"flash {got:08x}, host {crc:08x}")
        f.save(COMPLETE, size, crc, size)
        return P.INSTALL_REP.pack(resumed, size, got)

    def do_eval(self, payload):
        b = self.board
        if b is None:
            raise Fail(ERR["NO_MODEL"])
        pos, n, n_gen, _flags = P.EVAL_REQ.unpack_from(payload)
        tokens = struct.unpack_from(f"<{n}I", payload, P.EVAL_REQ.size)
        if pos != b.tokens:
            raise Fail(ERR["POSITION"], f"the board has consumed {b.tokens} tokens, not {pos}")
        bad = [t for t in tokens if t >= b.hp.n_vocab]
        if bad:
            raise Fail(ERR["TOKEN"], f"{bad[0]} >= {b.hp.n_vocab}")
        saved, saved_tokens = b.state.copy(), b.tokens
        generated = []
        try:
            for t in tokens:
                logits = b.eval(t)
            for _ in range(n_gen):
                t = int(np.argmax(logits))
                generated.append(t)
                logits = b.eval(t)
        except RwkvStreamError as e:            # a pass the link could not finish: undo it all
            b.load_state(saved)
            b.tokens = saved_tokens
            if isinstance(b.source, SerialSource):
                b.source.drop()
            self.stats["aborted_passes"] += 1
            if isinstance(e, LinkLost):
                raise
            raise Fail(ERR["LINK"] if isinstance(e, LinkError) else ERR["BAD_STREAM"],
                       e.message) from None
        self.stats["evals"] += 1
        return P.EVAL_REP.pack(b.tokens, len(generated)) + struct.pack(f"<{len(generated)}I",
                                                                       *generated)

    def do_logits(self, payload):
        if self.board is None:
            raise Fail(ERR["NO_MODEL"])
        off, n = P.LOGITS_REQ.unpack_from(payload)
        data = self.board.arena["logits"].astype("<f4").tobytes()
        if off + n > len(data) or n > self.profile.max_payload:
            raise Fail(ERR["RANGE"], f"{off}+{n} of {len(data)}")
        return data[off:off + n]

    def do_reset(self, payload):
        if self.board is None:
            raise Fail(ERR["NO_MODEL"])
        self.board.reset()
        self.board.tokens = 0
        return b""

    def close(self):
        if self.flash:
            self.flash.close()


def source_header_crc(source) -> int:
    """CRC of the stream's first 112 bytes: identifies the model for keeping state."""
    buf = np.zeros(112, np.uint8)
    source.seek(0)
    try:
        source.readinto(buf)
    except LinkLost:
        raise
    except LinkError as e:
        raise Fail(ERR["LINK"], e.message) from None
    return zlib.crc32(buf)


# -- running as a process --------------------------------------------------------------------
def serve_url(board: LinkBoard, url: str, baud: int | None = None, stop=None, ready=None):
    """`socket://HOST:PORT` listens there and serves one host connection after another; anything
    else is opened with pyserial (a tty, a pty path) and served until stopped."""
    if url.startswith("socket://"):
        u = urlparse(url)
        srv = socket.create_server((u.hostname or "127.0.0.1", u.port or 0))
        srv.settimeout(0.2)
        if ready:
            ready(srv.getsockname()[1])
        try:
            while stop is None or not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                conn.setblocking(True)
                port = SocketPort(conn)
                try:
                    board.serve(port, stop)
                finally:
                    port.close()
        finally:
            srv.close()
    else:
        try:
            port = serial.serial_for_url(url, baudrate=baud or P.NOMINAL_BAUD, timeout=0)
        except serial.SerialException as e:
            raise BadInput(f"cannot open {url}: {e}") from None
        if ready:
            ready(None)
        try:
            while stop is None or not stop.is_set():
                board.serve(port, stop)
        finally:
            port.close()
