"""--quant auto:BPW (host/auto.py) and `sweep` (host/sweep.py)."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from conftest import REPO, fp32_model, run_cli
from formats.errors import BadInput, UsageError
from formats.quants import by_name
from host.auto import Option, choose, parse_budget
from host.model import load_model
from host.plan import make_plan
from host.stream import VirtualStream

TEXT = REPO / "docs" / "quality" / "eval-text.txt"


def _options(rng, n_tensors, n_opts):
    out = {}
    for t in range(n_tensors):
        bits = np.sort(rng.choice(np.arange(100, 1000), n_opts, replace=False))
        loss = np.sort(rng.random(n_opts))[::-1] * rng.uniform(0.1, 10)
        out[f"t{t}"] = [Option(f"c{k}", None, int(b), float(l))
                        for k, (b, l) in enumerate(zip(bits, loss))]
    return out


def test_choice_meets_every_budget_and_is_near_the_optimum():
    rng = np.random.default_rng(0)
    for _ in range(60):
        opts = _options(rng, 4, 4)
        low = sum(o[0].bits for o in opts.values())
        high = sum(o[-1].bits for o in opts.values())
        budget = int(rng.integers(low, high + 1))
        got = choose(opts, budget, 1000)
        used = sum(o.bits for o in got.values())
        assert used <= budget
        best = min(sum(c.loss for c in combo) for combo in itertools.product(*opts.values())
                   if sum(c.bits for c in combo) <= budget)
        worst = max(sum(c.loss for c in combo) for combo in itertools.product(*opts.values())
                    if sum(c.bits for c in combo) <= budget)
        # greedy on the hulls: never worse than a third of the way from the optimum to the
        # worst feasible mix (measured: usually the optimum itself)
        assert sum(o.loss for o in got.values()) <= best + (worst - best) / 3 + 1e-12


def test_below_the_cheapest_mix_is_refused():
    opts = _options(np.random.default_rng(1), 3, 3)
    with pytest.raises(BadInput, match="below the smallest mix"):
        choose(opts, sum(o[0].bits for o in opts.values()) - 1, 100)


def test_budget_spec():
    assert parse_budget("auto:4.5") == 4.5 and parse_budget("Q4_0") is None
    for bad in ("auto", "auto:x", "auto:0.5", "auto:40"):
        with pytest.raises(UsageError):
            parse_budget(bad)


def test_sensitive_tensor_gets_more_bits():
    """Two tensors of one model: scale one so its errors count 100x (importance), and auto must
    give it the larger share of the budget."""
    m = load_model(fp32_model("5v2-730K"))
    names = ["blocks.0.att.key.weight", "blocks.0.att.value.weight"]
    n_cols = m[names[0]].shape[-1]
    from host.auto import auto_plan
    base = make_plan(m, "Q4_0")
    for hot, cold in (names, names[::-1]):
        imp = {hot: np.full(n_cols, 100.0, np.float32), cold: np.ones(n_cols, np.float32)}
        chosen, report = auto_plan(m, 5.0, base, names, importance=imp,
                                   candidates=("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
        assert chosen[hot].bits_per_weight > chosen[cold].bits_per_weight, report["types"]
        assert report["achieved_bpw"] <= 5.0


def test_auto_stream_meets_its_budget_and_carries_the_plan(tmp_path):
    model = fp32_model("5v2-730K")
    out = tmp_path / "auto.rwks"
    r = json.loads(run_cli("convert", model, "-o", out, "--quant", "auto:4.5", "--json",
                           check_status=0).stdout)
    assert r["auto"]["achieved_bpw"] <= 4.5 and "proxy" in r["auto"]["sensitivity"]
    info = json.loads(run_cli("inspect", out, "--json", check_status=0).stdout)
    types = {rec["name"]: rec["type"] for rec in info["records"] if rec["type"]}
    m = load_model(model)
    quantized = [n for n, q in make_plan(m, "Q4_0").items() if q.name == "Q4_0"]
    assert {types[n] for n in quantized} == {q.split(":")[0] for q in r["auto"]["types"].values()}
    assert len({types[n] for n in quantized}) > 1          # a real mix
    bits = sum(8 * rec["bytes"] for rec in info["records"] if rec["name"] in quantized)
    assert bits <= 4.5 * sum(np.prod(m[n].shape) for n in quantized)
    run_cli("validate", out, check_status=0)
    with pytest.raises(AssertionError):
        run_cli("convert", model, "-o", tmp_path / "a.bin", "--quant", "auto:4.5",
                check_status=0)


def test_sweep_runs_in_seconds_and_plots(tmp_path):
    proc = run_cli("sweep", fp32_model("4v0-660K"), "--text", TEXT, "--limit", "200",
                   "--settings", "Q8_0,Q4_0,QX:bpw=4.5,auto:5", "--plot", tmp_path / "s.png",
                   "--json", check_status=0)
    r = json.loads(proc.stdout)
    rows = {row["setting"]: row for row in r["rows"]}
    assert set(rows) == {"Q8_0", "Q4_0", "QX:bpw=4.5", "auto:5"}
    assert rows["Q8_0"]["kl_mean"] < rows["Q4_0"]["kl_mean"]
    assert rows["Q4_0"]["bits_per_weight"] == 4.5 and rows["auto:5"]["bits_per_weight"] <= 5
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrated_auto_is_never_worse_than_the_best_single_type_that_fits(tmp_path):
    model = fp32_model("4v0-660K")
    r = json.loads(run_cli("convert", model, "-o", tmp_path / "a.rwks", "--quant", "auto:4.6",
                           "--calib-text", REPO / "docs" / "quality" / "calib-text.txt", "--json",
                           check_status=0).stdout)["auto"]
    assert "kl-scaled" in r["sensitivity"] and r["achieved_bpw"] <= 4.6
    kl = r["measured_kl"]
    assert "mix" in kl and "Q4_0" in kl and "Q5_0" not in kl       # Q5_0 (5.5) does not fit
    assert kl[r["chosen"]] == min(kl.values())
