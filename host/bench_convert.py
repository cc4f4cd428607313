"""`rwkv-stream bench convert`: checkpoint -> stream throughput next to the bare quantizer.

Both measured in one process, on one thread, on the same data: converting a synthetic RWKV-4
169M-shaped FP16 checkpoint into a stream (read the mmapped FP16 bytes, quantize, CRC, write)
and quantizing the same matrices' float32 values, already in memory, with nothing else. The
two alternate `repeat` times and each keeps its best time (the same treatment for both, so
that another process's burst on a shared machine does not decide the ratio).

Throughput is MB/s of the FP16 source. `ratio` is the issue's measure: the bare quantizer's
MB/s over the conversion's MB/s of the whole source (which includes the FP16 embedding and
head, copied through). `strict` charges the conversion's whole time to the quantized matrices
alone: conversion seconds / bare quantize seconds of the same matrices. Peak memory is what
tracemalloc (which sees numpy's allocations) records above the baseline after imports and
kernel warm-up during the conversion to a file, next to the target: 2 x the largest tensor as
float32 + 32 MB.
"""
from __future__ import annotations

import os
import tempfile
import time
import tracemalloc

import numpy as np

from formats.arch import RwkvVersion
from formats.quants import by_name

from .bin_writer import write_bin
from .encode import encode_rows
from .model import Model, load_model
from .plan import make_plan
from .stream import VirtualStream
from .stream.writer import write_stream
from .synth import SyntheticCheckpoint, synth_hparams


def make_169m_fp16(path, n_layer: int = 12) -> None:
    hp = synth_hparams(RwkvVersion.V4, 768, n_layer, 50277)
    model = Model(SyntheticCheckpoint(hp, seed=1))
    f16 = by_name("F16")
    with open(path, "wb") as f:
        write_bin(model, make_plan(model, f16), f16, f)


def run(quants=("Q5_1", "Q4_0"), n_layer: int = 12, workdir=None, repeat: int = 3) -> list[dict]:
    tmp = tempfile.mkdtemp(dir=workdir)
    src = os.path.join(tmp, "rwkv4-169m-shaped-FP16.bin")
    make_169m_fp16(src, n_layer)
    model = load_model(src)
    rows = []
    try:
        source_mb = os.path.getsize(src) / 1e6
        for q in quants:
            qt = by_name(q)
            qt.quantize(np.zeros((1, 32), np.float32))                  # warm the kernels up
            plan = make_plan(model, q)
            quantized = [t for t in model if plan[t.name] is qt]
            for t in quantized[:1]:                                     # and the fused path
                encode_rows(t, qt, 0, 1)
            bare_mb = sum(t.source.nbytes for t in quantized) / 1e6
            largest = max(4 * int(np.prod(t.shape)) for t in model)
            t_bare = seconds = float("inf")
            for _ in range(max(1, repeat)):
                # bare quantizer: the same matrices, already float32 in memory
                spent = 0.0
                for t in quantized:
                    x = t.values()
                    t0 = time.perf_counter()
                    qt.quantize(x)
                    spent += time.perf_counter() - t0
                    del x
                t_bare = min(t_bare, spent)
                # the pipeline alone (to /dev/null)
                t0 = time.perf_counter()
                with open(os.devnull, "wb") as f:
                    write_stream(VirtualStream(model, plan), f)
                seconds = min(seconds, time.perf_counter() - t0)
            # then to a real file, once, with tracemalloc watching
            out = os.path.join(tmp, f"out-{q}.rwks")
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            with open(out, "wb") as f:
                write_stream(VirtualStream(model, plan), f)
            file_seconds = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            rows.append(dict(quant=q, source_mb=round(source_mb, 1),
                             convert_mb_s=round(source_mb / seconds, 1),
                             to_file_mb_s=round(source_mb / file_seconds, 1),
                             quantized_mb=round(bare_mb, 1),
                             bare_quantize_mb_s=round(bare_mb / t_bare, 1),
                             ratio=round((bare_mb / t_bare) / (source_mb / seconds), 2),
                             strict_ratio=round(seconds / t_bare, 2),
                             convert_seconds=round(seconds, 4),
                             bare_seconds=round(t_bare, 4),
                             repeat=max(1, repeat),
                             peak_mb=round(peak / 1e6, 1),
                             target_peak_mb=round((2 * largest + (32 << 20)) / 1e6, 1),
                             stream_mb=round(os.path.getsize(out) / 1e6, 1)))
            os.unlink(out)
    finally:
        model.close()
        os.unlink(src)
        os.rmdir(tmp)
    return rows


def format_table(rows) -> str:
    lines = [f"{'quant':<6} {'source MB':>9} {'convert MB/s':>12} {'to file':>8} "
             f"{'bare quantize MB/s':>18} {'ratio':>6} {'strict':>6} {'peak MB':>8} "
             f"{'target':>7} {'stream MB':>9}"]
    for r in rows:
        lines.append(f"{r['quant']:<6} {r['source_mb']:>9} {r['convert_mb_s']:>12} "
                     f"{r['to_file_mb_s']:>8} "
                     f"{r['bare_quantize_mb_s']:>18} {r['ratio']:>5}x {r['strict_ratio']:>5}x "
                     f"{r['peak_mb']:>8} {r['target_peak_mb']:>7} {r['stream_mb']:>9}")
    lines.append("(convert = to /dev/null, to file = to a file in the temp folder; MB/s of the "
                 "FP16 source for convert; of the quantized matrices' FP16 bytes for the bare "
                 "quantizer fed float32; best of "
                 f"{rows[0]['repeat'] if rows else 1} alternated runs each; ratio = bare MB/s / "
                 "convert MB/s (target <= 1.5); strict = convert seconds / bare seconds for the "
                 "same matrices (the whole conversion charged to them); peak = tracemalloc "
                 "above baseline, converting to the file)")
    return "\n".join(lines)
