"""Test rig for the serial link: a simulated board in a thread at the end of a real pty pair or
a loopback socket, with the fault-injecting relay as the cable."""
from __future__ import annotations

import io
import threading

import numpy as np

from firmware_sim.board import Board
from firmware_sim.link_board import LinkBoard, profile, serve_url
from firmware_sim.sources import BytesSource, VirtualSource
from formats.arch import RwkvVersion
from host.link.protocol import Timeouts
from host.link.relay import Relay, SocketRelay, pty_cable
from host.model import Model
from host.plan import make_plan
from host.stream import VirtualStream
from host.stream.writer import write_stream
from host.synth import SyntheticCheckpoint, synth_hparams

# Short, fixed timeouts: an unpaced loopback answers in well under a millisecond.
FAST = Timeouts(reply=0.08, handshake=0.25, retries=4)


def synth_model(seed=1) -> Model:
    hp = synth_hparams(RwkvVersion.V7, 64, 2, 256, ffn_size=128, head_size=32)
    return Model(SyntheticCheckpoint(hp, seed=seed))


def virtual_source(model, quant="Q8_0"):
    return VirtualSource(VirtualStream(model, make_plan(model, quant)))


def stream_bytes(model, quant="Q8_0") -> bytes:
    buf = io.BytesIO()
    write_stream(VirtualStream(model, make_plan(model, quant)), buf)
    return buf.getvalue()


def reference_logits(data: bytes, tokens) -> np.ndarray:
    """The same model read from a file, on the plain simulator: logits after `tokens`."""
    board = Board(BytesSource(data))
    for t in tokens:
        logits = board.eval(t)
    return logits.copy()


class Rig:
    """kind 'pty' or 'socket'; to_board / to_host: Faults for each direction."""

    def __init__(self, kind="pty", *, to_board=None, to_host=None, board="sim", flash=None,
                 timeouts=FAST, seed=0, rate=None, latency=0.0, **profile_kw):
        self.board = LinkBoard(profile(board, **profile_kw), flash_path=flash,
                               timeouts=timeouts)
        self.stop = threading.Event()
        self.kind = kind
        relay_kw = dict(rate=rate, latency=latency, seed=seed)
        if kind == "pty":
            board_path, self.url, relay = pty_cable(faults_ab=to_host, faults_ba=to_board,
                                                    **relay_kw)
            self.relays = [relay]
            target, self._socket_relay = board_path, None
            started = threading.Event()
            self.thread = threading.Thread(
                target=serve_url, args=(self.board, board_path),
                kwargs=dict(stop=self.stop, ready=lambda _: started.set()), daemon=True)
            self.thread.start()
            started.wait(5)
        else:
            got = {}
            started = threading.Event()

            def ready(port):
                got["port"] = port
                started.set()
            self.thread = threading.Thread(
                target=serve_url, args=(self.board, "socket://127.0.0.1:0"),
                kwargs=dict(stop=self.stop, ready=ready), daemon=True)
            self.thread.start()
            started.wait(5)
            self._socket_relay = SocketRelay(
                ("127.0.0.1", got["port"]),
                lambda host_end, board_end: Relay(host_end, board_end, to_board, to_host,
                                                  **relay_kw))
            self.relays = self._socket_relay.relays
            self.url = self._socket_relay.url

    @property
    def relay(self) -> Relay:
        return self.relays[-1]

    def faults_injected(self) -> int:
        return sum(r.faults_injected for r in self.relays)

    def close(self):
        self.stop.set()
        if self._socket_relay:
            self._socket_relay.close()
        else:
            for r in self.relays:
                r.stop()
                for fd in r.slaves:
                    try:
                        import os
                        os.close(fd)
                    except OSError:
                        pass
        self.thread.join(5)
        self.board.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
