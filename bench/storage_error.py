"""Storage options of a 768/3072 RBE block (b = 64, k = 300): the bytes of each (rbe_ffn.storage_report)
and the relative output error of storing values at half width (docs/benchmarks.md, Storage options).

    .venv/bin/python bench/storage_error.py

Seeded, one thread, a few seconds. Error: ||y_half - y|| / ||y|| over 512 Gaussian inputs, where
y_half is the layer reloaded from rbe_ffn.storage_state_dict(layer, dtype) (coeffs only), or with
its basis rounded instead, to show why the pattern numbers are kept in the layer's dtype.
"""
import copy
import math

import torch

import rbe_ffn

torch.set_num_threads(1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def with_pattern(m, g):
    """A pattern part of a trained layer's size: basis ~ N(0, 1/(3 in)) (fresh layers have basis = 0)."""
    with torch.no_grad():
        for lin in [x for x in m.modules() if isinstance(x, rbe_ffn.RBELinear)]:
            lin.basis.normal_(0, 1 / math.sqrt(3 * lin.in_features), generator=g)
    return m


print("| module | pattern | dtype | coeffs rounded | basis rounded instead |")
print("| --- | --- | --- | ---: | ---: |")
for kind in ("RBELinear 768->3072", "RBEFeedForward 768/3072"):
    for pattern in (False, True):
        g = torch.Generator().manual_seed(0)
        if kind.startswith("RBELinear"):
            m = rbe_ffn.RBELinear(768, 3072, block_size=64, k=300, generator=g, index_seed=0)
        else:
            m = rbe_ffn.RBEFeedForward(768, 3072, block_size=64, k=300, generator=g, index_seed=0)
        if pattern:
            with_pattern(m, g)
        x = torch.randn(512, 768, generator=g)
        y = m(x)
        for dt in (torch.float16, torch.bfloat16):
            q = copy.deepcopy(m)
            q.load_state_dict(rbe_ffn.storage_state_dict(m, dt))
            e_coeffs = rel(q(x), y)
            q = copy.deepcopy(m)
            with torch.no_grad():
                for lin in [x for x in q.modules() if isinstance(x, rbe_ffn.RBELinear)]:
                    lin.basis.copy_(lin.basis.to(dt).float())
            e_basis = rel(q(x), y) if pattern else float("nan")
            print(f"| {kind} | {'N(0, 1/(3 in))' if pattern else '0 (fresh)'} | {str(dt)[6:]} | {e_coeffs:.2e} | "
                  f"{e_basis:.2e} |")

m = rbe_ffn.RBEFeedForward(768, 3072, block_size=64, k=300, device="meta")
print("\n| index | coeffs | bytes (both weights) | bytes per block | dense bytes (same dtype) | ratio |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for index in ("stored", "seeded"):
    for vd in (None, torch.float16, torch.bfloat16):
        r = rbe_ffn.storage_report(m, index, vd)
        print(f"| {index} | {'float32' if vd is None else str(vd)[6:]} | {r['bytes']:,} | {r['bytes_per_block']:.2f} | "
              f"{r['dense_bytes']:,} | {r['compression_ratio']:.2f}x |")
