"""`rwkv-stream run`: a simulated board runs a model from a stream or straight from a checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from firmware_sim.arena import BudgetExceeded
from firmware_sim.board import Board
from firmware_sim.sources import FileSource, VirtualSource
from formats import stream as S
from formats.errors import BadInput, UsageError

from .model import load_model
from .plan import make_plan
from .sampling import Sampler
from .stream import VirtualStream
from .tokenizers import StreamingDecoder, get_tokenizer


def open_source(path, quant=None, overrides=(), importance=None, calib_text=None):
    """A stream file is read as it is; any checkpoint becomes a virtual stream (quantized on
    the fly to --quant, or keeping its own types)."""
    path = Path(path)
    if not path.exists():
        raise BadInput("no such file", path=path)
    with open(path, "rb") as f:
        is_stream = f.read(4) == S.MAGIC
    if is_stream:
        if quant or overrides or importance or calib_text:
            raise UsageError("--quant, --tensor-type, --imatrix and --calib-text apply to "
                             "checkpoints; this is already a stream")
        return FileSource(path)
    model = load_model(path)
    return VirtualSource(VirtualStream(model, make_plan(model, quant, overrides, importance,
                                                        calib_text)))


MAX_SEQUENCE = 64


def _sequence_columns(source, args) -> int:
    """Prompt tokens per pass: --seq, else as many as --ram allows (up to 64), else 1."""
    from firmware_sim.arena import BudgetExceeded, buffer_plan, place
    from firmware_sim.board import read_stream_info
    if args.seq is not None:
        if args.seq < 1:
            raise UsageError("--seq must be >= 1")
        return args.seq
    if args.ram is None or args.logits_out:
        return 1
    info = read_stream_info(source, np.zeros(112, np.uint8), np.zeros(max(args.chunk, 64),
                                                                       np.uint8))
    best = 1
    for k in range(2, MAX_SEQUENCE + 1):
        try:
            place(buffer_plan(info.hparams, args.chunk, True, k), args.ram, args.psram or 0)
        except BudgetExceeded:
            break
        best = k
    return best


STREAMED_TOP_P_K = 256


def run(args) -> dict:
    source = open_source(args.model, args.quant, args.tensor_type, args.imatrix,
                         args.calib_text)
    if args.batch_file:
        from .batch_cmd import run_batch
        return run_batch(source, args)
    if args.logits_out and args.seq and args.seq > 1:
        raise UsageError("--logits-out needs the logits after every prompt token: it runs the "
                         "prompt one token per pass (drop --seq)")
    columns = _sequence_columns(source, args)
    kw = dict(ram=args.ram, psram=args.psram or 0, chunk=args.chunk, mode=args.mode,
              check_crc=not args.no_crc, columns=columns, xip=args.xip)
    try:
        board = Board(source, **kw)
    except BudgetExceeded:
        # no room for the logits: sample over the head rows as they stream -- greedy or
        # Gumbel-max with a temperature; top-k/top-p keep the k largest logits as rows stream
        # (top-p alone: within the STREAMED_TOP_P_K largest, which the report says)
        if args.logits_out:
            raise
        top_k = args.top_k or (STREAMED_TOP_P_K if args.top_p < 1 else 0)
        board = Board(source, logits=False, top_k=top_k, **kw)
        board.temperature = args.temperature
        board.rng = np.random.default_rng(args.seed)
        board.sampler = Sampler(args.temperature, 0, args.top_p, args.seed)
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
    if logits_rows is not None:
        for t, tok in enumerate(tokens):
            logits_rows[t] = board.eval(tok)
        logits = logits_rows[-1]
    else:
        logits = board.eval_sequence(tokens)
    streamed = logits is None
    prompt_passes = board.passes
    prompt_bytes = source.bytes_read - read0
    t_prompt = time.perf_counter() - t0
    generated = []
    out = sys.stdout.buffer
    decoder = StreamingDecoder(tokenizer) if tokenizer else None
    text = b""
    stopped = None
    t1 = time.perf_counter()
    for _ in range(args.n):
        tok = board.next_token if streamed else sampler(logits)
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
    n_gen = board.passes - prompt_passes
    gen_bytes = source.bytes_read - read0 - prompt_bytes
    n_eval = len(tokens) + n_gen
    result = dict(version=hp.version.label, mode=args.mode, prompt_tokens=len(tokens),
                  generated=generated, text=text.decode("utf-8", "replace"), stopped_at=stopped,
                  ram_bytes=board.arena.ram, ram_needed=board.ram_needed,
                  ram_used=dict(board.arena.used), chunk=args.chunk,
                  sequence_columns=columns, prompt_passes=prompt_passes,
                  logits=("in RAM" if not streamed else
                          f"streamed; the {board.top_k} largest kept for top-k/top-p"
                          + (" (top-p alone is applied within them)" if not args.top_k else "")
                          if board.top_k else "streamed through the sampler"),
                  prompt_bytes_read=prompt_bytes,
                  bytes_read_per_prompt_token=prompt_bytes // len(tokens),
                  bytes_read_per_generated_token=gen_bytes // n_gen if n_gen else None,
                  bytes_read_per_token=(source.bytes_read - read0) // n_eval,
                  prompt_seconds=round(t_prompt, 4), generate_seconds=round(t_gen, 4),
                  tokens_per_second=round(n_eval / max(t_prompt + t_gen, 1e-9), 2))
    if args.board:
        from firmware_sim.profiles import get_profile
        profile = get_profile(args.board)
        total = source.bytes_read - read0
        rates = dict(profile.links)
        if profile.flash_read:
            rates["flash"] = profile.flash_read
        result["board"] = profile.name
        result["transfer_seconds"] = {name: round(total / rate, 3) for name, rate in
                                      rates.items()}
    board.close()
    return result
