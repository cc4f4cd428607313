"""The one table mapping checkpoint tensor names to canonical names.

Canonical names are the RWKV authors' names, which rwkv.cpp keeps (`blocks.N.att.key.weight`).
Each row: canonical name (`{i}` = layer), the Hugging Face transformers name (None where
transformers has no such model), and the RWKV version that introduced the tensor.
"""
from __future__ import annotations

import re

from formats.arch import RwkvVersion as V

# canonical                 hugging face (transformers' Rwkv*, `rwkv.` prefix)      since
NAMES: tuple[tuple[str, str | None, V], ...] = (
    ("emb.weight",                     "rwkv.embeddings.weight",                      V.V4),
    ("blocks.0.ln0.weight",            "rwkv.blocks.0.pre_ln.weight",                 V.V4),
    ("blocks.0.ln0.bias",              "rwkv.blocks.0.pre_ln.bias",                   V.V4),
    ("blocks.{i}.ln1.weight",          "rwkv.blocks.{i}.ln1.weight",                  V.V4),
    ("blocks.{i}.ln1.bias",            "rwkv.blocks.{i}.ln1.bias",                    V.V4),
    ("blocks.{i}.ln2.weight",          "rwkv.blocks.{i}.ln2.weight",                  V.V4),
    ("blocks.{i}.ln2.bias",            "rwkv.blocks.{i}.ln2.bias",                    V.V4),
    ("blocks.{i}.att.time_mix_k",      "rwkv.blocks.{i}.attention.time_mix_key",      V.V4),
    ("blocks.{i}.att.time_mix_v",      "rwkv.blocks.{i}.attention.time_mix_value",    V.V4),
    ("blocks.{i}.att.time_mix_r",      "rwkv.blocks.{i}.attention.time_mix_receptance", V.V4),
    ("blocks.{i}.att.time_mix_g",      "rwkv.blocks.{i}.attention.time_mix_gate",     V.V5_2),
    ("blocks.{i}.att.time_first",      "rwkv.blocks.{i}.attention.time_first",        V.V4),
    ("blocks.{i}.att.time_decay",      "rwkv.blocks.{i}.attention.time_decay",        V.V4),
    ("blocks.{i}.att.time_faaaa",      "rwkv.blocks.{i}.attention.time_faaaa",        V.V5_2),
    ("blocks.{i}.att.time_maa_x",      "rwkv.blocks.{i}.attention.time_maa_x",        V.V6),
    ("blocks.{i}.att.time_maa_w",      "rwkv.blocks.{i}.attention.time_maa_w",        V.V6),
    ("blocks.{i}.att.time_maa_k",      "rwkv.blocks.{i}.attention.time_maa_k",        V.V6),
    ("blocks.{i}.att.time_maa_v",      "rwkv.blocks.{i}.attention.time_maa_v",        V.V6),
    ("blocks.{i}.att.time_maa_r",      "rwkv.blocks.{i}.attention.time_maa_r",        V.V6),
    ("blocks.{i}.att.time_maa_g",      "rwkv.blocks.{i}.attention.time_maa_g",        V.V6),
    ("blocks.{i}.att.time_maa_w1",     "rwkv.blocks.{i}.attention.time_maa_w1",       V.V6),
    ("blocks.{i}.att.time_maa_w2",     "rwkv.blocks.{i}.attention.time_maa_w2",       V.V6),
    ("blocks.{i}.att.time_decay_w1",   "rwkv.blocks.{i}.attention.time_decay_w1",     V.V6),
    ("blocks.{i}.att.time_decay_w2",   "rwkv.blocks.{i}.attention.time_decay_w2",     V.V6),
    ("blocks.{i}.att.x_r",             None,                                          V.V7),
    ("blocks.{i}.att.x_w",             None,                                          V.V7),
    ("blocks.{i}.att.x_k",             None,                                          V.V7),
    ("blocks.{i}.att.x_v",             None,                                          V.V7),
    ("blocks.{i}.att.x_a",             None,                                          V.V7),
    ("blocks.{i}.att.x_g",             None,                                          V.V7),
    ("blocks.{i}.att.x_rwkvag",        None,                                          V.V7),
    ("blocks.{i}.att.w0",              None,                                          V.V7),
    ("blocks.{i}.att.w1",              None,                                          V.V7),
    ("blocks.{i}.att.w2",              None,                                          V.V7),
    ("blocks.{i}.att.a0",              None,                                          V.V7),
    ("blocks.{i}.att.a1",              None,                                          V.V7),
    ("blocks.{i}.att.a2",              None,                                          V.V7),
    ("blocks.{i}.att.v0",              None,                                          V.V7),
    ("blocks.{i}.att.v1",              None,                                          V.V7),
    ("blocks.{i}.att.v2",              None,                                          V.V7),
    ("blocks.{i}.att.g1",              None,                                          V.V7),
    ("blocks.{i}.att.g2",              None,                                          V.V7),
    ("blocks.{i}.att.k_k",             None,                                          V.V7),
    ("blocks.{i}.att.k_a",             None,                                          V.V7),
    ("blocks.{i}.att.r_k",             None,                                          V.V7),
    ("blocks.{i}.att.receptance.weight", "rwkv.blocks.{i}.attention.receptance.weight", V.V4),
    ("blocks.{i}.att.key.weight",      "rwkv.blocks.{i}.attention.key.weight",        V.V4),
    ("blocks.{i}.att.value.weight",    "rwkv.blocks.{i}.attention.value.weight",      V.V4),
    ("blocks.{i}.att.gate.weight",     "rwkv.blocks.{i}.attention.gate.weight",       V.V5_2),
    ("blocks.{i}.att.ln_x.weight",     "rwkv.blocks.{i}.attention.ln_x.weight",       V.V5_1),
    ("blocks.{i}.att.ln_x.bias",       "rwkv.blocks.{i}.attention.ln_x.bias",         V.V5_1),
    ("blocks.{i}.att.output.weight",   "rwkv.blocks.{i}.attention.output.weight",     V.V4),
    ("blocks.{i}.ffn.time_mix_k",      "rwkv.blocks.{i}.feed_forward.time_mix_key",   V.V4),
    ("blocks.{i}.ffn.time_mix_r",      "rwkv.blocks.{i}.feed_forward.time_mix_receptance", V.V4),
    ("blocks.{i}.ffn.time_maa_k",      "rwkv.blocks.{i}.feed_forward.time_maa_k",     V.V6),
    ("blocks.{i}.ffn.time_maa_r",      "rwkv.blocks.{i}.feed_forward.time_maa_r",     V.V6),
    ("blocks.{i}.ffn.x_k",             None,                                          V.V7),
    ("blocks.{i}.ffn.receptance.weight", "rwkv.blocks.{i}.feed_forward.receptance.weight", V.V4),
    ("blocks.{i}.ffn.key.weight",      "rwkv.blocks.{i}.feed_forward.key.weight",     V.V4),
    ("blocks.{i}.ffn.value.weight",    "rwkv.blocks.{i}.feed_forward.value.weight",   V.V4),
    ("ln_out.weight",                  "rwkv.ln_out.weight",                          V.V4),
    ("ln_out.bias",                    "rwkv.ln_out.bias",                            V.V4),
    ("head.weight",                    "head.weight",                                 V.V4),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_CANONICAL = [(_pattern(c), c, v) for c, _, v in NAMES]
_HF = [(_pattern(h), c) for c, h, _ in NAMES if h is not None]


def canonical_name(name: str) -> str | None:
    """The canonical name of a checkpoint tensor, or None if the table does not know it."""
    for pat, _, _ in _CANONICAL:
        if pat.match(name):
            return name
    for pat, canon in _HF:
        m = pat.match(name)
        if m:
            return canon.replace("{i}", m.group(1)) if m.groups() else canon
    return None


def introduced_in(canonical: str) -> V | None:
    for pat, _, v in _CANONICAL:
        if pat.match(canonical):
            return v
    return None


def layer_of(canonical: str) -> int | None:
    m = re.match(r"^blocks\.(\d+)\.", canonical)
    return int(m.group(1)) if m else None
