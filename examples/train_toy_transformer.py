"""Train a small causal transformer whose MLPs are RBE-compressed feed-forward blocks.

What it shows:
  * rbe_ffn.RBEFeedForward drops into an ordinary PyTorch model (pre-norm blocks,
    causal self-attention via F.scaled_dot_product_attention) and trains with AdamW
    directly in the compressed parameters (no dense W1/W2 exists at any point);
  * the loss falls: character-level next-token prediction on a corpus read from
    the Python standard library's own source files (the directory of the `os`
    module), so it runs offline with nothing to download;
  * what the FFN weights cost: dense float32 bytes vs RBE bytes and the ratio;
  * what checkpoint=True buys: the tensors the FFN saves for backward, measured
    with torch.autograd.graph.saved_tensors_hooks around one forward (parameters
    and buffers excluded by data_ptr), checkpoint=True vs False, and a dense
    nn.Linear -> GELU -> nn.Linear block for reference;
  * the time per training step.

It is also a check: it exits with status 1 if the held-out loss after training
is not below 0.8x the held-out loss before training.

Run (from the repository root, after `make example` has built the extension):

    .venv/bin/python examples/train_toy_transformer.py            # default 300 steps
    .venv/bin/python examples/train_toy_transformer.py --steps 100

Seeded and deterministic: the same numbers on every run with the same thread count.
It runs on one CPU thread by default (--threads 1): at 512 tokens per step the
kernels are small, so a second thread gains little, while on a machine where
other processes also use the cores, OpenMP's barriers made 2 threads 4-5x slower
per step in our measurements (one thread also makes the result independent of
the core count). `--threads 0` keeps torch's default.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import rbe_ffn

# Standard-library modules present in every CPython 3.8+; read in this order.
CORPUS_FILES = ["abc.py", "bisect.py", "heapq.py", "string.py", "textwrap.py", "fnmatch.py", "glob.py",
                "functools.py", "random.py", "posixpath.py", "shutil.py", "os.py"]


def load_corpus(max_chars: int = 400_000) -> str:
    root = os.path.dirname(os.__file__)
    parts = []
    for name in CORPUS_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
    text = "\n".join(parts)
    if len(text) < 20_000:
        raise SystemExit(f"corpus too small ({len(text)} chars) from {root}: standard library sources not found")
    # keep ASCII only (non-ASCII characters become '?') so the vocabulary stays small
    return "".join(c if ord(c) < 128 else "?" for c in text[:max_chars])


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + ffn(ln(x)) with an RBE feed-forward."""

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.ffn(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d_model: int, n_heads: int, n_layers: int, d_ff: int,
                 block_size: int, k: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, rbe_ffn.RBEFeedForward(d_model, d_ff, activation="gelu", block_size=block_size,
                                                           k=k, checkpoint=True))
            for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        # GPT-style small init of the (tied) embedding, so the initial loss is about ln(vocab)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def saved_for_backward(module: nn.Module, x: torch.Tensor) -> tuple[int, int, list]:
    """(count, bytes, shapes) of the distinct non-parameter tensors saved for backward by one forward."""
    own = {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen, shapes = set(), []

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() > 0 and t.data_ptr() not in own and key not in seen:
            seen.add(key)
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    nbytes = 0
    for ptr, numel, dtype in seen:
        nbytes += numel * torch.empty((), dtype=dtype).element_size()
    return len(seen), nbytes, shapes


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, reps: int = 10) -> float:
    """Median seconds of one forward + backward of `module` on x."""
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        module(x).sum().backward()
        if i >= 2:  # two warm-up calls
            times.append(time.perf_counter() - t0)
    module.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1; 0 keeps torch's default). See the module docstring.")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    d_model, n_heads, n_layers, d_ff = 128, 4, 2, 512
    # b=32: a dense block is 32*32*4 = 4096 bytes; RBE stores 8*4 + k*(4+2) bytes -> k=80 gives 512 (8.0x)
    block_size, k = 32, 80

    torch.manual_seed(args.seed)
    text = load_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_val = len(data) // 10
    train, val = data[:-n_val], data[-n_val:]
    print(f"corpus: {len(text):,} chars of stdlib source ({os.path.dirname(os.__file__)}), "
          f"vocab {len(chars)}, train {len(train):,} / held-out {len(val):,}")

    model = TinyLM(len(chars), args.seq_len, d_model, n_heads, n_layers, d_ff, block_size, k)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_layers} layers, d_model={d_model}, {n_heads} heads, d_ff={d_ff}, "
          f"RBE FFN b={block_size} k={k} checkpoint=True; {n_params:,} parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    gen = torch.Generator().manual_seed(args.seed + 1)

    def batch(src: torch.Tensor, g: torch.Generator):
        i = torch.randint(len(src) - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([src[j:j + args.seq_len] for j in i.tolist()])
        y = torch.stack([src[j + 1:j + 1 + args.seq_len] for j in i.tolist()])
        return x, y

    vg = torch.Generator().manual_seed(12345)
    val_batches = [batch(val, vg) for _ in range(8)]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in val_batches]
        model.train()
        return sum(losses) / len(losses)

    decay = [p for n, p in model.named_parameters() if n.endswith(("weight", "coeffs")) and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, min(30, args.steps // 10))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    freq = torch.bincount(train, minlength=len(chars)).double() / len(train)
    unigram = -(freq[val].log()).mean().item()  # cross-entropy of the train unigram model on held-out text
    val0 = evaluate()
    print(f"held-out loss before training: {val0:.4f} (uniform guess: ln {len(chars)} = {math.log(len(chars)):.4f}; "
          f"a context-free unigram model: {unigram:.4f})")

    log_every = max(1, args.steps // 6)
    losses, step_times = [], []
    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True, file=sys.stdout, mininterval=0.5)
    for step in bar:
        x, y = batch(train, gen)
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step == 0 or (step + 1) % log_every == 0 or step + 1 == args.steps:
            recent = losses[-min(len(losses), 20):]
            tqdm.write(f"  step {step + 1:4d}  train loss {losses[-1]:.4f}  (mean of last {len(recent)}: "
                       f"{sum(recent) / len(recent):.4f})")
    bar.close()
    val1 = evaluate()

    # ---- report -------------------------------------------------------------------------------
    tail = losses[-min(len(losses), 20):]
    print("\n== loss ==")
    print(f"train loss: first step {losses[0]:.4f} -> mean of last {len(tail)} steps {sum(tail) / len(tail):.4f}")
    print(f"held-out loss: {val0:.4f} -> {val1:.4f} ({val1 / val0:.2f}x; unigram baseline {unigram:.4f})")

    ffns = [blk.ffn for blk in model.blocks]
    dense = sum(2 * f.d_model * f.d_ff * 4 for f in ffns)
    rbe = sum(f.weight_nbytes for f in ffns)
    print("\n== FFN weight bytes (both layers, W1 + W2, biases excluded) ==")
    print(f"dense float32: {dense:,} B   RBE (float32 values + int16 index): {rbe:,} B   ratio {dense / rbe:.2f}x")
    print("(compression of a freshly trained parameterization: there is no dense model this one approximates)")

    print("\n== tensors saved for backward by one FFN forward "
          f"(input [{args.batch}, {args.seq_len}, {d_model}] requires grad; params/buffers excluded) ==")
    ffn = ffns[0]
    xin = torch.randn(args.batch, args.seq_len, d_model, requires_grad=True)
    ref = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
    rows = []
    for label, mod in (("RBE checkpoint=True", None), ("RBE checkpoint=False", None), ("dense nn.Linear/GELU", ref)):
        if mod is None:
            ffn.checkpoint = label.endswith("True")
            mod = ffn
        rows.append((label, *saved_for_backward(mod, xin)))
    for label, n, nbytes, shapes in rows:
        print(f"  {label:22s} {n} tensors, {nbytes:>9,} B   {shapes}")
    layer_times = []
    for label, mod in (("RBE checkpoint=True", None), ("RBE checkpoint=False", None), ("dense nn.Linear/GELU", ref)):
        if mod is None:
            ffn.checkpoint = label.endswith("True")
            mod = ffn
        layer_times.append((label, time_fwd_bwd(mod, xin)))
    ffn.checkpoint = True

    st = sorted(step_times)
    steady = st[len(st) // 10: len(st) - len(st) // 10] or st  # drop the extremes (first-step warm-up)
    print("\n== time ==")
    print(f"per training step ({args.batch}x{args.seq_len} = {args.batch * args.seq_len} tokens): "
          f"median {1e3 * st[len(st) // 2]:.1f} ms, trimmed mean {1e3 * sum(steady) / len(steady):.1f} ms, "
          f"total {sum(step_times):.1f} s for {args.steps} steps")
    print("one FFN layer, forward + backward on the same tokens (median of 10): " +
          ", ".join(f"{label} {1e3 * t:.1f} ms" for label, t in layer_times))

    if not val1 < 0.8 * val0:
        print(f"\nFAIL: held-out loss {val1:.4f} is not below 0.8 x initial {val0:.4f}", file=sys.stderr)
        return 1
    print(f"\nOK: held-out loss fell below 0.8x its initial value ({val1:.4f} < {0.8 * val0:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
