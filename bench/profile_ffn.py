"""Where a CPU feed-forward call spends its time: a workload to run under `perf`, the grouping of
perf's report by kernel family, and the multiply-adds per token of RBE and dense.

    .venv/bin/python bench/profile_ffn.py --mode step --macs          # multiply-adds per token only
    OMP_NUM_THREADS=1 perf record -o bench/out/step.perf -- \\
        .venv/bin/python bench/profile_ffn.py --mode step --seconds 20
    .venv/bin/python bench/profile_ffn.py --report bench/out/step.perf   # shares by kernel family

The workload prints when its timed loop starts; perf also records the set-up (import, encoding),
which lands in "Python, torch and the rest" (run long enough that it stays small). The report
groups the symbols of `perf report --sort symbol` by the families of docs/DESIGN.md section 3.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import contextlib
import time

# kernel families, matched on perf's symbol names in this order (first match wins)
FAMILIES = (
    ("sparse products (forward rows, input-gradient columns; the one-pass backward's coefficient gradient too)",
     r"sparse_sched|sparse_block|rbe_rows_forward|rows_body|rbe_cols_backward|cols_item|rbe_cols_coeffs_backward|"
     r"rbe_few_rows_forward|"
     r"few_term|one_sparse|one_block|rbe_one_rows_forward"),
    ("parameter gradient",
     r"coeff_grads|rbe_params_backward|params_sched|pattern_backward|basis_grad_tile|rbe_bias_backward|bias_sums"),
    ("transforms (fast DCT, pattern projections, tile transposes)",
     r"gemm_tile|dct2_tile|dct3_tile|analyse_tile|synthesise_tile|rbe_analysis|store_tile|load_tile|few_matvec|"
     r"rbe_few_analysis|rbe_few_at"),
    ("activation (double-precision erfc / exp, or float32 with 16-bit results, and its passes)",
     r"erfc|_exp_|rbe_gelu|act_forward|act_backward|act_and|act_f32|act_grad_f32|f32_arrays|\barrays_(1|8|16)\b"),
    ("schedules (regrouping the coefficients per call)", r"rbe_schedule|sched"),
    ("index snapshot and check, other copies (bfloat16 roundings), scales, scans",
     r"index_ok|rbe_index|memmove|memcpy|scale_rows|max_abs|nonfinite|rbe_to_bf16"),
)
OTHER = "Python, torch and the rest"


def macs_per_token(d_model: int, d_ff: int, b: int, k: int, nf: int) -> dict:
    """Multiply-adds per token of one RBE feed-forward (fast DCT, as the float32 x86 kernels
    compute it) and of dense, forward and step (forward + backward with dL/dx)."""
    def fast_dct(n: int) -> int:  # the even/odd recursion of csrc/rbe_x86_impl.h dct2_tile/dct3_tile
        return n * n if n % 2 or n <= 2 else fast_dct(n // 2) + (n // 2) ** 2

    # one segment's analysis (or synthesis) of one token: the pattern rows are mirror-symmetric, so
    # for an even b they take the b/2 half sums the DCT's first split forms anyway
    seg = fast_dct(b) + nf * (b // 2 if b % 2 == 0 else b)
    R1, C1 = -(-d_ff // b), -(-d_model // b)
    sparse = R1 * C1 * k  # per layer: both layers have R * C = R1 * C1 blocks
    small, large = C1 * seg, R1 * seg  # transforms over d_model / d_ff
    fwd = small + sparse + large + large + sparse + small  # fc1: x analysis, rows, synthesis; fc2 the same
    # backward (standard, gelu: the forward kept fc2's analysed input, docs/DESIGN.md): g analysed,
    # fc2 columns + synthesis into d_ff, fc2's parameter dots on the kept input, fc1's output
    # gradient analysed, fc1 columns + synthesis into d_model, x analysed again for fc1's parameter dots
    bwd = (small + sparse + large) + sparse + (large + sparse + small) + (small + sparse)
    dense = 2 * d_model * d_ff
    return {"rbe_forward": fwd, "rbe_step": fwd + bwd, "dense_forward": dense, "dense_step": 3 * dense}


def report(path: str) -> None:
    out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", "symbol", "--stdio"],
                         capture_output=True, text=True, check=True).stdout
    shares = {name: 0.0 for name, _ in FAMILIES}
    shares[OTHER] = 0.0
    top = []
    for line in out.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+\[[.k]\]\s+(.+?)\s*$", line)
        if not m:
            continue
        pct, sym = float(m.group(1)), m.group(2)
        name = next((n for n, pat in FAMILIES if re.search(pat, sym)), OTHER)
        shares[name] += pct
        if len(top) < 12:
            top.append((pct, sym[:60], name))
    print("| kernel family | share of samples |\n|---|---|")
    for name, pct in shares.items():
        print(f"| {name} | {pct:.1f}% |")
    print("\nlargest symbols:")
    for pct, sym, name in top:
        print(f"  {pct:5.1f}%  {sym}  ({name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("forward", "step"), default="step")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--autocast", action="store_true",
                    help="run under torch.autocast('cpu', dtype=torch.bfloat16) (16-bit results)")
    ap.add_argument("--packed", action="store_true",
                    help="rbe_ffn.pack_for_inference first (forward calls of 1-3 tokens read packed coefficients)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the timed loop")
    ap.add_argument("--macs", action="store_true", help="print the multiply-adds per token and stop")
    ap.add_argument("--report", metavar="PERF_DATA", help="group a perf recording by kernel family and stop")
    a = ap.parse_args()
    if a.report:
        report(a.report)
        return

    import torch

    import rbe_ffn

    m = rbe_ffn.RBEFeedForward(a.d_model, a.d_ff, "gelu", block_size=a.block_size, k=a.k, checkpoint=a.checkpoint)
    if a.packed:
        rbe_ffn.pack_for_inference(m)
    nf = m.fc1.plan.shape[1] - a.block_size
    macs = macs_per_token(a.d_model, a.d_ff, a.block_size, a.k, nf)
    print(f"multiply-adds per token ({a.d_model}/{a.d_ff}, b={a.block_size}, k={a.k}, nf={nf}; the step with "
          f"the standard backward{', which --checkpoint exceeds: it also recomputes fc1' if a.checkpoint else ''}): "
          + ", ".join(f"{key} {v:,}" for key, v in macs.items())
          + f"; dense / RBE: forward {macs['dense_forward'] / macs['rbe_forward']:.2f}x, "
            f"step {macs['dense_step'] / macs['rbe_step']:.2f}x")
    if a.macs:
        return
    x = torch.randn(a.tokens, a.d_model, requires_grad=a.mode == "step")

    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.autocast else contextlib.nullcontext

    def once():
        if a.mode == "forward":
            with torch.no_grad(), ctx():
                m(x)
        else:
            with ctx():
                y = m(x)
            y.float().sum().backward()
            for p in m.parameters():
                p.grad = None
            x.grad = None

    for _ in range(3):
        once()
    print(f"timed loop starts ({a.mode}, {a.tokens} tokens, {torch.get_num_threads()} threads, "
          f"isa {rbe_ffn.cpu_isa()}{', bf16 autocast' if a.autocast else ''}{', packed' if a.packed else ''})",
          flush=True)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        once()
        n += 1
    print(f"{n} calls, {(time.perf_counter() - t0) / n * 1e3:.2f} ms each")


if __name__ == "__main__":
    main()
