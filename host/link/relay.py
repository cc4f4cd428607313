"""A cable between host and board that can misbehave: a fault-injecting, pacing relay.

It copies bytes between two ends (pty masters or sockets), one thread pair per direction. Per
frame (bytes up to a zero delimiter) it may drop a byte, flip a bit, drop, duplicate, reorder
(swap with the next frame) or delay it; it can go silent (or hang up, for sockets) after a given
number of bytes; and it can pace bytes at a line rate with a fixed latency each way, for the
link benchmark. Counters record every fault injected and every byte carried.
"""
from __future__ import annotations

import os
import queue
import random
import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass


@dataclass
class Faults:
    drop_byte: float = 0.0      # probabilities per frame
    flip_bit: float = 0.0
    drop_frame: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    delay_s: float = 0.02
    cut_after: int | None = None   # after this many bytes in this direction, cut the cable
    cut_for: float | None = None   # ... for this many seconds (None: hang up for good)
    start_after: int = 0           # frames passed untouched first
    max_faults: int | None = None  # stop injecting after this many


class FdEnd:
    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd

    def recv(self):
        try:
            return os.read(self.fd, 1 << 16)
        except OSError:
            return b""

    def send(self, data):
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


class SockEnd:
    def __init__(self, sock):
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def fileno(self):
        return self.sock.fileno()

    def recv(self):
        try:
            return self.sock.recv(1 << 16)
        except OSError:
            return b""

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Relay:
    def __init__(self, a, b, faults_ab: Faults | None = None, faults_ba: Faults | None = None,
                 *, rate: float | None = None, latency: float = 0.0, seed: int = 0):
        self.ends = (a, b)
        self.faults = (faults_ab or Faults(), faults_ba or Faults())
        self.rate, self.latency = rate, latency
        self.rng = random.Random(seed)
        self.counts = Counter()
        self.bytes = [0, 0]               # carried a->b, b->a (after faults)
        self.stop_event = threading.Event()
        self.silent_until = 0.0
        self.hung_up = False
        self.threads = []
        self._seen = [0, 0]

    def start(self) -> "Relay":
        for d in (0, 1):
            q = queue.Queue()
            for target in (self._reader, self._writer):
                t = threading.Thread(target=target, args=(d, q), daemon=True)
                t.start()
                self.threads.append(t)
        return self

    def stop(self, close: bool = True, join: bool = True) -> None:
        self.stop_event.set()
        # The threads must be gone before their fds are closed: a reader still polling a closed
        # fd number would read whatever file the process opens next under that number. (A cut
        # from inside a reader closes at once, as a pulled cable does.)
        me = threading.current_thread()
        for t in self.threads if join else ():
            if t is not me:
                t.join(2.0)
        if close:
            for e in self.ends:
                e.close()

    def cut(self, seconds: float | None) -> None:
        self.counts["cuts"] += 1
        if seconds is None:
            self.hung_up = True
            self.stop(join=False)
        else:
            self.silent_until = time.monotonic() + seconds

    @property
    def faults_injected(self) -> int:
        return sum(v for k, v in self.counts.items())

    # -- one direction ---------------------------------------------------------------------
    def _frames(self, d: int, frame: bytes) -> list[bytes]:
        f = self.faults[d]
        c = self.counts
        n_faults = sum(c.values())
        self._seen[d] += 1
        if self._seen[d] <= f.start_after or \
                (f.max_faults is not None and n_faults >= f.max_faults):
            return [frame]
        r = self.rng.random
        if f.drop_frame and r() < f.drop_frame:
            c["drop_frame"] += 1
            return []
        data = bytearray(frame)
        if f.drop_byte and r() < f.drop_byte:
            del data[self.rng.randrange(len(data))]
            c["drop_byte"] += 1
        if f.flip_bit and r() < f.flip_bit and data:
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            c["flip_bit"] += 1
        out = [bytes(data)]
        if f.duplicate and r() < f.duplicate:
            out.append(bytes(data))
            c["duplicate"] += 1
        return out

    def _reader(self, d: int, q: queue.Queue) -> None:
        src = self.ends[d]
        f = self.faults[d]
        buf = bytearray()
        held: list[bytes] = []
        passed = 0
        ser_end = 0.0
        while not self.stop_event.is_set():
            try:
                ready = select.select([src], [], [], 0.005)[0]
            except (OSError, ValueError):
                break
            out: list[bytes] = []
            if ready:
                data = src.recv()
                if not data:
                    break
                if f.cut_after is not None and passed + len(data) > f.cut_after:
                    f.cut_after = None
                    self.cut(f.cut_for)
                    if self.hung_up:
                        break
                passed += len(data)
                if time.monotonic() < self.silent_until:
                    continue
                buf += data
                while True:
                    i = buf.find(0)
                    if i < 0:
                        break
                    frame = bytes(buf[:i + 1])
                    del buf[:i + 1]
                    for piece in self._frames(d, frame):
                        if held:
                            out.append(piece)
                            out.extend(held)
                            held = []
                        elif f.reorder and self.rng.random() < f.reorder and \
                                self._budget_left(f):
                            held = [piece]
                            self.counts["reorder"] += 1
                        else:
                            out.append(piece)
            elif held:
                out, held = held, []
            if not out:
                continue
            data = b"".join(out)
            now = time.monotonic()
            extra = 0.0
            if f.delay and self.rng.random() < f.delay and self._budget_left(f):
                extra = f.delay_s
                self.counts["delay"] += 1
            if self.rate:
                ser_end = max(ser_end, now) + len(data) / self.rate
                q.put((ser_end + self.latency + extra, data))
            else:
                q.put((now + self.latency + extra, data))
        q.put(None)

    def _budget_left(self, f: Faults) -> bool:
        return f.max_faults is None or sum(self.counts.values()) < f.max_faults

    def _writer(self, d: int, q: queue.Queue) -> None:
        dst = self.ends[1 - d]
        while True:
            item = q.get()
            if item is None or self.stop_event.is_set():
                return
            when, data = item
            delay = when - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() < self.silent_until:
                continue
            try:
                dst.send(data)
            except OSError:
                return
            self.bytes[d] += len(data)


# -- set-ups ---------------------------------------------------------------------------------
def pty_cable(**relay_kw):
    """Two ptys joined by a relay: returns (board_path, host_path, relay). Each side opens its
    path with pyserial like any tty."""
    import tty
    ends, paths = [], []
    for _ in range(2):
        master, slave = os.openpty()
        tty.setraw(slave)
        paths.append(os.ttyname(slave))
        ends.append((master, slave))
    relay = Relay(FdEnd(ends[0][0]), FdEnd(ends[1][0]), **relay_kw).start()
    relay.slaves = [s for _, s in ends]       # kept open so the masters never see a hang-up
    return paths[0], paths[1], relay


class SocketRelay:
    """Listens on loopback; every connection is joined to `upstream` through a new Relay made
    by make_relay(client_end, upstream_end)."""

    def __init__(self, upstream: tuple[str, int], make_relay):
        self.upstream = upstream
        self.make_relay = make_relay
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(0.1)
        self.port = self.srv.getsockname()[1]
        self.url = f"socket://127.0.0.1:{self.port}"
        self.relays: list[Relay] = []
        self.stop_event = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop_event.is_set():
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.setblocking(True)
            up = socket.create_connection(self.upstream)
            self.relays.append(self.make_relay(SockEnd(conn), SockEnd(up)).start())

    def close(self):
        self.stop_event.set()
        for r in self.relays:
            r.stop()
        self.srv.close()
