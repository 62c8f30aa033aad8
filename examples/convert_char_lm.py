"""Converting a dense transformer the project trains itself: the byte-level LM of examples/train_char_lm.py,
its FFNs in RBE form at ~4x and ~8x fewer bytes, against int8 per-row and NF4 on the same weights, judged
by held-out perplexity (docs/studies/convert_char_lm.md, issue #13 item 3a).

1. Train (or load, when --model holds a state_dict saved by this script with the same configuration) the
   dense model of examples/study_equal_params.py: CharLM, 2 layers, d_model 128, 4 heads, ctx 64, d_ff 512
   (nn.Sequential(Linear, GELU, Linear)), batch 32, AdamW lr 3e-3 (warmup, cosine to 10%), clip 1.0, on
   load_corpus(--corpus-mb) (the standard library's .py files; whole files held out for validation). The
   validation curve goes to convert_char_lm_train.csv and the state_dict to --model.
2. Convert every FFN with rbe_ffn.replace_mlp(block_size, k) for each k, four ways: the plain encoder;
   data-aware (calibration= the model run on training windows); data-aware + layer-wise Distill; and then
   whole-model rbe_ffn.distill_model (objective "kl" on the logits, batches of training windows, a held-out
   set of other training windows choosing the step kept, a wall-time budget).
3. Peers on the same FFN weight matrices: int8 per-row absmax and NF4 (blocks of 64) from
   examples/quant_peers.py (weights fake-quantized, everything else float32).

Every model is evaluated on the same fixed validation windows (from the held-out files, never seen by any
training, calibration or distillation step): loss in nats/byte and perplexity exp(loss).

    OMP_NUM_THREADS=1 .venv/bin/python examples/convert_char_lm.py                  # about 18 min on one core
    OMP_NUM_THREADS=1 .venv/bin/python examples/convert_char_lm.py --quick          # a smoke run, seconds
    # the second round's recipe (4.00x: float16 coefficients, every parameter trained, scaled, cosine decay)
    OMP_NUM_THREADS=1 .venv/bin/python examples/convert_char_lm.py --ks 248 --values-dtype float16 \
        --parametrization scaled --train all --schedule cosine --distill-lr 2e-3 --patience 0 \
        --distill-steps 11000 --distill-seconds 2400
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_peers import PEERS, quantized  # noqa: E402  (the peers, one definition for every study)
from train_char_lm import CharLM, dense_ffn, load_corpus  # noqa: E402  (the same model and corpus)
from study_equal_params import add_model_args  # noqa: E402  (the training study's configuration)
from convert_recipe import (add_recipe_args, check_recipe_args, rbe_bytes_per_weight,  # noqa: E402
                            recipe_labels, stored)

import rbe_ffn  # noqa: E402

CONFIG_KEYS = ("layers", "d_model", "heads", "ctx", "batch", "lr", "weight_decay", "steps", "corpus_mb", "seed")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(ap)  # the training study's model, optimizer and corpus
    ap.add_argument("--steps", type=int, default=4000, help="training steps of the dense model")
    ap.add_argument("--eval-every", type=int, default=250, help="validation evaluations during training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=1024,
                    help="fixed validation windows of ctx bytes every model is evaluated on")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--ks", default="165,80",
                    help="RBE coefficients per block (b=32: 165 -> 4.0x, 80 -> 8.0x fewer bytes than float32)")
    ap.add_argument("--calib-windows", type=int, default=128, help="training windows for calibration= and Distill")
    ap.add_argument("--layer-steps", type=int, default=300, help="layer-wise Distill steps per block")
    ap.add_argument("--distill-steps", type=int, default=3000, help="whole-model steps at most (0: none)")
    ap.add_argument("--distill-seconds", type=float, default=420, help="wall-time budget per whole-model run")
    ap.add_argument("--distill-lr", default="1e-3",
                    help="whole-model Adam lr; a comma-separated list runs one distill_model stage per lr, each "
                         "from the previous stage's result with the same step and time budget (a step schedule)")
    ap.add_argument("--holdout-batches", type=int, default=8, help="distill_model's held-out training batches")
    add_recipe_args(ap, patience=6)
    ap.add_argument("--runs-csv", default=os.path.join("examples", "out", "convert_char_lm_runs.csv"),
                    help="every row of every run is appended here with the run's recipe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=os.path.join("examples", "out", "char_lm_dense.pt"),
                    help="state_dict of the dense model: loaded when its configuration matches, else trained")
    ap.add_argument("--out", default=os.path.join("examples", "out"))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps, seconds")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(layers=1, d_model=64, ctx=16, batch=8, steps=40, eval_every=20, corpus_mb=0.3,
                        eval_windows=32, block_size=16, ks="40", calib_windows=16, layer_steps=10,
                        distill_steps=10, distill_seconds=10, holdout_batches=2,
                        model=os.path.join("examples", "out", "char_lm_dense_quick.pt"))
    args = ap.parse_args(argv)
    if args.d_model % args.heads or args.steps < 1:
        ap.error("need --d-model divisible by --heads and --steps >= 1")
    check_recipe_args(ap, args)
    return args


def lm_loss(model, windows, batch=64) -> float:
    """Mean next-byte cross-entropy (nats/byte) of `model` on windows [n, ctx + 1]."""
    was = model.training
    model.eval()
    tot = 0.0
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            tot += F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    model.train(was)
    return tot / (len(windows) * (windows.shape[1] - 1))


def windows_at(data, n, ctx, seed):
    """n windows of ctx + 1 bytes of `data` at seeded random offsets."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - ctx - 1, (n,), generator=g)
    return data[starts[:, None] + torch.arange(ctx + 1)]


def train_dense(args, train, vwin, out_csv):
    """The dense model, trained as examples/study_equal_params.py trains its dense arm; returns the model
    and the validation curve [(step, train loss, val loss, seconds)]."""
    model = CharLM(256, args.ctx, args.d_model, args.heads, args.layers,
                   lambda: dense_ffn(args.d_model, 4 * args.d_model), args.seed)
    g = torch.Generator().manual_seed(10_000 + args.seed)
    starts = torch.randint(len(train) - args.ctx - 1, (args.steps, args.batch), generator=g)
    offs = torch.arange(args.ctx + 1)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, min(100, args.steps // 10))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    curve = [(0, float("nan"), lm_loss(model, vwin), 0.0)]
    t0, pend = time.perf_counter(), []
    for step in range(args.steps):
        w = train[starts[step][:, None] + offs]
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        loss = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pend.append(loss.item())
        s = step + 1
        if s % args.eval_every == 0 or s == args.steps:
            curve.append((s, sum(pend) / len(pend), lm_loss(model, vwin), time.perf_counter() - t0))
            pend = []
            print(f"  step {s:5d}  train {curve[-1][1]:.4f}  val {curve[-1][2]:.4f}  {curve[-1][3]:.0f} s", flush=True)
    with open(out_csv, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["step", "train_loss", "val_loss", "seconds"])
        for s, tl, vl, sec in curve:
            wr.writerow([s, "" if math.isnan(tl) else f"{tl:.5f}", f"{vl:.5f}", f"{sec:.1f}"])
    return model.eval(), curve



def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    train, val, info = load_corpus(args.corpus_mb)
    print(f"corpus: {info['files']} files ({info['bytes']:,} bytes, sha256 {info['sha256']}), train "
          f"{info['train_bytes']:,} / val {info['val_bytes']:,} bytes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.machine()}", flush=True)
    vwin = windows_at(val, args.eval_windows, args.ctx, seed=1)   # every model's evaluation
    config = {k: getattr(args, k) for k in CONFIG_KEYS}

    saved = torch.load(args.model) if os.path.exists(args.model) else None
    if saved is not None and saved.get("config") == config:
        teacher = CharLM(256, args.ctx, args.d_model, args.heads, args.layers,
                         lambda: dense_ffn(args.d_model, 4 * args.d_model), args.seed)
        teacher.load_state_dict(saved["state_dict"])
        teacher.eval()
        curve = saved["curve"]
        print(f"loaded the dense model from {args.model} (trained {args.steps} steps)", flush=True)
    else:
        print(f"training the dense model: {args.steps} steps", flush=True)
        teacher, curve = train_dense(args, train, windows_at(val, 256, args.ctx, seed=2),
                                     os.path.join(args.out, "convert_char_lm_train.csv"))
        torch.save({"config": config, "state_dict": teacher.state_dict(), "curve": curve}, args.model)
    train_seconds = curve[-1][3]
    tail = [c for c in curve if c[0] >= 0.8 * args.steps]
    print(f"training curve (256 windows): val {curve[-1][2]:.4f} at step {curve[-1][0]}; over the last 20% "
          f"(steps {tail[0][0]}-{curve[-1][0]}) it fell {tail[0][2] - curve[-1][2]:.4f} nats/byte", flush=True)

    # calibration / layer-wise inputs and whole-model batches: training windows only, disjoint seeds
    calib = windows_at(train, args.calib_windows, args.ctx, seed=3)[:, :-1]
    n_batches = max(1, args.distill_steps)
    distill_train = list(windows_at(train, n_batches * args.batch, args.ctx, seed=4)[:, :-1].split(args.batch))
    distill_held = list(windows_at(train, args.holdout_batches * args.batch, args.ctx, seed=5)[:, :-1]
                        .split(args.batch))

    rows = []
    base = lm_loss(teacher, vwin)
    vdtype = getattr(torch, args.values_dtype)
    recipe = (f"values {args.values_dtype}; whole-model: {args.parametrization}, train={args.train}, lr "
              f"{args.distill_lr} {args.schedule} warmup {args.warmup}, {args.distill_steps} steps / "
              f"{args.distill_seconds:g} s, patience {args.patience}")
    print("recipe: " + recipe, flush=True)
    # the non-default choices, named in the table's method column
    stored_as, how = recipe_labels(args)
    new_csv = not os.path.exists(args.runs_csv)
    runs = open(args.runs_csv, "a", newline="")
    log = csv.writer(runs)
    if new_csv:
        log.writerow(["date", "recipe", "method", "k", "bytes_per_weight", "val_loss", "ppl", "ppl_vs_original",
                      "tokens", "seconds", "notes"])

    def record(name, k, bpw, model, seconds, tokens="", extra=""):
        loss = lm_loss(stored(model, vdtype) if k != "-" else model, vwin)
        rows.append((name, k, bpw, loss, math.exp(loss), math.exp(loss) / math.exp(base) - 1, tokens, seconds, extra))
        log.writerow([time.strftime("%Y-%m-%d %H:%M"), recipe, name, k, f"{bpw:.4f}", f"{loss:.5f}",
                      f"{math.exp(loss):.4f}", f"{100 * (math.exp(loss - base) - 1):+.2f}%", tokens,
                      f"{seconds:.0f}", extra])
        runs.flush()
        print(f"{name:44s} k={k!s:>4} {bpw:.3f} B/weight ({4 / bpw:.2f}x)  val {loss:.4f}  ppl {math.exp(loss):.4f} "
              f"({100 * (math.exp(loss - base) - 1):+.2f}%)  {seconds:6.1f} s  {extra}", flush=True)

    record("original (float32)", "-", 4.0, teacher, 0.0)
    ffn_linears = lambda m: [lin for blk in m.blocks for lin in (blk.ffn[0], blk.ffn[2])]
    for name, fn in PEERS:
        t = time.time()
        m, bpw = quantized(teacher, fn, ffn_linears)
        record(name, "-", bpw, m, time.time() - t)

    b = args.block_size
    for k in [int(x) for x in args.ks.split(",")]:
        t = time.time()
        m = copy.deepcopy(teacher)
        rep = rbe_ffn.replace_mlp(m, block_size=b, k=k)
        bpw = rbe_bytes_per_weight(m, vdtype)
        record("RBE plain" + stored_as, k, bpw, m, time.time() - t,
               extra="weight err " + ", ".join(f"{l.error_fc1:.3f}/{l.error_fc2:.3f}" for l in rep))

        t = time.time()
        m = copy.deepcopy(teacher)
        rep = rbe_ffn.replace_mlp(m, block_size=b, k=k, calibration=calib)
        record("RBE data-aware" + stored_as, k, bpw, m, time.time() - t, tokens=f"{calib.numel():,} calib",
               extra="block err plain->data " + ", ".join(f"{l.block_error_plain:.3f}->{l.block_error:.3f}" for l in rep))

        t = time.time()
        m = copy.deepcopy(teacher)
        rep = rbe_ffn.replace_mlp(m, block_size=b, k=k, calibration=calib,
                                  distill=rbe_ffn.Distill(calib, steps=args.layer_steps, lr=1e-3, progress=False))
        record("RBE data-aware + layer-wise" + stored_as, k, bpw, m, time.time() - t, tokens=f"{calib.numel():,} calib",
               extra="held-out block err " + ", ".join(f"{l.output_error_before:.3f}->{l.output_error_after:.3f}"
                                                        for l in rep))
        if args.distill_steps == 0:
            continue
        t, tokens = time.time(), 0
        for stage, lr in enumerate(float(x) for x in args.distill_lr.split(",")):
            d = rbe_ffn.distill_model(m, teacher, distill_train, objective="kl", holdout=distill_held,
                                      steps=args.distill_steps, lr=lr, eval_every=25,
                                      patience=args.patience or None, train=args.train, schedule=args.schedule,
                                      warmup=args.warmup, parametrization=args.parametrization,
                                      max_seconds=args.distill_seconds, progress=False, seed=args.seed + stage)
            tokens += d.tokens
            record("RBE data-aware + layer-wise + whole-model" + how + stored_as
                   + (f" (stage {stage + 1}, lr {lr:g})" if stage else ""),
                   k, bpw, m, time.time() - t, tokens=f"{tokens:,}",
                   extra=f"{d.steps} steps (best {d.best_step}, {d.stopped}); held-out KL {d.before:.4f}->{d.after:.4f}")

    print(f"\ntotal {time.time() - t_start:.0f} s; dense model: {args.steps} steps, {train_seconds:.0f} s of training\n")
    lines = ["| method | k | bytes/weight (x smaller than fp32) | val loss (nats/byte) | perplexity | "
             "ppl vs original | tokens | time (s) | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for name, k, bpw, loss, ppl, rel, tok, sec, extra in rows:
        lines.append(f"| {name} | {k} | {bpw:.3f} ({4 / bpw:.2f}x) | {loss:.4f} | {ppl:.4f} | {100 * rel:+.2f}% | "
                     f"{tok} | {sec:.0f} | {extra} |")
    table = "\n".join(lines)
    print(table)
    runs.close()
    with open(os.path.join(args.out, "convert_char_lm_summary.md"), "w") as f:
        f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
