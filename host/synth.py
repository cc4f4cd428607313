"""Random, well-scaled RWKV checkpoints of any shape, for tests and benchmarks."""
from __future__ import annotations

import zlib

import numpy as np

from formats.arch import RwkvVersion as V
from formats.errors import UsageError
from formats.quants import by_name

from .model import HParams, expected_shapes, forward_order
from .readers.base import Checkpoint, SourceTensor

F32 = by_name("F32")


def synth_hparams(version: V, n_embd: int, n_layer: int, n_vocab: int, *, ffn_size=None,
                  head_size=None, lora=None) -> HParams:
    if n_embd <= 0 or n_layer <= 0 or n_vocab <= 0:
        raise UsageError("--n-embd, --n-layer and --n-vocab must be positive")
    if n_embd % 32:
        raise UsageError(f"--n-embd {n_embd} must be a multiple of 32 (ggml's block size)")
    ffn = ffn_size or (n_embd * 7 // 2 // 32 * 32 if version in (V.V6,) else 4 * n_embd)
    n_head = 0
    if version is not V.V4:
        S = head_size or min(64, n_embd)
        if n_embd % S:
            raise UsageError(f"head size {S} does not divide n_embd {n_embd}")
        n_head, head_size = n_embd // S, S
    else:
        head_size = 0
    if lora is None:
        small = max(32, (n_embd // 24) // 32 * 32)
        lora = {V.V6: {"maa": 32, "decay": 64}, V.V7: {"w": small, "a": small, "v": small // 2 or 16,
                                                       "g": small * 2}}.get(version, {})
    return HParams(version, n_vocab, n_embd, n_layer, ffn, n_head, head_size, dict(lora))


def _values(name: str, shape, hp: HParams, rng: np.random.Generator) -> np.ndarray:
    """A plausible distribution per tensor kind, in rwkv.cpp's stored form."""
    tail = name.rsplit(".", 1)[-1] if not name.endswith(".weight") and not name.endswith(".bias") \
        else ".".join(name.split(".")[-2:])
    v = hp.version
    if name.endswith("ln_x.weight") or (".ln" in name and name.endswith(".weight")) \
            or name == "ln_out.weight":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith(".bias"):
        return 0.05 * rng.standard_normal(shape)
    if name == "emb.weight":
        return 0.5 * rng.standard_normal(shape)
    if name.endswith(".weight"):       # linear maps (out, in)
        return rng.standard_normal(shape) / np.sqrt(shape[-1])
    if tail.startswith("time_mix") or tail.startswith("time_maa_") and tail[-1] not in "12" \
            or tail in ("x_rwkvag", "x_k"):
        return rng.uniform(0.0, 1.0, shape)
    if tail == "time_decay":
        raw = rng.uniform(-6.0, 0.5, shape)
        if v is V.V4:
            return -np.exp(raw)
        if v in (V.V5_1, V.V5_2):
            return np.exp(-np.exp(raw))
        return raw
    if tail == "time_first":
        raw = rng.uniform(-1.0, 1.0, shape)
        return np.exp(raw) if v is V.V5_1 else raw
    if tail == "time_faaaa":
        return 0.5 * rng.standard_normal(shape)
    if tail in ("time_maa_w1", "time_decay_w1", "w1", "a1", "v1", "g1"):
        return 0.1 * rng.standard_normal(shape) / np.sqrt(shape[-1])
    if tail in ("time_maa_w2", "time_decay_w2", "w2", "a2", "v2", "g2"):
        return 0.1 * rng.standard_normal(shape) / np.sqrt(shape[-1])
    if tail == "w0":
        return rng.uniform(-3.0, 0.0, shape)
    if tail in ("a0", "v0"):
        return 0.2 * rng.standard_normal(shape)
    if tail in ("k_k", "k_a"):
        return rng.uniform(0.5, 1.5, shape)
    if tail == "r_k":
        return 0.2 * rng.standard_normal(shape)
    raise AssertionError(f"no distribution for {name}")


class SyntheticCheckpoint(Checkpoint):
    """A checkpoint in rwkv.cpp's stored form whose tensors are generated when loaded."""

    format_name = "synthetic"
    stored_form = True

    def __init__(self, hp: HParams, seed: int = 0):
        super().__init__(f"<synthetic v{hp.version.label}>")
        self.hp = hp
        self.info = dict(seed=seed)
        shapes = expected_shapes(hp)
        for name in forward_order(hp):
            shape = shapes[name]

            def load(name=name, shape=shape):
                rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                return np.ascontiguousarray(_values(name, shape, hp, rng),
                                            dtype=np.float32).view(np.uint8).reshape(-1)

            self.tensors[name] = SourceTensor(name, shape, F32, self.path, None, load)
