"""`rwkv-stream bench convert`: checkpoint -> stream throughput next to the bare quantizer.

Both measured in one process: converting a synthetic RWKV-4 169M-shaped FP16 checkpoint into a
stream (read, dequantize FP16, quantize, CRC, write) and quantizing the same matrices' float32
values with nothing else. Throughput is MB/s of the FP16 source. Peak memory is what
tracemalloc (which sees numpy's allocations) records above the baseline after imports and
kernel warm-up, next to the target: 2 x the largest tensor as float32 + 32 MB.
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


def run(quants=("Q5_1", "Q4_0"), n_layer: int = 12, workdir=None) -> list[dict]:
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
            # bare quantizer: the same matrices, already float32 in memory
            t_bare = 0.0
            for t in quantized:
                x = t.values()
                t0 = time.perf_counter()
                qt.quantize(x)
                t_bare += time.perf_counter() - t0
            bare_mb = sum(t.source.nbytes for t in quantized) / 1e6
            largest = max(4 * int(np.prod(t.shape)) for t in model)
            # the pipeline alone (to /dev/null), then to a real file
            t0 = time.perf_counter()
            with open(os.devnull, "wb") as f:
                write_stream(VirtualStream(model, plan), f)
            seconds = time.perf_counter() - t0
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
             f"{'bare quantize MB/s':>18} {'ratio':>6} {'peak MB':>8} {'target':>7} "
             f"{'stream MB':>9}"]
    for r in rows:
        lines.append(f"{r['quant']:<6} {r['source_mb']:>9} {r['convert_mb_s']:>12} "
                     f"{r['to_file_mb_s']:>8} "
                     f"{r['bare_quantize_mb_s']:>18} {r['ratio']:>5}x {r['peak_mb']:>8} "
                     f"{r['target_peak_mb']:>7} {r['stream_mb']:>9}")
    lines.append("(convert = to /dev/null, to file = to a file in the temp folder; MB/s of the FP16 source for convert; of the quantized matrices' FP16 bytes for "
                 "the bare quantizer fed float32; ratio = bare / convert; peak = tracemalloc "
                 "above baseline)")
    return "\n".join(lines)
