"""Error of 16-bit results on the CPU against float32, RBE beside dense (issue #11, item 3).

Under torch.autocast("cpu", dtype=torch.bfloat16) a float32 RBEFeedForward computes in float32,
evaluates its activation in float32 and (AVX-512 BF16 CPUs) runs its sparse products and
coefficient gradients on bfloat16 operands; dense nn.Linear layers compute their products on
bfloat16 operands. For
each, the relative error (norm of the difference / norm of the float32 result) of the output,
the input gradient and the weight gradients against the same module in float32, on the same
bfloat16 input and upstream gradient. RBE's target: no worse than 2x dense's.

    .venv/bin/python bench/bf16_error.py [--d-model 768 --d-ff 3072 --tokens 256 --seeds 3]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import rbe_ffn


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dense_twin(m):
    """nn.Sequential(Linear, GELU, Linear) with m's decoded weights: the same function."""
    d = nn.Sequential(nn.Linear(m.d_model, m.d_ff), nn.GELU(), nn.Linear(m.d_ff, m.d_model))
    with torch.no_grad():
        d[0].weight.copy_(m.fc1.dense_weight()), d[0].bias.copy_(m.fc1.bias)
        d[2].weight.copy_(m.fc2.dense_weight()), d[2].bias.copy_(m.fc2.bias)
    return d


def errors(module, x, g, weights):
    """(output, input gradient, weight gradients) errors of bf16 autocast against float32."""
    out = {}
    for mode in ("f32", "bf16"):
        module.zero_grad()
        h = x.clone().requires_grad_()
        if mode == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(h)
        else:
            y = module(h.float())
        y.float().backward(g)
        out[mode] = (y.detach().float(), h.grad.float(), [w().grad.clone() for w in weights])
    (y32, dx32, gw32), (y16, dx16, gw16) = out["f32"], out["bf16"]
    return rel(y16, y32), rel(dx16, dx32), max(rel(a, b) for a, b in zip(gw16, gw32))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    from rbe_ffn import _C
    print(f"rbe_ffn.cpu_isa()={rbe_ffn.cpu_isa()}; bfloat16 sparse operands: {_C.bf16_sparse()}; "
          f"{args.d_model}/{args.d_ff}, {args.tokens} tokens, b={args.block_size}, k={args.k}")
    rows = {"rbe": [], "dense": []}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        m = rbe_ffn.RBEFeedForward(args.d_model, args.d_ff, block_size=args.block_size, k=args.k)
        d = dense_twin(m)
        # the block's input as an autocast-ed layer before it would hand it: bfloat16
        x = torch.randn(args.tokens, args.d_model).bfloat16()
        g = torch.randn(args.tokens, args.d_model)
        rows["rbe"].append(errors(m, x, g, [lambda: m.fc1.coeffs, lambda: m.fc1.basis,
                                            lambda: m.fc2.coeffs, lambda: m.fc2.basis]))
        rows["dense"].append(errors(d, x, g, [lambda: d[0].weight, lambda: d[2].weight]))
    print("| module | output | input gradient | weight gradients (worst) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        cells = [statistics.median(v[i] for v in r) for i in range(3)]
        print(f"| {name} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")
    print(f"(medians over {args.seeds} seeds; relative error = |bf16 autocast - float32| / |float32|)")


if __name__ == "__main__":
    main()
