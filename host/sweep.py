"""`rwkv-stream sweep`: quality against size for every type, QX settings and auto budgets.

One F32 reference run over the text, then one run per setting, each a virtual stream quantized
on the fly: bits per weight of the quantized tensors (the ones `--quant` applies to), stream
bytes, bits per byte, mean KL against F32 and top-1 agreement. A table, `--json`, and with
`--plot` a PNG of KL against bits per weight (matplotlib, the optional `plot` extra).
"""
from __future__ import annotations

import math

from firmware_sim.sources import VirtualSource
from formats.errors import BadInput, UsageError

from .model import load_model
from .plan import make_plan, quantizable
from .quality import DEFAULT_COLUMNS, _tokens, compare, run_logits
from .stream import VirtualStream

SETTINGS = ("Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "Q3_K", "Q2_K",
            "QX:bpw=6", "QX:bpw=5", "QX:bpw=4.5", "QX:bpw=4", "QX:bpw=3.5", "QX:bpw=3",
            "QX:bs=32,bpw=4.5", "QX:bs=32,bpw=3.5",
            "auto:6", "auto:5", "auto:4.5", "auto:4", "auto:3.5")


def family(setting: str) -> str:
    if setting.startswith("auto"):
        return "auto"
    if setting.startswith("QX"):
        return "QX"
    return "k-quants" if setting.endswith("_K") else "ggml"


def sweep(model_path, text, settings=SETTINGS, *, tokenizer=None, limit=None,
          columns=DEFAULT_COLUMNS, importance=None, calib_text=None, progress=None) -> dict:
    model = load_model(model_path)
    tokens, tok = _tokens(text, model.hparams.n_vocab, tokenizer, limit)
    f32 = make_plan(model, "F32")
    ref = run_logits(VirtualSource(VirtualStream(model, f32)), tokens, "float", columns)
    quantized = quantizable(model)
    n_weights = sum(math.prod(model[n].shape) for n in quantized)
    rows = []
    for setting in settings:
        try:
            plan = make_plan(model, setting, importance=importance,
                             calib_text=calib_text if setting.startswith("auto") else None)
        except (BadInput, UsageError) as e:
            rows.append(dict(setting=setting, family=family(setting), skipped=e.message))
            continue
        vs = VirtualStream(model, plan)
        bits = 8 * sum(vs.layout.by_name[n].data_size for n in quantized)
        logits = run_logits(VirtualSource(vs), tokens, "float", columns)
        m = compare(logits, tokens, ref, tok)
        rows.append(dict(setting=setting, family=family(setting),
                         bits_per_weight=round(bits / n_weights, 4), stream_bytes=vs.size,
                         bits_per_byte=round(m["bits_per_byte"], 5),
                         kl_mean=m["kl_mean"], top1_agreement=round(m["top1_agreement"], 5),
                         fallbacks=len(getattr(plan, "fallbacks", ()))))
        if progress:
            progress(setting)
    return dict(model=str(model_path), text=str(text), tokens=len(tokens),
                imatrix=None if importance is None or isinstance(importance, dict)
                else str(importance), calib_text=None if calib_text is None else str(calib_text),
                f32_bits_per_byte=round(compare(ref, tokens, None, tok)["bits_per_byte"], 5),
                quantized_weights=n_weights, rows=rows)


def format_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['text']} ({result['tokens']:,} tokens; F32: "
             f"{result['f32_bits_per_byte']} bits per byte)",
             "",
             "| setting | bits/weight | stream bytes | bits/byte | KL (nats) | top-1 |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['setting']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['setting']} | {r['bits_per_weight']:.3f} | {r['stream_bytes']:,} | "
                     f"{r['bits_per_byte']:.4f} | {r['kl_mean']:.5f} | "
                     f"{100 * r['top1_agreement']:.2f}% |")
    return "\n".join(lines)


def need_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'rwkv-stream[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(result: dict, path) -> None:
    plt = need_matplotlib()
    from .outputs import atomic_output
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = {"ggml": "o", "k-quants": "s", "QX": "^", "auto": "D"}
    for fam, marker in markers.items():
        pts = [r for r in result["rows"] if r.get("family") == fam and "kl_mean" in r]
        if not pts:
            continue
        pts.sort(key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in pts], [max(r["kl_mean"], 1e-7) for r in pts],
                marker=marker, linestyle="-" if fam in ("QX", "auto") else "", label=fam)
        for r in pts:
            ax.annotate(r["setting"], (r["bits_per_weight"], max(r["kl_mean"], 1e-7)),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized matrices)")
    ax.set_ylabel("mean KL vs F32 (nats, log scale)")
    ax.set_title(f"{result['model'].split('/')[-1]}: quality against size", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
