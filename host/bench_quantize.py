"""`rwkv-stream bench quantize`: this project's block-quant kernels against gguf-py's numpy ones.

Both run in the same process on the same float32 matrix, one thread, best of `repeat` runs.
Throughput is MB/s of float32 values (4 bytes per element) for both directions, so quantize and
dequantize numbers are comparable. `same` says whether both produced identical bytes / values.
gguf-py has no k-quant quantizer: for Q4_K and Q6_K only our quantizer is timed (gguf and ratio
None) and both dequantize our blocks.
"""
from __future__ import annotations

import time

import numpy as np

from formats import quants
from formats.errors import UsageError

BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K")


def _best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _gguf_quantizes(gguf_quants, gt) -> bool:
    """Whether gguf-py has a quantizer for this type (0.19 has none for the k-quants)."""
    return "quantize_blocks" in vars(gguf_quants._type_traits[gt])


def run(size: int = 4096, repeat: int = 3) -> list[dict]:
    """Quantize and dequantize a (size, size) float32 matrix with every block type."""
    try:
        import gguf.quants
        from gguf import GGMLQuantizationType
    except ImportError:
        raise UsageError("bench quantize needs the test extras: pip install -e .[test]") from None
    if size <= 0 or size % 32:
        raise UsageError(f"bench quantize needs a positive size that is a multiple of 32, "
                         f"got {size}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size), dtype=np.float32)
    mb = x.nbytes / 1e6
    rows = []
    for name in BLOCK_TYPES:
        qt = quants.by_name(name)
        if size % qt.block_size:
            continue                  # k-quants: rows must be whole 256-value super-blocks
        gt = GGMLQuantizationType[name]
        bs = qt.block_size
        qt.dequantize(qt.quantize(x[:1, :bs]), (1, bs))          # warm up (compile or load cache)

        ours_q = qt.quantize(x)
        t_ours = _best_seconds(lambda: qt.quantize(x), repeat)
        if _gguf_quantizes(gguf.quants, gt):
            ref_q = gguf.quants.quantize(x, gt)
            t_ref = _best_seconds(lambda: gguf.quants.quantize(x, gt), repeat)
            rows.append(dict(type=name, op="quantize", mb=mb, ours_mb_s=mb / t_ours,
                             gguf_mb_s=mb / t_ref, ratio=t_ref / t_ours,
                             same=bool(np.array_equal(ours_q, ref_q))))
        else:               # k-quants: gguf-py cannot quantize them (compared with ggml's C
            ref_q = ours_q  # golden blocks in tests/test_kquants.py instead)
            rows.append(dict(type=name, op="quantize", mb=mb, ours_mb_s=mb / t_ours,
                             gguf_mb_s=None, ratio=None, same=None))

        ours_d = qt.dequantize(ref_q, x.shape)
        ref_d = gguf.quants.dequantize(ref_q, gt)
        t_ours = _best_seconds(lambda: qt.dequantize(ref_q, x.shape), repeat)
        t_ref = _best_seconds(lambda: gguf.quants.dequantize(ref_q, gt), repeat)
        rows.append(dict(type=name, op="dequantize", mb=mb, ours_mb_s=mb / t_ours,
                         gguf_mb_s=mb / t_ref, ratio=t_ref / t_ours,
                         same=bool(np.array_equal(ours_d.view(np.uint32),
                                                  ref_d.view(np.uint32)))))
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of run() as a fixed-width text table."""
    head = f"{'type':<6} {'op':<10} {'ours MB/s':>10} {'gguf MB/s':>10} {'ratio':>7}  same"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["gguf_mb_s"] is None:
            lines.append(f"{r['type']:<6} {r['op']:<10} {r['ours_mb_s']:>10.0f} {'-':>10} "
                         f"{'-':>7}  - (gguf-py has no quantizer)")
            continue
        lines.append(f"{r['type']:<6} {r['op']:<10} {r['ours_mb_s']:>10.0f} "
                     f"{r['gguf_mb_s']:>10.0f} {r['ratio']:>6.1f}x  {'yes' if r['same'] else 'NO'}")
    if rows:
        lines.append(f"(MB/s of float32 values; {rows[0]['mb']:.0f} MB per run, one thread)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(run()))
