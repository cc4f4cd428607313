"""`rwkv-stream inspect`: what a model file holds."""
from __future__ import annotations

import math

from .model import load_model


def describe_stream(path) -> dict:
    """The record map of a stream, what a board reads per token, and bits per weight."""
    from formats import stream as S

    from .plan import fallback_notes, stream_fallbacks
    from .stream.reader import StreamFile
    sf = StreamFile.for_input(path)
    try:
        records = sf.walk_as_input()
        tensors = [r for r in records if r.kind == S.RecordKind.TENSOR]
        n_weights = sum(math.prod(r.shape) for r in tensors)
        payload = sum(r.data_size for r in tensors)
        emb = tensors[0]
        # per token a board reads the header-less body once, except the embedding, of which it
        # reads one row
        per_token = (tensors[-1].end - emb.end) + emb.qtype.row_bytes(emb.shape[-1])
        fallbacks = stream_fallbacks((r.name, r.qtype, r.shape) for r in tensors)
        return dict(file=str(path), format="stream", stream_version=f"{sf.header.major}."
                    f"{sf.header.minor}", **sf.hparams.as_dict(), bytes=sf.size,
                    header_bytes=sf.header.header_size, n_weights=n_weights,
                    bits_per_weight=round(8 * payload / n_weights, 3),
                    bytes_per_token=per_token, fallbacks=fallbacks,
                    fallback_notes=fallback_notes(fallbacks),
                    records=[dict(name=r.name, type=r.qtype.name if r.qtype else None,
                                  shape=list(r.shape), offset=r.offset, data_offset=r.data_offset,
                                  bytes=r.data_size,
                                  bits_per_weight=round(8 * r.data_size / math.prod(r.shape), 3)
                                  if r.shape else None) for r in records])
    finally:
        sf.close()


def format_stream_text(info: dict) -> str:
    lines = [f"{info['file']}: stream {info['stream_version']}, RWKV v{info['version']}",
             f"  n_vocab {info['n_vocab']}  n_embd {info['n_embd']}  n_layer {info['n_layer']}"
             f"  ffn {info['ffn_size']}"
             + (f"  heads {info['n_head']} x {info['head_size']}" if info['n_head'] else ""),
             f"  {info['bytes']:,} bytes, {info['n_weights']:,} weights, "
             f"{info['bits_per_weight']} bits per weight",
             f"  a board reads {info['bytes_per_token']:,} bytes per token (one embedding row "
             "and every later record)",
             *(f"  {note}" for note in info.get("fallback_notes", ())), ""]
    w = max(len(r["name"]) for r in info["records"])
    lines.append(f"  {'offset':>10}  {'record':<{w}}  {'type':<5} {'shape':<16} {'bytes':>11}  bpw")
    for r in info["records"]:
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(f"  {r['offset']:>10}  {r['name']:<{w}}  {r['type'] or '-':<5} "
                     f"{shape:<16} {r['bytes']:>11,}  {r['bits_per_weight'] or ''}")
    return "\n".join(lines)


def describe(path) -> dict:
    with open(path, "rb") as f:
        if f.read(4) == b"RWKS":
            return describe_stream(path)
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
    if info["format"] == "stream":
        return format_stream_text(info)
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
