"""`--quant auto:BPW`: every quantizable tensor gets its own type, chosen to meet a size budget
with the least loss.

The tensors that `--quant` applies to (rwkv.cpp's quantize rule: the 2-D matrices except emb
and head) share a budget of BPW bits per weight; every other tensor keeps what `--quant Q4_0`
would give it. For each tensor and each candidate type (ggml's, the k-quants where rows are
whole super-blocks, QX at several sizes) two numbers are measured:

* bits: the exact bytes of that tensor in that type (QX: after quantizing it);
* loss, one of two sensitivities --
  - **proxy**: the importance-weighted squared error of the tensor,
    sum_cols imp[col] * sum_rows (w - w_q)^2, with calibrate's importance (ones without it).
    Comparable between candidates of one tensor, less so between tensors.
  - **kl-scaled proxy** (when a calibration text is given): the proxy curve of each tensor
    scaled so that at Q4_0 it equals the measured mean KL of the next-token distributions
    against F32 over the text with only that tensor quantized (the rest F32) -- one model run
    per tensor. (Measuring the KL at every candidate, |tensors| x |candidates| runs, was too
    slow: ~10 minutes for a 730K-parameter model.)

Then the choice is a multiple-choice knapsack solved greedily by marginal gain per bit: every
tensor starts at its cheapest candidate and climbs its lower convex hull of (bits, loss), the
steepest step across all tensors first, while the budget allows; leftover bits then buy any
single upgrade that still fits. The result never exceeds the budget. With a calibration text the
mix is finally measured next to every single type (with its fallbacks) that fits the budget, and
the best measured plan wins (`report["measured_kl"]`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formats.errors import BadInput, UsageError
from formats.quants import QuantType, by_name

CANDIDATES = ("Q2_K", "Q3_K", "QX:bpw=2.5", "QX:bpw=3", "QX:bpw=3.5", "Q4_0", "QX:bpw=4",
              "Q4_K", "Q4_1", "QX:bpw=4.5", "Q5_0", "QX:bpw=5", "Q5_K", "Q5_1", "QX:bpw=6",
              "Q6_K", "Q8_0")


def parse_budget(quant: str) -> float | None:
    """"auto:4.5" -> 4.5; None when quant is not an auto spec."""
    if not isinstance(quant, str) or not quant.lower().startswith("auto"):
        return None
    _, _, value = quant.partition(":")
    try:
        bpw = float(value)
    except ValueError:
        raise UsageError(f"--quant {quant!r}: write auto:BITS, e.g. auto:4.5") from None
    if not 1.0 <= bpw <= 16.0:
        raise UsageError(f"--quant {quant!r}: the budget must be 1 to 16 bits per weight")
    return bpw


@dataclass
class Option:
    spec: str            # how --quant / --tensor-type names it, e.g. "QX:bpw=3.5"
    qtype: QuantType
    bits: int
    loss: float


def _candidates(n_cols: int, names) -> list[tuple[str, QuantType]]:
    out = []
    for name in names:
        try:
            q = by_name(name)
        except BadInput:
            continue                     # a type this build lacks
        if n_cols % q.block_size == 0:
            out.append((name, q))
    return out


def _tensor_bits(t, q: QuantType, importance) -> tuple[int, np.ndarray]:
    """(bits of t stored as q, the values it decodes to)."""
    x = t.values().reshape(-1, t.shape[-1])
    data = q.quantize_weighted(x, importance) if importance is not None else q.quantize(x)
    return 8 * data.size, q.dequantize(data, x.shape)


def measure_proxy(model, names, candidates, importance, progress=None) -> dict[str, list[Option]]:
    options = {}
    for name in names:
        t = model[name]
        x = t.values().reshape(-1, t.shape[-1]).astype(np.float64)
        imp = importance.get(name) if importance else None
        w = np.ones(x.shape[1]) if imp is None else imp.astype(np.float64)
        opts = []
        for spec, q in _candidates(t.shape[-1], candidates):
            bits, y = _tensor_bits(t, q, imp)
            opts.append(Option(spec, q, bits, float(((y - x) ** 2 * w).sum())))
        options[name] = opts
        if progress:
            progress(name)
    return options


def _kl_meter(model, base_plan, names, tokens, importance, columns=64):
    """measure(types) -> the mean KL over `tokens`, against the plan with every tensor of
    `names` in F32, of that plan with `types` (name -> type) put in."""
    from firmware_sim.sources import VirtualSource

    from .quality import mean_kl, run_logits
    from .stream import VirtualStream
    f32 = by_name("F32")
    ref_plan = {n: f32 if n in names else q for n, q in base_plan.items()}

    def logits(plan):
        vs = VirtualStream(model, _with_importance(plan, importance))
        return run_logits(VirtualSource(vs), tokens, "float", columns)

    ref = logits(ref_plan)
    return lambda types: mean_kl(logits({**ref_plan, **types}), ref)


def measure_kl_scaled(model, names, candidates, tokens, base_plan, importance,
                      probe="Q4_0", progress=None) -> dict[str, list[Option]]:
    """The proxy's curve of each tensor, scaled so that at `probe` it equals the measured KL
    (against F32, over `tokens`) with only that tensor quantized to `probe`: one run of the
    model per tensor instead of one per tensor and candidate."""
    options = measure_proxy(model, names, candidates, importance)
    measure = _kl_meter(model, base_plan, names, tokens, importance)
    for name in names:
        at = next((o for o in options[name] if o.spec == probe), None)
        if at is None or at.loss <= 0:
            continue
        scale = measure({name: at.qtype}) / at.loss
        for o in options[name]:
            o.loss *= scale
        if progress:
            progress(name)
    return options


def _with_importance(plan: dict, importance):
    from .plan import Plan
    out = Plan(plan)
    out.importance = importance or {}
    return out


def _hull(opts: list[Option]) -> list[Option]:
    """The lower convex hull of (bits, loss), cheapest first."""
    pts = sorted(opts, key=lambda o: (o.bits, o.loss))
    front = []
    for o in pts:                       # Pareto: each more expensive point must lose less
        if not front or o.loss < front[-1].loss:
            front.append(o)
    hull = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-o: drop it
            if (b.loss - a.loss) * (o.bits - a.bits) >= (o.loss - a.loss) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def choose(options: dict[str, list[Option]], budget_bits: int,
           n_weights: int) -> dict[str, Option]:
    """Greedy by marginal loss reduction per bit along each tensor's hull, then leftovers."""
    hulls = {n: _hull(o) for n, o in options.items()}
    pick = {n: 0 for n in hulls}
    used = sum(h[0].bits for h in hulls.values())
    if used > budget_bits:
        cheapest = sum(h[0].bits for h in hulls.values())
        raise BadInput(f"the budget of {budget_bits:,} bits is below the smallest mix "
                       f"({cheapest:,} bits, {cheapest / n_weights:.3f} bits per weight)")
    while True:
        best, gain = None, 0.0
        for n, h in hulls.items():
            i = pick[n]
            if i + 1 < len(h):
                step = h[i + 1].bits - h[i].bits
                if used + step <= budget_bits:
                    g = (h[i].loss - h[i + 1].loss) / step
                    if g > gain:
                        best, gain = n, g
        if best is None:
            break
        used += hulls[best][pick[best] + 1].bits - hulls[best][pick[best]].bits
        pick[best] += 1
    chosen = {n: hulls[n][i] for n, i in pick.items()}
    improved = True
    while improved:                     # spend what is left on the best single upgrade
        improved = False
        best = None
        for n, opts in options.items():
            cur = chosen[n]
            for o in opts:
                extra = o.bits - cur.bits
                if o.loss < cur.loss and used + extra <= budget_bits:
                    d = cur.loss - o.loss
                    if best is None or d > best[0]:
                        best = (d, n, o, extra)
        if best:
            _, n, o, extra = best
            chosen[n] = o
            used += extra
            improved = True
    return chosen


def auto_plan(model, bpw: float, base_plan: dict, names: list[str], *, importance=None,
              tokens=None, candidates=CANDIDATES, progress=None) -> tuple[dict, dict]:
    """(name -> type for `names`, a report). `tokens`: KL sensitivity over them; else proxy."""
    n_weights = sum(int(np.prod(model[n].shape)) for n in names)
    if not names:
        raise BadInput("this model has no tensor that --quant auto applies to")
    if tokens is not None:
        # one run per tensor: a short prefix of the text is enough to scale each curve; the
        # final check of the mix against single types (a few runs) reads all of it
        options = measure_kl_scaled(model, names, candidates, tokens[:SCALE_TOKENS], base_plan,
                                    importance, progress=progress)
        how = (f"kl-scaled proxy: each tensor's {'importance-weighted' if importance else ''} "
               f"squared-error curve scaled to the KL it causes alone at Q4_0 (measured "
               f"against F32 over {min(len(tokens), SCALE_TOKENS)} calibration tokens; mix "
               f"and single types then compared over all {len(tokens)})").replace("  ", " ")
    else:
        options = measure_proxy(model, names, candidates, importance, progress)
        how = "proxy: " + ("importance-weighted" if importance else "plain") + \
              " squared error of each tensor (no calibration text)"
    budget = int(np.floor(bpw * n_weights))
    chosen = choose(options, budget, n_weights)
    report = dict(budget_bpw=bpw, sensitivity=how, weights=n_weights)
    if tokens is not None:
        chosen = _check_against_presets(model, chosen, options, budget, base_plan, names,
                                        tokens, importance, report)
    used = sum(o.bits for o in chosen.values())
    report.update(achieved_bpw=round(used / n_weights, 4),
                  types={n: o.spec for n, o in chosen.items()},
                  loss=sum(o.loss for o in chosen.values()))
    return {n: o.qtype for n, o in chosen.items()}, report


SCALE_TOKENS = 128
PRESETS = ("Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")


def _check_against_presets(model, chosen, options, budget, base_plan, names, tokens,
                           importance, report, columns=64):
    """The mix's loss model can misjudge; with a calibration text, the mix is measured (mean
    KL over the text) next to every single type, with llama.cpp's fallbacks, that fits the
    budget, and the best measured plan wins. So auto is never worse, on that text, than the
    best uniform choice of the same size."""
    measure = _kl_meter(model, base_plan, names, tokens, importance, columns)

    def measured(types):
        return measure({n: o.qtype for n, o in types.items()})

    by_spec = {n: {o.spec: o for o in opts} for n, opts in options.items()}
    trials = {"mix": (chosen, measured(chosen))}
    for preset in PRESETS:
        try:
            q = by_name(preset)
        except BadInput:
            continue
        pick = {}
        for n in names:
            t = q if q.fits(model[n].shape[-1]) else (by_name(q.fallback) if q.fallback else None)
            o = by_spec[n].get(t.name) if t is not None else None
            if o is None:
                break
            pick[n] = o
        else:
            if sum(o.bits for o in pick.values()) <= budget:
                trials[preset] = (pick, measured(pick))
    best = min(trials, key=lambda k: trials[k][1])
    report["measured_kl"] = {k: v[1] for k, v in trials.items()}
    report["chosen"] = best
    return trials[best][0]
