"""Smoke test of bench/bench_peers.py: run with --smoke (64/128, tokens 1 and 16, one round) in a
subprocess, then check the CSV: every arm and mode is there, the arms that compute the same
function agree (dense fp32 vs bf16 autocast within bf16 tolerance, int8 within int8 tolerance,
RBE checkpointed / under autocast equal to RBE), and the low-rank and narrow arms have RBE's
weight parameter count as the script states it; every arm's peak memory is there and holds at
least what the call must allocate. No speed assertions."""
import csv
import os
import subprocess
import sys

import rbe_ffn
from conftest import load_script, same_package_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {"dense", "dense_bf16", "int8_dyn", "lowrank", "narrow", "rbe", "rbe_ckpt", "rbe_bf16"}


def run_smoke(tmp_path, *extra):
    env = same_package_env()
    out, csv_path = tmp_path / "peers.md", tmp_path / "peers.csv"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_peers.py"), "--smoke", "--threads", "1",
                          "--out", str(out), "--csv", str(csv_path), *extra],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f)), out.read_text(), res.stdout


def test_bench_peers_smoke(tmp_path):
    rows, md, stdout = run_smoke(tmp_path)
    assert "get_cpu_capability()=" in stdout and "avx2" in stdout
    assert "once per round, after the other arms ran, in a random order" in md

    # every (tokens, mode, arm) has a row; int8 has no training step, everything else is timed
    for tokens in ("1", "16"):
        for mode in ("forward", "step"):
            got = {r["arm"]: r for r in rows if r["tokens"] == tokens and r["mode"] == mode}
            assert set(got) == ARMS, (tokens, mode, set(got))
            for arm, r in got.items():
                if arm == "int8_dyn" and mode == "step":
                    assert r["status"] == "n/a" and r["ms"] == ""
                elif arm == "rbe_bf16" and r["status"] == "unsupported":
                    assert r["note"] and r["ms"] == ""  # the error's first line, no time
                else:
                    assert r["status"] == "ok" and float(r["ms"]) > 0, r

    # the same function where it should be (forward, max |y - y_ref| / max |y_ref|)
    for r in rows:
        if r["mode"] != "forward" or r["status"] != "ok":
            continue
        if r["arm"] == "dense_bf16":
            assert r["ref"] == "dense" and float(r["rel_err"]) < 2e-2
        elif r["arm"] == "int8_dyn":
            assert r["ref"] == "dense" and float(r["rel_err"]) < 0.1
        elif r["arm"] == "rbe_ckpt":
            assert r["ref"] == "rbe" and float(r["rel_err"]) < 1e-5
        elif r["arm"] == "rbe_bf16":  # computed in float32, the output rounded to bfloat16
            assert r["ref"] == "rbe" and float(r["rel_err"]) < 2e-2
        else:
            assert r["rel_err"] == ""

    # parameter counts: RBE = basis + coeffs of both layers; low-rank 2r(d+f), narrow 2d f',
    # each the nearest to RBE's
    d, f = 64, 128
    one = {r["arm"]: r for r in rows if r["tokens"] == "1" and r["mode"] == "forward"}
    m = rbe_ffn.RBEFeedForward(d, f, "gelu", block_size=64, k=300)
    p_rbe = sum(t.numel() for t in (m.fc1.basis, m.fc1.coeffs, m.fc2.basis, m.fc2.coeffs))
    assert int(one["rbe"]["weight_params"]) == int(one["rbe_ckpt"]["weight_params"]) == p_rbe
    assert int(one["rbe"]["weight_bytes"]) == m.weight_nbytes
    assert int(one["dense"]["weight_params"]) == 2 * d * f and int(one["dense"]["weight_bytes"]) == 8 * d * f
    assert int(one["int8_dyn"]["weight_bytes"]) == 2 * d * f + 2 * 8  # int8 values + scale, zero point
    lr, nw = int(one["lowrank"]["weight_params"]), int(one["narrow"]["weight_params"])
    r = round(p_rbe / (2 * (d + f)))
    assert lr == 2 * r * (d + f) and f"r={r}" in one["lowrank"]["note"]
    assert abs(lr - p_rbe) <= (d + f)  # the nearest rank
    fn = round(p_rbe / (2 * d))
    assert nw == 2 * d * fn and f"d_ff'={fn}" in one["narrow"]["note"]
    assert abs(nw - p_rbe) <= d

    # peak memory of one call: at least the output (forward), and the parameters' gradients
    # (step: every arm frees them before the call); a forward-only arm has none for the step
    for r in rows:
        if r["status"] != "ok":
            assert r["peak_bytes"] == "", r
            continue
        peak, tokens = int(r["peak_bytes"]), int(r["tokens"])
        assert peak >= tokens * d * (2 if r["arm"] in ("dense_bf16", "rbe_bf16") else 4), r  # the output
        if r["mode"] == "step":
            assert peak >= 4 * int(r["weight_params"]), r

    # the markdown: the arms table, the time table with ratios, the memory table, the spread table
    for s in ("### Arms", "| 64/128 | 16 | step |", "fastest non-RBE", "### Peak memory of one call",
              "### Spread over rounds"):
        assert s in md


def test_bench_peers_no_memory(tmp_path):
    rows, md, _ = run_smoke(tmp_path, "--no-memory")
    assert all(r["peak_bytes"] == "" for r in rows)
    assert "### Peak memory" not in md


def test_bench_peers_warm(tmp_path):
    # --warm N: every arm still timed once per round (the mean of its N calls in a row), and the
    # table says which order it measured
    rows, md, _ = run_smoke(tmp_path, "--warm", "2")
    assert "mean of 2 calls in a row" in md
    for tokens in ("1", "16"):
        got = {r["arm"] for r in rows if r["tokens"] == tokens and r["mode"] == "forward" and r["status"] == "ok"}
        assert got == ARMS, (tokens, got)
        assert all(float(r["ms"]) > 0 for r in rows if r["tokens"] == tokens and r["status"] == "ok")


def test_round_order_never_times_an_arm_after_its_own_weights():
    import random
    bp = load_script("bench/bench_peers.py")

    class A:  # an arm: a name and the module holding its weights
        def __init__(self, name, model):
            self.name, self.model = name, model

    dense, rbe, others = object(), object(), [object() for _ in range(3)]
    live = [A("dense", dense), A("dense_bf16", dense), A("rbe", rbe), A("rbe_bf16", rbe)]
    live += [A(f"o{i}", m) for i, m in enumerate(others)]
    rng, last, seq, firsts = random.Random(1), None, [], set()
    for _ in range(300):
        order = bp.round_order(live, last, rng)
        assert sorted(a.name for a in order) == sorted(a.name for a in live)  # each arm once a round
        firsts.add(order[0].name)
        seq += order
        last = order[-1]
    assert all(a.model is not b.model for a, b in zip(seq, seq[1:]))
    assert firsts == {a.name for a in live}  # and the order does change


def test_slow_arms_rule():
    """The rule that caps an arm's rounds: more than SLOW_FACTOR x dense float32's warm-up time."""
    bp = load_script("bench/bench_peers.py")
    f = bp.SLOW_FACTOR
    assert bp.slow_arms({"dense": 1.0, "dense_bf16": f * 1.01, "rbe": 0.3}) == {"dense_bf16"}
    assert bp.slow_arms({"dense": 1.0, "dense_bf16": f * 0.99, "rbe": 0.3}) == set()
    assert bp.slow_arms({"rbe": 100.0}) == set()  # no dense arm: no reference, nothing capped


def test_measure_caps_only_the_slow_arm(monkeypatch):
    """measure() itself: an arm 32x dense's time in the warm-up round gets SLOW_ROUNDS timed rounds,
    the others every round; without warm-up rounds nothing is capped. A fake clock stands in for
    time.perf_counter, advanced by each arm's call (dyadic costs: the differences are exact)."""
    bp = load_script("bench/bench_peers.py")
    clock = [0.0]
    monkeypatch.setattr(bp.time, "perf_counter", lambda: clock[0])

    class A:
        status, train = "ok", True

        def __init__(self, name, cost):
            self.name, self.cost, self.model = name, cost, object()

        def run(self, x, mode):
            clock[0] += self.cost

    arms = [A("dense", 1.0), A("dense_bf16", 32.0), A("rbe", 0.25), A("near", 16.0)]
    times = bp.measure(arms, None, "step", reps=10, warmup=2)
    assert {n: len(v) for n, v in times.items()} == {"dense": 10, "dense_bf16": bp.SLOW_ROUNDS, "rbe": 10, "near": 10}
    assert times["dense_bf16"] == [32.0] * bp.SLOW_ROUNDS  # still timed as itself
    times = bp.measure(arms, None, "step", reps=5, warmup=0)
    assert all(len(v) == 5 for v in times.values())
