"""`rwkv-stream bench run`: simulated-board tokens/s next to a dense numpy forward, one run.

Models: synthetic RWKV-4 169M-shaped (n_embd 768, 12 layers, vocab 50277) and an RWKV-7 of the
same width. Streams are files; the board reads them through its chunk buffer in int8 and float
modes. The yardstick is tests/reference_forward.py (plain numpy, float64, whole model in
memory), timed in the same process. Peak memory is tracemalloc's peak above the baseline after
imports and warm-up, next to the board's RAM budget.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from firmware_sim.board import Board
from firmware_sim.sources import FileSource
from formats.arch import RwkvVersion
from formats.errors import UsageError

from .model import Model
from .plan import make_plan
from .stream import VirtualStream
from .stream.writer import write_stream
from .synth import SyntheticCheckpoint, synth_hparams

TOKENS = [187, 510, 1563, 310, 247, 4, 9, 1000]


def _reference_class():
    tests = Path(__file__).resolve().parent.parent / "tests"
    if not (tests / "reference_forward.py").exists():
        raise UsageError("bench run compares against tests/reference_forward.py: run it from a "
                         "source checkout")
    sys.path.insert(0, str(tests))
    from reference_forward import ReferenceRWKV
    return ReferenceRWKV


def _time_board(path, mode, chunk, n_tokens, check_crc, xip=False):
    board = Board(FileSource(path), chunk=chunk, mode=mode, check_crc=check_crc, xip=xip)
    board.eval(TOKENS[0])                                        # warm-up (kernels compiled)
    read0 = board.source.bytes_read
    t0 = time.perf_counter()
    for t in TOKENS[1:1 + n_tokens]:
        board.eval(t)
    seconds = (time.perf_counter() - t0) / n_tokens
    per_token = (board.source.bytes_read - read0) // n_tokens
    # memory on a separate token: tracemalloc slows every allocation down, so not while timing
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    board.eval(TOKENS[-1])
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    ram = board.ram_needed
    board.close()
    return seconds, peak, per_token, ram


def run(repeat: int = 3, quants=("F16", "Q8_0", "Q5_1", "Q4_0", "Q4_K"), chunk: int = 64 << 10,
        versions=(RwkvVersion.V4, RwkvVersion.V7), n_layer: int = 12) -> list[dict]:
    Reference = _reference_class()
    rows = []
    tmp = tempfile.mkdtemp()
    try:
        for version in versions:
            hp = synth_hparams(version, 768, n_layer, 50277)
            model = Model(SyntheticCheckpoint(hp, seed=2))
            ref = Reference({t.name: t.values() for t in model}, version.label)
            state = ref.init_state()
            ref.forward(TOKENS[0], state)
            t0 = time.perf_counter()
            for t in TOKENS[1:1 + repeat]:
                _, state = ref.forward(t, state)
            ref_seconds = (time.perf_counter() - t0) / repeat
            del ref
            for q in quants:
                path = os.path.join(tmp, f"v{version.label}-{q}.rwks")
                with open(path, "wb") as f:
                    write_stream(VirtualStream(model, make_plan(model, q, ["head.weight=" + q])),
                                 f)
                for mode, xip in (("int8", False), ("int8", True), ("float", False)):
                    s, peak, per_token, ram = _time_board(path, mode, chunk, repeat, True, xip)
                    rows.append(dict(model=f"v{version.label} 768x{n_layer}", quant=q,
                                     mode=mode + (" xip" if xip else ""),
                                     ms_per_token=round(1e3 * s, 2),
                                     tokens_per_s=round(1 / s, 2),
                                     reference_ms=round(1e3 * ref_seconds, 1),
                                     speedup=round(ref_seconds / s, 2),
                                     mb_read_per_token=round(per_token / 1e6, 1),
                                     ram_kib=round(ram / 1024, 1),
                                     peak_mib=round(peak / 2**20, 2)))
                os.unlink(path)
    finally:
        os.rmdir(tmp)
    return rows


def format_table(rows) -> str:
    lines = [f"{'model':<12} {'quant':<5} {'mode':<8} {'ms/token':>9} {'tok/s':>7} "
             f"{'numpy ms':>9} {'speedup':>8} {'MB/token':>9} {'RAM KiB':>8} {'peak MiB':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<12} {r['quant']:<5} {r['mode']:<8} {r['ms_per_token']:>9} "
                     f"{r['tokens_per_s']:>7} {r['reference_ms']:>9} {r['speedup']:>7}x "
                     f"{r['mb_read_per_token']:>9} {r['ram_kib']:>8} {r['peak_mib']:>9}")
    lines.append("(one thread; streams read from a file through a 64 KiB chunk buffer (xip: "
                 "read in place from the memory-mapped file, as from XIP flash), CRCs "
                 "checked on the first (warm-up) pass; head quantized like the other matrices; numpy = tests/reference_forward.py, "
                 "float64, dense, in memory; peak = tracemalloc above the post-warm-up baseline)")
    return "\n".join(lines)
