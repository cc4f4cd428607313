"""`rwkv-stream plan`: before anything is sent, does the model fit the board, and how fast?"""
from __future__ import annotations

from pathlib import Path

from firmware_sim.arena import BudgetExceeded, buffer_plan, place, required_bytes
from firmware_sim.profiles import BoardProfile
from formats import stream as S

from .model import load_model
from .plan import fallback_notes, make_plan, stream_fallbacks
from .stream.layout import StreamLayout


def _layout(model_path, quant, overrides, importance=None, calib_text=None):
    with open(model_path, "rb") as f:
        is_stream = f.read(4) == S.MAGIC
    if is_stream:
        from .stream.reader import StreamFile
        sf = StreamFile.for_input(model_path)
        try:
            recs = [r for r in sf.walk_as_input() if r.kind == S.RecordKind.TENSOR]
            row = recs[0].qtype.row_bytes(recs[0].shape[-1])
            return sf.hparams, sf.size, row + recs[-1].end - recs[0].end, \
                {r.name: r.qtype.name for r in recs}, row, \
                stream_fallbacks((r.name, r.qtype, r.shape) for r in recs)
        finally:
            sf.close()
    model = load_model(model_path)
    plan = make_plan(model, quant, overrides, importance, calib_text)
    lay = StreamLayout.for_model(model, plan)
    emb, last = lay.records[0], lay.records[-1]
    return (model.hparams, lay.total_size, emb.row_bytes + last.end - emb.end,
            {n: q.name for n, q in plan.items()}, emb.row_bytes, plan.fallbacks)


def _per_prompt_token(per_token: int, emb_row: int, columns: int) -> int:
    """A pass reads everything after the embedding once, plus one embedding row per token."""
    return (per_token - emb_row) // columns + emb_row


def plan(model_path, board: BoardProfile, quant=None, overrides=(), chunk=4096, *,
         importance=None, calib_text=None) -> dict:
    hp, stream_bytes, per_token, types, emb_row_bytes, fallbacks = _layout(
        model_path, quant, overrides, importance, calib_text)
    result = dict(model=str(model_path), board=board.as_dict(), **{"rwkv": hp.as_dict()},
                  stream_bytes=stream_bytes, bytes_per_token=per_token, chunk=chunk)
    buffers = buffer_plan(hp, chunk, logits=True)
    try:
        where = place(buffers, board.sram, board.psram)
        result["fits"] = True
        result["logits"] = "in RAM"
    except BudgetExceeded as e:
        buffers = buffer_plan(hp, chunk, logits=False)
        try:
            where = place(buffers, board.sram, board.psram)
            result["fits"] = True
            result["logits"] = ("do not fit: sampling runs over the head rows as they stream "
                                "(greedy or Gumbel-max temperature sampling; no top-k/top-p)")
        except BudgetExceeded:
            where = {}
            result["fits"] = False
            result["why"] = str(e.message)
    result["ram_needed"] = required_bytes(buffers)
    result["ram_map"] = [dict(name=b.name, bytes=b.nbytes, shape=list(b.shape), what=b.what,
                              region=where.get(b.name, ("-", 0))[0]) for b in buffers]
    if stream_bytes <= board.flash:
        storage, read_rate = "install into flash", board.flash_read
    elif board.psram and stream_bytes <= board.psram - sum(
            b.nbytes for b in buffers if where.get(b.name, ("",))[0] == "psram"):
        storage, read_rate = "install into PSRAM", board.psram_read
    else:
        storage, read_rate = "stream live over the link for every pass", 0.0
    result["storage"] = storage
    speeds = {f"link {name}": rate / per_token for name, rate in board.links.items()}
    if read_rate:
        speeds[storage.replace("install into ", "from ")] = read_rate / per_token
    result["tokens_per_second"] = {k: round(v, 3) for k, v in speeds.items()}
    columns = 1
    if result["fits"]:
        for k in range(2, 65):
            try:
                place(buffer_plan(hp, chunk, result["logits"] == "in RAM", k), board.sram,
                      board.psram)
            except BudgetExceeded:
                break
            columns = k
    result["sequence_tokens_per_pass"] = columns
    result["bytes_per_prompt_token"] = _per_prompt_token(per_token, emb_row_bytes, columns)
    result["sequence_mode"] = (f"{columns} prompt tokens per pass over the weights: "
                               f"{result['bytes_per_prompt_token']:,} bytes read per prompt token"
                               if columns > 1 else "no room for more than one token per pass")
    result["assumptions"] = [
        "tokens/s counts only moving the stream's bytes (one embedding row plus every later "
        "record per token); compute is not included",
        "link rates are the profile's sustained bytes/s; flash/PSRAM read rates are vendor "
        "figures for memory-mapped reads, not measurements",
        f"chunk buffer {chunk} bytes; activations float32",
    ]
    result["types"] = types
    result["fallbacks"] = fallbacks
    result["fallback_notes"] = fallback_notes(fallbacks)
    return result


def format_text(r: dict) -> str:
    b, hp = r["board"], r["rwkv"]
    lines = [f"{Path(r['model']).name} on {b['name']} ({b['sram'] // 1024} KiB SRAM"
             + (f", {b['psram'] // 1024} KiB PSRAM" if b["psram"] else "")
             + f", {b['flash'] // 1024} KiB flash, {b['clock_mhz']} MHz)",
             f"  RWKV v{hp['version']}: n_embd {hp['n_embd']}, {hp['n_layer']} layers, vocab "
             f"{hp['n_vocab']}",
             f"  fits: {'yes' if r['fits'] else 'NO'}; RAM needed {r['ram_needed']:,} bytes"
             + (f" -- {r['why']}" if not r["fits"] else ""),
             f"  logits: {r['logits']}" if r["fits"] else "",
             f"  stream: {r['stream_bytes']:,} bytes -> {r['storage']}",
             f"  bytes read per token: {r['bytes_per_token']:,}",
             *(f"  types: {note}" for note in r.get("fallback_notes", ())),
             "  tokens/s:"]
    for k, v in r["tokens_per_second"].items():
        lines.append(f"    {k:<28} {v:>10.3f}")
    lines.append("  RAM map:")
    for m in r["ram_map"]:
        lines.append(f"    {m['region']:<6} {m['name']:<8} {m['bytes']:>10,}  {m['what']}")
    lines.append(f"  sequence mode: {r['sequence_mode']}")
    lines.append("  assumptions:")
    lines += [f"    - {a}" for a in r["assumptions"]]
    return "\n".join(line for line in lines if line != "")
