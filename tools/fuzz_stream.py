"""A longer mutation run than the test suite's: random flips, inserts and deletes in a valid
stream, each case through `validate --deep` and a simulated board's first token.

    python tools/fuzz_stream.py [-n 3000] [--quant QX:bpw=3.5] [--seed 1]

Every case must end in OK or one BadInput/CheckFailed line; anything else (another exception,
running out of memory under a 6 GiB address-space cap) stops the run, saves the case to
fuzz-case.rwks and exits 1. Prints the counts and the slowest case.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware_sim.board import Board  # noqa: E402
from firmware_sim.sources import BytesSource  # noqa: E402
from formats.arch import RwkvVersion  # noqa: E402
from formats.errors import BadInput, CheckFailed  # noqa: E402
from host.model import Model  # noqa: E402
from host.plan import make_plan  # noqa: E402
from host.stream import VirtualStream  # noqa: E402
from host.stream.reader import validate  # noqa: E402
from host.stream.writer import write_stream  # noqa: E402
from host.synth import SyntheticCheckpoint, synth_hparams  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--quant", default="QX:bpw=3.5")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    m = Model(SyntheticCheckpoint(synth_hparams(RwkvVersion.V5_2, 64, 1, 32, ffn_size=64)))
    buf = io.BytesIO()
    write_stream(VirtualStream(m, make_plan(m, a.quant, ["head.weight=" + a.quant])), buf)
    good = buf.getvalue()
    rng = random.Random(a.seed)
    counts = dict(validate_ok=0, validate_refused=0, board_ok=0, board_refused=0)
    slowest = 0.0
    path = os.path.join(tempfile.mkdtemp(), "case.rwks")
    for i in range(a.n):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op, pos = rng.choice(["flip", "insert", "delete"]), rng.randrange(len(b))
            if op == "flip":
                b[pos] ^= 1 << rng.randrange(8)
            elif op == "insert":
                b[pos:pos] = rng.randbytes(rng.randint(1, 16))
            else:
                del b[pos:pos + rng.randint(1, 16)]
        t = time.perf_counter()
        Path(path).write_bytes(b)
        try:
            try:
                validate(path, deep=True)
                counts["validate_ok"] += 1
            except CheckFailed:
                counts["validate_refused"] += 1
            try:
                Board(BytesSource(bytes(b)), chunk=256).eval(1)
                counts["board_ok"] += 1
            except BadInput:
                counts["board_refused"] += 1
        except BaseException:
            traceback.print_exc(limit=6)
            Path("fuzz-case.rwks").write_bytes(b)
            print(f"case {i}: not a clear error; saved to fuzz-case.rwks")
            return 1
        slowest = max(slowest, time.perf_counter() - t)
    print(f"{a.n} mutated {a.quant} streams of {len(good):,} bytes: {counts}; "
          f"slowest case {slowest:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
