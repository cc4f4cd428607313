"""Which type each tensor gets: rwkv.cpp's rules by default, `--tensor-type GLOB=TYPE` on top."""
from __future__ import annotations

import fnmatch

import numpy as np

from formats.errors import BadInput, UsageError
from formats.quants import QuantType, by_name

from .model import Model, ModelTensor


class Plan(dict):
    """name -> type for every tensor, in forward order; `fallbacks` lists the tensors whose
    rows are not whole blocks of the type they were meant to get, and which got that type's
    `fallback` instead (dicts: tensor, type, fallback, n_cols); `importance` maps tensor names
    to per-column importance for the quantizers; `auto` is auto:BPW's report."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.fallbacks: list[dict] = []
        self.importance: dict = {}
        self.auto: dict | None = None


def _importance(model: Model, importance) -> dict:
    """calibrate's statistics, checked against the model: name -> float32 (n_cols,)."""
    if importance is None:
        return {}
    if not isinstance(importance, dict):
        from .quality import load_importance
        path, importance = importance, load_importance(importance)
    else:
        path = None
    names = {t.name: t for t in model}
    for name, values in importance.items():
        t = names.get(name)
        if t is None:
            raise BadInput(f"importance for {name}, which this model does not have (a file "
                           "calibrated on another model?)", path=path)
        if values.shape != (t.shape[-1],) or not np.all(np.isfinite(values)):
            raise BadInput(f"importance of {name} has shape {values.shape}, the tensor's rows "
                           f"have {t.shape[-1]} columns (or it is not finite)", path=path)
    return importance

F32, F16 = by_name("F32"), by_name("F16")

# rwkv.cpp's converter keeps these FP32 in an FP16 file (rwkv_spec.md section 1.4).
_FP16_EXCLUDED = (".time_", ".k_k", ".k_a", ".r_k", ".x_rwkvag", ".x_k", ".w0", ".a0", ".v0")
# rwkv.cpp's quantizer never quantizes these 2-D tensors.
_QUANT_EXCLUDED = ("att.v1", "att.v2", "att.g1", "att.g2", "att.a1", "att.a2", "att.w1",
                   "att.w2", "att.r_k")


def parse_overrides(specs) -> list[tuple[str, QuantType]]:
    out = []
    for spec in specs or ():
        glob, sep, type_name = spec.partition("=")
        if not sep or not glob or not type_name:
            raise UsageError(f"--tensor-type expects GLOB=TYPE, got {spec!r}")
        out.append((glob, by_name(type_name)))
    return out


def _fp16_rule(t: ModelTensor) -> bool:
    return len(t.shape) > 1 and not any(s in t.name for s in _FP16_EXCLUDED)


def _quantize_rule(t: ModelTensor) -> bool:
    return (len(t.shape) == 2 and t.name not in ("emb.weight", "head.weight")
            and not any(s in t.name for s in _QUANT_EXCLUDED))


def quantizable(model: Model) -> list[str]:
    """The tensors `--quant` applies to (rwkv.cpp's quantize rule), in forward order."""
    return [t.name for t in model if _quantize_rule(t)]


def _kept_type(t: ModelTensor) -> QuantType:
    """The type a tensor keeps when the target does not apply to it: the source's, as rwkv.cpp
    keeps it; a transformed or bf16 tensor takes what rwkv.cpp's converter would have written."""
    stored = t.source.qtype                   # the checkpoint's own type, before transforms
    if not t.transformed and (stored in (F32, F16) or stored.is_block):
        return stored
    if stored is F32:
        return F32
    return F16 if _fp16_rule(t) else F32      # a 16-bit source, as the FP16 converter writes


def default_type(t: ModelTensor, target: QuantType) -> QuantType:
    if target is F32:
        return F32
    if target is F16:
        return F16 if _fp16_rule(t) else F32
    if target.is_block:
        return target if _quantize_rule(t) else _kept_type(t)
    # BF16 target: like F16.
    return target if _fp16_rule(t) else F32


def make_plan(model: Model, quant: str | QuantType | None, overrides=(), importance=None,
              calib_text=None, progress=None) -> Plan:
    """name -> type for every tensor, in forward order (a Plan: a dict that also lists the
    fallbacks). quant None keeps the source's types; "auto:BPW" chooses per tensor
    (host/auto.py; the report is `plan.auto`). A tensor whose rows are not whole blocks of its
    type gets the type's fallback (k-quants: as llama.cpp does), recorded in `plan.fallbacks`;
    a type without one is BadInput. `importance` (calibrate's .npz path, or name -> per-column
    array) goes with the plan to the quantizers (`plan.importance`)."""
    from .auto import auto_plan, parse_budget
    importance = _importance(model, importance)
    budget = parse_budget(quant)
    if budget is None and calib_text is not None:
        raise UsageError("--calib-text is for --quant auto:BPW")
    target = quant if isinstance(quant, QuantType) or quant is None or budget is not None \
        else by_name(quant)
    if budget is not None:
        target = by_name("Q4_0")        # what the tensors outside the budget get, as Q4_0 would
    rules = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) \
        else list(overrides)
    plan = Plan((t.name, default_type(t, target) if target else t.source_type) for t in model)
    plan.importance = importance
    if budget is not None:
        names = quantizable(model)
        tokens = None
        if calib_text is not None:
            from .quality import _tokens
            tokens, _ = _tokens(calib_text, model.hparams.n_vocab, None, None)
        chosen, plan.auto = auto_plan(model, budget, dict(plan), names, importance=importance,
                                      tokens=tokens, progress=progress)
        plan.update(chosen)
    used = set()
    for t in model:
        for glob, qtype in rules:
            if fnmatch.fnmatchcase(t.name, glob):
                plan[t.name] = qtype
                used.add(glob)
    for glob, _ in rules:
        if glob not in used:
            raise UsageError(f"--tensor-type {glob!r} matches no tensor of this model")
    for t in model:
        qtype = plan[t.name]
        n_cols = t.shape[-1] if t.shape else 1
        if not qtype.is_block or qtype.fits(n_cols):
            continue
        fallback = by_name(qtype.fallback) if qtype.fallback else None
        if fallback is None or not fallback.fits(n_cols):
            raise BadInput(f"rows of {n_cols} elements cannot be stored as {qtype.name} "
                           f"(blocks of {qtype.block_size})"
                           + (f" nor as its fallback {fallback.name} (blocks of "
                              f"{fallback.block_size})" if fallback else "")
                           + "; choose another type for it with --tensor-type",
                           path=model.path, tensor=t.name)
        plan[t.name] = fallback
        plan.fallbacks.append(dict(tensor=t.name, type=qtype.name, fallback=fallback.name,
                                   n_cols=n_cols))
    return plan


def stream_fallbacks(records) -> list[dict]:
    """The fallbacks a stream shows, from its records alone ((name, type, shape) each): a
    matrix of type F whose rows are not whole blocks of a type T the stream also uses, where F
    is T's fallback. (A stream does not say what was asked for; a stream in which no tensor
    got T itself shows none.)"""
    records = [(n, q, tuple(s)) for n, q, s in records if q is not None]
    used = {q.name: q for _, q, _ in records}
    out = []
    for name, q, shape in records:
        if len(shape) < 2:
            continue
        for t in used.values():
            if t.fallback == q.name and not t.fits(shape[-1]):
                out.append(dict(tensor=name, type=t.name, fallback=q.name, n_cols=shape[-1]))
                break
    return out


def fallback_notes(fallbacks) -> list[str]:
    """One line per (type, fallback) pair: "3 tensors fell back from Q4_K to Q5_0 (rows of
    64 are not a multiple of 256)"."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for f in fallbacks:
        groups.setdefault((f["type"], f["fallback"]), []).append(f)
    notes = []
    for (name, fb), items in groups.items():
        cols = sorted({f["n_cols"] for f in items})
        n = len(items)
        notes.append(f"{n} tensor{'s' if n != 1 else ''} fell back from {name} to {fb} (rows of "
                     f"{', '.join(map(str, cols))} {'are' if n != 1 or len(cols) > 1 else 'is'} "
                     f"not a multiple of {by_name(name).block_size})")
    return notes
