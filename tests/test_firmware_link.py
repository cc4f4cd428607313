"""The C board firmware (firmware/link, firmware/port) against the Python host tools.

`board_host` (the POSIX port) sits at the end of a real pty pair or a loopback socket, with
host/link/relay.py as the cable (clean or faulty); the same firmware built for QEMU's
mps2-an385 (Cortex-M3) answers on `-serial tcp:...`. The host side is always the real
`rwkv-stream install | chat | serve` (or its HostSession). Generated tokens are compared with
the Python board (`rwkv-stream board-sim --mode int8`, the simulator's int8 forward pass).

Needs a C compiler and make; the QEMU tests need qemu-system-arm, arm-none-eabi-gcc and
picolibc (`.ci/run` installs them when apt is there) and skip with the reason otherwise. While
firmware/core/rwkv_board.c is missing the firmware runs on firmware/link/link_test_stub.c and
the comparisons with the simulator skip.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import LINK_FAULTS, REPO, fixture_path, free_port
from firmware_sim.board import Board
from firmware_sim.sources import BytesSource
from formats.arch import RwkvVersion
from host.link.framing import BoardError, LinkError
from host.link.host import HostSession
from host.link.protocol import ERR, OP, Timeouts, frame_overhead
from host.link.relay import Faults, Relay, SocketRelay, pty_cable
from host.model import Model
from host.plan import make_plan
from host.stream import VirtualStream
from host.stream.writer import write_stream
from host.synth import SyntheticCheckpoint, synth_hparams

FW = REPO / "firmware"
CORE = (FW / "core" / "rwkv_board.c").exists()
needs_core = pytest.mark.skipif(not CORE, reason="firmware/core/rwkv_board.c is missing: the "
                                                 "firmware runs on the link's test stub")
FAST = Timeouts(reply=0.08, handshake=0.25, retries=4)
PROMPT = [72, 101, 108, 108, 111]
FLASH_DATA = 4096


# -- building ----------------------------------------------------------------------------------
_built: dict[str, Path] = {}


def _make(target: str, out: str) -> Path:
    if target not in _built:
        if not shutil.which("make"):
            pytest.skip("make is not installed")
        proc = subprocess.run(["make", "-C", str(FW), "-s", target], capture_output=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        _built[target] = FW / out
    return _built[target]


@pytest.fixture(scope="module")
def board_exe() -> Path:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (cc)")
    return _make("board-host", "build/board_host")


@pytest.fixture(scope="module")
def fw_elf() -> Path:
    missing = [t for t in ("qemu-system-arm", "arm-none-eabi-gcc") if not shutil.which(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install qemu-system-arm "
                    "gcc-arm-none-eabi picolibc-arm-none-eabi)")
    if not Path("/usr/lib/picolibc/arm-none-eabi/picolibc.specs").exists():
        pytest.skip("picolibc-arm-none-eabi is not installed")
    return _make("qemu", "build/qemu/fw.elf")


# -- streams -----------------------------------------------------------------------------------
def synth_stream(version=RwkvVersion.V5_2, n_embd=32, n_layer=2, quant="Q8_0", seed=3) -> bytes:
    """A synthetic model, 256 tokens; the embedding and head quantized too (QEMU's UART carries
    only 15-20 KB/s towards the board)."""
    kw = dict(ffn_size=64) if version is RwkvVersion.V4 else dict(ffn_size=64, head_size=16)
    model = Model(SyntheticCheckpoint(synth_hparams(version, n_embd, n_layer, 256, **kw),
                                      seed=seed))
    plan = make_plan(model, quant, (f"emb.weight={quant}", f"head.weight={quant}"))
    buf = io.BytesIO()
    write_stream(VirtualStream(model, plan), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A synthetic v5.2 model, 32 wide, 2 layers, 256 tokens, all Q8_0 (about 45 KB)."""
    data = synth_stream()
    path = tmp_path_factory.mktemp("streams") / "small-v52-Q8_0.rwks"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shared tiny rwkv.cpp fixture, v5.2 730K, as a Q8_0 stream (about 860 KB)."""
    src = fixture_path("rwkv_cpp", "tiny-rwkv-5v2-730K-FP16.bin")
    path = tmp_path_factory.mktemp("streams") / "tiny-5v2-Q8_0.rwks"
    proc = subprocess.run([sys.executable, "-m", "host.cli", "convert", str(src), "-o",
                           str(path), "--quant", "Q8_0"], capture_output=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    return path


def sim_generate(data: bytes, prompt, n: int):
    """The Python board in int8 mode: greedy generation and the last logits."""
    board = Board(BytesSource(data), mode="int8")
    for t in prompt:
        logits = board.eval(t)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = board.eval(t)
    return out, logits.copy()


def with_header(data: bytes, edit) -> bytes:
    """The stream with its header edited by edit(bytearray) and the header CRC recomputed."""
    raw = bytearray(data)
    n_types, n_tensors = struct.unpack_from("<H", raw, 76)[0], struct.unpack_from("<I", raw, 72)[0]
    hf = 112 + 32 * n_types + n_tensors + (-n_tensors) % 4
    edit(raw)
    raw[hf:hf + 4] = (zlib.crc32(bytes(raw[:hf])) & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(raw)


def flash_image(data: bytes) -> bytes:
    """What an install leaves in storage: a complete install record, then the stream."""
    rec = struct.pack("<4sIQIQ", b"RWKF", 2, len(data), zlib.crc32(data) & 0xFFFFFFFF, len(data))
    rec += (zlib.crc32(rec) & 0xFFFFFFFF).to_bytes(4, "little")
    return rec.ljust(FLASH_DATA, b"\0") + data


# -- running the host tools --------------------------------------------------------------------
def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "host.cli", *map(str, args)],
                          capture_output=True, cwd=REPO, timeout=timeout)


def cli_tokens(*args, timeout=300):
    proc = cli(*args, "--json", timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return json.loads(proc.stdout)["results"][0]["generated"]


def prompt_args(n=8):
    return ["--prompt-tokens", ",".join(map(str, PROMPT)), "-n", str(n)]


# -- the C board on a port ---------------------------------------------------------------------
def stop(proc: subprocess.Popen) -> None:
    """Terminate a board process, killing it if it has not gone within 5 s."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()


class CBoard:
    """board_host at the end of a pty cable (relay.py, faults optional) or on a loopback socket
    behind a SocketRelay."""

    def __init__(self, exe, flash: Path | None, kind="pty", *, to_board=None, to_host=None,
                 seed=0, args=()):
        self.lines: list[str] = []
        cmd = [str(exe), "--flash-size", str(16 << 20), *map(str, args)]
        if flash is not None:
            cmd += ["--flash", str(flash)]
        self.relay = self.socket_relay = None
        if kind == "pty":
            board_path, self.url, self.relay = pty_cable(faults_ab=to_host, faults_ba=to_board,
                                                         seed=seed)
            cmd += ["--port", board_path]
        else:
            cmd += ["--port", "socket://127.0.0.1:0"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"listening on port (\d+)", line)
            if m:
                port = int(m.group(1))
            if "board ready" in line:
                break
        assert "board ready" in "".join(self.lines), "".join(self.lines)
        threading.Thread(target=self._drain, daemon=True).start()
        if kind != "pty":
            self.socket_relay = SocketRelay(
                ("127.0.0.1", port),
                lambda host_end, board_end: Relay(host_end, board_end, to_board, to_host,
                                                  seed=seed))
            self.url = self.socket_relay.url

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def faults(self) -> int:
        relays = self.socket_relay.relays if self.socket_relay else [self.relay]
        return sum(r.faults_injected for r in relays)

    def close(self):
        stop(self.proc)
        if self.socket_relay:
            self.socket_relay.close()
        if self.relay:
            # stop the relay's threads before closing its fds: a thread still reading a closed
            # fd number would read from whatever file reuses it next
            self.relay.stop(close=False)
            for t in self.relay.threads:
                t.join(2)
            for end in self.relay.ends:
                end.close()
            for fd in self.relay.slaves:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- (a) the host port: install + chat, serve, against the Python board --------------------------
@pytest.fixture(scope="module")
def sim_tokens(tiny):
    """`rwkv-stream board-sim --mode int8` served live by `rwkv-stream serve`."""
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "board-sim", "--port",
                             "socket://127.0.0.1:0", "--mode", "int8"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:                # "... ready on ... (listening on port N)"
            m = re.search(r"listening on port (\d+)", line)
            if m:
                port = m.group(1)
                break
        assert port, "board-sim did not start"
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        return cli_tokens("serve", tiny, "--port", f"socket://127.0.0.1:{port}", *prompt_args())
    finally:
        proc.terminate()
        proc.wait(10)


@needs_core
def test_install_then_chat_matches_board_sim(board_exe, tiny, sim_tokens, tmp_path):
    with CBoard(board_exe, tmp_path / "flash.bin") as b:
        proc = cli("install", tiny, "--port", b.url, "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        result = json.loads(proc.stdout)
        assert result["board"] == "host" and result["size"] == tiny.stat().st_size
        assert result["resumed_from"] == 0
        got = cli_tokens("chat", "--port", b.url, *prompt_args())
    assert got == sim_tokens
    flash = (tmp_path / "flash.bin").read_bytes()
    assert flash[FLASH_DATA:FLASH_DATA + result["size"]] == tiny.read_bytes()


@needs_core
def test_live_serve_matches_board_sim(board_exe, tiny, sim_tokens):
    with CBoard(board_exe, None) as b:
        assert cli_tokens("serve", tiny, "--port", b.url, *prompt_args()) == sim_tokens


@needs_core
@pytest.mark.parametrize("version", [RwkvVersion.V4, RwkvVersion.V5_2, RwkvVersion.V7])
def test_logits_match_the_int8_simulator(board_exe, version):
    data = synth_stream(version)
    want_gen, want = sim_generate(data, PROMPT, 3)
    with CBoard(board_exe, None, "socket") as b, HostSession(b.url, timeouts=FAST) as h:
        h.hello()
        h.live(BytesSource(data))
        gen = h.eval(PROMPT, 3)
        logits = h.logits()
    assert gen == want_gen
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_install_chat_and_serve_agree(board_exe, small, tmp_path):
    """Whatever the core: the installed copy and the live stream give the same tokens, and a
    second session continues where the first left off."""
    with CBoard(board_exe, tmp_path / "flash.bin") as b:
        assert cli("install", small, "--port", b.url).returncode == 0
        from_flash = cli_tokens("chat", "--port", b.url, *prompt_args(6))
    with CBoard(board_exe, None) as b:
        live = cli_tokens("serve", small, "--port", b.url, *prompt_args(6))
        with HostSession(b.url, timeouts=FAST) as h:
            info = h.hello()
            assert info.tokens == len(PROMPT) + 6      # the board kept its model and count
    assert from_flash == live
    if CORE:
        assert live == sim_generate(small.read_bytes(), PROMPT, 6)[0]


def test_handshake_describes_the_board(board_exe, small, tmp_path):
    with CBoard(board_exe, tmp_path / "f", args=["--max-frame", 1024, "--window", 3,
                                                  "--ram", 300000]) as b, \
            HostSession(b.url, timeouts=FAST) as h:
        info = h.hello()
        assert (info.version, info.name, info.max_payload, info.window) == (1, "host", 1024, 3)
        assert info.caps == 3 and info.flash == (16 << 20) - FLASH_DATA and info.tokens == 0
        assert info.ram == 300000 + 3 * (1024 + frame_overhead(1024)) and info.chunk == 4096
        assert {0, 1, 2, 3, 6, 7, 8}.issubset(info.types)
        h.install(BytesSource(small.read_bytes()))
        info = h.hello()
        assert info.caps == 7 and info.installed_size == info.verified == small.stat().st_size
        assert info.installed_crc == zlib.crc32(small.read_bytes())


def test_install_resumes_after_a_disconnect(board_exe, small, tmp_path):
    data = small.read_bytes()
    flash = tmp_path / "flash.bin"
    with CBoard(board_exe, flash, "socket", to_board=Faults(cut_after=len(data) // 2),
                args=["--max-frame", 1024]) as b:
        with pytest.raises(LinkError), HostSession(b.url, timeouts=FAST) as h:
            h.hello()
            h.install(BytesSource(data))
    with CBoard(board_exe, flash, args=["--max-frame", 1024]) as b, \
            HostSession(b.url, timeouts=FAST) as h:
        info = h.hello()
        assert info.caps & 1 and not info.caps & 4 and 0 < info.verified <= len(data) // 2
        result = h.install(BytesSource(data))
        assert 0 < result["resumed_from"] <= len(data) // 2
        assert result["sent"] <= len(data) - result["resumed_from"] + 4096
    assert flash.read_bytes()[FLASH_DATA:FLASH_DATA + len(data)] == data


def test_errors_carry_the_protocol_codes_and_the_board_keeps_answering(board_exe, small,
                                                                        tmp_path):
    data = small.read_bytes()
    bad_type = with_header(data, lambda raw: raw.__setitem__(112, 99))     # unknown type id
    bad_crc = bytearray(data)
    bad_crc[20] ^= 1                                                         # header CRC fails
    bad_magic = b"RWKX" + data[4:]
    with CBoard(board_exe, tmp_path / "f", "socket") as b, \
            HostSession(b.url, timeouts=FAST) as h:
        h.hello()

        def code(name, payload=b""):
            with pytest.raises(BoardError) as e:
                h.command(name, payload)
            return e.value.code

        def live(stream):
            h.source = BytesSource(stream)      # past the host's own checks, on purpose
            return code("LIVE", struct.pack("<QQ", len(stream), len(stream) - 48))

        assert live(bad_type) == ERR["UNSUPPORTED_TYPE"]
        assert live(bytes(bad_crc)) == ERR["BAD_STREAM"]
        assert live(bad_magic) == ERR["BAD_STREAM"]
        assert code("EVAL", struct.pack("<IHHB3x", 0, 0, 0, 0)) == ERR["NO_MODEL"]
        assert code("RUN_FLASH") == ERR["NOT_INSTALLED"]
        assert code("HELLO", struct.pack("<HHI", 2, 0, 4096)) == ERR["VERSION"]
        assert code("HELLO", b"\1") == ERR["BAD_REQUEST"]
        assert code("INSTALL", struct.pack("<QI", 1 << 30, 0)) == ERR["TOO_BIG"]
        with pytest.raises(BoardError) as e:
            h.link.command(0x55, b"", h.handle)
        assert e.value.code == ERR["UNKNOWN_OPCODE"]
        # ... and after all that, a good stream runs
        h.hello()
        h.live(BytesSource(data))
        assert code("EVAL", struct.pack("<IHHB3xI", 7, 1, 0, 0, 1)) == ERR["POSITION"]
        assert code("EVAL", struct.pack("<IHHB3xI", 0, 1, 0, 0, 256)) == ERR["TOKEN"]
        assert code("LOGITS", struct.pack("<II", 1020, 8)) == ERR["RANGE"]
        gen = h.eval(PROMPT, 2)
        assert len(gen) == 2 and h.info.tokens == len(PROMPT) + 2
        h.reset()
        assert h.eval(PROMPT, 2) == gen


def test_set_baud_keeps_talking(board_exe, small):
    with CBoard(board_exe, None) as b, HostSession(b.url, timeouts=FAST) as h:
        h.hello()
        h.set_baud(460800)
        h.live(BytesSource(small.read_bytes()))
        assert len(h.eval(PROMPT, 2)) == 2
        with pytest.raises(BoardError) as e:
            h.command("SET_BAUD", struct.pack("<I", 300))
        assert e.value.code == ERR["BAUD"]


# -- (b) the fault relay between the host tools and the C board -----------------------------------
FAULTS = {k: v for k, v in LINK_FAULTS.items() if k != "delays"}


@pytest.fixture(scope="module")
def clean_run(board_exe, small, tmp_path_factory):
    """Tokens and logits over a clean cable: live, and installed."""
    data = small.read_bytes()
    out = {}
    with CBoard(board_exe, tmp_path_factory.mktemp("clean") / "f") as b, \
            HostSession(b.url, timeouts=FAST) as h:
        h.hello()
        h.live(BytesSource(data))
        out["live"] = (h.eval(PROMPT, 3), h.logits())
        h.install(BytesSource(data))
        h.hello()
        h.run_flash()
        h.reset()
        out["install"] = (h.eval(PROMPT, 3), h.logits())
    assert out["live"][0] == out["install"][0]
    if CORE:
        want_gen, want = sim_generate(data, PROMPT, 3)
        assert out["live"][0] == want_gen
    return out


@pytest.mark.parametrize("mode", ["live", "install"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_faulty_cable_gives_identical_output(board_exe, small, clean_run, fault, mode, tmp_path):
    f = FAULTS[fault]
    kind = "socket" if fault in ("reordered frames", "everything") else "pty"
    with CBoard(board_exe, tmp_path / "f", kind, to_board=Faults(**f), to_host=Faults(**f),
                seed=zlib.crc32(f"{fault}/{mode}".encode()),
                args=["--max-frame", 1024, "--reply-ms", 80]) as b, \
            HostSession(b.url, timeouts=FAST) as h:
        h.hello()
        if mode == "live":
            h.live(BytesSource(small.read_bytes()))
        else:
            h.install(BytesSource(small.read_bytes()))
            h.hello()
            h.run_flash()
        gen = h.eval(PROMPT, 3)
        logits = h.logits()
        assert b.faults() > 0
    assert gen == clean_run[mode][0]
    assert np.array_equal(logits, clean_run[mode][1])


def test_cli_through_a_faulty_cable(board_exe, small, clean_run, tmp_path):
    f = Faults(drop_byte=0.02, flip_bit=0.02, drop_frame=0.01, duplicate=0.02)
    with CBoard(board_exe, tmp_path / "f", to_board=f, to_host=f, seed=5,
                args=["--reply-ms", 100]) as b:
        got = cli_tokens("serve", small, "--port", b.url, "--prompt-tokens",
                         ",".join(map(str, PROMPT)), "-n", "3")
    assert got == clean_run["live"][0]


def test_silent_cable_gives_a_clear_error(board_exe, small, tmp_path):
    data = small.read_bytes()
    with CBoard(board_exe, tmp_path / "f", to_board=Faults(cut_after=len(data) // 3,
                                                           cut_for=60),
                args=["--reply-ms", 30, "--max-frame", 1024, "--window", 2]) as b:
        t0 = time.monotonic()
        proc = cli("install", small, "--port", b.url)
        assert proc.returncode == 2
        err = proc.stderr.decode()      # the board gives up first (LINK), or the host does
        assert "LINK" in err or "no answer from the board" in err, err
        assert time.monotonic() - t0 < 30
        # the board gave up on its READs and answers the next host
        time.sleep(0.5)
        b.relay.silent_until = 0
        with HostSession(b.url, timeouts=FAST) as h:
            info = h.hello()
            assert not info.caps & 4 and info.verified < len(data)


def live_logits(url, data, tokens=PROMPT, timeouts=FAST):
    with HostSession(url, timeouts=timeouts) as h:
        h.hello()
        h.live(BytesSource(data))
        h.eval(tokens, 0)
        return h.logits()


def test_disconnect_mid_pass_then_a_new_session_continues(board_exe, small):
    """The host hangs up in the third pass: EVAL is all or nothing, the next session starts
    from the board's count (0) and gets the clean logits."""
    data = small.read_bytes()
    with CBoard(board_exe, None) as b:
        clean = live_logits(b.url, data)
    with CBoard(board_exe, None, "socket", to_board=Faults(cut_after=int(len(data) * 2.5)),
                args=["--max-frame", 1024]) as b:
        with pytest.raises(LinkError):
            live_logits(b.url, data)
        with HostSession(b.url, timeouts=FAST) as h:    # (the relay keeps one connection
            assert h.hello().tokens == 0                # to the board per host connection)
            h.live(BytesSource(data))
            h.eval(PROMPT, 0)
            assert np.array_equal(h.logits(), clean)


def test_link_failure_mid_pass_is_undone_and_the_next_eval_runs(board_exe, small):
    """The cable goes silent longer than the board's retry budget in the middle of a pass: the
    board answers ERROR LINK (from its reply cache, once the host's EVAL gets through), restores
    its state, and the same session's next EVAL runs on a core opened again."""
    data = small.read_bytes()
    with CBoard(board_exe, None) as b:
        clean = live_logits(b.url, data)
    patient = Timeouts(reply=0.2, handshake=0.25, retries=6)
    with CBoard(board_exe, None, to_board=Faults(cut_after=int(len(data) * 2.5), cut_for=4.2),
                args=["--max-frame", 1024, "--reply-ms", 30]) as b, \
            HostSession(b.url, timeouts=patient) as h:
        h.hello()
        h.live(BytesSource(data))
        with pytest.raises(BoardError) as e:
            h.eval(PROMPT, 0)
        assert e.value.code == ERR["LINK"]
        assert h.hello().tokens == 0
        h.eval(PROMPT, 0)
        assert np.array_equal(h.logits(), clean)


# -- (c) QEMU mps2-an385 ------------------------------------------------------------------------
class Qemu:
    """The firmware on QEMU's mps2-an385, UART0 on a TCP socket (nodelay: no 40 ms per
    reply); `preload` goes into the PSRAM that stands in for flash (-device loader)."""

    def __init__(self, elf, tmp_path, preload: bytes | None = None, icount=False, log=None):
        self.port = free_port()
        cmd = ["qemu-system-arm", "-M", "mps2-an385", "-nographic", "-monitor", "none",
               "-serial", f"tcp:127.0.0.1:{self.port},server=on,wait=on,nodelay=on",
               "-serial", f"file:{log}" if log else "null", "-kernel", str(elf)]
        if icount:
            cmd += ["-icount", "shift=0"]
        if preload is not None:
            img = tmp_path / "flash.img"
            img.write_bytes(preload)
            cmd += ["-device", f"loader,file={img},addr=0x21000000,force-raw=on"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:     # QEMU waits for a first connection; this probe lets the board boot
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("qemu did not start: " +
                                       self.proc.stderr.read().decode()[-1000:])
                time.sleep(0.05)
        self.url = f"socket://127.0.0.1:{self.port}"

    def close(self):
        stop(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_qemu_install_then_chat(fw_elf, small, tmp_path):
    with Qemu(fw_elf, tmp_path) as q:
        proc = cli("install", small, "--port", q.url, "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        result = json.loads(proc.stdout)
        assert result["board"] == "mps2-an385" and result["size"] == small.stat().st_size
        got = cli_tokens("chat", "--port", q.url, *prompt_args(6))
        again = HostSession(q.url, timeouts=FAST)
        with again as h:
            assert h.hello().tokens == len(PROMPT) + 6
    if CORE:
        assert got == sim_generate(small.read_bytes(), PROMPT, 6)[0]
    else:
        assert len(got) == 6


def test_qemu_live_serve(fw_elf, tmp_path):
    """Live on the Cortex-M3: the board pulls every pass through QEMU's UART (~15-20 KB/s
    towards the board), so the model is the smallest: v4, 32 wide, one layer, all Q8_0 (about
    17 KB a pass)."""
    data = synth_stream(RwkvVersion.V4, n_layer=1)
    path = tmp_path / "v4.rwks"
    path.write_bytes(data)
    with Qemu(fw_elf, tmp_path) as q:
        got = cli_tokens("serve", path, "--port", q.url, "--prompt-tokens", "72", "-n", "1")
    if CORE:
        assert got == sim_generate(data, [72], 1)[0]
    else:
        assert len(got) == 1


def test_qemu_preloaded_fixture(fw_elf, tiny, tmp_path):
    """A larger stream put into the board's storage by QEMU's loader, as a flasher would."""
    data = tiny.read_bytes()
    with Qemu(fw_elf, tmp_path, preload=flash_image(data)) as q:
        with HostSession(q.url) as h:
            info = h.hello()
            assert info.caps & 4 and info.installed_size == len(data)
        proc = cli("chat", "--port", q.url, *prompt_args(4), "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        out = json.loads(proc.stdout)
        got = out["results"][0]["generated"]
        with HostSession(q.url, timeouts=Timeouts(reply=0.02, handshake=0.25, retries=6)) as h:
            h.hello()
            h.run_flash()
            # a long EVAL (24 tokens on the emulated M3), so that the LOGITS behind it finds
            # the board busy however fast the machine running QEMU is
            busy_eval = h.link.request(OP["EVAL"], struct.pack("<IHHB3xI", h.info.tokens, 1, 24,
                                                               0, 65), extend=True)
            other = h.link.request(OP["LOGITS"], struct.pack("<II", 0, 16))
            with pytest.raises(BoardError) as e:
                h.link.wait_reply(other, h.handle)
            assert e.value.code == ERR["BUSY"]
            rep = h.link.wait_reply(busy_eval, h.handle).payload
            assert len(rep) == 8 + 24 * 4
            h.info.tokens = struct.unpack_from("<I", rep)[0]
            # 30 tokens take longer than the host's first waits: its repeats get WORKING
            assert len(h.eval([65], 30)) == 30 and h.link.stats["working"] > 0
    if CORE:
        assert got == sim_generate(data, PROMPT, 4)[0]


def test_qemu_refuses_malformed_streams_and_keeps_answering(fw_elf, small, tmp_path):
    data = small.read_bytes()
    bad_type = with_header(data, lambda raw: raw.__setitem__(112, 99))
    corrupt = bytearray(data)
    emb = struct.unpack_from("<Q", corrupt, 80)[0]
    corrupt[emb + 5] ^= 0x40                   # the embedding's payload CRC no longer matches
    with Qemu(fw_elf, tmp_path, preload=flash_image(bytes(corrupt))) as q:
        if CORE:        # the core checks the embedding record's CRC when it opens the stream
            proc = cli("chat", "--port", q.url, "--prompt-tokens", "1", "-n", "1")
            assert proc.returncode == 2
            assert "BAD_STREAM" in proc.stderr.decode()
        with HostSession(q.url) as h:
            h.hello()
            if CORE:
                with pytest.raises(BoardError) as e:
                    h.run_flash()
                assert e.value.code == ERR["BAD_STREAM"]
            h.source = BytesSource(bad_type)
            with pytest.raises(BoardError) as e:
                h.command("LIVE", struct.pack("<QQ", len(bad_type), len(bad_type) - 48))
            assert e.value.code == ERR["UNSUPPORTED_TYPE"]
            assert h.hello().name == "mps2-an385"         # still answering


@pytest.mark.skipif(not CORE, reason="needs the C board core")
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "F16"])
def test_qemu_logits_equal_the_int8_simulator(fw_elf, quant, tmp_path):
    """On the emulated Cortex-M3 (soft float, picolibc) the C core's logits are the Python
    simulator's in int8 mode to 1e-5: the same arithmetic order in IEEE single precision, but
    exp/tanh come from picolibc's libm, whose double results differ from glibc's (the host
    build, bit-identical) in the last bits, so a float rounding occasionally flips (measured:
    at most ~1.5e-6 on v4)."""
    src = fixture_path("rwkv_cpp", "tiny-rwkv-4v0-660K-FP32.bin")
    path = tmp_path / f"v4-{quant}.rwks"
    proc = subprocess.run([sys.executable, "-m", "host.cli", "convert", str(src), "-o", str(path),
                           "--quant", quant], capture_output=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    data = path.read_bytes()
    with Qemu(fw_elf, tmp_path, preload=flash_image(data)) as q:
        with HostSession(q.url) as h:
            h.hello()
            h.run_flash()
            h.reset()
            h.eval(PROMPT)
            got = h.logits()
    _, want = sim_generate(data, PROMPT, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_qemu_through_a_faulty_relay_gives_identical_output(fw_elf, small, tmp_path):
    """The fault relay between the host tools and the Cortex-M3 in QEMU: bytes dropped and
    flipped, frames dropped, duplicated and reordered both ways; the installed model's tokens
    and logits equal those over the clean socket."""
    f = FAULTS["everything"]
    with Qemu(fw_elf, tmp_path, preload=flash_image(small.read_bytes())) as q:
        with HostSession(q.url) as h:
            h.hello()
            h.run_flash()
            h.reset()
            clean = (h.eval(PROMPT, 3), h.logits())
        relay = SocketRelay(("127.0.0.1", q.port),
                            lambda host_end, board_end: Relay(host_end, board_end, Faults(**f),
                                                              Faults(**f), seed=11))
        try:
            with HostSession(relay.url, timeouts=Timeouts(reply=0.3, handshake=1.0,
                                                          retries=12)) as h:
                h.hello()
                h.run_flash()
                h.reset()
                got = (h.eval(PROMPT, 3), h.logits())
            assert sum(r.faults_injected for r in relay.relays) > 0
        finally:
            relay.close()
    assert got[0] == clean[0]
    assert np.array_equal(got[1], clean[1])
