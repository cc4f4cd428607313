"""Frames, COBS, CRC and the protocol tables, without ports; and docs/protocol.md against
host/link/protocol.py."""
from __future__ import annotations

import random
import re

import pytest
from cobs import cobs

from conftest import REPO
from host.link import protocol as P
from host.link.framing import decode_frame, encode_frame


def c_style_cobs_encode(data: bytes) -> bytes:
    """docs/protocol.md's C encoder, transcribed: it must agree with the cobs package."""
    out = bytearray([0])
    code_at, code = 0, 1
    for i, b in enumerate(data):
        if b:
            out.append(b)
            code += 1
            if code == 0xFF and i + 1 < len(data):
                out[code_at] = code
                code_at = len(out)
                out.append(0)
                code = 1
        else:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
    out[code_at] = code
    return bytes(out)


@pytest.mark.parametrize("n", [0, 1, 253, 254, 255, 508, 4096])
def test_doc_cobs_matches_the_package(n):
    rng = random.Random(n)
    for zeros in (0.0, 0.1, 0.9):
        data = bytes(0 if rng.random() < zeros else rng.randrange(1, 256) for _ in range(n))
        assert c_style_cobs_encode(data) == cobs.encode(data)


def test_frame_round_trip_and_overhead():
    payload = bytes(range(256)) * 16
    wire = encode_frame(P.OP["READ"], P.FLAG_REPLY, 0xBEEF, payload)
    assert wire.count(0) == 1 and wire.endswith(b"\0")
    assert len(wire) == len(payload) + P.frame_overhead(len(payload))
    f = decode_frame(wire[:-1])
    assert (f.op, f.flags, f.seq, f.payload) == (P.OP["READ"], 1, 0xBEEF, payload)
    assert len(payload) / len(wire) >= 0.99


def test_every_single_bit_flip_is_caught():
    wire = bytearray(encode_frame(P.OP["EVAL"], 0, 7, bytes(range(40)))[:-1])
    for i in range(len(wire)):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            assert decode_frame(bytes(bad)) is None or bad == wire


def test_receiver_resynchronises_after_garbage():
    good = encode_frame(P.OP["HELLO"], 0, 1, b"abc")
    stream = b"\x13\x37garbage\x00" + good[5:] + good + b"\xff\xfe\x00" + good
    frames = [decode_frame(c) for c in stream.split(b"\0") if c]
    assert [f is not None for f in frames] == [False, False, True, False, True]


def test_board_info_round_trip():
    info = P.BoardInfo(1, 7, 2048, 4, (0, 1, 8), 264 * 1024, 0, 4096, 2 << 20, 12345, 12000,
                       0xDEADBEEF, 3, "rp2040")
    assert P.BoardInfo.unpack(info.pack()) == info
    assert P.INFO.size == 72


def test_timeouts_scale_with_the_link():
    slow, fast = P.timeouts_for(115200), P.timeouts_for(3_000_000)
    assert slow.reply > 5 * fast.reply
    assert P.timeouts_for(921600).budget() < 15


def _doc_table(name):
    text = (REPO / "docs" / "protocol.md").read_text()
    block = text.split(f"<!-- table: {name} -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
    return rows[2:]


def test_doc_opcode_table_matches_protocol_py():
    rows = _doc_table("opcodes")
    assert {r[1]: (int(r[0], 16), r[2], r[3], r[4]) for r in rows} == P.OPCODES


def test_doc_error_table_matches_protocol_py():
    rows = _doc_table("errors")
    assert {int(r[0]): (r[1], r[2]) for r in rows} == P.ERRORS


def test_doc_states_the_layout_sizes():
    text = (REPO / "docs" / "protocol.md").read_text()
    for what, size in [("HelloReq", P.HELLO_REQ.size), ("InstallReq", P.INSTALL_REQ.size),
                       ("InstallRep", P.INSTALL_REP.size), ("LiveReq", P.LIVE_REQ.size),
                       ("ModelRep", P.MODEL_REP.size), ("EvalReq", P.EVAL_REQ.size),
                       ("EvalRep", P.EVAL_REP.size)]:
        assert re.search(rf"{what} \({size} bytes", text), what
