"""`rwkv-stream bench types`: the k-quants and QX next to Q4_0, in one run.

Part 1, kernels: the same float32 matrix (standard normal, with 1 % of the weights scaled by 12
so that outliers matter), best of `repeat` runs. MB/s is of float32 values (4 bytes per
weight), as in `bench quantize`; QX's quantizer uses a thread per core, every other kernel
one thread. The dot kernels are ns per weight for one full matvec over the matrix
(`matvec_blocks` over all blocks, the activation prepared once), in float and int8 mode,
with the ratio to Q4_0.

Part 2, simulator: a synthetic RWKV-4 (n_embd 512, 4 layers, vocabulary 4096, every matrix
including the head in the type) written as a stream file per type, then ms per token on the
board in int8 and float mode.

    python -m host.bench_types [--rows R] [--cols C] [--repeat N] [--no-sim] [TYPE ...]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from formats import quants, qx

DEFAULT_TYPES = ("Q4_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "QX:bpw=4.5",
                 "QX:bs=32,bpw=4.5", "QX:bpw=3.5", "QX:err=0.05")


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _matvec_ns(t, body, rows, cols, x, repeat, int8_mode):
    n = cols
    xf, xq = np.zeros(n, np.float32), np.zeros(n, np.int8)
    xd, xs = np.zeros(n // 32, np.float32), np.zeros(n // 32, np.float32)
    out = np.zeros(rows, np.float32)
    t.prepare_activation(int8_mode, x, xf, xq, xd, xs)
    bpr = cols // t.block_size

    def run():
        out[:] = 0
        t.matvec_blocks(int8_mode, body, rows * bpr, 0, bpr, xf, xq, xd, xs, out)
    return _best(run, repeat) / (rows * cols) * 1e9, out.copy()


def run(rows: int = 1024, cols: int = 4096, repeat: int = 3, types=DEFAULT_TYPES,
        simulator: bool = True):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    spikes = rng.choice(w.size, w.size // 100, replace=False)
    w.reshape(-1)[spikes] *= np.float32(12)
    x = rng.standard_normal(cols).astype(np.float32)
    mb = w.nbytes / 1e6
    exact = w.astype(np.float64) @ x.astype(np.float64)
    results = []
    types = ("Q4_0",) + tuple(t for t in types if t != "Q4_0")
    for name in types:
        t = quants.by_name(name)
        t.dequantize(t.quantize(w[:2, :256]), (2, 256))              # compile / load the cache
        tq = _best(lambda: t.quantize(w), 1 if t.variable else repeat)
        data = t.quantize(w)
        td = _best(lambda: t.dequantize(data, w.shape), repeat)
        y = t.dequantize(data, w.shape)
        flat = np.ascontiguousarray(data.reshape(-1))
        body = flat[4 * (rows + 1):] if t.variable else flat
        row = dict(type=name, bpw=8 * flat.size / w.size, quant_mb_s=mb / tq, deq_mb_s=mb / td,
                   rmse=float(np.sqrt(np.mean((y.astype(np.float64) - w) ** 2))),
                   max_err=float(np.abs(y - w).max()))
        for mode, key in ((False, "float"), (True, "int8")):
            ns, out = _matvec_ns(t, body, rows, cols, x, repeat, mode)
            row[key + "_ns"] = ns
            row[key + "_dot_err"] = float(np.sqrt(np.mean((out - exact) ** 2)))
        results.append(row)
    base = results[0]
    for r in results:
        r["float_ratio"] = r["float_ns"] / base["float_ns"]
        r["int8_ratio"] = r["int8_ns"] / base["int8_ns"]
    if simulator:
        for r, sim in zip(results, _simulator(types, repeat)):
            r.update(sim)
    return results


def _simulator(types, repeat: int):
    import tempfile

    from firmware_sim.board import Board
    from firmware_sim.sources import FileSource
    from formats.arch import RwkvVersion

    from .model import Model
    from .plan import make_plan
    from .stream import VirtualStream
    from .stream.writer import write_stream
    from .synth import SyntheticCheckpoint, synth_hparams
    model = Model(SyntheticCheckpoint(synth_hparams(RwkvVersion.V4, 512, 4, 4096), seed=2))
    tokens = [1, 50, 300, 7, 4000, 12]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in types:
            path = os.path.join(tmp, "m.rwks")
            with open(path, "wb") as f:
                write_stream(VirtualStream(model, make_plan(model, name, ["head.weight=" + name])),
                             f)
            row = dict(stream_bytes=os.path.getsize(path))
            for mode in ("int8", "float"):
                board = Board(FileSource(path), mode=mode, chunk=16384)
                board.eval(tokens[0])                       # warm-up, CRCs checked once
                best = _best(lambda: [board.eval(t) for t in tokens], repeat)
                row[f"{mode}_ms_token"] = best / len(tokens) * 1e3
                board.close()
            out.append(row)
    base = out[0]
    for r in out:
        r["sim_int8_ratio"] = r["int8_ms_token"] / base["int8_ms_token"]
    return out


def format_table(rows) -> str:
    head = (f"{'type':<34} {'bpw':>6} {'rmse':>7} {'quant MB/s':>10} {'deq MB/s':>9} "
            f"{'float ns/w':>10} {'x Q4_0':>7} {'int8 ns/w':>9} {'x Q4_0':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['type']:<34} {r['bpw']:>6.3f} {r['rmse']:>7.4f} {r['quant_mb_s']:>10.1f} "
                     f"{r['deq_mb_s']:>9.0f} {r['float_ns']:>10.3f} {r['float_ratio']:>6.2f}x "
                     f"{r['int8_ns']:>9.3f} {r['int8_ratio']:>6.2f}x")
    lines.append(f"(MB/s of float32 values; ns per weight of one matvec on one thread; QX "
                 f"quantize timed once, on {os.cpu_count()} cores)")
    if rows and "int8_ms_token" in rows[0]:
        lines += ["", f"{'simulator: v4 512x4, vocab 4096':<34} {'stream bytes':>12} "
                      f"{'int8 ms/token':>13} {'x Q4_0':>7} {'float ms/token':>14}"]
        for r in rows:
            lines.append(f"{r['type']:<34} {r['stream_bytes']:>12,} {r['int8_ms_token']:>13.2f} "
                         f"{r['sim_int8_ratio']:>6.2f}x {r['float_ms_token']:>14.2f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-sim", action="store_true", help="kernels only (skip part 2)")
    ap.add_argument("types", nargs="*", default=list(DEFAULT_TYPES),
                    help="types, e.g. Q4_K 'QX:bs=32,bpw=3.5' QX:err=0.05")
    a = ap.parse_args(argv)
    print(format_table(run(a.rows, a.cols, a.repeat, a.types, simulator=not a.no_sim)))


if __name__ == "__main__":
    main()
