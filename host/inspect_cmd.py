"""`rwkv-stream inspect`: what a model file holds."""
from __future__ import annotations

import math

from .model import load_model


def describe(path) -> dict:
    model = load_model(path)
    try:
        tensors = []
        for t in model:
            q = t.source.qtype
            n = math.prod(t.shape)
            nbytes = q.nbytes(t.shape)
            tensors.append(dict(name=t.name, type=q.name, shape=list(t.shape), bytes=nbytes,
                                bits_per_weight=round(8 * nbytes / n, 3)))
        total = sum(t["bytes"] for t in tensors)
        weights = sum(math.prod(t["shape"]) for t in tensors)
        return dict(file=str(path), format=model.checkpoint.format_name,
                    header=model.checkpoint.info, **model.hparams.as_dict(),
                    tensors=tensors, total_bytes=total, n_weights=weights,
                    bits_per_weight=round(8 * total / weights, 3))
    finally:
        model.close()


def format_text(info: dict) -> str:
    lines = [f"{info['file']}: {info['format']}, RWKV v{info['version']}",
             f"  n_vocab {info['n_vocab']}  n_embd {info['n_embd']}  n_layer {info['n_layer']}"
             f"  ffn {info['ffn_size']}"
             + (f"  heads {info['n_head']} x {info['head_size']}" if info['n_head'] else "")
             + (f"  lora {info['lora']}" if info['lora'] else ""),
             f"  {info['n_weights']:,} weights, {info['total_bytes']:,} bytes, "
             f"{info['bits_per_weight']} bits per weight", ""]
    w = max(len(t["name"]) for t in info["tensors"])
    lines.append(f"  {'tensor':<{w}}  {'type':<5} {'shape':<18} {'bytes':>12}  bpw")
    for t in info["tensors"]:
        shape = "x".join(str(d) for d in t["shape"])
        lines.append(f"  {t['name']:<{w}}  {t['type']:<5} {shape:<18} {t['bytes']:>12,}  "
                     f"{t['bits_per_weight']}")
    return "\n".join(lines)
