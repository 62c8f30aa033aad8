"""A checkpointed RBEFeedForward in its default chunks of 128 tokens against the same block with
all tokens at once (memory_limit_mb=1e300): training-step time (interleaved, medians) and peak
memory, beside the dense block's peak (docs/benchmarks.md, CPU memory).

    .venv/bin/python bench/bench_chunking.py
"""
import statistics
import time

import torch

import rbe_ffn
from rbe_ffn._profiling import peak_live_bytes
torch.set_num_threads(2)
for d, f, T in ((768, 3072, 1024), (768, 3072, 4096), (1024, 4096, 1024), (1024, 4096, 4096)):
    torch.manual_seed(0)
    a = rbe_ffn.RBEFeedForward(d, f, k=300, checkpoint=True)              # default: chunks of 128
    b = rbe_ffn.RBEFeedForward(d, f, k=300, checkpoint=True, memory_limit_mb=1e300)  # all tokens at once
    b.load_state_dict(a.state_dict())
    dn = torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.GELU(), torch.nn.Linear(f, d))
    x = torch.randn(T, d, requires_grad=True)
    def stepper(m):
        def step():
            for p in m.parameters(): p.grad = None
            x.grad = None
            m(x).sum().backward()
        return step
    sa, sb, sd = stepper(a), stepper(b), stepper(dn)
    for s in (sa, sb): s()
    ta, tb = [], []
    for _ in range(7 if T > 2000 else 15):
        for s, t in ((sa, ta), (sb, tb)):
            t0 = time.perf_counter(); s(); t.append(time.perf_counter() - t0)
    pa, pb, pd = peak_live_bytes(sa), peak_live_bytes(sb), peak_live_bytes(sd)
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(f"{d}/{f} T={T}: chunked {ma*1e3:.1f} ms, unchunked {mb*1e3:.1f} ms, ratio {ma/mb:.3f}; "
          f"peak chunked {pa/2**20:.1f} MiB, unchunked {pb/2**20:.1f}, dense {pd/2**20:.1f} (chunked/dense {pa/pd:.2f})", flush=True)
