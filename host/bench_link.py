"""`rwkv-stream bench link`: the serial link through a relay that paces bytes like a real cable.

Links: a 921600-baud UART (92,160 B/s, 8N1) and USB full speed (~1 MB/s) with a 1 ms
turnaround each way. For each: payload bytes / wire bytes at the default frame size, achieved
throughput as a fraction of the raw rate for install and for live, and tokens/s of a
live-streamed tiny model next to `plan`'s prediction (bytes per token / link rate).
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from firmware_sim.link_board import LinkBoard, profile, serve_url
from firmware_sim.profiles import BoardProfile
from formats.arch import RwkvVersion

from .link import protocol as P
from .link.host import HostSession
from .link.relay import pty_cable
from .model import Model
from .plan import make_plan
from .plan_cmd import plan
from .run_cmd import open_source
from .stream import VirtualStream
from .stream.writer import write_stream
from .synth import SyntheticCheckpoint, synth_hparams

LINKS = [("uart-921600", 921600 / 10, 0.0), ("usb-fs", 1.0e6, 0.001)]


def _model_file(folder: Path) -> Path:
    hp = synth_hparams(RwkvVersion.V7, 64, 2, 256, ffn_size=128, head_size=32)
    model = Model(SyntheticCheckpoint(hp, seed=1))
    path = folder / "bench.rwks"
    with open(path, "wb") as f:
        write_stream(VirtualStream(model, make_plan(model, "Q8_0")), f)
    return path


def _settle(relay, quiet=0.1):
    """Wait until nothing is left in the relay's queues (bytes stop moving)."""
    last = None
    while last != tuple(relay.bytes):
        last = tuple(relay.bytes)
        time.sleep(quiet)


def _one_link(name, rate, latency, path, tokens, folder):
    bp, url, relay = pty_cable(rate=rate, latency=latency)
    board = LinkBoard(profile("sim"), flash_path=str(folder / f"{name}.flash"))
    stop = threading.Event()
    th = threading.Thread(target=serve_url, args=(board, bp), kwargs=dict(stop=stop),
                          daemon=True)
    th.start()
    baud = int(rate * 10)
    row = dict(link=name, rate_bytes_per_s=rate, turnaround_ms=latency * 1e3,
               frame_payload=P.DEFAULT_MAX_PAYLOAD, window=P.DEFAULT_WINDOW)
    try:
        time.sleep(0.05)
        with HostSession(url, baud) as h:
            h.hello()
            src = open_source(path)
            w0 = list(relay.bytes)
            res = h.install(src)
            wire = [relay.bytes[i] - w0[i] for i in (0, 1)]
            row.update(stream_bytes=res["size"], install_s=res["seconds"],
                       install_efficiency=round(res["size"] / sum(wire), 4),
                       install_efficiency_data_direction=round(res["size"] / wire[1], 4),
                       install_throughput=round(res["size"] / res["seconds"] / rate, 3))
            h.live(open_source(path))
            _settle(relay)
            served0, w0 = h.served, list(relay.bytes)
            t0 = time.perf_counter()
            h.eval(tokens)
            dt = time.perf_counter() - t0
            _settle(relay)
            served = h.served - served0
            wire = [relay.bytes[i] - w0[i] for i in (0, 1)]
            row.update(live_bytes_per_token=served // len(tokens),
                       live_efficiency=round(served / sum(wire), 4),
                       live_throughput=round(served / dt / rate, 3),
                       live_tokens_per_s=round(len(tokens) / dt, 3),
                       retransmits=h.link.stats["retransmits"])
    finally:
        stop.set()
        relay.stop()
        th.join(5)
        board.close()
    return row


def run(tokens=(1, 2, 3)) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _model_file(folder)
        for name, rate, latency in LINKS:
            row = _one_link(name, rate, latency, path, list(tokens), folder)
            prof = BoardProfile("bench", sram=64 << 20, flash=1 << 30, clock_mhz=0,
                                links={name: rate})
            predicted = plan(path, prof)["tokens_per_second"][f"link {name}"]
            row["plan_tokens_per_s"] = predicted
            rows.append(row)
    return rows


def format_table(rows) -> str:
    out = [f"stream {rows[0]['stream_bytes']:,} bytes (synthetic RWKV v7, Q8_0); frame payload "
           f"{rows[0]['frame_payload']} bytes, window {rows[0]['window']}; efficiency = payload"
           " / wire bytes (both directions), throughput = payload rate / raw rate",
           f"{'link':<12} {'raw B/s':>9} {'install eff':>11} {'install thr':>11} "
           f"{'live eff':>9} {'live thr':>9} {'tok/s':>7} {'plan tok/s':>10}"]
    for r in rows:
        out.append(f"{r['link']:<12} {r['rate_bytes_per_s']:>9,.0f} "
                   f"{r['install_efficiency']:>11.4f} {r['install_throughput']:>11.3f} "
                   f"{r['live_efficiency']:>9.4f} {r['live_throughput']:>9.3f} "
                   f"{r['live_tokens_per_s']:>7.3f} {r['plan_tokens_per_s']:>10.3f}")
    return "\n".join(out)


if __name__ == "__main__":
    print(format_table(run()))
