"""Smoke test of examples/train_char_lm.py: its main function, in-process, with tiny settings
(2 layers, d_model 64, 3 steps, 0.1 MB of corpus). Checks the CSV, PNG and summary are written,
the losses are finite, and checkpoint=True saves less for backward than checkpoint=False. And the
helpers the conversion studies share (examples/convert_recipe.py)."""
import argparse
import csv
import math
import os

import pytest
import torch
from conftest import load_script



def test_train_char_lm_smoke(tmp_path):
    ex = load_script("examples/train_char_lm.py")
    threads = torch.get_num_threads()
    try:
        res = ex.main(["--quick", "--steps", "3", "--eval-every", "2", "--corpus-mb", "0.1", "--eval-windows", "4",
                       "--time-reps", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)

    with open(tmp_path / "char_lm.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "arm", "train_loss", "val_loss", "train_seconds", "wall_seconds"]
    arms = ("dense", "rbe", "dense-small")
    assert {r["arm"] for r in rows} == set(arms)
    for arm in arms:  # evaluated at steps 0, 2 and 3 (the last)
        assert [int(r["step"]) for r in rows if r["arm"] == arm] == [0, 2, 3]
    for r in rows:
        assert math.isfinite(float(r["val_loss"])) and 0 < float(r["val_loss"]) < 10
        if int(r["step"]) > 0:
            assert math.isfinite(float(r["train_loss"]))
            assert float(r["train_seconds"]) > 0
    with open(tmp_path / "char_lm.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "char_lm_summary.md").read_text()
    for name in ("| dense |", "| rbe |", "| rbe, checkpoint=False |", "| dense-small |"):
        assert name in summary

    # the RBE arm has 1/8 of the dense FFN weight parameters, dense-small the same as RBE
    w = {a: res["counts"][a][0] for a in arms}
    assert w["dense"] == 8 * w["rbe"] and w["dense-small"] == w["rbe"]
    assert all(math.isfinite(v) for v in res["final_val"].values())
    assert res["same_forward"]
    mem = res["memory"]  # (saved bytes, of which inside the FFNs, profiler peak)
    # checkpointed: the input only; standard: also act'(h) and fc2's analysed input (about 2.2-2.5
    # [T, d_ff] tensors at these block sizes, where dense keeps GELU's input and fc2's: 2)
    assert mem["rbe"][1] < mem["dense"][1] and mem["rbe"][1] < mem["rbe, checkpoint=False"][1]
    assert mem["rbe, checkpoint=False"][1] < 1.3 * mem["dense"][1]
    assert mem["rbe"][0] < mem["rbe, checkpoint=False"][0]


def test_profiler_helper_prints_nothing():
    """`make example` printed kineto's "USDT: ... profiler_start" / "profiler_stop" lines for every
    peak-memory measurement (rbe_ffn._profiling.peak_live_bytes, a fresh process as in the example);
    the helper leaves the environment as it found it."""
    import subprocess
    import sys

    code = ("import os, torch\n"
            "from rbe_ffn._profiling import peak_live_bytes\n"
            "a = peak_live_bytes(lambda: torch.ones(1000) + 1)\n"
            "b = peak_live_bytes(lambda: torch.ones(1000) + 1)\n"
            "assert a >= 8000 and b >= 8000, (a, b)\n"
            "assert 'KINETO_LOG_LEVEL' not in os.environ\n"
            "print('done')\n")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "done\n" and out.stderr == "", (out.stdout, out.stderr)


def test_convert_recipe_stored_width_and_bytes():
    """examples/convert_recipe.py (shared by the conversion studies): a model is evaluated as loaded back
    at the stored width (coefficients rounded to float16, nothing else changed), and its bytes per weight
    are storage_report's: at b = 64 and float16 coefficients k = 1016 is exactly 1 B (4x smaller than
    float32); at float32 they are the studies' (32 + 6k) / 4096."""
    import rbe_ffn
    rec = load_script("examples/convert_recipe.py")
    torch.manual_seed(0)
    model = torch.nn.Sequential(rbe_ffn.RBELinear.from_compressed(rbe_ffn.compress(torch.randn(64, 128), 64, 1016)))
    assert rec.rbe_bytes_per_weight(model, torch.float16) == 1.0
    assert rec.rbe_bytes_per_weight(model, torch.float32) == (32 + 6 * 1016) / 4096
    back = rec.stored(model, torch.float16)
    c, cb = model[0].coeffs, back[0].coeffs
    assert cb.dtype == c.dtype and not torch.equal(cb, c)
    torch.testing.assert_close(cb, c.half().to(c.dtype), rtol=0, atol=0)
    assert torch.equal(back[0].basis, model[0].basis) and torch.equal(back[0].index, model[0].index)
    assert torch.equal(rec.stored(model, torch.float32)[0].coeffs, c)

    ap = argparse.ArgumentParser()
    rec.add_recipe_args(ap, patience=4)
    assert rec.recipe_labels(ap.parse_args([])) == ("", "")
    args = ap.parse_args("--values-dtype float16 --train all --parametrization scaled --schedule cosine".split())
    assert rec.recipe_labels(args) == (", coeffs float16", " (scaled, train=all, cosine)")
    with pytest.raises(SystemExit):
        rec.check_recipe_args(ap, ap.parse_args(["--warmup", "-1"]))
