"""`rwkv-stream bench sequence`: fewer passes over the weights, measured.

Synthetic RWKV-4 169M-shaped model (n_embd 768, 12 layers, vocab 50277) at Q4_0, stream read
from a file through a 64 KiB chunk. One run: a 64-token prompt in serial mode (one pass per
token) and in sequence mode (16 and 64 tokens per pass), and batches of 1, 4 and 16 sequences
advancing one token each. Bytes read per token and wall time per token.
"""
from __future__ import annotations

import os
import tempfile
import time

from firmware_sim.board import Board
from firmware_sim.sources import FileSource
from formats.arch import RwkvVersion

from .model import Model
from .plan import make_plan
from .stream import VirtualStream
from .stream.writer import write_stream
from .synth import SyntheticCheckpoint, synth_hparams

PROMPT = [(7 * i + 3) % 50277 for i in range(64)]


def _measure(path, columns, batch, steps, mode):
    board = Board(FileSource(path), chunk=64 << 10, mode=mode, check_crc=False,
                  columns=columns, batch=batch)
    board.eval_batch([1] * columns) if batch else board.eval(1)      # warm-up
    board.reset()
    read0, t0 = board.source.bytes_read, time.perf_counter()
    if batch:
        for t in range(steps):
            board.eval_batch([PROMPT[(t + n) % 64] for n in range(columns)])
        tokens = steps * columns
    else:
        board.eval_sequence(PROMPT)
        tokens = len(PROMPT)
    seconds = time.perf_counter() - t0
    return dict(mode=("batch" if batch else "sequence" if columns > 1 else "serial"),
                columns=columns, passes=board.passes - 1, tokens=tokens,
                mb_read_per_token=round((board.source.bytes_read - read0) / tokens / 1e6, 2),
                ms_per_token=round(1e3 * seconds / tokens, 2), ram_kib=round(
                    board.ram_needed / 1024, 1))


def run(quant: str = "Q4_0", n_layer: int = 12, mode: str = "int8", steps: int = 4):
    hp = synth_hparams(RwkvVersion.V4, 768, n_layer, 50277)
    model = Model(SyntheticCheckpoint(hp, seed=4))
    fd, path = tempfile.mkstemp(suffix=".rwks")
    try:
        with os.fdopen(fd, "wb") as f:
            write_stream(VirtualStream(model, make_plan(model, quant, ["head.weight=" + quant])),
                         f)
        rows = [_measure(path, 1, False, 0, mode), _measure(path, 16, False, 0, mode),
                _measure(path, 64, False, 0, mode)]
        rows += [_measure(path, b, True, steps, mode) for b in (1, 4, 16)]
    finally:
        os.unlink(path)
    return rows


def format_table(rows) -> str:
    lines = [f"{'mode':<9} {'K':>3} {'passes':>6} {'tokens':>6} {'MB read/token':>13} "
             f"{'ms/token':>9} {'RAM KiB':>8}"]
    for r in rows:
        lines.append(f"{r['mode']:<9} {r['columns']:>3} {r['passes']:>6} {r['tokens']:>6} "
                     f"{r['mb_read_per_token']:>13} {r['ms_per_token']:>9} {r['ram_kib']:>8}")
    lines.append("(synthetic RWKV-4 169M shape, Q4_0 incl. head, int8 mode, one thread, stream "
                 "file through a 64 KiB chunk; K = tokens per pass over the weights)")
    return "\n".join(lines)
