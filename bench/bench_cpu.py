"""CPU benchmark: dense nn.Sequential(Linear, GELU, Linear) against RBEFeedForward.

Both run in the same process, interleaved (dense, rbe-standard, rbe-checkpointed,
dense, ...), with the thread count pinned; we report the median of each and the
ratio dense / RBE. Modes: forward (no grad), backward alone (the forward that
builds the graph is not timed), full step (forward + backward). The input
requires grad, so every backward also computes dL/dx.

    .venv/bin/python bench/bench_cpu.py                  # the README table
    .venv/bin/python bench/bench_cpu.py --quick          # 768/3072, 1024 tokens only
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import rbe_ffn
from rbe_ffn._profiling import peak_call_bytes


def dense_ffn(d_model, d_ff):
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))


def timer(fn, sync=lambda: None):
    sync()
    t0 = time.perf_counter()
    r = fn()
    sync()
    return r if isinstance(r, float) else time.perf_counter() - t0


def make_runs(model, x, mode):
    params = [p for p in model.parameters()]

    def fwd():
        with torch.no_grad():
            model(x)

    def step():
        for p in params:
            p.grad = None
        model(x).sum().backward()

    def bwd():  # forward untimed, then the backward alone
        for p in params:
            p.grad = None
        y = model(x)
        g = torch.ones_like(y)
        t0 = time.perf_counter()
        y.backward(g)
        return time.perf_counter() - t0

    return {"forward": fwd, "backward": bwd, "step": step}[mode]


def bench_case(d_model, d_ff, tokens, k, block_size, reps, warmup, modes):
    torch.manual_seed(0)
    dense = dense_ffn(d_model, d_ff)
    rbe_std = rbe_ffn.RBEFeedForward(d_model, d_ff, "gelu", block_size=block_size, k=k)
    rbe_ck = rbe_ffn.RBEFeedForward(d_model, d_ff, "gelu", block_size=block_size, k=k, checkpoint=True)
    x = torch.randn(tokens, d_model, requires_grad=True)
    rows = []
    for mode in modes:
        fns = {name: make_runs(m, x, mode) for name, m in
               (("dense", dense), ("rbe", rbe_std), ("rbe_ckpt", rbe_ck))}
        times = {name: [] for name in fns}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for name, fn in fns.items():
                times[name].append(timer(fn))
        med = {name: statistics.median(v) for name, v in times.items()}
        rows.append((mode, med))
    dense_bytes = sum(p.numel() * p.element_size() for n, p in dense.named_parameters() if n.endswith("weight"))
    return rows, dense_bytes, rbe_std.weight_nbytes


class DecodeThenMatmul(nn.Module):
    """Baseline: decode both RBE weights to dense on every call, then dense PyTorch ops."""

    def __init__(self, rbe):
        super().__init__()
        self.rbe = rbe

    def forward(self, x):
        f1, f2 = self.rbe.fc1, self.rbe.fc2
        w1 = rbe_ffn.decompress(f1.basis, f1.coeffs, f1.index, (f1.out_features, f1.in_features), f1.block_size)
        w2 = rbe_ffn.decompress(f2.basis, f2.coeffs, f2.index, (f2.out_features, f2.in_features), f2.block_size)
        return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, f1.bias)),
                                          w2, f2.bias)


def codec_table(reps=3):
    """Encoder speed (768x3072) and forward time of decode-then-matmul vs transform domain."""
    torch.manual_seed(0)
    w = torch.randn(3072, 768) * 0.02
    enc = []
    for _ in range(reps):
        t0 = time.perf_counter()
        cw = rbe_ffn.compress(w, 64, 300)
        enc.append(time.perf_counter() - t0)
    lines = ["", "| codec / baseline (768/3072, b=64, k=300, 1024 tokens) | median ms |", "|---|---|",
             f"| compress one 3072x768 matrix | {statistics.median(enc) * 1e3:.0f} |"]
    rbe = rbe_ffn.RBEFeedForward(768, 3072, "gelu", k=300)
    base = DecodeThenMatmul(rbe)
    dense = dense_ffn(768, 3072)
    x = torch.randn(1024, 768)
    times = {"dense": [], "rbe": [], "decode": []}
    with torch.no_grad():
        for _ in range(reps + 2):
            for name, m in (("dense", dense), ("rbe", rbe), ("decode", base)):
                times[name].append(timer(lambda: m(x)))
    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    lines += [f"| forward: dense PyTorch module | {med['dense'] * 1e3:.1f} |",
              f"| forward: decode both weights, then dense matmuls | {med['decode'] * 1e3:.1f} |",
              f"| forward: transform domain (RBEFeedForward) | {med['rbe'] * 1e3:.1f} |"]
    return lines


def peak_step_bytes(model, x):
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator during one training step
    (forward + backward), above the level at its start: from the profiler's memory events. A
    second step, measured like the first (its parameters' gradients freed before it)."""
    return peak_call_bytes(lambda: model(x).sum().backward(), model.parameters())


def saved_bytes(model, x):
    params = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the memory and codec tables")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--plot", default=None, help="write a PNG of forward time vs tokens (matplotlib)")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (k=300 only), e.g. 1,4,16")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory and codec tables")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(768, 3072)] if args.quick else [(768, 3072), (1024, 4096)]
    token_list = [1024] if args.quick else [1, 64, 1024, 4096]
    if args.tokens:
        token_list = [int(t) for t in args.tokens.split(",")]
    k_list = [300] if args.quick else [100, 300, 1000]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, threads={torch.get_num_threads()}, "
        f"torch {torch.__version__}, float32, b=64; medians of {args.reps} interleaved runs",
        "",
        "| d_model/d_ff | tokens | k | mode | dense ms | RBE ms | RBE ckpt ms | dense/RBE | dense/RBE ckpt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    plot_data = []
    for d_model, d_ff in ([] if args.memory_only else shapes):
        for tokens in token_list:
            for k in k_list:
                if (tokens != 1024 or (d_model, d_ff) != (768, 3072) or args.tokens) and k != 300:
                    continue
                reps = args.reps if tokens <= 1024 else max(5, args.reps // 3)
                rows, dbytes, rbytes = bench_case(d_model, d_ff, tokens, k, 64, reps, 2,
                                                  ["forward", "backward", "step"])
                for mode, med in rows:
                    if mode == "forward" and k == 300 and (d_model, d_ff) == (768, 3072):
                        plot_data.append((tokens, med["dense"], med["rbe"]))
                    line = (f"| {d_model}/{d_ff} | {tokens} | {k} | {mode} | {med['dense']*1e3:.2f} | "
                            f"{med['rbe']*1e3:.2f} | {med['rbe_ckpt']*1e3:.2f} | "
                            f"{med['dense']/med['rbe']:.2f} | {med['dense']/med['rbe_ckpt']:.2f} |")
                    lines.append(line)
                    print(line, flush=True)
    if args.no_memory:
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    # memory figures
    d_model, d_ff, tokens = 768, 3072, 1024
    x = torch.randn(tokens, d_model, requires_grad=True)
    lines += ["", "| module (768/3072, 1024 tokens) | weight bytes | saved for backward (bytes, params excluded) "
              "| peak memory of a training step (bytes above its start) |", "|---|---|---|---|"]
    dense = dense_ffn(d_model, d_ff)
    dbytes = sum(p.numel() * p.element_size() for n, p in dense.named_parameters() if n.endswith("weight"))
    lines.append(f"| dense | {dbytes} | {saved_bytes(dense, x)} | {peak_step_bytes(dense, x)} |")
    for k in (100, 300, 1000):
        for ck in (False, True):
            m = rbe_ffn.RBEFeedForward(d_model, d_ff, "gelu", k=k, checkpoint=ck)
            lines.append(f"| RBE k={k} checkpoint={ck} | {m.weight_nbytes} ({dbytes / m.weight_nbytes:.1f}x smaller) "
                         f"| {saved_bytes(m, x)} | {peak_step_bytes(m, x)} |")
    m = rbe_ffn.RBEFeedForward(d_model, d_ff, "gelu", k=300, checkpoint=True, memory_limit_mb=8)
    lines.append(f"| RBE k=300 checkpoint=True memory_limit_mb=8 | {m.weight_nbytes} | {saved_bytes(m, x)} "
                 f"| {peak_step_bytes(m, x)} |")
    print("\n".join(lines[-10:]))
    codec = codec_table()
    print("\n".join(codec))
    lines += codec
    if args.plot and plot_data:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        toks, dt, rt = zip(*plot_data)
        plt.figure(figsize=(5, 3.5))
        plt.loglog(toks, [t * 1e3 for t in dt], "o-", label="dense nn.Sequential")
        plt.loglog(toks, [t * 1e3 for t in rt], "s-", label="RBEFeedForward (k=300)")
        plt.xlabel("tokens")
        plt.ylabel("forward time, ms (median)")
        plt.title(f"768/3072 float32, {torch.get_num_threads()} threads")
        plt.legend()
        plt.grid(True, which="both", alpha=0.3)
        plt.tight_layout()
        plt.savefig(args.plot, dpi=120)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
