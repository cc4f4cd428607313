"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

import numpy as np

from formats.errors import UsageError


class Sampler:
    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None):
        if temperature < 0:
            raise UsageError("--temperature must be >= 0 (0 = greedy)")
        if not 0 < top_p <= 1:
            raise UsageError("--top-p must be in (0, 1]")
        if top_k < 0:
            raise UsageError("--top-k must be >= 0 (0 = off)")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0 or self.top_k == 1:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k:
            order = order[:self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self.rng.choice(len(order), p=p)])
