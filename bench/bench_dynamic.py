"""Cost of one DynamicSupport update against one training step: RBEFeedForward 768/3072 (b = 64,
k = 300, float32), 1024 tokens, Adam, one thread. Steps alternate (every=2): an ordinary step,
then a captured step (hooks armed) followed by the update (ds.step()); medians of each, with the
update split into its parts (recompute + transform-domain tiles, block-row gradients + choice,
swap). Peak memory of the update beside that of a training step (docs/DESIGN.md, section 9;
docs/benchmarks.md).

    PYTHONPATH=python OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dynamic.py
"""
import statistics
import time

import torch

import rbe_ffn
from rbe_ffn import dynamic
from rbe_ffn._profiling import peak_live_bytes

torch.set_num_threads(1)
torch.manual_seed(0)
d, f, T, REPS = 768, 3072, 1024, 9
m = rbe_ffn.RBEFeedForward(d, f, k=300)
opt = torch.optim.Adam(m.parameters(), lr=1e-3)
ds = rbe_ffn.DynamicSupport(m, opt, every=2, fraction=0.3, schedule="constant")
x, w = torch.randn(T, d), torch.randn(T, d)

parts = {"choose": [], "swap": []}


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        parts[name].append(time.perf_counter() - t0)
        return out
    return wrapper


ds._choose = timed("choose", ds._choose)
ds._swap = timed("swap", ds._swap)


def train():
    opt.zero_grad(set_to_none=True)
    (m(x) * w).sum().backward()
    opt.step()


plain, captured, update = [], [], []
for r in range(REPS + 1):
    t0 = time.perf_counter(); train(); t1 = time.perf_counter(); assert ds.step() is None
    plain.append(t1 - t0)
    assert ds.armed
    t0 = time.perf_counter(); train(); t1 = time.perf_counter(); info = ds.step(); t2 = time.perf_counter()
    assert info is not None and info["moved"] > 0
    captured.append(t1 - t0); update.append(t2 - t1)
    if r == 0:  # warm-up
        plain.clear(); captured.clear(); update.clear()
        for v in parts.values():
            v.clear()
med = {k: statistics.median(v) for k, v in (("plain", plain), ("captured", captured), ("update", update))}
print(f"768/3072, T={T}, k=300, float32, 1 thread, {REPS} reps (medians)")
print(f"training step {med['plain'] * 1e3:.1f} ms; captured step {med['captured'] * 1e3:.1f} ms "
      f"({med['captured'] / med['plain']:.2f}x); update {med['update'] * 1e3:.1f} ms = "
      f"{med['update'] / med['plain']:.2f} training steps")
per = {k: [a + b for a, b in zip(v[::2], v[1::2])] for k, v in parts.items()}  # fc2 + fc1 of each update
rest = [u - c - s for u, c, s in zip(update, per["choose"], per["swap"])]
print(f"update parts (medians, ms): recompute + transform-domain tiles {statistics.median(rest) * 1e3:.1f}, "
      f"block-row gradients + choice {statistics.median(per['choose']) * 1e3:.1f}, "
      f"swap {statistics.median(per['swap']) * 1e3:.1f}")
for every in (100, 1000):
    print(f"amortized at every={every}: {med['update'] / (every * med['plain']) * 100:.2f}% of training time")

# peak transient memory: an ordinary step; the captured step; the update alone (after it)
assert not ds.armed
p_plain = peak_live_bytes(train)
ds.step()
assert ds.armed
p_captured = peak_live_bytes(train)
p_update = peak_live_bytes(ds.step)
print(f"peak live memory: training step {p_plain / 2**20:.1f} MiB, captured step {p_captured / 2**20:.1f} MiB, "
      f"update {p_update / 2**20:.1f} MiB")
