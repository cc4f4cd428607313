"""`rwkv-stream run`: a simulated board runs a model from a stream or straight from a checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from firmware_sim.board import Board
from firmware_sim.sources import FileSource, VirtualSource
from formats import stream as S
from formats.errors import BadInput, UsageError

from .model import load_model
from .plan import make_plan
from .sampling import Sampler
from .stream import VirtualStream
from .tokenizers import StreamingDecoder, get_tokenizer


def open_source(path, quant=None, overrides=()):
    """A stream file is read as it is; any checkpoint becomes a virtual stream (quantized on
    the fly to --quant, or keeping its own types)."""
    path = Path(path)
    if not path.exists():
        raise BadInput("no such file", path=path)
    with open(path, "rb") as f:
        is_stream = f.read(4) == S.MAGIC
    if is_stream:
        if quant or overrides:
            raise UsageError("--quant and --tensor-type apply to checkpoints; this is already "
                             "a stream")
        return FileSource(path)
    model = load_model(path)
    return VirtualSource(VirtualStream(model, make_plan(model, quant, overrides)))


def run(args) -> dict:
    source = open_source(args.model, args.quant, args.tensor_type)
    board = Board(source, ram=args.ram, chunk=args.chunk, mode=args.mode,
                  check_crc=not args.no_crc)
    hp = board.hp
    if args.state_in:
        board.load_state(np.fromfile(args.state_in, "<f4"))
    tokenizer = None
    if args.prompt_tokens is not None:
        tokens = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    else:
        tokenizer = get_tokenizer(hp.n_vocab, args.tokenizer)
        text = args.prompt if args.prompt is not None else \
            Path(args.prompt_file).read_text("utf-8")
        tokens = tokenizer.encode(text)
    if not tokens:
        raise UsageError("the prompt is empty")
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    stops = [s.encode("utf-8") for s in args.stop or ()]
    logits_rows = np.zeros((len(tokens), hp.n_vocab), np.float32) if args.logits_out else None
    t0 = time.perf_counter()
    read0 = source.bytes_read
    for t, tok in enumerate(tokens):
        logits = board.eval(tok)
        if logits_rows is not None:
            logits_rows[t] = logits
    t_prompt = time.perf_counter() - t0
    generated = []
    out = sys.stdout.buffer
    decoder = StreamingDecoder(tokenizer) if tokenizer else None
    text = b""
    stopped = None
    t1 = time.perf_counter()
    for _ in range(args.n):
        tok = sampler(logits)
        generated.append(tok)
        if decoder:
            piece = decoder.push(tok)
            text += piece
            if not args.json:
                out.write(piece)
                out.flush()
            hit = [s for s in stops if s in text]
            if hit:
                stopped = hit[0].decode("utf-8")
                break
        logits = board.eval(tok)
    t_gen = time.perf_counter() - t1
    if not args.json and generated and decoder:
        out.write(b"\n")
    if args.logits_out:
        np.save(args.logits_out, logits_rows)
    if args.state_out:
        board.state.astype("<f4").tofile(args.state_out)
    n_eval = len(tokens) + len(generated)
    result = dict(version=hp.version.label, mode=args.mode, prompt_tokens=len(tokens),
                  generated=generated, text=text.decode("utf-8", "replace"), stopped_at=stopped, ram_bytes=board.arena.ram, ram_needed=board.ram_needed,
                  chunk=args.chunk, bytes_read_per_token=(source.bytes_read - read0) // n_eval,
                  prompt_seconds=round(t_prompt, 4), generate_seconds=round(t_gen, 4),
                  tokens_per_second=round(n_eval / max(t_prompt + t_gen, 1e-9), 2))
    board.close()
    return result
