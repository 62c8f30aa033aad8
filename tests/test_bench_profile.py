"""bench/profile_ffn.py: the multiply-add counts it reports, against counts written out by hand,
and its workload run briefly in a subprocess (no speed assertions)."""
import os
import subprocess
import sys

from conftest import load_script, same_package_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "profile_ffn.py")


def test_macs_by_hand():
    p = load_script("bench/profile_ffn.py")
    # b = 8: the fast DCT recursion 8 -> 4 -> 2: 4^2 + 2^2 + 2^2 = 24 multiply-adds; a segment adds
    # nf * b/2 = 3 * 4 = 12 for the pattern projections (mirror-symmetric rows on the half sums):
    # 36 per segment and token
    # 16 -> 40, b = 8: fc1 has R = 5 block rows, C = 2 block columns, 10 blocks of k = 6
    m = p.macs_per_token(16, 40, 8, 6, 3)
    seg, sparse = 36, 10 * 6
    small, large = 2 * seg, 5 * seg
    assert m["rbe_forward"] == 2 * (small + sparse + large)
    # backward: g and x analysed, two syntheses, fc1's output gradient analysed (fc2's input as the
    # forward kept it); two column products and two parameter-dot passes
    assert m["rbe_step"] == m["rbe_forward"] + (4 * sparse + 3 * small + 2 * large)
    assert m["dense_forward"] == 2 * 16 * 40 and m["dense_step"] == 3 * 2 * 16 * 40
    # odd block sizes have no even/odd split: the matrix DCT
    assert p.macs_per_token(5, 5, 5, 1, 0)["rbe_forward"] == 2 * (25 + 1 + 25)


def test_workload_runs(tmp_path):
    env = same_package_env()
    for mode in ("forward", "step"):
        res = subprocess.run([sys.executable, SCRIPT, "--mode", mode, "--d-model", "64", "--d-ff", "128",
                              "--tokens", "16", "--k", "20", "--seconds", "0.2"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "timed loop starts" in res.stdout and "calls," in res.stdout, res.stdout
