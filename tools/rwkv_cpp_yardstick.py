"""The issue's yardstick, measured side by side: rwkv.cpp and our board on one model, one thread.

rwkv.cpp is not a dependency. This script uses a librwkv.so you built yourself from the PyPI
source package `rwkv_cpp` 0.0.1 (rwkv.cpp of 2023 with its single-file ggml):

    pip download --no-deps rwkv_cpp==0.0.1 && tar xzf rwkv_cpp-0.0.1.tar.gz
    cmake -S rwkv_cpp-0.0.1 -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
    cmake --build build -j2
    python tools/rwkv_cpp_yardstick.py build/librwkv.so

That rwkv.cpp reads file version 100 (its Q4_0 block has a float32 scale, 20 bytes) and, like
today's rwkv.cpp, keeps emb.weight and head.weight unquantized. The model is the `bench run`
one (synthetic RWKV-4, n_embd 768, 12 layers, vocabulary 50277), written by our converter as
FP32 and quantized to Q4_0 by rwkv.cpp itself. Our board runs streams of the same model with
rwkv.cpp's plan (head F32) and with the bench's plan (head Q4_0), int8 mode, from the file
through a 64 KiB chunk and in place (XIP).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware_sim.board import Board                      # noqa: E402
from firmware_sim.sources import FileSource               # noqa: E402
from formats import quants                                # noqa: E402
from formats.arch import RwkvVersion                      # noqa: E402
from host.bin_writer import write_bin                     # noqa: E402
from host.model import Model                              # noqa: E402
from host.plan import make_plan                           # noqa: E402
from host.stream import VirtualStream                     # noqa: E402
from host.stream.writer import write_stream               # noqa: E402
from host.synth import SyntheticCheckpoint, synth_hparams  # noqa: E402

TOKENS = range(2, 12)


def _lib(path):
    lib = ctypes.CDLL(path)
    lib.rwkv_init_from_file.restype = ctypes.c_void_p
    lib.rwkv_init_from_file.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
    lib.rwkv_eval.argtypes = [ctypes.c_void_p, ctypes.c_int32] + [ctypes.c_void_p] * 3
    lib.rwkv_eval.restype = ctypes.c_bool
    lib.rwkv_quantize_model_file.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.rwkv_quantize_model_file.restype = ctypes.c_bool
    for fn in ("rwkv_get_state_buffer_element_count", "rwkv_get_logits_buffer_element_count"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    lib.rwkv_free.argtypes = [ctypes.c_void_p]
    return lib


def _best_ms(step, repeat):
    step(1)                                          # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for t in TOKENS:
            step(t)
        best = min(best, (time.perf_counter() - t0) / len(TOKENS))
    return 1e3 * best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("librwkv", help="librwkv.so built from rwkv_cpp 0.0.1 (see the docstring)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    lib = _lib(args.librwkv)
    model = Model(SyntheticCheckpoint(synth_hparams(RwkvVersion.V4, 768, 12, 50277), seed=2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32, q40 = os.path.join(tmp, "f32.bin"), os.path.join(tmp, "q4_0.bin")
        with open(f32, "wb") as f:
            write_bin(model, make_plan(model, "F32"), quants.by_name("F32"), f)
        with open(f32, "r+b") as f:             # FP32 files are the same in versions 100/101
            f.seek(4)
            f.write(struct.pack("<i", 100))
        if not lib.rwkv_quantize_model_file(f32.encode(), q40.encode(), 2):   # 2: Q4_0
            sys.exit("rwkv.cpp could not quantize the model")
        ctx = lib.rwkv_init_from_file(q40.encode(), 1)
        state = np.zeros(lib.rwkv_get_state_buffer_element_count(ctx), np.float32)
        logits = np.zeros(lib.rwkv_get_logits_buffer_element_count(ctx), np.float32)
        ms = _best_ms(lambda t: lib.rwkv_eval(ctx, t, state.ctypes.data, state.ctypes.data,
                                              logits.ctypes.data), args.repeat)
        lib.rwkv_free(ctx)
        rows.append(("rwkv.cpp Q4_0 (head F32), whole model in RAM", ms))
        for label, overrides in (("head F32", []), ("head Q4_0", ["head.weight=Q4_0"])):
            path = os.path.join(tmp, "s.rwks")
            with open(path, "wb") as f:
                write_stream(VirtualStream(model, make_plan(model, "Q4_0", overrides)), f)
            for xip in (False, True):
                board = Board(FileSource(path), chunk=64 << 10, mode="int8", xip=xip)
                ms = _best_ms(board.eval, args.repeat)
                board.close()
                rows.append((f"board Q4_0 ({label}), int8, "
                             + ("in place (XIP)" if xip else "file, 64 KiB chunk"), ms))
    base = rows[0][1]
    for label, ms in rows:
        print(f"{label:<52} {ms:7.2f} ms/token  {ms / base:5.2f}x rwkv.cpp")


if __name__ == "__main__":
    main()
