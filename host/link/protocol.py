"""The serial link's numbers: one opcode table, one error-code table, frame and message layouts,
named timeouts and retry counts scaled to the link speed. docs/protocol.md describes them all;
tests/test_link_protocol.py checks that document's tables against these.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

PROTOCOL_VERSION = 1

# -- frames -----------------------------------------------------------------------------------
# Before COBS: opcode u8, flags u8, seq u16, payload, crc32 u32 (of everything before it).
FRAME_HEADER = struct.Struct("<BBH")
FRAME_CRC_SIZE = 4
FLAG_REPLY = 0x01                 # this frame answers the request whose seq it carries
DELIMITER = b"\x00"
DEFAULT_MAX_PAYLOAD = 4096        # bytes of payload in one frame unless a side asks for less
MIN_MAX_PAYLOAD = 64
DEFAULT_WINDOW = 8                # requests a board keeps in flight
MAX_WINDOW = 64


def frame_overhead(payload: int) -> int:
    """Wire bytes a frame adds to `payload` bytes: header, CRC, COBS code bytes, delimiter."""
    raw = FRAME_HEADER.size + payload + FRAME_CRC_SIZE
    return raw - payload + (raw // 254 + 1) + 1


# -- the opcode table -------------------------------------------------------------------------
# name: (value, who sends the request, payload of the request, payload of the reply)
OPCODES = {
    "HELLO":    (0x01, "host",  "HelloReq", "Info"),
    "SET_BAUD": (0x02, "host",  "u32 baud", "empty (sent at the old rate)"),
    "INSTALL":  (0x03, "host",  "InstallReq", "InstallRep, after the board pulled the rest"),
    "LIVE":     (0x04, "host",  "LiveReq", "ModelRep, once the board has parsed the header"),
    "RUN_FLASH": (0x05, "host", "empty", "ModelRep, once the board has parsed the header"),
    "EVAL":     (0x06, "host",  "EvalReq + u32 tokens", "EvalRep + u32 generated tokens"),
    "LOGITS":   (0x07, "host",  "u32 offset, u32 length", "that many bytes of the logits"),
    "RESET":    (0x08, "host",  "empty", "empty"),
    "READ":     (0x20, "board", "u64 offset, u32 length", "the stream's bytes [offset, +length)"),
    "WORKING":  (0x7D, "board", "-", "empty: the request with this seq is still executing"),
    "ERROR":    (0x7E, "either", "-", "u16 code, UTF-8 text (a reply to any request)"),
    "NAK":      (0x7F, "either", "empty, seq 0: a corrupt frame arrived", "-"),
}
OP = {name: v[0] for name, v in OPCODES.items()}
OP_NAME = {v[0]: name for name, v in OPCODES.items()}
# Requests a board executes once: a byte-identical repeat is answered from its reply cache.
NOT_IDEMPOTENT = {OP["SET_BAUD"], OP["INSTALL"], OP["LIVE"], OP["RUN_FLASH"], OP["EVAL"],
                  OP["RESET"]}

# -- the board error-code table ---------------------------------------------------------------
ERRORS = {
    1: ("BAD_REQUEST", "malformed request payload"),
    2: ("UNKNOWN_OPCODE", "the board does not know this opcode"),
    3: ("VERSION", "protocol version not supported"),
    4: ("BUSY", "the board is executing another command"),
    5: ("NO_MODEL", "no model loaded: send LIVE or RUN_FLASH first"),
    6: ("NOT_INSTALLED", "the flash holds no complete, verified stream"),
    7: ("NO_FLASH", "this board has no storage to install into"),
    8: ("TOO_BIG", "the stream does not fit the board's flash"),
    9: ("UNSUPPORTED_TYPE", "the stream uses a type this board does not implement"),
    10: ("NO_RAM", "the model's buffers do not fit the board's RAM"),
    11: ("BAD_STREAM", "the stream's header or a record failed its check"),
    12: ("CRC_MISMATCH", "the whole-stream CRC-32 over flash differs from the host's"),
    13: ("TOKEN", "a token is outside the vocabulary"),
    14: ("POSITION", "EVAL's position differs from the tokens the board has consumed"),
    15: ("LINK", "the board gave up on a request after its retry budget"),
    16: ("BAUD", "the board cannot use that baud rate"),
    17: ("RANGE", "READ or LOGITS range outside the stream or buffer"),
}
ERR = {name: code for code, (name, _) in ERRORS.items()}


def error_text(code: int) -> str:
    name, text = ERRORS.get(code, (f"E{code}", "unknown board error"))
    return f"{name}: {text}"


# -- message layouts --------------------------------------------------------------------------
HELLO_REQ = struct.Struct("<HHI")          # version, reserved, host max payload
INFO = struct.Struct("<HHIBBHIIIQQQII16s")  # see docs/protocol.md section 5
CAP_INSTALL, CAP_LIVE, CAP_INSTALLED = 1, 2, 4
INSTALL_REQ = struct.Struct("<QI")          # size, whole-stream crc32
LIVE_REQ = struct.Struct("<QQ")             # size, end of the last tensor record (read-ahead cap)
MODEL_REP = struct.Struct("<IBBH")          # n_vocab, tokenizer, arch, reserved
READ_REQ = struct.Struct("<QI")             # offset, length
INSTALL_REP = struct.Struct("<QQI4x")      # resumed from, size, crc32 the board computed over flash
EVAL_REQ = struct.Struct("<IHHB3x")         # position, n tokens, n to generate, flags
EVAL_REP = struct.Struct("<IH2x")           # position after, n generated
EVAL_KEEP_LOGITS = 1                        # (logits are always kept; reserved)
LOGITS_REQ = struct.Struct("<II")
ERROR_REP = struct.Struct("<H")
BAUD_REQ = struct.Struct("<I")
NAME_SIZE = 16


@dataclass
class BoardInfo:
    version: int
    caps: int
    max_payload: int
    window: int
    types: tuple[int, ...]
    ram: int
    psram: int
    chunk: int
    flash: int
    tokens: int
    installed_size: int
    installed_crc: int
    verified: int
    name: str

    def pack(self) -> bytes:
        return INFO.pack(self.version, self.caps, self.max_payload, self.window,
                         len(self.types), 0, self.ram, self.psram, self.chunk, self.flash,
                         self.installed_size, self.verified, self.installed_crc, self.tokens,
                         self.name.encode("ascii")[:NAME_SIZE]) + bytes(self.types)

    @classmethod
    def unpack(cls, data: bytes) -> "BoardInfo":
        (version, caps, max_payload, window, n_types, _, ram, psram, chunk, flash, isize,
         verified, icrc, tokens, name) = INFO.unpack_from(data)
        types = tuple(data[INFO.size:INFO.size + n_types])
        return cls(version, caps, max_payload, window, types, ram, psram, chunk, flash, tokens,
                   isize, icrc, verified, name.rstrip(b"\0").decode("ascii", "replace"))


# -- timeouts and retries, scaled to the link ------------------------------------------------
RETRIES = 6                 # retransmissions of one request before giving up
BACKOFF = 2.0               # each retransmission waits this many times longer
MAX_WAIT = 2.0              # ... but never more than this (seconds)
TURNAROUND = 0.02           # seconds a side may take to start answering (OS, USB polling)
MIN_REPLY_TIMEOUT = 0.05
HANDSHAKE_TIMEOUT = 0.25    # first HELLO wait; a board may still be booting
HANDSHAKE_RETRIES = 4
NOMINAL_BAUD = 921600       # what sockets and ptys are treated as when no --baud is given


@dataclass(frozen=True)
class Timeouts:
    reply: float            # first wait for the answer to a request
    handshake: float
    retries: int = RETRIES

    def budget(self, first: float | None = None) -> float:
        """Seconds until a request is given up: the sum of its backed-off waits."""
        t, w = 0.0, first or self.reply
        for _ in range(self.retries + 1):
            t += w
            w = min(w * BACKOFF, MAX_WAIT)
        return t


def timeouts_for(baud: int | None, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 window: int = DEFAULT_WINDOW, scale: float = 1.0) -> Timeouts:
    """A request's answer may queue behind a whole window of full frames in each direction."""
    byte_time = 10.0 / (baud or NOMINAL_BAUD)
    frame = (max_payload + frame_overhead(max_payload)) * byte_time
    reply = max(MIN_REPLY_TIMEOUT, TURNAROUND + (window + 2) * frame) * scale
    return Timeouts(reply=reply, handshake=max(HANDSHAKE_TIMEOUT, reply) * scale)
