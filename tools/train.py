"""Train the small byte-level RWKV v5.2 model that ships as package data.

Development only: needs torch (``pip install -e .[dev]``, torch==2.13.0, CPU).
The model is plain torch and follows rwkv.cpp's v5.2 forward pass
(docs: /work/shared/docs/rwkv_spec.md section 4.5) with the RWKV authors'
raw PyTorch parameter names and shapes, so the saved state dict is an ordinary
RWKV v5.2 checkpoint that the project's own ``.pth`` reader loads:

* ``time_decay`` (H,S) raw (the decay per step is ``exp(-exp(time_decay))``),
* ``time_faaaa`` (H,S) raw bonus,
* ``time_mix_*`` (1,1,C), ``att.ln_x`` group norm with eps 1e-5 (as rwkv.cpp),
* no sigmoid on the attention receptance, token shift carries LN outputs.

Training is time-parallel: for v5.2 the decay does not depend on the token, so
the WKV recurrence over a window of T tokens is an exact (T,T) "attention"
with weights ``sum_i r_t[i] k_s[i] w_i^(t-1-s)`` (s < t) plus the ``u`` bonus
on the diagonal.  ``wkv_sequential`` is the token-by-token reference.

Usage (the bundled model):

    python tools/train.py --out host/data/demo-rwkv-5v2-925k.pth
    python tools/train.py --eval host/data/demo-rwkv-5v2-925k.pth   # held-out bpb
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def build_corpus() -> tuple[bytes, bytes]:
    """(train, held-out) bytes from tools/corpus.py, run in a fresh isolated
    interpreter (``python -I``) so that modules imported here (torch) cannot
    change what the standard library exposes: the corpus is then a function
    of the Python installation only."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tr, he = os.path.join(d, "train.txt"), os.path.join(d, "heldout.txt")
        subprocess.run([sys.executable, "-I", os.path.join(HERE, "corpus.py"), "--out", tr,
                        "--heldout-out", he], check=True, stdout=subprocess.DEVNULL, cwd=d)
        with open(tr, "rb") as f1, open(he, "rb") as f2:
            return f1.read(), f2.read()

LN_EPS = 1e-5
GN_EPS = 1e-5  # rwkv.cpp uses 1e-5 for v5.x (not ChatRWKV's 64e-5)


def init_params(n_layer: int, n_embd: int, head_size: int, ffn_dim: int, vocab: int = 256,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """A v5.2 state dict with RWKV-LM-style initialisation (float32)."""
    g = torch.Generator().manual_seed(seed)
    C, H, S, V, Fd = n_embd, n_embd // head_size, head_size, vocab, ffn_dim
    p: dict[str, torch.Tensor] = {}

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def ortho(rows, cols, gain):
        w = torch.empty(rows, cols)
        a = torch.randn(max(rows, cols), min(rows, cols), generator=g)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r))
        w.copy_(q if rows >= cols else q.T)
        return w * gain

    p["emb.weight"] = (torch.rand(V, C, generator=g) * 2 - 1) * 1e-4
    p["blocks.0.ln0.weight"] = torch.ones(C)
    p["blocks.0.ln0.bias"] = torch.zeros(C)
    ddd = torch.arange(C, dtype=torch.float32) / C
    n = torch.arange(C, dtype=torch.float32)
    for i in range(n_layer):
        b = f"blocks.{i}."
        r01 = i / max(n_layer - 1, 1)
        r1a0 = 1.0 - i / n_layer
        for ln in ("ln1", "ln2"):
            p[b + ln + ".weight"] = torch.ones(C)
            p[b + ln + ".bias"] = torch.zeros(C)
        p[b + "att.time_mix_k"] = torch.pow(ddd, r1a0).view(1, 1, C)
        p[b + "att.time_mix_v"] = (torch.pow(ddd, r1a0) + 0.3 * r01).view(1, 1, C)
        p[b + "att.time_mix_r"] = torch.pow(ddd, 0.5 * r1a0).view(1, 1, C)
        p[b + "att.time_mix_g"] = torch.pow(ddd, 0.5 * r1a0).view(1, 1, C)
        decay = -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01)
        p[b + "att.time_decay"] = decay.view(H, S)
        p[b + "att.time_faaaa"] = (r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1).view(H, S)
        p[b + "att.receptance.weight"] = ortho(C, C, 1.0)
        p[b + "att.key.weight"] = ortho(C, C, 0.1)
        p[b + "att.value.weight"] = ortho(C, C, 1.0)
        p[b + "att.gate.weight"] = ortho(C, C, 0.1)
        p[b + "att.output.weight"] = torch.zeros(C, C)
        p[b + "att.ln_x.weight"] = torch.ones(C)
        p[b + "att.ln_x.bias"] = torch.zeros(C)
        p[b + "ffn.time_mix_k"] = torch.pow(ddd, r1a0).view(1, 1, C)
        p[b + "ffn.time_mix_r"] = torch.pow(ddd, r1a0).view(1, 1, C)
        p[b + "ffn.key.weight"] = ortho(Fd, C, 1.0)
        p[b + "ffn.receptance.weight"] = torch.zeros(C, C)
        p[b + "ffn.value.weight"] = torch.zeros(C, Fd)
    p["ln_out.weight"] = torch.ones(C)
    p["ln_out.bias"] = torch.zeros(C)
    p["head.weight"] = ortho(V, C, 0.5 * math.sqrt(V / C)) if V > C else ortho(V, C, 0.5)
    return p


def shape_of(p: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """(n_layer, n_embd, n_head, head_size) of a v5.2 state dict."""
    L = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))
    H, S = p["blocks.0.att.time_decay"].shape
    return L, H * S, H, S


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Token shift within a window starting from a zero state: x[t-1] (0 at t=0)."""
    return F.pad(x, (0, 0, 1, -1))


def _mix(x, prev, m):
    return x * m + prev * (1 - m)


def wkv_parallel(r, k, v, lw, u, chunk: int = 32):
    """r,k,v: (B,H,T,S); lw = log decay (H,S) = -exp(time_decay); u (H,S).

    out[t,j] = sum_i r[t,i] (u_i k[t,i] v[t,j] + sum_{s<t} w_i^(t-1-s) k[s,i] v[s,j]),
    computed in chunks: exact (chunk x chunk) weights inside a chunk, and the
    state [key][value] carried from chunk to chunk.  Every power of w has a
    non-negative exponent, so nothing overflows.
    """
    B, H, T, S = r.shape
    Lc = min(chunk, T)
    if T % Lc:  # pad the end: later tokens never affect earlier outputs
        pad = Lc - T % Lc
        r, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (r, k, v))
        return wkv_parallel(r, k, v, lw, u, chunk)[:, :, :T]
    t = torch.arange(Lc)
    dist = (t[:, None] - 1 - t[None, :]).to(r.dtype)          # t-1-s
    mask = (t[:, None] > t[None, :]).to(r.dtype)              # s < t
    D = torch.exp(lw[:, None, None, :] * dist.clamp(min=0)[None, :, :, None]) * mask[None, :, :, None]
    pw_in = torch.exp(lw[:, None, :] * t[None, :, None].to(r.dtype))           # w^(t-c0)   (H,Lc,S)
    pw_out = torch.exp(lw[:, None, :] * (Lc - 1 - t)[None, :, None].to(r.dtype))  # w^(L-1-s)
    w_all = torch.exp(lw * Lc)                                                # (H,S)
    state = torch.zeros(B, H, S, S, dtype=r.dtype)
    outs = []
    for c in range(T // Lc):
        sl = slice(c * Lc, (c + 1) * Lc)
        rc, kc, vc = r[:, :, sl], k[:, :, sl], v[:, :, sl]
        A = torch.einsum("bhti,htsi->bhtsi", rc, D)
        A = torch.einsum("bhtsi,bhsi->bhts", A, kc)
        diag = (rc * u[None, :, None, :] * kc).sum(-1)
        A = A + torch.diag_embed(diag)
        o = A @ vc + (rc * pw_in[None]) @ state
        outs.append(o)
        state = w_all[None, :, :, None] * state + (kc * pw_out[None]).transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2)


def wkv_sequential(r, k, v, lw, u):
    """Token-by-token reference of rwkv.cpp's v5.2 WKV (state [h][key][value])."""
    B, H, T, S = r.shape
    w = torch.exp(lw)
    state = torch.zeros(B, H, S, S, dtype=r.dtype)
    outs = []
    for t in range(T):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]             # (B,H,S_key,S_val)
        outs.append(torch.einsum("bhi,bhij->bhj", r[:, :, t], u[None, :, :, None] * kv + state))
        state = w[None, :, :, None] * state + kv
    return torch.stack(outs, dim=2)


def forward(p: dict[str, torch.Tensor], idx: torch.Tensor, sequential: bool = False) -> torch.Tensor:
    """Logits (B,T,V) for byte windows idx (B,T), each starting from the zero state."""
    L, C, H, S = shape_of(p)
    B, T = idx.shape
    x = F.embedding(idx, p["emb.weight"])
    x = F.layer_norm(x, (C,), p["blocks.0.ln0.weight"], p["blocks.0.ln0.bias"], LN_EPS)
    wkv = wkv_sequential if sequential else wkv_parallel
    for i in range(L):
        b = f"blocks.{i}."
        xa = F.layer_norm(x, (C,), p[b + "ln1.weight"], p[b + "ln1.bias"], LN_EPS)
        prev = _shift(xa)
        xk = _mix(xa, prev, p[b + "att.time_mix_k"])
        xv = _mix(xa, prev, p[b + "att.time_mix_v"])
        xr = _mix(xa, prev, p[b + "att.time_mix_r"])
        xg = _mix(xa, prev, p[b + "att.time_mix_g"])
        heads = lambda z: z.view(B, T, H, S).transpose(1, 2)  # noqa: E731
        r = heads(xr @ p[b + "att.receptance.weight"].T)
        k = heads(xk @ p[b + "att.key.weight"].T)
        v = heads(xv @ p[b + "att.value.weight"].T)
        g = F.silu(xg @ p[b + "att.gate.weight"].T)
        lw = -torch.exp(p[b + "att.time_decay"])
        out = wkv(r, k, v, lw, p[b + "att.time_faaaa"])       # (B,H,T,S)
        out = out.transpose(1, 2).reshape(B * T, C)
        y = F.group_norm(out, H, p[b + "att.ln_x.weight"], p[b + "att.ln_x.bias"], GN_EPS)
        y = y.view(B, T, C) * g
        x = x + y @ p[b + "att.output.weight"].T

        xf = F.layer_norm(x, (C,), p[b + "ln2.weight"], p[b + "ln2.bias"], LN_EPS)
        prev = _shift(xf)
        xk = _mix(xf, prev, p[b + "ffn.time_mix_k"])
        xr = _mix(xf, prev, p[b + "ffn.time_mix_r"])
        kk = torch.relu(xk @ p[b + "ffn.key.weight"].T) ** 2
        x = x + torch.sigmoid(xr @ p[b + "ffn.receptance.weight"].T) * (kk @ p[b + "ffn.value.weight"].T)
    x = F.layer_norm(x, (C,), p["ln_out.weight"], p["ln_out.bias"], LN_EPS)
    return x @ p["head.weight"].T


def to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@torch.no_grad()
def bits_per_byte(p: dict[str, torch.Tensor], data: bytes, ctx: int = 128, batch: int = 32) -> float:
    """Held-out bits per byte: windows data[ctx*i : ctx*i+ctx+1], each from the zero
    state, predicting its last ctx bytes (every byte after the first is predicted once)."""
    p = {k: v.float() for k, v in p.items()}
    d = to_tensor(data)
    n = (len(d) - 1) // ctx
    total, count = 0.0, 0
    for s in range(0, n, batch):
        idx = torch.stack([d[ctx * i: ctx * i + ctx + 1] for i in range(s, min(s + batch, n))])
        logits = forward(p, idx[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += idx[:, 1:].numel()
    return total / count / math.log(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the bundled tiny RWKV v5.2 byte model.")
    ap.add_argument("--out", default="host/data/demo-rwkv-5v2-925k.pth")
    ap.add_argument("--eval", metavar="PTH", help="only print the held-out bits per byte of PTH")
    ap.add_argument("--eval-windows", type=int, metavar="N",
                    help="with --eval: only the first N windows of the held-out text (the "
                         "figure host/data/README.md records for the test suite)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--head-size", type=int, default=32)
    ap.add_argument("--ffn-dim", type=int, default=448)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-final", type=float, default=1e-4)
    ap.add_argument("--minutes", type=float, default=14.0, help="wall-time budget")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()
    train, held = build_corpus()
    print(f"corpus: train {len(train)} bytes, held-out {len(held)} bytes ({time.time() - t0:.1f}s)",
          flush=True)
    if a.eval:
        sd = torch.load(a.eval, map_location="cpu", weights_only=True)
        if a.eval_windows:
            held = held[:a.eval_windows * a.ctx + 1]
        print(f"held-out bits per byte: {bits_per_byte(sd, held, a.ctx):.6f}")
        return

    p = init_params(a.n_layer, a.n_embd, a.head_size, a.ffn_dim, seed=a.seed)
    for v in p.values():
        v.requires_grad_(True)
    n_params = sum(v.numel() for v in p.values())
    print(f"model: v5.2 L={a.n_layer} C={a.n_embd} H={a.n_embd // a.head_size} "
          f"S={a.head_size} F={a.ffn_dim}, {n_params} parameters", flush=True)
    decay, no_decay = [], []
    for k, v in p.items():
        (decay if v.dim() == 2 and "time_" not in k else no_decay).append(v)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.99), eps=1e-8)
    data = to_tensor(train)
    gen = torch.Generator().manual_seed(a.seed)
    budget = a.minutes * 60
    t_start = time.time()
    ema, step = None, 0
    while step < a.max_steps:
        elapsed = time.time() - t_start
        if elapsed > budget:
            break
        frac = min(elapsed / budget, 1.0)
        lr = a.lr_final + 0.5 * (a.lr - a.lr_final) * (1 + math.cos(math.pi * frac))
        if step < 50:
            lr = lr * (step + 1) / 50
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, len(data) - a.ctx - 1, (a.batch,), generator=gen)
        idx = torch.stack([data[s: s + a.ctx + 1] for s in starts.tolist()])
        logits = forward(p, idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        step += 1
        if step % 50 == 0:
            print(f"step {step} t={time.time() - t_start:.0f}s lr={lr:.2e} loss={loss.item():.4f} "
                  f"ema={ema:.4f} ({ema / math.log(2):.3f} bits/byte)", flush=True)
    train_time = time.time() - t_start
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    sd = {k: v.detach().to(dt).contiguous() for k, v in p.items()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    torch.save(sd, a.out)
    bpb = bits_per_byte(sd, held, a.ctx)
    print(f"done: {step} steps in {train_time:.0f}s, final train loss (ema) {ema:.4f} nats/byte "
          f"= {ema / math.log(2):.4f} bits/byte; held-out {bpb:.4f} bits/byte ({a.dtype} weights); "
          f"saved {a.out} ({os.path.getsize(a.out)} bytes)", flush=True)


if __name__ == "__main__":
    main()
