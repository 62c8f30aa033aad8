"""A trained model converted plain vs data-aware: trains the dense arm of examples/train_char_lm.py
(d_model 256, 4 layers, byte-level LM on the Python stdlib's source, 1 thread), then converts its
FFNs with replace_mlp at k = 64, 300, 1000, without and with calibration on 4096 training tokens,
and reports validation loss and each block's relative output error on held-out validation windows
(docs/studies/calibration.md). About 3 minutes for 300 steps on a 2-core machine.

    .venv/bin/python examples/calibration_char_lm.py 300        # training steps
"""
import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_char_lm as T  # noqa: E402

import rbe_ffn  # noqa: E402
from rbe_ffn.convert import _capture_inputs, _scan  # noqa: E402  (the held-out block inputs)
torch.set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
d, L, H, ctx, B = 256, 4, 4, 128, 8
train, val, info = T.load_corpus(4.0)
model = T.CharLM(256, ctx, d, H, L, lambda: T.dense_ffn(d, 4 * d), 0)
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
g = torch.Generator().manual_seed(1)
offs = torch.arange(ctx + 1)
def batch(src, n, gen):
    s = torch.randint(len(src) - ctx - 1, (n,), generator=gen)
    w = src[s[:, None] + offs]
    return w[:, :-1], w[:, 1:]
t0 = time.time()
for step in range(steps):
    lr = 2e-3 * min(1, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
    for pg in opt.param_groups: pg["lr"] = lr
    x, y = batch(train, B, g)
    loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
print(f"trained {steps} steps in {time.time()-t0:.0f}s, last train loss {loss.item():.3f}", flush=True)
model.eval()
vg = torch.Generator().manual_seed(2)
vx, vy = batch(val, 32, vg)
def vloss(m):
    with torch.no_grad():
        return F.cross_entropy(m(vx).reshape(-1, 256), vy.reshape(-1)).item()
cal_x, _ = batch(train, 32, torch.Generator().manual_seed(3))   # 4096 calibration tokens
blocks = _scan(model)[0]
held = _capture_inputs(model, blocks, vx)                       # held-out: the validation windows
print(f"dense val loss {vloss(model):.4f}")
for k in (64, 300, 1000):
    res = {}
    for mode in ("plain", "data"):
        m = copy.deepcopy(model)
        t = time.time()
        rep = rbe_ffn.replace_mlp(m, block_size=64, k=k, calibration=cal_x if mode == "data" else None)
        dt = time.time() - t
        errs = []
        for blk in blocks:
            x = held[blk.path]
            with torch.no_grad():
                want = blk.teacher(x)
                errs.append(((m.get_submodule(blk.path)(x) - want).norm() / want.norm()).item())
        res[mode] = (vloss(m), errs, dt, rep)
    rp = res["data"][3]
    print(f"k={k}: val loss plain {res['plain'][0]:.4f} data {res['data'][0]:.4f} | held-out block err plain "
          f"{' '.join(f'{e:.3f}' for e in res['plain'][1])} data {' '.join(f'{e:.3f}' for e in res['data'][1])} | "
          f"convert time plain {res['plain'][2]:.1f}s data {res['data'][2]:.1f}s", flush=True)
    for l in rp:
        print(f"   {l.path}: fc1 out err plain {l.output_error_fc1_plain:.4f} data {l.output_error_fc1:.4f}; "
              f"fc2 plain {l.output_error_fc2_plain:.4f} data {l.output_error_fc2:.4f}; "
              f"weight err fc1 {l.error_fc1:.3f} fc2 {l.error_fc2:.3f}")
