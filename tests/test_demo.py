"""`rwkv-stream demo`: checkpoint -> on-the-fly quantization -> pty link -> simulated board."""
from __future__ import annotations

import json

import pytest

from conftest import fixture_path, run_cli
from host.demo import DATA


def _demo(model, n=24):
    proc = run_cli("demo", "--model", model, "-n", n, "--prompt", "The ", "--json",
                   check_status=0)
    return json.loads(proc.stdout)


def test_demo_generates_what_the_simulator_generates_from_the_same_model():
    model = fixture_path("pytorch", "tiny-rwkv-5v2-730K-bf16.pth")
    r = _demo(model)
    assert r["install"]["size"] > 0 and r["install"]["resumed_from"] == 0
    direct = json.loads(run_cli("run", model, "--prompt", "The ", "-n", "24", "--quant", "Q5_1",
                                "--json", check_status=0).stdout)
    assert r["text"] == direct["text"] and len(r["text"]) > 0
    assert r["cost"]["bytes_read_per_token"] > 0


def test_bundled_model_loads_and_runs():
    found = sorted(DATA.glob("*.pth"))
    if not found:
        pytest.skip(f"no bundled model in {DATA} yet")
    r = _demo(found[0], n=16)
    assert len(r["text"]) > 0


def test_sampled_demo_draws_what_run_draws_with_the_same_seed():
    """With a temperature the host samples from the logits the board sends back over the
    link; `run` samples from the simulator's logits with the same Sampler and seed."""
    model = fixture_path("pytorch", "tiny-rwkv-5v2-730K-bf16.pth")
    args = ["--temperature", "0.8", "--top-k", "20", "--seed", "4"]
    r = json.loads(run_cli("demo", "--model", model, "-n", "20", "--prompt", "The ", "--json",
                           *args, check_status=0).stdout)
    direct = json.loads(run_cli("run", model, "--prompt", "The ", "-n", "20", "--quant",
                                "Q5_1", "--json", *args, check_status=0).stdout)
    greedy = _demo(model, n=20)
    assert r["text"] == direct["text"] and r["text"] != greedy["text"]


HELDOUT_WINDOWS, HELDOUT_BPB_TORCH = 16, 1.655946   # host/data/README.md (tools/train.py --eval)


def test_bundled_model_matches_its_recorded_heldout_bits_per_byte(tmp_path):
    """The simulator, reading the bundled .pth with the project's reader, predicts the first 16
    held-out windows as well as torch did when the figure was recorded (tools/train.py
    --eval --eval-windows 16): each window of 129 bytes from a fresh state, its last 128 bytes
    predicted."""
    import numpy as np

    from conftest import REPO
    from host.quality import run_logits
    from host.run_cmd import open_source
    held = (REPO / "tests" / "data" / "demo-heldout-head.txt").read_bytes()
    assert len(held) == 128 * HELDOUT_WINDOWS + 1
    model = sorted(DATA.glob("*.pth"))[0]
    nll = []
    for w in range(HELDOUT_WINDOWS):
        window = list(held[128 * w:128 * w + 129])
        logits = run_logits(open_source(model), window[:-1], "float", 64).astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll.extend(-lp[np.arange(128), window[1:]])
    bpb = float(np.mean(nll) / np.log(2))
    assert abs(bpb - HELDOUT_BPB_TORCH) < 1e-4, bpb


def test_readme_command_lines_parse():
    """Every `rwkv-stream ...` line in the README's code blocks is a valid command line."""
    import re
    import shlex

    from conftest import REPO
    from host.cli import build_parser
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("rwkv-stream "):
                    lines.append(part)
    assert len(lines) >= 15
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])     # exits (SystemExit) if invalid
        assert args.func, line
