"""`rwkv-stream convert`: any checkpoint -> rwkv.cpp `.bin` (later also `.rwks` streams)."""
from __future__ import annotations

from pathlib import Path

from formats.errors import UsageError
from formats.quants import by_name

from .auto import parse_budget
from .bin_writer import write_bin
from .model import Model, load_model
from .outputs import atomic_output
from .plan import fallback_notes, make_plan
from .progress import progress_bar
from .stream import VirtualStream
from .stream.writer import write_stream

FORMATS = {".bin": "rwkv.cpp", ".rwks": "stream"}


def output_format(dst: str, explicit: str | None) -> str:
    if explicit:
        if explicit not in FORMATS.values():
            raise UsageError(f"--format {explicit!r} is not one of {sorted(set(FORMATS.values()))}")
        return explicit
    suffix = Path(dst).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"cannot tell the output format from {dst!r}; use a suffix "
                         f"({', '.join(FORMATS)}) or --format")
    return FORMATS[suffix]


def convert_model(model: Model, dst, quant: str, overrides=(), fmt: str | None = None,
                  importance=None, calib_text=None) -> dict:
    fmt = output_format(str(dst), fmt)
    auto = parse_budget(quant) is not None
    if auto and fmt == "rwkv.cpp":
        raise UsageError("--quant auto mixes types rwkv.cpp files cannot hold: write a stream "
                         "(.rwks)")
    target = by_name("Q4_0" if auto else quant)
    plan = make_plan(model, quant if auto else target, overrides, importance, calib_text)
    total = sum(t.source.nbytes for t in model)
    with progress_bar(total, f"convert -> {quant}") as bar, atomic_output(dst) as out:
        if fmt == "rwkv.cpp":
            write_bin(model, plan, target, out, progress=lambda t: bar.update(t.source.nbytes))
        else:
            vs = VirtualStream(model, plan)
            write_stream(vs, out, progress=lambda r: bar.update(model[r.name].source.nbytes))
    return dict(output=str(dst), format=fmt, quant=quant if auto else target.name,
                types={n: q.name for n, q in plan.items()}, fallbacks=plan.fallbacks,
                fallback_notes=fallback_notes(plan.fallbacks), auto=plan.auto)


def convert(src, dst, quant: str, overrides=(), fmt: str | None = None, importance=None,
            calib_text=None) -> dict:
    model = load_model(src)
    try:
        return convert_model(model, dst, quant, overrides, fmt, importance, calib_text)
    finally:
        model.close()
