"""Shared test set-up: where the external fixtures live, and how to run the CLI for real."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("RWKV_STREAM_FIXTURES", REPO.parent / "shared" / "fixtures"))

# The tiny rwkv.cpp test models: name -> RWKV version label.
MODELS = {"4v0-660K": "4", "5v1-730K": "5.1", "5v2-730K": "5.2", "6v0-3m": "6",
          "7v0-834K": "7"}
QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")

# The serial link's fault mixes (host.link.relay.Faults keyword arguments), for the link tests
# against the simulated board and against the C board.
LINK_FAULTS = {
    "dropped bytes": dict(drop_byte=0.08),
    "flipped bits": dict(flip_bit=0.08),
    "dropped frames": dict(drop_frame=0.04),
    "duplicated frames": dict(duplicate=0.1),
    "reordered frames": dict(reorder=0.1),
    "delays": dict(delay=0.05, delay_s=0.03),
    "everything": dict(drop_byte=0.03, flip_bit=0.03, drop_frame=0.02, duplicate=0.03,
                       reorder=0.03, delay=0.02, delay_s=0.02),
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixture_path(*parts) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"fixture {path} is absent (set RWKV_STREAM_FIXTURES)")
    return path


def fp32_model(model: str) -> Path:
    """The FP32 rwkv.cpp file of a tiny model (v6 exists only dequantized from Q5_1)."""
    name = "tiny-rwkv-6v0-3m-FP32-from-Q5_1.bin" if model == "6v0-3m" \
        else f"tiny-rwkv-{model}-FP32.bin"
    return fixture_path("rwkv_cpp", name)


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.exists():
        pytest.skip(f"fixtures folder {FIXTURES} is absent (set RWKV_STREAM_FIXTURES)")
    return FIXTURES


def run_cli(*args, input: bytes | None = None, check_status: int | None = None, cwd=None):
    """Run `rwkv-stream` as a real subprocess; returns CompletedProcess with bytes output."""
    proc = subprocess.run([sys.executable, "-m", "host.cli", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd or REPO, timeout=600)
    if check_status is not None:
        assert proc.returncode == check_status, (proc.returncode, proc.stderr.decode()[-2000:])
    return proc


def mutated(stream: bytes, data, max_edits: int) -> bytes:
    """1..max_edits random edits of `stream` drawn by hypothesis (`data`): a flipped bit, up to
    16 inserted bytes, or up to 16 deleted bytes each."""
    from hypothesis import strategies as st
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, max_edits))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del buf[pos:pos + data.draw(st.integers(1, 16))]
    return bytes(buf)
