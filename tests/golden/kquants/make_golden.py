"""Regenerate the k-quant golden blocks in this directory from ggml's C reference quantizers.

    python tests/golden/kquants/make_golden.py /path/to/harness

`harness` is a small C program built from ggml's ggml-quants.c reference functions
(`quantize_row_q{2,3,4,5,6}_K_ref` with `nearest_int`, `make_qx_quants`, `make_q3_quants`,
`make_qkx2_quants`, `get_scale_min_k4`, GROUP_MAX_EPS = 1e-15f) and a main() that reads raw
little-endian float32 values and writes the blocks:

    harness TYPE in.f32 out.bin        # TYPE: q2_k q3_k q4_k q5_k q6_k

built on x86-64 with `gcc -O2 -ffp-contract=off -fno-fast-math harness.c -lm` (float32
arithmetic, no FMA contraction; fp16 stores round to nearest even via _Float16, as F16C does).
ggml's code is not part of this repository; the harness lives outside it. The test
(tests/test_kquants.py) only reads the files written here:

    inputs.npy     float32[N_CASES, 256 * BLOCKS]  the source rows (seeded, see CASES)
    q6_k.npy ...   uint8[N_CASES, BLOCKS * block_bytes]  ggml's blocks for each row
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BLOCKS = 4
N = 256 * BLOCKS
TYPES = ("q6_k", "q4_k", "q5_k", "q3_k", "q2_k")


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(20261126)
    f = np.float32
    out = [
        rng.standard_normal(N).astype(f),                               # plain gaussian
        (rng.standard_normal(N) * 0.02).astype(f),                      # weight-like scale
        rng.uniform(0.0, 1.0, N).astype(f),                             # all positive
        (-rng.uniform(0.0, 1.0, N)).astype(f),                          # all negative
        rng.integers(-4, 5, N).astype(f),                               # ties in nearest_int
        (rng.standard_normal(N) * 1e4).astype(f),                       # large
        (rng.standard_normal(N) * 1e8).astype(f),                       # fp16 scale overflow
        (rng.standard_normal(N) * 1e-6).astype(f),                      # small
    ]
    x = rng.standard_normal(N).astype(f)                                 # outliers
    x[rng.integers(0, N, 24)] *= 40
    out.append(x)
    x = rng.standard_normal(N).astype(f)                                 # zeros and ~zeros
    x[:256] = 0.0                                                        # a whole zero block
    x[256:272] = 0.0                                                     # a zero 16-group
    x[288:320] = 1e-20                                                   # below GROUP_MAX_EPS
    x[512:544] = 0.75                                                    # a constant group
    x[600:610] = -0.0
    x[768:] = rng.standard_normal(256).astype(f) * f(1e-39)              # subnormals
    out.append(x)
    return out


def main(harness: str) -> None:
    inputs = np.stack(_cases())
    np.save(HERE / "inputs.npy", inputs)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.f32", Path(tmp) / "out.bin"
        for t in TYPES:
            rows = []
            for x in inputs:
                x.astype("<f4").tofile(src)
                subprocess.run([harness, t, str(src), str(dst)], check=True)
                rows.append(np.fromfile(dst, dtype=np.uint8))
            np.save(HERE / f"{t}.npy", np.stack(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kq/harness")
