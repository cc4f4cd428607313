"""The one enum of RWKV versions."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import BadInput


class RwkvVersion(enum.IntEnum):
    """RWKV architecture versions as rwkv.cpp names them; the value is the stream's arch code."""

    V4 = 40
    V5_1 = 51
    V5_2 = 52
    V6 = 60
    V7 = 70

    @property
    def label(self) -> str:
        return {40: "4", 51: "5.1", 52: "5.2", 60: "6", 70: "7"}[int(self)]

    @property
    def has_heads(self) -> bool:
        return self is not RwkvVersion.V4

    @classmethod
    def parse(cls, text: str) -> "RwkvVersion":
        """Accepts '4', 'v4', '5.2', 'v5.2', '6.0' ..."""
        t = text.strip().lower().lstrip("v")
        if t.endswith(".0"):
            t = t[:-2]
        for v in cls:
            if v.label == t:
                return v
        raise BadInput(f"unknown RWKV version {text!r} (known: "
                       + ", ".join("v" + v.label for v in cls) + ")")


V = RwkvVersion

# Per-layer tensors in the order the forward pass consumes them (rwkv_spec.md section 4).
_LAYER_ORDER = {
    V.V4: ["ln1.weight", "ln1.bias", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r",
           "att.receptance.weight", "att.key.weight", "att.value.weight", "att.time_first",
           "att.time_decay", "att.output.weight"],
    V.V5_1: ["ln1.weight", "ln1.bias", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r",
             "att.receptance.weight", "att.key.weight", "att.value.weight", "att.time_first",
             "att.time_decay", "att.ln_x.weight", "att.ln_x.bias", "att.output.weight"],
    V.V5_2: ["ln1.weight", "ln1.bias", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r",
             "att.time_mix_g", "att.receptance.weight", "att.key.weight", "att.value.weight",
             "att.gate.weight", "att.time_faaaa", "att.time_decay", "att.ln_x.weight",
             "att.ln_x.bias", "att.output.weight"],
    V.V6: ["ln1.weight", "ln1.bias", "att.time_maa_x", "att.time_maa_w1", "att.time_maa_w2",
           "att.time_maa_w", "att.time_maa_k", "att.time_maa_v", "att.time_maa_r",
           "att.time_maa_g", "att.receptance.weight", "att.key.weight", "att.value.weight",
           "att.gate.weight", "att.time_decay", "att.time_decay_w1", "att.time_decay_w2",
           "att.time_faaaa", "att.ln_x.weight", "att.ln_x.bias", "att.output.weight"],
    V.V7: ["ln1.weight", "ln1.bias", "att.x_rwkvag", "att.receptance.weight", "att.w0",
           "att.w1", "att.w2", "att.key.weight", "att.value.weight", "att.v0", "att.v1",
           "att.v2", "att.a0", "att.a1", "att.a2", "att.g1", "att.g2", "att.k_k", "att.k_a",
           "att.r_k", "att.ln_x.weight", "att.ln_x.bias", "att.output.weight"],
}
_FFN_ORDER = {
    V.V4: ["ln2.weight", "ln2.bias", "ffn.time_mix_k", "ffn.time_mix_r",
           "ffn.receptance.weight", "ffn.key.weight", "ffn.value.weight"],
    V.V6: ["ln2.weight", "ln2.bias", "ffn.time_maa_k", "ffn.time_maa_r",
           "ffn.receptance.weight", "ffn.key.weight", "ffn.value.weight"],
    V.V7: ["ln2.weight", "ln2.bias", "ffn.x_k", "ffn.key.weight", "ffn.value.weight"],
}
_FFN_ORDER[V.V5_1] = _FFN_ORDER[V.V5_2] = _FFN_ORDER[V.V4]


@dataclass(frozen=True)
class HParams:
    version: V
    n_vocab: int
    n_embd: int
    n_layer: int
    ffn_size: int
    n_head: int = 0          # 0 for v4
    head_size: int = 0
    lora: dict = field(default_factory=dict)   # rank per LoRA (v6: maa, decay; v7: w, a, v, g)

    @property
    def ln_eps(self) -> float:
        return 1e-5

    @property
    def gn_eps(self) -> float:
        # rwkv.cpp: 1e-5 for v5.x, 64e-5 for v6/v7 (rwkv_spec.md pitfall 1).
        return 64e-5 if self.version in (V.V6, V.V7) else 1e-5

    @property
    def state_floats(self) -> int:
        per_layer = 5 * self.n_embd if self.version is V.V4 else (2 + self.head_size) * self.n_embd
        return per_layer * self.n_layer

    def as_dict(self) -> dict:
        return dict(version=self.version.label, n_vocab=self.n_vocab, n_embd=self.n_embd,
                    n_layer=self.n_layer, ffn_size=self.ffn_size, n_head=self.n_head,
                    head_size=self.head_size, lora=dict(self.lora))


def detect_version(names) -> V:
    """rwkv.cpp's order of tests (rwkv_spec.md section 2): later ones override earlier ones."""
    names = set(names)
    version = V.V4
    if "blocks.0.att.ln_x.weight" in names:
        version = V.V5_2 if "blocks.0.att.gate.weight" in names else V.V5_1
    if "blocks.0.att.time_maa_x" in names:
        version = V.V6
    if "blocks.0.att.r_k" in names or "blocks.0.att.k_k" in names:
        version = V.V7
    return version


def forward_order(hp: HParams) -> list[str]:
    names = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"]
    for i in range(hp.n_layer):
        for suffix in _LAYER_ORDER[hp.version] + _FFN_ORDER[hp.version]:
            if hp.version is V.V7 and i == 0 and suffix in ("att.v0", "att.v1", "att.v2"):
                continue
            names.append(f"blocks.{i}.{suffix}")
    return names + ["ln_out.weight", "ln_out.bias", "head.weight"]


def expected_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """Stored (rwkv.cpp) numpy shape of every tensor."""
    C, V_, F, H, S = hp.n_embd, hp.n_vocab, hp.ffn_size, hp.n_head, hp.head_size
    r = hp.lora
    per = {"ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
           "att.receptance.weight": (C, C), "att.key.weight": (C, C),
           "att.value.weight": (C, C), "att.output.weight": (C, C),
           "ffn.key.weight": (F, C), "ffn.value.weight": (C, F),
           "ffn.receptance.weight": (C, C), "att.ln_x.weight": (C,), "att.ln_x.bias": (C,),
           "att.gate.weight": (C, C)}
    for mix in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_mix_g",
                "ffn.time_mix_k", "ffn.time_mix_r", "ffn.time_maa_k", "ffn.time_maa_r",
                "att.time_maa_x", "att.time_maa_w", "att.time_maa_k", "att.time_maa_v",
                "att.time_maa_r", "att.time_maa_g"):
        per[mix] = (C,)
    if hp.version is V.V4:
        per.update({"att.time_first": (C,), "att.time_decay": (C,)})
    elif hp.version is V.V5_1:
        per.update({"att.time_first": (H, 1, 1), "att.time_decay": (H, 1, 1)})
    elif hp.version is V.V5_2:
        per.update({"att.time_faaaa": (H, S, 1), "att.time_decay": (H, S, 1)})
    elif hp.version is V.V6:
        D, Dw = r["maa"], r["decay"]
        per.update({"att.time_faaaa": (H, S, 1), "att.time_decay": (H, S, 1),
                    "att.time_maa_w1": (5 * D, C), "att.time_maa_w2": (5, C, D),
                    "att.time_decay_w1": (Dw, C), "att.time_decay_w2": (C, Dw)})
    else:
        per.update({"att.x_rwkvag": (6, 1, C), "att.r_k": (H, S), "ffn.x_k": (1, 1, C)})
        for vec in ("w0", "a0", "v0", "k_k", "k_a"):
            per[f"att.{vec}"] = (1, 1, C)
        for lora in ("w", "a", "v", "g"):
            per[f"att.{lora}1"] = (r[lora], C)
            per[f"att.{lora}2"] = (C, r[lora])
    shapes = {"emb.weight": (V_, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
              "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V_, C)}
    for name in forward_order(hp):
        if name.startswith("blocks.") and not name.startswith("blocks.0.ln0"):
            shapes[name] = per[name.split(".", 2)[2]]
    return shapes


