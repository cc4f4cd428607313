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
