"""The board's memory: every buffer carved from one arena at start-up, checked against the budget.

`buffer_plan` is the one place that decides what a board holds in RAM, with each buffer's shape;
`Arena` places them (fast SRAM first, PSRAM for what may live there) or says what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formats.arch import HParams, RwkvVersion as V
from formats.errors import RwkvStreamError

ALIGN = 16


class BudgetExceeded(RwkvStreamError):
    """The model's buffers do not fit the board's RAM."""


# Parameter vectors a layer holds at once, and token-shift-mixed inputs, per version.
PARAM_ROWS = {V.V4: 7, V.V5_1: 9, V.V5_2: 10, V.V6: 12, V.V7: 16}
MIX_ROWS = {V.V4: 3, V.V5_1: 3, V.V5_2: 4, V.V6: 5, V.V7: 6}


@dataclass(frozen=True)
class BufferSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    psram_ok: bool        # may live in slower external RAM
    what: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def lora_width(hp: HParams) -> int:
    r = hp.lora
    if hp.version is V.V6:
        return max(5 * r.get("maa", 0), r.get("decay", 0))
    if hp.version is V.V7:
        return max(r.get(k, 0) for k in "wavg")
    return 0


def buffer_plan(hp: HParams, chunk_bytes: int, logits: bool = True, columns: int = 1,
                batch: int = 1, every_logit: bool = False,
                top_k: int = 0) -> list[BufferSpec]:
    """Every buffer a board holds. `columns` (K) tokens go through each layer per pass over the
    weights: K prompt tokens of one sequence (sequence mode) or one token of each of K = batch
    sequences (batch mode, each with its own state and logits). `every_logit`: a sequence pass
    keeps the logits of all K tokens, not just the last (evaluation)."""
    from formats.kernels import ROW_STATE_SIZE
    C, F, Vn, K = hp.n_embd, hp.ffn_size, hp.n_vocab, columns
    lw = lora_width(hp)
    n_act = max(C, F, lw)
    blocks = -(-n_act // 32)
    plan = [
        BufferSpec("header", "u1", (112,), False, "the stream header's fixed fields"),
        BufferSpec("chunk", "u1", (chunk_bytes,), False, "chunk buffer the stream is read through"),
        BufferSpec("x", "f4", (K, C), False, "residual stream"),
        BufferSpec("xn", "f4", (K, C), False, "layer-normed input of the current block"),
        BufferSpec("delta", "f4", (K, C), False,
                   "token shift: previous normed input minus current"),
        BufferSpec("par", "f4", (PARAM_ROWS[hp.version], C), False,
                   "the layer's parameter vectors (norms, mixes, decays)"),
        BufferSpec("mix", "f4", (MIX_ROWS[hp.version], K, C), False,
                   "token-shift-mixed inputs (r, w, k, v, a, g as the version has them)"),
        BufferSpec("proj", "f4", (8, K, C), False, "projections r, k, v, g, w, a, kk, y"),
        BufferSpec("tmp", "f4", (K, C), False, "matmul output before the residual add"),
        BufferSpec("hidden", "f4", (K, F), False, "channel-mix hidden layer"),
        BufferSpec("act_f", "f4", (K, n_act), False, "matmul input as the weight type needs it"),
        BufferSpec("act_q", "i1", (K, blocks * 32), False,
                   "matmul input quantized to Q8 (int8 mode)"),
        BufferSpec("act_d", "f4", (K, blocks), False, "Q8 block scales of the matmul input"),
        BufferSpec("act_s", "f4", (K, blocks), False, "Q8_1 block sums of the matmul input"),
        BufferSpec("lanes", "f8", (K, ROW_STATE_SIZE), False,
                   "int8 mode: a row's partial lane sums across chunk boundaries"),
    ]
    if lw:
        plan.append(BufferSpec("lora", "f4", (K, lw), False, "LoRA hidden values"))
    if hp.version is V.V7:
        plan.append(BufferSpec("v_first", "f4", (K, C), False, "layer 0's value vector"))
    plan.append(BufferSpec("state", "f4", (batch, hp.state_floats), True,
                           "recurrent state (rwkv.cpp's layout), one per sequence"))
    if logits:
        rows = max(batch, K if every_logit else 1)
        plan.append(BufferSpec("logits", "f4", (rows, Vn), True,
                               "logits, one row per sequence (or per token, evaluating)"))
    else:
        # no room for the logits: the head's rows stream through this window and a sampler
        # keeps only the best (greedy or Gumbel-max) token; a head row is at least 16 bytes
        plan.append(BufferSpec("head_rows", "f4", (max(1, chunk_bytes // 16),), False,
                               "logits of the head rows in the chunk (streamed sampling)"))
        if top_k:
            plan.append(BufferSpec("top_logits", "f4", (top_k,), False,
                                   "the k largest logits so far (streamed top-k sampling)"))
            plan.append(BufferSpec("top_ids", "i4", (top_k,), False, "their token ids"))
    return plan


def _shortfall(plan: list[BufferSpec], ram: int, psram: int) -> str:
    need = required_bytes(plan)
    hot = sum(_aligned(b.nbytes) for b in plan if not b.psram_ok)
    parts = ", ".join(f"{b.name} {b.nbytes:,}" for b in sorted(plan, key=lambda b: -b.nbytes)[:4])
    where = f"{ram:,} bytes of RAM" + (f" + {psram:,} of PSRAM" if psram else "")
    if psram and hot <= ram:
        return (f"the board needs {hot:,} bytes of RAM plus {need - hot:,} that may live in "
                f"PSRAM ({parts}, ...); it has {where}")
    return (f"the board needs {need:,} bytes of RAM ({parts}, ...); it has {where}: give at "
            f"least --ram {need}")


def _aligned(n: int) -> int:
    return n + (-n) % ALIGN


def required_bytes(plan: list[BufferSpec]) -> int:
    return sum(_aligned(b.nbytes) for b in plan)


def place(plan: list[BufferSpec], ram: int, psram: int = 0) -> dict[str, tuple[str, int]]:
    """name -> (region, offset): hot buffers first in SRAM, the rest there while it has room,
    then in PSRAM. Raises BudgetExceeded with what is needed."""
    where = {}
    used = {"sram": 0, "psram": 0}
    for spec in sorted(plan, key=lambda b: b.psram_ok):
        size = _aligned(spec.nbytes)
        region = "sram"
        if used["sram"] + size > ram:
            if spec.psram_ok and used["psram"] + size <= psram:
                region = "psram"
            else:
                raise BudgetExceeded(_shortfall(plan, ram, psram))
        where[spec.name] = (region, used[region])
        used[region] += size
    return where


class Arena:
    """One block of SRAM (and optionally PSRAM) holding every buffer in `plan`."""

    def __init__(self, plan: list[BufferSpec], ram: int, psram: int = 0):
        self.plan = plan
        self.ram, self.psram = ram, psram
        placement = place(plan, ram, psram)
        self.sram = np.zeros(ram, np.uint8)
        self.ext = np.zeros(psram, np.uint8) if psram else None
        self.where: dict[str, tuple[str, int, int]] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.used = {"sram": 0, "psram": 0}
        for spec in plan:
            region, off = placement[spec.name]
            mem = self.sram if region == "sram" else self.ext
            self.buffers[spec.name] = mem[off:off + spec.nbytes].view(
                np.dtype(spec.dtype)).reshape(spec.shape)
            self.where[spec.name] = (region, off, spec.nbytes)
            self.used[region] = max(self.used[region], off + _aligned(spec.nbytes))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.buffers[name]

    def ram_map(self) -> list[dict]:
        return [dict(name=s.name, region=self.where[s.name][0], offset=self.where[s.name][1],
                     bytes=s.nbytes, shape=list(s.shape), what=s.what) for s in self.plan]
