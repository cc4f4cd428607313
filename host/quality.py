"""How much a quantization costs, measured on text: `eval` and `calibrate`.

eval: the model (a stream, or a checkpoint quantized on the fly) runs on the simulated board
over a text, K tokens a pass (sequence mode, every token's logits kept); next to it the same
checkpoint in F32 (float mode) is the reference. Reported: bits per token and per byte of the
text (the model's own cross-entropy), the mean KL divergence KL(P_f32 || P_model) of the
next-token distributions (nats), and top-1 agreement.

calibrate: per input column of every matrix, the mean of the squared activation over a text
(the "importance matrix" of llama.cpp), collected by watching the board's matrix inputs. Saved
as an .npz of float32 arrays by tensor name (no pickle), read back by `load_importance`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from firmware_sim.board import Board
from formats.errors import BadInput, UsageError

from .model import load_model
from .run_cmd import open_source
from .tokenizers import get_tokenizer

DEFAULT_COLUMNS = 32
EVAL_CHUNK = 1 << 20


def _tokens(path, n_vocab: int, tokenizer: str | None, limit: int | None) -> tuple[list, object]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"--text is not UTF-8 ({e.reason} at byte {e.start})", path=path) from None
    tok = get_tokenizer(n_vocab, tokenizer)
    tokens = tok.encode(text)
    if limit:
        tokens = tokens[:limit]
    if len(tokens) < 2:
        raise BadInput("--text needs at least two tokens to predict one", path=path)
    return tokens, tok


def stream_hparams(source):
    """The header's hyper-parameters (what a board reads first), without making a board."""
    from firmware_sim.board import MIN_CHUNK, read_stream_info
    from formats.board_constants import HEADER_FIXED_SIZE
    fixed, buf = np.zeros(HEADER_FIXED_SIZE, np.uint8), np.zeros(MIN_CHUNK, np.uint8)
    return read_stream_info(source, fixed, buf).hparams


def run_logits(source, tokens, mode: str = "float", columns: int = DEFAULT_COLUMNS,
               observe=None) -> np.ndarray:
    """(T, n_vocab) logits after every token, from a fresh state."""
    # a measuring board, not a small one: a big chunk means few kernel calls per matrix
    board = Board(source, mode=mode, columns=columns, every_logit=True, chunk=EVAL_CHUNK)
    board.observe = observe
    try:
        return board.eval_logits(tokens)
    finally:
        board.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl(lp: np.ndarray, rp: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per row, from log-probabilities."""
    return (np.exp(rp) * (rp - lp)).sum(axis=-1)


def mean_kl(logits: np.ndarray, reference: np.ndarray) -> float:
    """compare()'s kl_mean alone: no tokens or tokenizer needed."""
    return float(_kl(_log_softmax(logits[:-1]), _log_softmax(reference[:-1])).mean())


def compare(logits: np.ndarray, tokens, reference: np.ndarray | None, tokenizer) -> dict:
    """Metrics over the predictions of tokens[1:] (from the logits after tokens[:-1])."""
    lp = _log_softmax(logits[:-1])
    target = np.asarray(tokens[1:])
    nll = -lp[np.arange(len(target)), target]                 # nats per predicted token
    n_bytes = len(tokenizer.decode_bytes(tokens[1:]))
    out = dict(tokens=len(target), bytes=n_bytes,
               bits_per_token=float(nll.mean() / np.log(2)),
               bits_per_byte=float(nll.sum() / np.log(2) / max(1, n_bytes)))
    if reference is not None:
        rp = _log_softmax(reference[:-1])
        kl = _kl(lp, rp)
        out.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                   top1_agreement=float(np.mean(rp.argmax(-1) == lp.argmax(-1))),
                   reference_bits_per_byte=float(
                       -rp[np.arange(len(target)), target].sum() / np.log(2) / max(1, n_bytes)))
    return out


def is_stream(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"RWKS"


def evaluate(model, text, *, quant=None, overrides=(), mode="float", reference=None,
             columns=DEFAULT_COLUMNS, tokenizer=None, limit=None, importance=None,
             calib_text=None) -> dict:
    """eval's result. The reference is `reference` (a checkpoint) or MODEL itself when it is a
    checkpoint, run as F32 in float mode."""
    source = open_source(model, quant, overrides, importance, calib_text)
    hp = stream_hparams(source)
    tokens, tok = _tokens(text, hp.n_vocab, tokenizer, limit)
    logits = run_logits(source, tokens, mode, columns)
    ref_path = reference or (None if is_stream(model) else model)
    ref = None
    if ref_path is not None:
        ref = run_logits(open_source(ref_path, "F32"), tokens, "float", columns)
        if ref.shape != logits.shape:
            raise UsageError(f"--reference {ref_path} has {ref.shape[1]} logits per token, the "
                             f"model {logits.shape[1]}")
    result = dict(model=str(model), text=str(text), quant=quant, mode=mode,
                  reference=None if ref_path is None else str(ref_path))
    result.update(compare(logits, tokens, ref, tok))
    return result


def calibrate(model, text, out, *, quant=None, columns=DEFAULT_COLUMNS, tokenizer=None,
              limit=None) -> dict:
    """Mean squared input activation per column of every matrix, saved to `out` (.npz)."""
    source = open_source(model, quant)
    hp = stream_hparams(source)
    tokens, _ = _tokens(text, hp.n_vocab, tokenizer, limit)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def observe(name, x):
        x = np.asarray(x, np.float64)
        sums[name] = sums.get(name, 0) + (x * x).sum(axis=0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    run_logits(open_source(model, quant), tokens, "float", columns, observe)
    stats = {name: (s / counts[name]).astype(np.float32) for name, s in sums.items()}
    from .outputs import atomic_output
    with atomic_output(out) as f:
        np.savez(f, **stats)
    return dict(model=str(model), text=str(text), output=str(out), tokens=len(tokens),
                tensors=len(stats))


def load_importance(path) -> dict[str, np.ndarray]:
    """`calibrate`'s file: tensor name -> float32 mean squared activation per input column."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise BadInput(f"not an importance file written by calibrate ({e})", path=path) from None
