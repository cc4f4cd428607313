"""`rwkv-stream demo`: the whole pipeline with no board and no download.

The bundled checkpoint (host/data/) is quantized on the fly, installed over a real pty into a
simulated board's flash (firmware_sim/link_board.py, the same code `board-sim` runs), and the
board generates text from its flash, reading the stream through its small chunk buffer.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from firmware_sim.link_board import LinkBoard, profile, serve_url
from formats.errors import UsageError

from .link.host import HostSession
from .link.relay import pty_cable
from .model import load_model
from .plan import make_plan
from .plan_cmd import plan
from .progress import progress_bar
from .stream import VirtualStream
from .tokenizers import ByteTokenizer

DATA = Path(__file__).resolve().parent / "data"


def bundled_model() -> Path:
    found = sorted(DATA.glob("*.pth"))
    if not found:
        raise UsageError(f"the bundled model is missing from {DATA} (a broken install?)")
    return found[0]


def demo(model_path=None, board_name="rp2350", quant="Q5_1", prompt="The ", n=120,
         say=print, sampler=None) -> dict:
    """`sampler` (host.sampling.Sampler): the host draws each token from the logits the board
    sends back; without it the board generates greedily by itself."""
    from firmware_sim.profiles import get_profile
    from firmware_sim.sources import VirtualSource
    path = Path(model_path) if model_path else bundled_model()
    model = load_model(path)
    hp = model.hparams
    if hp.n_vocab != 256:
        raise UsageError("the demo speaks bytes: it needs a model with a 256-token vocabulary")
    say(f"model: {path.name}: RWKV v{hp.version.label}, {hp.n_layer} layers x {hp.n_embd}, "
        f"{sum(t.source.nbytes for t in model):,} bytes on disk ({path.stat().st_size:,} file)")
    p = plan(path, get_profile(board_name), quant)
    say(f"board: {board_name} ({p['board']['sram'] // 1024} KiB RAM, "
        f"{p['board']['flash'] // 1024} KiB flash): needs {p['ram_needed']:,} bytes of RAM, "
        f"stream {p['stream_bytes']:,} bytes -> {p['storage']}")
    if not p["fits"]:
        raise UsageError(f"the model does not fit the {board_name}: {p.get('why')}")
    source = VirtualSource(VirtualStream(model, make_plan(model, quant)))
    with tempfile.TemporaryDirectory() as tmp:
        board = LinkBoard(profile(board_name), flash_path=os.path.join(tmp, "flash.bin"))
        board_path, host_path, relay = pty_cable()
        stop, started = threading.Event(), threading.Event()
        thread = threading.Thread(target=serve_url, args=(board, board_path), daemon=True,
                                  kwargs=dict(stop=stop, ready=lambda _: started.set()))
        thread.start()
        started.wait(5)
        try:
            with HostSession(host_path) as host:
                info = host.hello()
                say(f"link: {host_path} (a pty) -> simulated {info.name}; quantizing to {quant} "
                    "on the fly while installing")
                with progress_bar(source.size, "install") as bar:
                    result = host.install(source, progress=lambda off, n: bar.update(n))
                say(f"installed {result['size']:,} bytes in {result['seconds']} s, CRC-32 "
                    f"{result['crc32']} confirmed by the board")
                host.hello()
                host.run_flash()
                host.reset()
                tokens = ByteTokenizer().encode(prompt)
                t0 = time.perf_counter()
                if sampler is None:
                    generated = host.eval(tokens, n)
                else:
                    host.eval(tokens)
                    generated = []
                    for _ in range(n):
                        generated.append(sampler(host.logits()))
                        host.eval(generated[-1:])
                seconds = time.perf_counter() - t0
                text = bytes(generated).decode("utf-8", "replace")
                say(f"\n{prompt}{text}\n")
                sim = board.board
                per_token = sim.source.bytes_read / max(sim.tokens, 1) if sim else 0
        finally:
            stop.set()
            relay.stop()
            for fd in relay.slaves:
                os.close(fd)
            thread.join(5)
            board.close()
    rates = dict(p["board"]["links"])
    cost = dict(tokens=len(tokens) + n, seconds=round(seconds, 2),
                bytes_read_per_token=int(per_token), ram_bytes=p["ram_needed"],
                flash_seconds_per_token=round(per_token / p["board"]["flash_read"], 4)
                if p["board"]["flash_read"] else None,
                link_seconds_per_token={k: round(per_token / v, 3) for k, v in rates.items()})
    say(f"cost: {cost['tokens']} tokens in {cost['seconds']} s of simulation; the board read "
        f"{cost['bytes_read_per_token']:,} bytes of flash per token (about "
        f"{cost['flash_seconds_per_token']} s/token at its flash's speed; live over usb-fs it "
        f"would take {cost['link_seconds_per_token'].get('usb-fs')} s/token); RAM "
        f"{cost['ram_bytes']:,} bytes")
    return dict(model=str(path), board=board_name, quant=quant, prompt=prompt, text=text,
                install=result, cost=cost)


def main_demo(args) -> dict:
    say = (lambda *a, **k: None) if args.json else \
        (lambda *a, **k: print(*a, **k, file=sys.stderr if a and str(a[0]).startswith(
            ("model", "board", "link", "installed", "cost")) else sys.stdout))
    sampler = None
    if args.temperature > 0:
        from .sampling import Sampler
        sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    return demo(args.model, args.board, args.quant, args.prompt, args.n, say, sampler)
