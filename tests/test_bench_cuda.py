"""Dry run of bench/bench_cuda.py on the CPU (--smoke: 64/128, tokens 1 and 16, one rep): the GPU
benchmark's own logic (the arms, RBE's paths and the narrow dense FFN of RBE's parameter count,
the interleaving, the table and the CSV) runs in every test run, so a GPU session does not spend
device time on a broken script. No speed assertions (the times of a CPU dry run mean nothing)."""
import csv
import math
import os
import subprocess
import sys

import rbe_ffn
from conftest import same_package_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cuda_smoke(tmp_path):
    out, csv_path = tmp_path / "cuda.md", tmp_path / "cuda.csv"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_cuda.py"), "--smoke", "--out", str(out),
                          "--csv", str(csv_path)], env=same_package_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for tokens in ("1", "16"):
        for mode in ("forward", "backward", "step"):
            got = {r["arm"]: r for r in rows if r["tokens"] == tokens and r["mode"] == mode}
            assert set(got) == {"dense", "narrow", "decode", "dct", "few"}, (tokens, mode, set(got))
            for arm, r in got.items():
                t = float(r["median_ms"])
                assert math.isfinite(t) and t > 0, (tokens, mode, arm, t)
    table = [line for line in out.read_text().splitlines() if line.startswith("| float32")]
    assert len(table) == 2 and all(line.count("|") == 11 for line in table), table
    # the narrow arm spends RBE's weight parameter count (basis + coeffs of both layers) densely
    m = rbe_ffn.RBEFeedForward(64, 128, block_size=16, k=40)
    p_rbe = sum(f.basis.numel() + f.coeffs.numel() for f in (m.fc1, m.fc2))
    assert all(f"64 x 128 ({round(p_rbe / (2 * 64))})" in line for line in table), table
