"""Plain vs data-aware encoding (compress(..., calibration=X)) of one Gaussian weight whose inputs
are correlated: X = Z A, A's singular values decaying as 1/sqrt(i). Prints, for each k, the
relative output error ||(W - W_rbe) X^T|| / ||W X^T|| on the calibration data and on a held-out
draw, the weight errors and the encoding times (docs/studies/calibration.md).

    .venv/bin/python examples/calibration_synthetic.py 3072 768 64,300,1000
    .venv/bin/python examples/calibration_synthetic.py 768 3072 64,300,1000
    args: out in k-list [n samples, default 4*in] [select: obs | diag]
"""
import sys
import time

import torch

import rbe_ffn
from rbe_ffn.calibrate import output_error
torch.manual_seed(0)
out, inp = int(sys.argv[1]), int(sys.argv[2])
ks = [int(a) for a in sys.argv[3].split(",")]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 4 * inp
sel = sys.argv[5] if len(sys.argv) > 5 else "obs"
b = 64
W = (torch.randn(out, inp) / inp ** 0.5)
s = 1 / torch.sqrt(torch.arange(1, inp + 1, dtype=torch.float64))
A = ((torch.linalg.qr(torch.randn(inp, inp, dtype=torch.float64))[0] * s)
     @ torch.linalg.qr(torch.randn(inp, inp, dtype=torch.float64))[0]).float()
X = torch.randn(n, inp) @ A
Xh = torch.randn(n // 2, inp) @ A
Hh = (Xh.double().T @ Xh.double()) / Xh.shape[0]
for k in ks:
    t = time.time(); cp = rbe_ffn.compress(W, b, k); tp = time.time() - t
    t = time.time(); cw = rbe_ffn.compress(W, b, k, calibration=X, select=sel); td = time.time() - t
    print(f"{out}x{inp} k={k} n={n} {sel}: output err plain {cw.output_error_plain:.4f} data {cw.output_error:.4f} | "
          f"held-out plain {output_error(W, cp.decompress(), Hh):.4f} data {output_error(W, cw.decompress(), Hh):.4f} | "
          f"weight err plain {cp.relative_error:.4f} data {cw.relative_error:.4f} | time plain {tp:.2f}s data {td:.1f}s "
          f"| plain rows kept {cw.plain_block_rows}", flush=True)
