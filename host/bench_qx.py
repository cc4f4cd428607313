"""QX next to Q4_0: size, error, quantize/dequantize speed and the board's dot kernels.

Everything runs in one process on the same float32 matrix (standard normal, with 1 % of the
weights scaled by 12 so that outliers matter), one thread, best of `repeat` runs. MB/s is of
float32 values (4 bytes per weight), as in `rwkv-stream bench quantize`; the dot kernels are
ns per weight for one full matvec over the matrix (`matvec_blocks` over all blocks, the
activation prepared once), in float and int8 mode, with QX/Q4_0 as a ratio.

    python -m host.bench_qx [--rows R] [--cols C] [--repeat N] [QX options ...]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from formats import quants, qx

DEFAULT_VARIANTS = ("bpw=4.5", "bs=64,bpw=4.5", "bpw=3.5", "err=0.05")


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


def run(rows: int = 1024, cols: int = 4096, repeat: int = 3, variants=DEFAULT_VARIANTS):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    spikes = rng.choice(w.size, w.size // 100, replace=False)
    w.reshape(-1)[spikes] *= np.float32(12)
    x = rng.standard_normal(cols).astype(np.float32)
    mb = w.nbytes / 1e6
    exact = w.astype(np.float64) @ x.astype(np.float64)
    results = []
    for name in ("Q4_0",) + tuple("QX:" + v for v in variants):
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
    return results


def format_table(rows) -> str:
    head = (f"{'type':<34} {'bpw':>6} {'rmse':>7} {'quant MB/s':>10} {'deq MB/s':>9} "
            f"{'float ns/w':>10} {'x Q4_0':>7} {'int8 ns/w':>9} {'x Q4_0':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['type']:<34} {r['bpw']:>6.3f} {r['rmse']:>7.4f} {r['quant_mb_s']:>10.1f} "
                     f"{r['deq_mb_s']:>9.0f} {r['float_ns']:>10.3f} {r['float_ratio']:>6.2f}x "
                     f"{r['int8_ns']:>9.3f} {r['int8_ratio']:>6.2f}x")
    lines.append("(MB/s of float32 values; ns per weight of one matvec; one thread; "
                 "QX quantize timed once)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS),
                    help="QX options, e.g. bpw=4.5 'bs=64,bpw=3.5' err=0.05")
    a = ap.parse_args(argv)
    print(format_table(run(a.rows, a.cols, a.repeat, a.variants)))


if __name__ == "__main__":
    main()
