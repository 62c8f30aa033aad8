"""GPU benchmark: RBEFeedForward on CUDA against what a GPU user would run instead, in the same
dtype (float32 and bfloat16 runs): the dense nn.Sequential(Linear, GELU, Linear), and "narrow",
a dense FFN whose d_ff' spends RBE's weight parameter count (bench_peers.matched_sizes). RBE on
each of its GPU paths: "decode" (the default), "dct" (the DCT-domain dense path,
rbe_ffn.dct_path()) and "few" (the DCT-domain path with the forward on the few-token sparse
kernel; timed up to FEW_MAX tokens, its backward is the dct one).

All arms run in the same process, interleaved (dense, narrow, decode, dct, few, dense, ...),
timed with CUDA events, with L2 flushed right before every timed part (a write of a buffer larger
than L2), so that no arm's weights are served from L2 when another's are not; we report medians
and the ratio dense time / arm time (> 1: faster than dense; RBE is worth its format where its
ratio beats narrow's). Modes: forward (no grad), backward alone (the forward that builds the
graph is not timed), full training step (forward + backward). The input requires grad, so every
backward also computes dL/dx. Peak memory: the most memory a training step allocates above what
it started with (torch.cuda.max_memory_allocated), per arm.

    python bench/bench_cuda.py                      # the README table (float32 and bfloat16)
    python bench/bench_cuda.py --quick              # 768/3072 only
    python bench/bench_cuda.py --csv out.csv        # also one row per (dtype, shape, tokens, mode, arm)
    python bench/bench_cuda.py --smoke              # CPU dry run of this script (tests; no meaningful times)
"""
from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import time

import torch

import rbe_ffn
from bench_peers import dense_ffn, matched_sizes, rbe_weight_params  # bench/ is this script's path

SHAPES = [(768, 3072), (1024, 4096), (4096, 11008)]
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
ARMS = ("dense", "narrow", "decode", "dct", "few")
RBE_PATHS = ("decode", "dct", "few")
FEW_MAX = 256
_FLUSH = {}
DEVICE = "cuda"  # "cpu" for --smoke: the same code paths, wall-clock timing, no memory statistics


class WallEvent:
    """torch.cuda.Event's interface over the wall clock (the CPU dry run)"""

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def runner(model, x, mode):
    params = list(model.parameters())

    def zero():
        for p in params:
            p.grad = None
        x.grad = None

    if mode == "forward":
        def run(start, end):
            with torch.no_grad():
                flush_l2()
                start.record()
                model(x)
                end.record()
    elif mode == "backward":
        def run(start, end):
            zero()
            y = model(x)
            g = torch.ones_like(y)
            flush_l2()  # after the untimed forward, which read the weights
            start.record()
            y.backward(g)
            end.record()
    else:
        def run(start, end):
            zero()
            flush_l2()
            start.record()
            model(x).float().sum().backward()
            end.record()
    return run


def flush_l2():
    """Overwrite L2 (a 512 MiB write, several times any GPU's L2)"""
    buf = _FLUSH.get("buf")
    if buf is None:
        buf = _FLUSH["buf"] = torch.empty(2**27 if DEVICE == "cuda" else 2**10, device=DEVICE, dtype=torch.float32)
    buf.zero_()


def on_path(arm):
    """the operators' path for an arm (the dense arms do not call them)"""
    return rbe_ffn.dct_path(arm in ("dct", "few"), few_tokens=FEW_MAX if arm == "few" else 0)


def timed(run, arm):
    if DEVICE == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    else:
        start, end = WallEvent(), WallEvent()
    with on_path(arm):
        run(start, end)
    end.synchronize()
    return start.elapsed_time(end)


def peak_step_mib(model, x):
    if DEVICE != "cuda":
        return float("nan")
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(x).float().sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(models, tokens, reps, warmup):
    """models: arm -> module; the medians per mode and arm, and each arm's step peak memory"""
    dense = models["dense"]
    x = torch.randn(tokens, dense[0].in_features, device=DEVICE, dtype=dense[0].weight.dtype, requires_grad=True)
    arms = [a for a in ARMS if a != "few" or tokens <= FEW_MAX]
    row = {}
    for mode in ("forward", "backward", "step"):
        runs = {arm: runner(models[arm], x, mode) for arm in arms}
        times = {n: [] for n in runs}
        for i in range(warmup + reps):
            for name, run in runs.items():
                t = timed(run, name)
                if i >= warmup:
                    times[name].append(t)
        row[mode] = {n: statistics.median(v) for n, v in times.items()}
    row["mem"] = {}
    for arm in arms:
        with on_path(arm):
            row["mem"][arm] = peak_step_mib(models[arm], x)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--csv", default=None, help="also write one row per (dtype, shape, tokens, mode, arm) here")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run (tests): 64/128 at b=16, k=40, float32, tokens 1 and 16, one rep")
    args = ap.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        args.dtypes, args.tokens, args.reps, args.warmup, args.block_size, args.k = "float32", "1,16", 1, 0, 16, 40
    tokens_list = [int(t) for t in args.tokens.split(",")]
    rows = []
    shapes = [(64, 128)] if args.smoke else SHAPES[:1] if args.quick else SHAPES
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "none (CPU dry run)"
    lines = [f"GPU: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
             f"{datetime.date.today().isoformat()}; b={args.block_size}, k={args.k}; "
             f"median of {args.reps} interleaved runs (CUDA events, L2 flushed before each); "
             f"ratio = dense time / arm time (narrow: dense with RBE's weight parameter count; RBE's decode "
             f"path / dct path / few-token path, up to {FEW_MAX} tokens); "
             f"TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}", "",
             "| dtype | d_model x d_ff (narrow d_ff') | tokens | fwd dense ms | fwd ratio narrow / decode / dct / few "
             "| bwd dense ms | bwd ratio narrow / decode / dct / few | step dense ms "
             "| step ratio narrow / decode / dct / few | step peak MiB dense / narrow / decode / dct / few |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        for d_model, d_ff in shapes:
            torch.manual_seed(0)
            rbe = rbe_ffn.RBEFeedForward(d_model, d_ff, "gelu", block_size=args.block_size, k=args.k,
                                         device=DEVICE).to(dtype)
            f_narrow = matched_sizes(d_model, d_ff, rbe_weight_params(rbe))[1]
            models = {"dense": dense_ffn(d_model, d_ff).to(DEVICE, dtype),
                      "narrow": dense_ffn(d_model, f_narrow).to(DEVICE, dtype), **{p: rbe for p in RBE_PATHS}}
            for tokens in tokens_list:
                r = bench(models, tokens, args.reps, args.warmup)
                cells = [dt, f"{d_model} x {d_ff} ({f_narrow})", str(tokens)]
                for mode in ("forward", "backward", "step"):
                    d = r[mode]["dense"]
                    cells += [f"{d:.3f}", " / ".join(f"{d / r[mode][a]:.2f}x" if a in r[mode] else "-"
                                                     for a in ARMS[1:])]
                    rows += [dict(dtype=dt, d_model=d_model, d_ff=d_ff, tokens=tokens, mode=mode, arm=a,
                                  median_ms=round(r[mode][a], 4), peak_step_mib=round(r["mem"][a], 1))
                             for a in ARMS if a in r[mode]]
                cells.append(" / ".join(f"{r['mem'][a]:.0f}" if a in r["mem"] else "-" for a in ARMS))
                line = "| " + " | ".join(cells) + " |"
                lines.append(line)
                print(line, flush=True)
            del models, rbe
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
