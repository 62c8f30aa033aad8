"""Character (byte-level) language model on the Python standard library's source: three FFN arms.

A small decoder-only transformer (pre-LN, causal attention with
F.scaled_dot_product_attention, learned positions, tied embedding/head) is trained
three times in one run, with the same seed, the same batches in the same order,
the same number of steps and the same optimizer (AdamW, warmup + cosine):

  dense      nn.Linear(d, 4d) -> GELU -> nn.Linear(4d, d)
  rbe        rbe_ffn.RBEFeedForward(d, 4d, "gelu", block_size=b, k=k, checkpoint=True),
             k chosen so that the FFN's weight parameters (basis + coeffs) are 1/8 of the dense ones
  dense-small  nn.Linear -> GELU -> nn.Linear with d_ff chosen so that its weight parameters equal
             the RBE arm's (d_ff = 4d/8 when the counts divide exactly)

Everything outside the FFNs (embeddings, attention, norms) is initialized identically in the three
models; the FFNs get their own seeded generator. The arms are trained interleaved (step s of
dense, then of rbe, then of dense-small, then step s+1 ...), so that the step times of the three
arms see the same load on a shared machine.

Corpus: the .py files of the standard library of the running Python (sysconfig's "stdlib"
directory; site-packages and the test suites excluded), in a fixed order (sorted by the SHA-256 of
their relative path, which spreads a capped subset over the whole library), read as bytes (vocabulary
256) until --corpus-mb MB; every 10th file of that order is held out for validation.

Outputs (in --out): char_lm.csv (step, arm, train loss, val loss, seconds), char_lm.png (val loss vs
step and vs training time), char_lm_summary.md (the table printed at the end).

Memory: "saved for backward" is measured with torch.autograd.graph.saved_tensors_hooks around the
forward (and loss) of one training step of the whole model: the distinct storages packed for backward,
parameters and buffers excluded, counted once each at their full size; the part packed inside the
FFN modules is shown separately. "peak step" is the profiler method of bench/bench_cpu.py: the peak of
(bytes allocated - bytes freed) by torch's CPU allocator during one forward + backward, above its start
(parameter gradients included). The RBE model is also measured with checkpoint=False (same weights; its
forward is bitwise equal, which is checked), to show what checkpoint=True saves on the same model.

Threads: one by default (--threads 1). On a machine whose cores other processes also use, OpenMP's
barriers made 2 threads 3-7x slower per step in our measurements; one thread also keeps the three
arms' step times comparable. Results are deterministic for a given thread count and corpus.

    .venv/bin/python examples/train_char_lm.py            # default: 80 steps x 3 arms, ~2-3 min on 2 shared cores
    .venv/bin/python examples/train_char_lm.py --quick    # a smoke run of a few seconds
    .venv/bin/python examples/train_char_lm.py --steps 600 --eval-every 50 --eval-windows 96 --out docs/char_lm
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import platform
import statistics
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import rbe_ffn
from rbe_ffn._profiling import peak_live_bytes

ARMS = ("dense", "rbe", "dense-small")
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ---------------------------------------------------------------------------------------------- data
def stdlib_files(root: str) -> list[str]:
    """Relative paths of the standard library's .py files, test suites and site-packages excluded,
    ordered by the SHA-256 of the relative path (deterministic, and spread over the library)."""
    rels = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in EXCLUDED_DIRS)
        for f in files:
            if f.endswith(".py"):
                rels.append(os.path.relpath(os.path.join(d, f), root))
    return sorted(rels, key=lambda r: (hashlib.sha256(r.encode()).hexdigest(), r))


def load_corpus(max_mb: float, val_frac: float = 0.1):
    """(train bytes, val bytes, info) as long tensors of byte values: whole files in stdlib_files order
    until max_mb MB (the last one cut); a file goes to validation when validation holds less than
    val_frac of the bytes read before it, else to training (so whole files are held out)."""
    root = sysconfig.get_paths()["stdlib"]
    limit = int(max_mb * 1e6)
    train, val, total, nfiles = [], [], 0, 0
    sha = hashlib.sha256()
    nval = 0
    for rel in stdlib_files(root):
        if total >= limit:
            break
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()[: limit - total] + b"\n"
        sha.update(data)
        if total > 0 and nval < val_frac * total:
            val.append(data)
            nval += len(data)
        else:
            train.append(data)
        total += len(data)
        nfiles += 1
    tr, va = b"".join(train), b"".join(val)
    if len(tr) < 2000 or len(va) < 2000:
        raise SystemExit(f"corpus too small (train {len(tr)}, val {len(va)} bytes) from {root}; raise --corpus-mb")
    info = {"root": root, "files": nfiles, "bytes": total, "train_bytes": len(tr), "val_bytes": len(va),
            "sha256": sha.hexdigest()[:16]}
    return (torch.frombuffer(bytearray(tr), dtype=torch.uint8).long(),
            torch.frombuffer(bytearray(va), dtype=torch.uint8).long(), info)


# --------------------------------------------------------------------------------------------- model
def dense_ffn(d_model: int, d_ff: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))


class Block(nn.Module):
    """Pre-LN block: x + proj(attn(ln1(x))), then x + ffn(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int, make_ffn, ffn_seed: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        # the FFN draws from its own seeded stream, so everything else is initialized identically in every arm
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ffn_seed)
            self.ffn = make_ffn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.ffn(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, vocab: int, ctx: int, d_model: int, n_heads: int, n_layers: int, make_ffn, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(ctx, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, make_ffn, seed * 1000 + 17 + i) for i in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        with torch.no_grad():  # GPT-style small embedding init: initial loss about ln(vocab)
            self.tok.weight.normal_(0.0, 0.02)
            self.pos.weight.normal_(0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def ffn_param_counts(model: CharLM) -> tuple[int, int, int]:
    """(weight parameters, bias parameters, weight bytes) of all FFNs of the model. For RBE the weight
    parameters are basis + coeffs and the bytes include the int16 index buffer."""
    w = b = nbytes = 0
    for blk in model.blocks:
        for name, p in blk.ffn.named_parameters():
            if name.endswith("bias"):
                b += p.numel()
            else:
                w += p.numel()
                nbytes += p.numel() * p.element_size()
        for name, buf in blk.ffn.named_buffers():
            if name.endswith("index_bytes"):  # the index, as its raw bytes
                nbytes += buf.numel() * buf.element_size()
    return w, b, nbytes


def rbe_k_for(d_model: int, d_ff: int, block_size: int, shrink: float) -> int:
    """k such that the RBE FFN's weight parameters (8 + k per block) are ~1/shrink of the dense ones."""
    blocks = 2 * (-(-d_ff // block_size)) * (-(-d_model // block_size))
    k = round(2 * d_model * d_ff / shrink / blocks) - 8
    return max(0, min(block_size * block_size, k))


# ------------------------------------------------------------------------------------ measurements
def saved_for_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ffn_modules) -> tuple[int, int]:
    """Bytes saved for backward by one training forward (+ loss): (whole model, the part saved inside
    the FFN modules). Distinct storages, parameters and buffers excluded, full storage size each."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}
    in_ffn = [0]
    ffn_bytes = [0]

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in own and ptr not in seen and s.nbytes() > 0:
            seen[ptr] = s.nbytes()
            if in_ffn[0]:
                ffn_bytes[0] += s.nbytes()
        return t

    def enter(*_):
        in_ffn[0] += 1

    def leave(*_):
        in_ffn[0] -= 1

    handles = []
    for m in ffn_modules:
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        del loss
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values()), ffn_bytes[0]


def peak_step_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """bench/bench_cpu.py's method: peak of (allocated - freed) bytes by torch's CPU allocator during one
    forward + backward (parameter gradients set to None first), above the level at its start."""
    for p in model.parameters():
        p.grad = None
    peak = peak_live_bytes(lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward())
    for p in model.parameters():
        p.grad = None
    return peak


def set_checkpoint(model: CharLM, on: bool) -> None:
    for blk in model.blocks:
        if isinstance(blk.ffn, rbe_ffn.RBEFeedForward):
            blk.ffn.checkpoint = on


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps per arm")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128, help="context length (tokens per sequence)")
    ap.add_argument("--eval-every", type=int, default=20, help="evaluate validation loss every N steps")
    ap.add_argument("--eval-windows", type=int, default=32,
                    help="validation windows of --ctx tokens (the same fixed ones at every evaluation)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup, then cosine to 10%%)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=64, help="RBE block size b")
    ap.add_argument("--k", type=int, default=None,
                    help="RBE coefficients per block (default: FFN weight parameters 1/8 of dense)")
    ap.add_argument("--corpus-mb", type=float, default=4.0, help="MB of stdlib source to read")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0 keeps torch's default); see the module docstring")
    ap.add_argument("--time-reps", type=int, default=5,
                    help="interleaved forward+backward repetitions per variant for the post-training timing")
    ap.add_argument("--out", default=os.path.join("examples", "out"), help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke-run defaults (options given explicitly still win): 2 layers, d_model 64, ctx 32, "
                         "20 steps, eval every 5 on 8 windows, 0.3 MB of corpus, 2 timing repetitions")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(layers=2, d_model=64, ctx=32, steps=20, eval_every=5, eval_windows=8, corpus_mb=0.3,
                        time_reps=2)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.d_model % args.heads:
        ap.error("need --steps >= 1, --eval-every >= 1 and --d-model divisible by --heads")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    train, val, info = load_corpus(args.corpus_mb)
    vocab = 256
    d, d_ff = args.d_model, 4 * args.d_model
    b = args.block_size
    k = args.k if args.k is not None else rbe_k_for(d, d_ff, b, 8.0)
    rbe_weight_params = 2 * (-(-d_ff // b)) * (-(-d // b)) * (8 + k)
    d_ff_small = max(1, round(rbe_weight_params / (2 * d)))  # same FFN weight parameters as the RBE arm

    makers = {
        "dense": lambda: dense_ffn(d, d_ff),
        "rbe": lambda: rbe_ffn.RBEFeedForward(d, d_ff, "gelu", block_size=b, k=k, checkpoint=True),
        "dense-small": lambda: dense_ffn(d, d_ff_small),
    }
    models = {a: CharLM(vocab, args.ctx, d, args.heads, args.layers, makers[a], args.seed) for a in ARMS}
    # the non-FFN parameters are the same numbers in every arm
    ref = {n: p for n, p in models["dense"].named_parameters() if ".ffn." not in n}
    for a in ARMS[1:]:
        for n, p in models[a].named_parameters():
            if ".ffn." not in n:
                assert torch.equal(p, ref[n]), f"{a}: {n} differs from the dense arm's initialization"

    counts = {a: ffn_param_counts(models[a]) for a in ARMS}
    totals = {a: sum(p.numel() for p in models[a].parameters()) for a in ARMS}
    tokens = args.batch * args.ctx
    print(f"corpus: {info['files']} .py files of {info['root']} ({info['bytes']:,} bytes, sha256 {info['sha256']}), "
          f"train {info['train_bytes']:,} / val {info['val_bytes']:,} bytes, byte vocabulary {vocab}")
    print(f"model: {args.layers} layers, d_model {d}, {args.heads} heads, ctx {args.ctx}, batch {args.batch} "
          f"({tokens} tokens/step), {args.steps} steps, AdamW lr {args.lr}, seed {args.seed}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    desc = {"dense": f"nn.Linear {d}->{d_ff} -> GELU -> nn.Linear",
            "rbe": f"RBEFeedForward d_ff={d_ff} b={b} k={k} checkpoint=True",
            "dense-small": f"nn.Linear {d}->{d_ff_small} -> GELU -> nn.Linear"}
    for a in ARMS:
        w, bb, nb = counts[a]
        print(f"  {a:12s} FFN: {desc[a]:44s} weight params {w:>9,} + bias {bb:>6,} = {w + bb:>9,}; "
              f"weight bytes {nb:>10,}; model params {totals[a]:,}")
    print(f"  FFN weight parameters dense / rbe = {counts['dense'][0] / counts['rbe'][0]:.3f}x, "
          f"dense-small / rbe = {counts['dense-small'][0] / counts['rbe'][0]:.3f}x")

    # identical data for every arm: one fixed sequence of batch start offsets, and fixed val windows
    g = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(len(train) - args.ctx - 1, (args.steps, args.batch), generator=g)
    vg = torch.Generator().manual_seed(args.seed + 2)
    vstarts = torch.randint(len(val) - args.ctx - 1, (args.eval_windows,), generator=vg)
    offs = torch.arange(args.ctx + 1)
    vwin = val[vstarts[:, None] + offs]

    def batch(step):
        w = train[starts[step][:, None] + offs]
        return w[:, :-1], w[:, 1:]

    @torch.no_grad()
    def evaluate(model) -> float:
        model.eval()
        tot = 0.0
        for i in range(0, len(vwin), args.batch):
            w = vwin[i:i + args.batch]
            tot += F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        model.train()
        return tot / (len(vwin) * args.ctx)

    opts, warmup = {}, max(1, min(100, args.steps // 10))
    for a in ARMS:
        m = models[a]
        decay = [p for n, p in m.named_parameters() if p.dim() >= 2 and not n.endswith("basis")]
        other = [p for p in m.parameters() if not any(p is q for q in decay)]
        opts[a] = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                     {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    freq = torch.bincount(train, minlength=vocab).double().clamp_min(1) / len(train)
    unigram = -freq[val].log().mean().item()
    print(f"baselines: uniform ln 256 = {math.log(vocab):.4f}; unigram (train byte frequencies) on val = {unigram:.4f}")

    rows = []  # step, arm, train_loss, val_loss, train_s, wall_s
    step_times = {a: [] for a in ARMS}
    pending = {a: [] for a in ARMS}
    t_train0 = time.perf_counter()
    for a in ARMS:
        rows.append([0, a, float("nan"), evaluate(models[a]), 0.0, time.perf_counter() - t_train0])
    bar = tqdm(range(args.steps), desc="train (3 arms)", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=args.no_progress)
    for step in bar:
        x, y = batch(step)
        lr = lr_at(step)
        for a in ARMS:
            m, opt = models[a], opts[a]
            t0 = time.perf_counter()
            for grp in opt.param_groups:
                grp["lr"] = lr
            loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            step_times[a].append(time.perf_counter() - t0)
            pending[a].append(loss.item())
        bar.set_postfix({a: f"{pending[a][-1]:.3f}" for a in ARMS})
        s = step + 1
        if s % args.eval_every == 0 or s == args.steps:
            for a in ARMS:
                tl = sum(pending[a]) / len(pending[a])
                pending[a] = []
                rows.append([s, a, tl, evaluate(models[a]), sum(step_times[a]), time.perf_counter() - t_train0])
            msg = "  ".join(f"{r[1]} val {r[3]:.4f}" for r in rows[-3:])
            (print if args.no_progress else tqdm.write)(f"step {s:5d}  {msg}")
    bar.close()
    train_wall = time.perf_counter() - t_train0

    # ---- memory and time of one step, after training (fixed batch of the training shape)
    x, y = batch(0)
    rbe = models["rbe"]
    variants = [("dense", models["dense"], None), ("rbe", rbe, True), ("rbe, checkpoint=False", rbe, False),
                ("dense-small", models["dense-small"], None)]
    with torch.no_grad():
        set_checkpoint(rbe, True)
        l_ck = rbe(x)
        set_checkpoint(rbe, False)
        l_std = rbe(x)
    same_forward = torch.equal(l_ck, l_std)
    mem = {}
    for name, m, ck in variants:
        if ck is not None:
            set_checkpoint(m, ck)
        ffns = [blk.ffn for blk in m.blocks]
        saved, saved_ffn = saved_for_backward(m, x, y, ffns)
        mem[name] = (saved, saved_ffn, peak_step_bytes(m, x, y))
    fb = {name: [] for name, _, _ in variants}
    for rep in range(args.time_reps + 1):  # interleaved forward + backward (no optimizer step); first rep warm-up
        for name, m, ck in variants:
            if ck is not None:
                set_checkpoint(m, ck)
            t0 = time.perf_counter()
            F.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
            dt = time.perf_counter() - t0
            m.zero_grad(set_to_none=True)
            if rep:
                fb[name].append(dt)
    set_checkpoint(rbe, True)

    # ---- outputs
    csv_path = os.path.join(args.out, "char_lm.csv")
    with open(csv_path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["step", "arm", "train_loss", "val_loss", "train_seconds", "wall_seconds"])
        for s, a, tl, vl, ts, ws in rows:
            wr.writerow([s, a, "" if math.isnan(tl) else f"{tl:.5f}", f"{vl:.5f}", f"{ts:.3f}", f"{ws:.3f}"])

    final = {a: [r for r in rows if r[1] == a][-1][3] for a in ARMS}
    med_step = {a: statistics.median(step_times[a]) for a in ARMS}
    mib = 2 ** 20
    hdr = (f"{args.layers} layers, d_model {d}, {args.heads} heads, ctx {args.ctx}, batch {args.batch}, "
           f"{args.steps} steps, seed {args.seed}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    lines = [f"Character LM on stdlib source: {hdr}", "",
             "| arm | FFN | FFN parameters (weights + biases) | FFN weight bytes | final val loss | "
             "median train step ms | fwd+bwd ms | saved for backward per step, MiB (FFN part) | peak step MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m, ck in variants:
        a = "rbe" if name.startswith("rbe") else name
        w, bb, nb = counts[a]
        dsc = desc[a].replace("checkpoint=True", f"checkpoint={ck}") if ck is not None else desc[a]
        vl = f"{final[a]:.4f}" if name == a else "(same weights as rbe)"
        st = f"{med_step[a] * 1e3:.0f}" if name == a else "-"
        saved, saved_ffn, peak = mem[name]
        lines.append(f"| {name} | {dsc} | {w:,} + {bb:,} | {nb:,} | {vl} | {st} | "
                     f"{statistics.median(fb[name]) * 1e3:.0f} | {saved / mib:.1f} ({saved_ffn / mib:.1f}) | "
                     f"{peak / mib:.1f} |")
    lines += ["", f"Baselines: uniform {math.log(vocab):.4f}, unigram {unigram:.4f}. "
              f"Train step = forward + backward + clip + AdamW, median over {args.steps} steps (arms interleaved); "
              f"fwd+bwd = median of {args.time_reps} interleaved forward+backward after training. "
              f"RBE forward with checkpoint=True and False bitwise equal: {same_forward}. "
              f"Training wall time (3 arms, with evaluations) {train_wall:.0f} s."]
    summary = "\n".join(lines)
    with open(os.path.join(args.out, "char_lm_summary.md"), "w") as f:
        f.write(summary + "\n")

    png_path = os.path.join(args.out, "char_lm.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = {"dense": f"dense FFN (d_ff {d_ff})", "rbe": f"RBE FFN (b {b}, k {k}, ckpt)",
              "dense-small": f"dense FFN, d_ff {d_ff_small} (same params as RBE)"}
    for a, style in zip(ARMS, ("o-", "s-", "^-")):
        rr = [r for r in rows if r[1] == a]
        axes[0].plot([r[0] for r in rr], [r[3] for r in rr], style, ms=3, label=labels[a])
        axes[1].plot([r[4] for r in rr], [r[3] for r in rr], style, ms=3, label=labels[a])
    lo = min(r[3] for r in rows)
    hi = max(r[3] for r in rows if r[0] >= max(args.eval_every, args.steps // 10)) if len(rows) > 6 else None
    for ax, xl in zip(axes, ("step", "training time of the arm, s (sum of its step times)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        if hi is not None and hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"byte-level LM on Python stdlib source: {args.layers}x{d}, ctx {args.ctx}, batch {args.batch}, "
                 f"{torch.get_num_threads()} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)

    print()
    print(summary)
    print(f"\nwrote {csv_path}, {png_path}, {os.path.join(args.out, 'char_lm_summary.md')}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    return {"rows": rows, "final_val": final, "median_step_s": med_step, "memory": mem, "counts": counts,
            "k": k, "d_ff_small": d_ff_small, "same_forward": same_forward, "summary": summary,
            "csv": csv_path, "png": png_path}


if __name__ == "__main__":
    main()
    sys.exit(0)
