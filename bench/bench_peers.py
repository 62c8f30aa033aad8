"""CPU peer benchmark: what a CPU user would pick for a transformer FFN, against RBEFeedForward.

Arms (each a module (T, d_model) -> (T, d_model), GELU, fp32 input):
  dense          nn.Sequential(Linear(d, f), GELU, Linear(f, d)), float32
  dense_bf16     the same module, forward (and the loss) under torch.autocast("cpu", bfloat16),
                 backward outside it, as a user would write it
  int8_dyn       torch.ao.quantization.quantize_dynamic(dense, {nn.Linear}, qint8): forward only
  lowrank        each Linear factored as Linear(in, r, bias=False) -> Linear(r, out), r chosen so
                 the weight parameter count matches RBE's (basis + coeffs of both layers)
  narrow         dense FFN with d_ff' chosen the same way
  rbe            RBEFeedForward(d, f, "gelu", block_size=64, k=300), rbe_ffn.pack_for_inference
                 applied (forward calls of 1-3 tokens read packed coefficients, as int8_dyn reads
                 its prepacked weights; the packs' bytes are in the notes)
  rbe_ckpt       the same weights, checkpoint=True (packed alike)
  rbe_bf16       rbe under the same autocast as dense_bf16 (see the note it prints)

All arms of one (shape, tokens, mode) run in the same process, interleaved (every arm once per
round, in a random order in which no arm follows one holding the same weights: round_order),
with the thread count pinned; we report the median over
rounds and the spread (quartiles, min-max). Modes: forward (no grad) and step (forward +
backward of y.sum(); the input requires grad, so backward also computes dL/dx; grads zeroed by
p.grad = None). Then each arm's peak memory of one call per mode (peak_bytes; --no-memory skips it).

    .venv/bin/python bench/bench_peers.py --out bench/out/peers.md --csv bench/out/peers.csv
    .venv/bin/python bench/bench_peers.py --quick        # 768/3072, tokens 1 and 1024
    .venv/bin/python bench/bench_peers.py --smoke        # 64/128, tokens 1 and 16, 1 rep (tests)
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import random
import statistics
import time
import warnings

import torch
from torch import nn

import rbe_ffn
from rbe_ffn._profiling import peak_call_bytes

ARMS = ("dense", "dense_bf16", "int8_dyn", "lowrank", "narrow", "rbe", "rbe_ckpt", "rbe_bf16")
RBE_ARMS = ("rbe", "rbe_ckpt", "rbe_bf16")
FULL_WIDTH = ("dense", "dense_bf16", "int8_dyn")  # the same d_ff as RBE, full capacity
MODES = ("forward", "step")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx")
CSV_FIELDS = ("d_model", "d_ff", "tokens", "mode", "arm", "round", "ms", "status", "weight_params",
              "weight_bytes", "peak_bytes", "rel_err", "ref", "threads", "note")


# ---------------------------------------------------------------- machine
def isa_line() -> str:
    flags, model = set(), "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    have = []
    for fl in ISA_FLAGS:
        if fl == "amx":
            amx = sorted(f for f in flags if f.startswith("amx"))
            have.append("amx(" + ",".join(amx) + ")" if amx else "-amx")
        else:
            have.append(fl if fl in flags else "-" + fl)
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "?")()
    isa = getattr(rbe_ffn, "cpu_isa", None)
    if callable(isa):
        try:
            isa = isa()
        except Exception as e:  # another engineer's API: never let it stop the benchmark
            isa = f"error: {type(e).__name__}"
    return (f"cpu: {model or platform.processor()}; flags: {' '.join(have)}; "
            f"torch.backends.cpu.get_cpu_capability()={cap}; "
            f"rbe_ffn.cpu_isa()={isa if isa is not None else 'n/a (not in this build)'}; "
            f"bfloat16 sparse operands (rbe_ffn._C.bf16_sparse()): {_bf16_sparse()}")


def _bf16_sparse():
    """Whether RBE's bf16 arm runs its sparse products and coefficient gradients on bfloat16 operands."""
    fn = getattr(getattr(rbe_ffn, "_C", None), "bf16_sparse", None)
    return bool(fn()) if callable(fn) else False


# ---------------------------------------------------------------- arms
def dense_ffn(d_model, d_ff):
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))


def lowrank_ffn(d_model, d_ff, r):
    return nn.Sequential(nn.Linear(d_model, r, bias=False), nn.Linear(r, d_ff), nn.GELU(),
                         nn.Linear(d_ff, r, bias=False), nn.Linear(r, d_model))


def rbe_weight_params(m) -> int:
    """Weight parameters of an RBEFeedForward: basis + coeffs of both layers (the index is a
    buffer of positions, not a parameter; it is in weight_nbytes)."""
    return sum(f.basis.numel() + f.coeffs.numel() for f in (m.fc1, m.fc2))


def matched_sizes(d_model, d_ff, p_rbe):
    """(rank r, narrow d_ff') whose weight parameter counts, 2*r*(d+f) and 2*d*d_ff', are the
    nearest to p_rbe."""
    r = max(1, round(p_rbe / (2 * (d_model + d_ff))))
    f_narrow = max(1, round(p_rbe / (2 * d_model)))
    return r, f_narrow


def linear_weight_params(m) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))


def int8_nbytes(q) -> int:
    """Bytes of the quantized weights: int8 values + one float32 scale and one int32 zero point
    per quantization group (per tensor here). fbgemm/onednn's packed form adds per-column
    offsets, not counted."""
    total = 0
    for mod in q.modules():
        w = getattr(mod, "weight", None)
        if callable(w) and hasattr(mod, "_packed_params"):
            wq = w()
            if wq.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                groups = wq.q_per_channel_scales().numel()
            else:
                groups = 1
            total += wq.int_repr().numel() * wq.int_repr().element_size() + groups * (4 + 4)
    return total


def quantize_int8(dense):
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {nn.Linear}, dtype=torch.qint8)


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


class Arm:
    def __init__(self, name, model, autocast=False, train=True, params=0, nbytes=0, note=""):
        self.name, self.model, self.autocast, self.train = name, model, autocast, train
        self.params, self.nbytes, self.note = params, nbytes, note
        self.status = "ok"

    def ctx(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)

    def run(self, x, mode):
        if mode == "forward":
            with torch.no_grad(), self.ctx():
                return self.model(x)
        for p in self.model.parameters():
            p.grad = None
        with self.ctx():
            loss = self.model(x).sum()
        loss.backward()
        return None


def build_arms(d_model, d_ff, block_size, k):
    torch.manual_seed(0)
    dense = dense_ffn(d_model, d_ff)
    rbe = rbe_ffn.RBEFeedForward(d_model, d_ff, "gelu", block_size=block_size, k=k)
    rbe_ck = rbe_ffn.RBEFeedForward(d_model, d_ff, "gelu", block_size=block_size, k=k, checkpoint=True)
    rbe_ck.load_state_dict(rbe.state_dict())  # the same function as rbe
    for m in (rbe, rbe_ck):
        rbe_ffn.pack_for_inference(m)
    packed = rbe.fc1.packed_nbytes + rbe.fc2.packed_nbytes  # 0 where the kernels are portable
    p_rbe = rbe_weight_params(rbe)
    r, f_narrow = matched_sizes(d_model, d_ff, p_rbe)
    lowrank, narrow = lowrank_ffn(d_model, d_ff, r), dense_ffn(d_model, f_narrow)
    q = quantize_int8(dense)
    p_dense = linear_weight_params(dense)
    fp32 = 4
    arms = [
        Arm("dense", dense, params=p_dense, nbytes=p_dense * fp32, note="float32"),
        Arm("dense_bf16", dense, autocast=True, params=p_dense, nbytes=p_dense * fp32,
            note=f"float32 master weights; autocast makes a bfloat16 copy ({p_dense * 2} bytes) every call"),
        Arm("int8_dyn", q, train=False, params=p_dense, nbytes=int8_nbytes(q),
            note="torch.ao quantize_dynamic, qint8 per-tensor weights, activations quantized per call; "
                 "forward only"),
        Arm("lowrank", lowrank, params=linear_weight_params(lowrank),
            nbytes=linear_weight_params(lowrank) * fp32, note=f"rank r={r}, float32"),
        Arm("narrow", narrow, params=linear_weight_params(narrow), nbytes=linear_weight_params(narrow) * fp32,
            note=f"d_ff'={f_narrow}, float32"),
        Arm("rbe", rbe, params=p_rbe, nbytes=rbe.weight_nbytes,
            note=f"b={block_size}, k={k}; bytes = basis + coeffs (float32) + index ({rbe.fc1.index.dtype}); "
                 f"pack_for_inference holds {packed} more bytes of packed coefficients (calls of 1-3 tokens)"),
        Arm("rbe_ckpt", rbe_ck, params=p_rbe, nbytes=rbe_ck.weight_nbytes, note="checkpoint=True"),
        Arm("rbe_bf16", rbe, autocast=True, params=p_rbe, nbytes=rbe.weight_nbytes),
    ]
    # What autocast does to RBE on CPU: the float32 input as for every arm, and a bfloat16 one
    # (what an autocast-ed layer before the FFN would hand it).
    a = arms[-1]
    x = torch.randn(2, d_model)
    try:
        with torch.no_grad(), a.ctx():
            y = rbe(x)
        a.note = f"runs; output {str(y.dtype).replace('torch.', '')}"
        if y.dtype == torch.float32:
            a.note += " (autocast leaves the RBE ops in float32 on CPU)"
        else:
            dots = "the sparse products and coefficient gradients on bfloat16 operands" if _bf16_sparse() else \
                "float32 sparse products (no AVX-512 BF16 here)"
            a.note += (" (computed in float32: the input cast up, the output to the autocast dtype; the "
                       f"activation evaluated in float32, {dots})")
        try:
            with torch.no_grad(), a.ctx():
                rbe(x.bfloat16())
            a.note += "; a bfloat16 input also runs"
        except Exception as e:
            a.note += f"; a bfloat16 input raises {first_line(e).split('. ')[0]}"
    except Exception as e:
        a.status, a.note = "unsupported", first_line(e)
    return arms


# ---------------------------------------------------------------- measurement
def rel_errors(arms, x):
    """Relative error (max |y - y_ref| / max |y_ref|) of the arms that compute the same function
    as another: dense_bf16 and int8_dyn against dense, rbe_ckpt and rbe_bf16 against rbe."""
    refs = {"dense_bf16": "dense", "int8_dyn": "dense", "rbe_ckpt": "rbe", "rbe_bf16": "rbe"}
    by = {a.name: a for a in arms}
    out = {}
    for name, ref in refs.items():
        if by[name].status != "ok":
            continue
        y_ref = by[ref].run(x, "forward").float()
        y = by[name].run(x, "forward").float()
        out[name] = (((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30)).item(), ref)
    return out


def round_order(live, last, rng, tries=1000):
    """Every arm once, in a random order in which no arm directly follows one that holds the same
    weights (itself, from the round before, included), when such an order exists; else (after
    `tries` draws) the last one drawn. A fixed or rotated order gives each arm the same predecessor
    every round, and one that follows an arm of its kind finds that arm's freed buffers in cache:
    the checkpointed RBE arm, always after the standard one, was 1.4x faster at one token with the
    same code (no grad); an arm after its own weights would time a warm call. (The first round of
    each measurement, where `last` is None, is a warm-up round unless --smoke.)"""
    for _ in range(tries):
        order = rng.sample(live, len(live))
        seq = ([last] if last is not None else []) + order
        if all(a.model is not b.model for a, b in zip(seq, seq[1:])):
            break
    return order


# An arm more than SLOW_FACTOR times slower than dense float32 in the last warm-up round is timed in
# SLOW_ROUNDS rounds only: bf16 autocast on a CPU without bfloat16 instructions (torch emulates them;
# 65-146x dense float32's step at 1024-4096 tokens on an AVX2-only EPYC, docs/benchmarks.md) would
# otherwise make one run of the benchmark take well over an hour. Its spread row says how many
# rounds it had. Without warm-up rounds (--smoke) nothing is capped.
SLOW_FACTOR, SLOW_ROUNDS = 20.0, 3


def slow_arms(warm_times):
    """The arms to time in SLOW_ROUNDS rounds only, from one warm-up round's times (name -> s)."""
    ref = warm_times.get("dense")
    return set() if ref is None else {n for n, t in warm_times.items() if t > SLOW_FACTOR * ref}


def measure(arms, x, mode, reps, warmup, warm=0):
    """Per arm, one time per timed round: of its single call (warm=0: the arm runs after the others,
    so its weights come from L3 or memory, as a model's layers do when they exceed the cache), or
    the mean of `warm` calls in a row after one untimed call (the arm's weights cached). Arms far
    slower than dense float32 (slow_arms) run in the first SLOW_ROUNDS timed rounds only."""
    live = [a for a in arms if a.status == "ok" and (a.train or mode == "forward")]
    times = {a.name: [] for a in live}
    rng, last, slow = random.Random(0), None, set()
    for rnd in range(warmup + reps):
        here = [a for a in live if not (a.name in slow and len(times[a.name]) >= SLOW_ROUNDS)]
        order = round_order(here, last, rng)
        last = order[-1]
        warm_times = {}
        for a in order:
            if warm:
                a.run(x, mode)
            t0 = time.perf_counter()
            for _ in range(max(warm, 1)):
                a.run(x, mode)
            dt = (time.perf_counter() - t0) / max(warm, 1)
            if rnd >= warmup:
                times[a.name].append(dt)
            warm_times[a.name] = dt
        if rnd == warmup - 1:
            slow = slow_arms(warm_times)
            for n in sorted(slow):
                print(f"  {n}: {warm_times[n] / warm_times['dense']:.0f}x dense float32 in the warm-up round, "
                      f"timed in {SLOW_ROUNDS} rounds", flush=True)
    return times


def peak_bytes(arms, x, mode):
    """Per arm that runs `mode`: the peak of (bytes allocated - bytes freed) by torch's CPU
    allocator during one call, above the level at its start (rbe_ffn._profiling.peak_call_bytes:
    the profiler's memory events), after one unmeasured call. As in every timed step, the
    parameters' gradients are freed before the call and the input's gradient already exists; the
    output is counted. Memory outside torch's allocator is not: the RBE kernels' per-thread
    scratch rows (a few KB), fbgemm's own buffers for int8_dyn."""
    return {a.name: peak_call_bytes(lambda: a.run(x, mode), a.model.parameters())
            for a in arms if a.status == "ok" and (a.train or mode == "forward")}


def spread(v):
    v = sorted(v)
    if len(v) >= 2:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    else:
        q1 = q3 = v[0]
    return statistics.median(v), q1, q3, v[0], v[-1]


def fmt(ms):
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21,
                    help="timed rounds (tokens <= 64: 3 * reps; tokens >= 4096: max(5, reps // 3))")
    ap.add_argument("--quick", action="store_true", help="768/3072, tokens 1 and 1024")
    ap.add_argument("--smoke", action="store_true", help="64/128, tokens 1 and 16, 1 rep, no warmup (tests)")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts, e.g. 1,64")
    ap.add_argument("--warm", type=int, default=0,
                    help="time the mean of this many calls in a row per arm and round, after an untimed one "
                         "(the arm's weights in cache); 0: one call, after the other arms ran")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--out", default=None, help="write the markdown here")
    ap.add_argument("--csv", default=None, help="write one row per measurement here")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak memory of each arm")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, token_list, reps, warmup = [(768, 3072), (1024, 4096)], [1, 16, 64, 1024, 4096], args.reps, 2
    if args.quick:
        shapes, token_list = [(768, 3072)], [1, 1024]
    if args.smoke:
        shapes, token_list, reps, warmup = [(64, 128)], [1, 16], 1, 0
    if args.tokens:
        token_list = [int(t) for t in args.tokens.split(",")]
    # rounds per token count: a round at <= 64 tokens costs milliseconds, and those times suffer
    # most from other processes on a shared machine: three times as many; at >= 4096 a third
    big_reps = max(5, reps // 3) if not args.smoke else reps
    small_reps = 3 * reps if not args.smoke else reps

    head = [
        isa_line(),
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32 input, GELU, "
        f"RBE b={args.block_size} k={args.k}; medians over {reps} interleaved rounds "
        f"({small_reps} at <= 64 tokens, {big_reps} at >= 4096), after {warmup} warm-up rounds "
        f"({min(warmup, 1)} at >= 4096)" + (f"; an arm more than {SLOW_FACTOR:.0f}x slower than dense float32 in "
                                             f"the last warm-up round: {SLOW_ROUNDS} rounds (the spread table's "
                                             "rounds column)" if warmup else ""),
        "each arm timed once per round, after the other arms ran, in a random order in which no arm follows one "
        "with the same weights (caches cold for its weights)" if not args.warm
        else f"each arm timed as the mean of {args.warm} calls in a row per round, after an untimed one "
             f"(its weights in cache)",
    ]
    print("\n".join(head), flush=True)
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    csv_rows, results, arm_info, peaks = [], {}, {}, {}
    t_start = time.perf_counter()
    for d_model, d_ff in shapes:
        arms = build_arms(d_model, d_ff, args.block_size, args.k)
        arm_info[(d_model, d_ff)] = arms
        for tokens in token_list:
            torch.manual_seed(1)
            x = torch.randn(tokens, d_model, requires_grad=True)
            errs = rel_errors(arms, x)
            n, w = ((big_reps, min(warmup, 1)) if tokens >= 4096 else (small_reps, warmup) if tokens <= 64
                    else (reps, warmup))
            for mode in MODES:
                times = measure(arms, x, mode, n, w, args.warm)
                peak = {} if args.no_memory else peak_bytes(arms, x, mode)
                for name, v in peak.items():
                    peaks[(d_model, d_ff, tokens, mode, name)] = v
                for a in arms:
                    err, ref = errs.get(a.name, ("", ""))
                    base = dict(d_model=d_model, d_ff=d_ff, tokens=tokens, mode=mode, arm=a.name,
                                weight_params=a.params, weight_bytes=a.nbytes, peak_bytes=peak.get(a.name, ""),
                                rel_err=err, ref=ref,
                                threads=torch.get_num_threads(), note=a.note)
                    if a.name in times:
                        for i, t in enumerate(times[a.name]):
                            csv_rows.append(dict(base, round=i, ms=f"{t * 1e3:.4f}", status="ok"))
                        results[(d_model, d_ff, tokens, mode, a.name)] = [t * 1e3 for t in times[a.name]]
                    else:
                        status = a.status if a.status != "ok" else "n/a"
                        note = a.note if a.status != "ok" else "forward only: does not train"
                        csv_rows.append(dict(base, round="", ms="", status=status, note=note))
                med = {k[4]: statistics.median(v) for k, v in results.items() if k[:4] == (d_model, d_ff, tokens, mode)}
                print(f"{d_model}/{d_ff} tokens={tokens} {mode}: " +
                      ", ".join(f"{k} {fmt(v)}" for k, v in med.items()) +
                      f"  [{time.perf_counter() - t_start:.0f} s]", flush=True)

    total = time.perf_counter() - t_start
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    head.append(f"load average {load0} at the start, {load} at the end ({os.cpu_count()} CPUs); "
                f"total {total / 60:.1f} min")
    lines = head + [""] + tables(shapes, token_list, arm_info, results, peaks)
    print("\n" + "\n".join(lines[len(head) - 1:]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            wr.writeheader()
            wr.writerows(csv_rows)
    return results


def tables(shapes, token_list, arm_info, results, peaks):
    out = ["### Arms", "",
           "| d_model/d_ff | arm | weight params | weight bytes | dense bytes / bytes | rel. error vs | notes |",
           "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        arms = arm_info[shape]
        dense_bytes = arms[0].nbytes
        for a in arms:
            ref = {"dense_bf16": "dense", "int8_dyn": "dense", "rbe_ckpt": "rbe", "rbe_bf16": "rbe"}.get(a.name, "")
            status = "" if a.status == "ok" else f"**{a.status}**: "
            out.append(f"| {shape[0]}/{shape[1]} | {a.name} | {a.params} | {a.nbytes} | "
                       f"{dense_bytes / a.nbytes:.1f} | {ref} | {status}{a.note} |")
    out += ["", "The rel. errors (max |y - y_ref| / max |y_ref|, forward, per token count) are in the CSV.", ""]

    hdr = ["d_model/d_ff", "tokens", "mode", "dense ms"] + [f"{a} ms (÷dense)" for a in ARMS[1:]] + [
        "fastest non-RBE", "RBE speedup", "RBE ckpt speedup", "fastest full-width non-RBE", "RBE speedup",
        "RBE bf16 speedup vs dense_bf16"]
    out += ["### Time per call (median ms; in brackets the time relative to dense fp32)", "",
            "Speedup = the fastest non-RBE arm's median / RBE's median (> 1: RBE is faster). Full-width: "
            "dense, dense_bf16, int8_dyn (d_ff as RBE); lowrank and narrow have RBE's parameter count. The "
            "last column compares the two arms under the same bf16 autocast.", "",
            "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for d_model, d_ff in shapes:
        by_name = {a.name: a for a in arm_info[(d_model, d_ff)]}
        for tokens in token_list:
            for mode in MODES:
                key = (d_model, d_ff, tokens, mode)
                med = {a: statistics.median(results[key + (a,)]) for a in ARMS if key + (a,) in results}
                dense = med["dense"]
                cells = [f"{d_model}/{d_ff}", str(tokens), mode, fmt(dense)]
                for a in ARMS[1:]:
                    if a in med:
                        cells.append(f"{fmt(med[a])} ({med[a] / dense:.2f})")
                    elif by_name[a].status != "ok":
                        cells.append(by_name[a].status)
                    else:
                        cells.append("n/a")
                non_rbe = [a for a in ARMS if a not in RBE_ARMS]
                for pool, rbes in ((non_rbe, ("rbe", "rbe_ckpt")), (FULL_WIDTH, ("rbe",))):
                    best = min((a for a in pool if a in med), key=med.get)
                    cells.append(best)
                    cells += [f"{med[best] / med[r]:.2f}" if r in med else "n/a" for r in rbes]
                both = "dense_bf16" in med and "rbe_bf16" in med
                cells.append(f"{med['dense_bf16'] / med['rbe_bf16']:.2f}" if both else "n/a")
                out.append("| " + " | ".join(cells) + " |")

    if peaks:
        out += ["", "### Peak memory of one call (MB above its start; in brackets relative to dense fp32)", "",
                "One call per arm after an unmeasured one; torch's CPU allocator, the output and (step) the "
                "parameters' gradients counted (bench_peers.peak_bytes; exact bytes in the CSV).", "",
                "| d_model/d_ff | tokens | mode | dense MB | " + " | ".join(f"{a} MB" for a in ARMS[1:]) + " |",
                "|" + "---|" * (3 + len(ARMS))]
        for d_model, d_ff in shapes:
            for tokens in token_list:
                for mode in MODES:
                    key = (d_model, d_ff, tokens, mode)
                    dense = peaks.get(key + ("dense",))
                    if dense is None:
                        continue
                    cells = [f"{d_model}/{d_ff}", str(tokens), mode, f"{dense / 1e6:.2f}"]
                    for a in ARMS[1:]:
                        v = peaks.get(key + (a,))
                        cells.append("n/a" if v is None else f"{v / 1e6:.2f} ({v / dense:.2f})")
                    out.append("| " + " | ".join(cells) + " |")

    out += ["", "### Spread over rounds (ms)", "",
            "| d_model/d_ff | tokens | mode | arm | rounds | median | quartiles (IQR) | min-max |",
            "|---|---|---|---|---|---|---|---|"]
    for (d_model, d_ff, tokens, mode, arm), v in results.items():
        m, q1, q3, lo, hi = spread(v)
        out.append(f"| {d_model}/{d_ff} | {tokens} | {mode} | {arm} | {len(v)} | {fmt(m)} | "
                   f"{fmt(q1)}-{fmt(q3)} ({fmt(q3 - q1)}) | {fmt(lo)}-{fmt(hi)} |")
    return out


if __name__ == "__main__":
    main()
