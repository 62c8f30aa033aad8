"""Training study: an RBE feed-forward block against the same parameters spent densely (issue #12).

A small byte-level decoder-only transformer (examples/train_char_lm.py's model and corpus: the
standard library's .py files) is trained with each FFN arm below, several seeds, two training
lengths. For one seed every arm sees the same initialization outside the FFN, the same batches in
the same order and the same optimizer (AdamW, warmup + cosine to 10%, clip 1.0); the arms of one
(seed, length) are trained interleaved step by step, so their step times see the same machine load.

Arms (the FFN weight parameters of every arm but "dense" are ~1/8 of dense's):
  dense        nn.Linear(d, 4d) -> GELU -> nn.Linear(4d, d)
  narrow       nn.Linear(d, f) -> GELU -> nn.Linear(f, d), f = RBE's weight parameters / (2 d)
  lowrank      each of dense's two matrices as a rank-r product (r(d + 4d) parameters each)
  rbe-plain    RBEFeedForward(parametrization="plain"): the parameters are the format's numbers
               (what every RBE layer was before the "scaled" parametrization)
  rbe          RBEFeedForward, the default ("scaled") parametrization
  rbe-dyn      rbe + rbe_ffn.DynamicSupport (prune and regrow of the kept positions)
  <arm>*<m>    the arm with its FFN's learning rate multiplied by m (e.g. narrow*2: is the
               baseline's learning rate what limits it?)
  rbe@p<x>c<y> exploration: plain layers with the pattern numbers' / coefficients' learning rate
               multiplied by x / y (through AdamW parameter groups)
RBE layers draw their positions from a seed (index_seed), so a checkpoint stores no index while the
positions stay fixed (rbe-dyn moves them: its index is stored).

Equal bytes: after training every arm is also evaluated with its FFN weights rounded to 16 bits as a
checkpoint would hold them (dense arms: bfloat16 weights; RBE arms: float16 coefficients through
rbe_ffn.storage_state_dict, pattern numbers float32), next to the bytes of that checkpoint.

Output (--out): study.csv (length, seed, arm, step, train loss, val loss, arm seconds),
study_summary.md (the tables printed at the end), study.png (validation curves, mean over seeds).

    .venv/bin/python examples/study_equal_params.py --quick          # a smoke run, seconds
    .venv/bin/python examples/study_equal_params.py --out docs/studies/equal_params
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_char_lm import CharLM, dense_ffn, load_corpus, rbe_k_for  # noqa: E402  (the same model and corpus)

import rbe_ffn  # noqa: E402

ALL_ARMS = ("dense", "narrow", "lowrank", "rbe-plain", "rbe", "rbe-dyn")


class LowRankFFN(nn.Module):
    """nn.Linear(d, 4d) -> GELU -> nn.Linear(4d, d) with each weight a rank-r product U V."""

    def __init__(self, d: int, d_ff: int, r: int):
        super().__init__()
        self.v1, self.u1 = nn.Linear(d, r, bias=False), nn.Linear(r, d_ff)
        self.v2, self.u2 = nn.Linear(d_ff, r, bias=False), nn.Linear(r, d)

    def forward(self, x):
        return self.u2(self.v2(F.gelu(self.u1(self.v1(x)))))


def ffn_half_bytes(model: CharLM) -> int:
    """Bytes of the FFN weights in a 16-bit checkpoint: dense arms bfloat16 weights, RBE arms
    float16 coefficients + float32 pattern numbers + the index (or the seed) as stored."""
    total = 0
    for blk in model.blocks:
        if isinstance(blk.ffn, rbe_ffn.RBEFeedForward):
            total += rbe_ffn.storage_report(blk.ffn, values_dtype=torch.float16)["bytes"]
        else:
            total += sum(2 * p.numel() for n, p in blk.ffn.named_parameters() if not n.endswith("bias"))
    return total


@torch.no_grad()
def rounded_to_half(model: CharLM) -> None:
    """Round the FFN weights as a 16-bit checkpoint holds them (see ffn_half_bytes), in place."""
    for blk in model.blocks:
        if isinstance(blk.ffn, rbe_ffn.RBEFeedForward):
            blk.ffn.load_state_dict(rbe_ffn.storage_state_dict(blk.ffn, torch.float16))
        else:
            for n, p in blk.ffn.named_parameters():
                if not n.endswith("bias"):
                    p.copy_(p.to(torch.bfloat16))


def ffn_numbers(model: CharLM) -> tuple[int, int]:
    """(FFN weight parameters, FFN weight bytes as trained: float32 values + the int16 index)."""
    w = nbytes = 0
    for blk in model.blocks:
        for name, p in blk.ffn.named_parameters():
            if not name.endswith("bias"):
                w += p.numel()
                nbytes += p.numel() * p.element_size()
        for name, buf in blk.ffn.named_buffers():
            if name.endswith("index_bytes"):
                nbytes += buf.numel() * buf.element_size()
    return w, nbytes


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile (df >= 1), from a small table (exact to 3 digits)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
    return table.get(df, 1.96 + 2.5 / df)


def add_model_args(ap) -> None:
    """The model, optimizer and corpus of the study (examples/convert_char_lm.py trains and converts the same)."""
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--corpus-mb", type=float, default=8.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arms", default=",".join(ALL_ARMS))
    ap.add_argument("--lengths", default="600,1200", help="training lengths (steps), comma-separated")
    ap.add_argument("--seeds", type=int, default=3)
    add_model_args(ap)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--shrink", type=float, default=8.0, help="dense FFN weight parameters / each small arm's")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--dyn-every", type=int, default=50, help="rbe-dyn: steps between support updates")
    ap.add_argument("--dyn-fraction", type=float, default=0.3, help="rbe-dyn: initial fraction dropped/regrown")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clip-units", choices=("parameters", "format"), default="parameters",
                    help="gradient clipping at norm 1 of the parameters' gradients (clip_grad_norm_) or of the "
                         "format numbers' (RBE gradients divided by their scales)")
    ap.add_argument("--out", default=os.path.join("examples", "out", "study"))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 seeds, lengths 6,12")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(lengths="6,12", seeds=2, layers=1, d_model=64, ctx=16, batch=4, corpus_mb=0.3,
                        eval_every=3, eval_windows=8, block_size=16, dyn_every=2)
    return ap.parse_args(argv)


_SEEDS = iter(range(1 << 30))  # a fresh index seed for every RBE block built (blocks never share positions)


def make_arms(args, names):
    d, d_ff, b = args.d_model, 4 * args.d_model, args.block_size
    k = rbe_k_for(d, d_ff, b, args.shrink)
    rbe_params = 2 * (-(-d_ff // b)) * (-(-d // b)) * (8 + k)
    f = max(1, round(rbe_params / (2 * d)))
    r = max(1, round(rbe_params / (2 * (d + d_ff))))
    makers = {
        "dense": lambda: dense_ffn(d, d_ff),
        "narrow": lambda: dense_ffn(d, f),
        "lowrank": lambda: LowRankFFN(d, d_ff, r),
        "rbe-plain": lambda: rbe_ffn.RBEFeedForward(d, d_ff, "gelu", block_size=b, k=k, parametrization="plain",
                                                    index_seed=next(_SEEDS)),
        "rbe": lambda: rbe_ffn.RBEFeedForward(d, d_ff, "gelu", block_size=b, k=k, index_seed=next(_SEEDS)),
        "rbe-dyn": lambda: rbe_ffn.RBEFeedForward(d, d_ff, "gelu", block_size=b, k=k, index_seed=next(_SEEDS)),
        "rbe-gen": lambda: rbe_ffn.RBEFeedForward(d, d_ff, "gelu", block_size=b, k=k),  # positions from torch's RNG
    }
    desc = {"dense": f"nn.Linear {d}->{d_ff}, GELU, back", "narrow": f"nn.Linear {d}->{f}, GELU, back",
            "lowrank": f"rank {r} factors of {d}x{d_ff} and back", "rbe-plain": f"b={b} k={k}, plain",
            "rbe": f"b={b} k={k}", "rbe-dyn": f"b={b} k={k} + DynamicSupport", "rbe-gen": f"b={b} k={k}, unseeded"}
    for a in names:  # exploration arms "rbe@p<mult>c<mult>": v1 layers, the pattern's / coefficients' lr scaled
        base, _, m = a.partition("*")
        if m and base in makers:
            makers[a] = makers[base]
            desc[a] = f"{desc[base]}, lr x{float(m):g}"
        if a.startswith("rbe@"):
            makers[a] = makers["rbe-plain"]
            desc[a] = f"b={b} k={k}, plain, lr x{lr_mults(a)[0]:g} pattern, x{lr_mults(a)[1]:g} coefficients"
    unknown = [a for a in names if a not in makers]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {list(makers)}")
    return {a: makers[a] for a in names}, desc


@torch.no_grad()
def clip_in_format_units(model: nn.Module, max_norm: float) -> None:
    """clip_grad_norm_ with the norm of the format numbers' gradients (an RBE parameter's gradient
    divided by its scale) instead of the parameters'."""
    scale = {}
    for mod in model.modules():
        if isinstance(mod, rbe_ffn.RBELinear):
            scale[id(mod.basis)], scale[id(mod.coeffs)] = mod._pattern_scale, mod._coeff_scale
    ps = [p for p in model.parameters() if p.grad is not None]
    total = math.sqrt(sum((p.grad.double() / scale.get(id(p), 1.0)).square().sum().item() for p in ps))
    if total > max_norm:
        for p in ps:
            p.grad.mul_(max_norm / (total + 1e-6))


def lr_mults(arm: str) -> tuple[float, float]:
    """(pattern, coefficient) learning-rate multipliers of an exploration arm "rbe@p<x>c<y>"; (1, 1) else."""
    if not arm.startswith("rbe@"):
        m = float(arm.partition("*")[2] or 1)  # "<arm>*m": the whole FFN's
        return m, m
    spec = arm[4:]
    p, c = spec[1:].split("c") if spec.startswith("p") else ("1", spec[1:])
    return float(p), float(c)


def train_group(args, makers, length, seed, train, val, writer):
    """Train every arm for `length` steps with seed `seed`, interleaved; returns {arm: final val loss},
    {arm: median step seconds}, {arm: (ffn params, ffn bytes)}."""
    vocab = 256
    models = {a: CharLM(vocab, args.ctx, args.d_model, args.heads, args.layers, mk, seed) for a, mk in makers.items()}
    g = torch.Generator().manual_seed(10_000 + seed)
    starts = torch.randint(len(train) - args.ctx - 1, (length, args.batch), generator=g)
    vg = torch.Generator().manual_seed(1)  # the same validation windows for every seed and length
    vstarts = torch.randint(len(val) - args.ctx - 1, (args.eval_windows,), generator=vg)
    offs = torch.arange(args.ctx + 1)
    vwin = val[vstarts[:, None] + offs]

    @torch.no_grad()
    def evaluate(model) -> float:
        model.eval()
        tot = 0.0
        for i in range(0, len(vwin), 64):
            w = vwin[i:i + 64]
            tot += F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        model.train()
        return tot / (len(vwin) * args.ctx)

    warmup = max(1, min(100, length // 10))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, length - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    opts, dyn = {}, {}
    for a, m in models.items():
        # AdamW groups by (weight decay?, learning-rate multiplier): matrices decay, the rest (and
        # the RBE pattern numbers) not; the multipliers: "<arm>*m" scales its FFN's learning rate,
        # "rbe@p<x>c<y>" its pattern's and coefficients'. Decoupled decay is lr * wd * p, so wd is
        # divided by the multiplier (the decay per step stays the same).
        pm, cm = lr_mults(a)
        keyed: dict = {}
        for n, p in m.named_parameters():
            decays = p.dim() >= 2 and not n.endswith("basis")
            mult = pm if n.endswith("basis") else cm if (n.endswith("coeffs") or ".ffn." in n) else 1.0
            keyed.setdefault((decays, mult), []).append(p)
        groups = [{"params": ps, "weight_decay": args.weight_decay / mult if decays else 0.0, "mult": mult}
                  for (decays, mult), ps in keyed.items()]
        basis = [p for n, p in m.named_parameters() if n.endswith("basis")]
        groups = [g for g in groups if g["params"] and g["mult"] > 0]
        for p in basis if pm == 0 else ():
            p.requires_grad_(False)
        opts[a] = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
        if a.partition("*")[0] == "rbe-dyn":
            dyn[a] = rbe_ffn.DynamicSupport(m, opts[a], every=args.dyn_every, fraction=args.dyn_fraction,
                                            until=int(0.75 * length))
    secs = {a: [] for a in models}
    pend = {a: [] for a in models}
    for a, m in models.items():
        writer.writerow([length, seed, a, 0, "", f"{evaluate(m):.5f}", "0.000"])
    for step in range(length):
        w = train[starts[step][:, None] + offs]
        x, y = w[:, :-1], w[:, 1:]
        lr = lr_at(step)
        for a, m in models.items():
            opt = opts[a]
            t0 = time.perf_counter()
            for grp in opt.param_groups:
                grp["lr"] = lr * grp["mult"]
            loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_units == "format":
                clip_in_format_units(m, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            if a in dyn:
                dyn[a].step()
            secs[a].append(time.perf_counter() - t0)
            pend[a].append(loss.item())
        s = step + 1
        if s % args.eval_every == 0 or s == length:
            for a, m in models.items():
                tl = sum(pend[a]) / len(pend[a])
                pend[a] = []
                writer.writerow([length, seed, a, s, f"{tl:.5f}", f"{evaluate(m):.5f}", f"{sum(secs[a]):.3f}"])
    final = {a: evaluate(m) for a, m in models.items()}
    numbers = {a: ffn_numbers(m) + (ffn_half_bytes(m),) for a, m in models.items()}
    half = {}
    for a, m in models.items():
        rounded_to_half(m)
        half[a] = evaluate(m)
        writer.writerow([length, seed, a + "@16bit", length, "", f"{half[a]:.5f}", f"{sum(secs[a]):.3f}"])
    return final, half, {a: statistics.median(v) for a, v in secs.items()}, numbers


def summarize(args, lengths, arms, finals, halves, step_s, numbers, desc) -> str:
    lines = []
    for L in lengths:
        lines += [f"### {L} steps ({len(finals[L])} seeds)", "",
                  "| arm | FFN | FFN weight params | FFN bytes (float32) | val loss mean | std | paired diff to narrow "
                  "(95% CI) | median step ms | 16-bit FFN bytes | val loss, 16-bit weights |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        seeds = sorted(finals[L])
        for a in arms:
            v = [finals[L][s][a] for s in seeds]
            mean = statistics.fmean(v)
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            if "narrow" in arms and a != "narrow" and len(v) > 1:
                dd = [finals[L][s][a] - finals[L][s]["narrow"] for s in seeds]
                md, sdd = statistics.fmean(dd), statistics.stdev(dd)
                h = t_quantile_975(len(dd) - 1) * sdd / math.sqrt(len(dd))
                diff = f"{md:+.4f} ({md - h:+.4f}, {md + h:+.4f})"
            else:
                diff = "-"
            ms = statistics.median(step_s[L][s][a] for s in seeds) * 1e3
            w, nb, hb = numbers[a]
            hv = [halves[L][s][a] for s in seeds]
            lines.append(f"| {a} | {desc[a]} | {w:,} | {nb:,} | {mean:.4f} | {sd:.4f} | {diff} | {ms:.0f} | {hb:,} | "
                         f"{statistics.fmean(hv):.4f} |")
        if "dense" in arms and "narrow" in arms and len(seeds) > 1:
            gap = [finals[L][s]["narrow"] - finals[L][s]["dense"] for s in seeds]
            sd_n = statistics.stdev([finals[L][s]["narrow"] for s in seeds])
            lines += ["", f"Capacity check: narrow - dense = {statistics.fmean(gap):.4f} nats "
                      f"(= {statistics.fmean(gap) / sd_n:.1f} x narrow's seed std {sd_n:.4f}; the study needs >= 5)."]
            for a in arms:
                if a.startswith("rbe") or a == "lowrank":
                    closed = [(finals[L][s]["narrow"] - finals[L][s][a]) / g for s, g in zip(seeds, gap)]
                    lines.append(f"- {a}: closes {statistics.fmean(closed) * 100:+.0f}% of the narrow-to-dense gap "
                                 f"(per seed: {', '.join(f'{c * 100:+.0f}%' for c in closed)})")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    arms = [a for a in args.arms.split(",") if a]
    lengths = [int(x) for x in args.lengths.split(",")]
    makers, desc = make_arms(args, arms)
    train, val, info = load_corpus(args.corpus_mb)
    head = (f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, ctx {args.ctx}, batch {args.batch} "
            f"({args.batch * args.ctx} tokens/step), AdamW lr {args.lr}, wd {args.weight_decay}, block {args.block_size}; "
            f"corpus {info['files']} stdlib files, {info['train_bytes']:,} train / {info['val_bytes']:,} val bytes "
            f"(sha256 {info['sha256']}); torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"{platform.machine()}, CPU ISA {rbe_ffn.cpu_isa()}")
    print(head, flush=True)
    finals = {L: {} for L in lengths}
    halves = {L: {} for L in lengths}
    step_s = {L: {} for L in lengths}
    numbers = {}
    t0 = time.perf_counter()
    with open(os.path.join(args.out, "study.csv"), "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["length", "seed", "arm", "step", "train_loss", "val_loss", "arm_seconds"])
        for L in lengths:
            for seed in range(args.seeds):
                fin, half, sec, numbers = train_group(args, makers, L, seed, train, val, wr)
                finals[L][seed], halves[L][seed], step_s[L][seed] = fin, half, sec
                f.flush()
                print(f"[{time.perf_counter() - t0:7.0f} s] length {L} seed {seed}: "
                      + "  ".join(f"{a} {v:.4f}" for a, v in fin.items()), flush=True)
    summary = f"{head}\n\n" + summarize(args, lengths, arms, finals, halves, step_s, numbers, desc)
    summary += f"\nTotal wall time {time.perf_counter() - t0:.0f} s.\n"
    with open(os.path.join(args.out, "study_summary.md"), "w") as f:
        f.write(summary)
    plot(os.path.join(args.out, "study.csv"), os.path.join(args.out, "study.png"), lengths, arms)
    print(summary)


def plot(csv_path: str, png_path: str, lengths, arms) -> None:
    """Validation loss vs step, mean over seeds (band: min to max), one panel per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if "@16bit" not in r["arm"]]
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for a in arms:
            by_step: dict[int, list] = {}
            for r in rows:
                if int(r["length"]) == L and r["arm"] == a and int(r["step"]) > 0:
                    by_step.setdefault(int(r["step"]), []).append(float(r["val_loss"]))
            steps = sorted(by_step)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], "o-", ms=3, label=a)
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], alpha=0.15)
        ax.set_title(f"{L} steps")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        last = [float(r["val_loss"]) for r in rows if int(r["length"]) == L and int(r["step"]) == L]
        if last:
            lo, hi = min(last), max(last)
            ax.set_ylim(lo - 0.1 * (hi - lo + 0.01), hi + 0.6 * (hi - lo + 0.01) + 0.1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
