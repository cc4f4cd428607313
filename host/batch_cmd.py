"""`rwkv-stream run --batch-file F`: several independent prompts, one pass over the weights per
step for all of them (batch mode)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from firmware_sim.board import Board
from formats.errors import UsageError

from .sampling import Sampler
from .tokenizers import get_tokenizer


def run_batch(source, args) -> dict:
    prompts = [line for line in Path(args.batch_file).read_text("utf-8").splitlines()
               if line.strip()]
    if not prompts:
        raise UsageError(f"{args.batch_file} holds no prompts (one per line)")
    board = Board(source, ram=args.ram, psram=args.psram or 0, chunk=args.chunk,
                  mode=args.mode, check_crc=not args.no_crc, columns=len(prompts), batch=True,
                  xip=args.xip)
    tokenizer = get_tokenizer(board.hp.n_vocab, args.tokenizer)
    seqs = [tokenizer.encode(p) for p in prompts]
    if any(not s for s in seqs):
        raise UsageError("a prompt in the batch is empty")
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    generated = [[] for _ in seqs]
    # Lockstep: at step t a sequence feeds its prompt's t-th token, then its own last sample.
    steps = max(len(s) for s in seqs) + args.n - 1
    read0, t0 = source.bytes_read, time.perf_counter()
    tokens = [s[0] for s in seqs]
    for t in range(steps):
        logits = board.eval_batch(tokens)
        for n, s in enumerate(seqs):
            if t + 1 < len(s):
                tokens[n] = s[t + 1]
            elif len(generated[n]) < args.n:
                tokens[n] = sampler(logits[n])
                generated[n].append(tokens[n])
    seconds = time.perf_counter() - t0
    texts = [tokenizer.decode_bytes(g).decode("utf-8", "replace") for g in generated]
    fed = board.tokens
    result = dict(version=board.hp.version.label, mode=args.mode, batch=len(seqs),
                  passes=board.passes, tokens_evaluated=fed, texts=texts,
                  bytes_read_per_pass=(source.bytes_read - read0) // max(board.passes, 1),
                  bytes_read_per_token=(source.bytes_read - read0) // max(fed, 1),
                  ram_needed=board.ram_needed, seconds=round(seconds, 3),
                  tokens_per_second=round(fed / max(seconds, 1e-9), 2))
    board.close()
    return result
