"""The instruction set of the float32 CPU kernels (csrc/rbe.h: AVX-512, AVX2 + FMA, portable C).

rbe_ffn.cpu_isa() names the kernels in use: the best the CPU has, capped by the environment
variable RBE_FFN_ISA, which the kernels read once per process. Each capped path runs in a child
process: it must be deterministic (bitwise the same over two runs) and agree with the default
path within float rounding. The C tests (tests/c) compare every variant with the naive
references; this checks the choice end to end, through the operators (schedules included).
"""
import os
import subprocess
import sys

import torch

import rbe_ffn

NAMES = ("portable", "avx2", "avx512")

CHILD = r"""
import sys, torch, rbe_ffn
torch.manual_seed(0)
torch.set_num_threads(1)
ffn = rbe_ffn.RBEFeedForward(96, 320, block_size=32, k=60)
out = {"isa": rbe_ffn.cpu_isa()}
with torch.no_grad():
    for T in (1, 16, 100):  # a 16-lane tile, one full tile block by block, two tiles with schedules
        out[f"y{T}"] = ffn(torch.randn(T, 96))
x = torch.randn(150, 96, requires_grad=True)
y = ffn(x)
(y * torch.randn_like(y)).sum().backward()
out["dx"] = x.grad
out.update({"grad." + n: p.grad for n, p in ffn.named_parameters() if p.grad is not None})
torch.save(out, sys.argv[1])
"""


def run_child(path, isa=None):
    env = {k: v for k, v in os.environ.items() if k != "RBE_FFN_ISA"}
    env["OMP_NUM_THREADS"] = "1"
    if isa is not None:
        env["RBE_FFN_ISA"] = isa
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    return torch.load(path), r.stderr


def test_cpu_isa_is_a_name():
    assert rbe_ffn.cpu_isa() in NAMES
    assert "cpu_isa" in rbe_ffn.__all__


def test_capped_paths_deterministic_and_close(tmp_path):
    default, _ = run_child(tmp_path / "default.pt")
    best = default["isa"]
    assert best in NAMES
    for cap in ("portable", "avx2"):
        a, _ = run_child(tmp_path / f"{cap}_a.pt", cap)
        b, _ = run_child(tmp_path / f"{cap}_b.pt", cap)
        # the cap never raises the choice above what the CPU has
        assert a["isa"] == NAMES[min(NAMES.index(cap), NAMES.index(best))]
        assert a.keys() == default.keys()
        for key, ref in default.items():
            if key == "isa":
                continue
            assert torch.equal(a[key], b[key]), f"RBE_FFN_ISA={cap}: {key} differs between two runs"
            scale = ref.abs().max().item()
            torch.testing.assert_close(a[key], ref, rtol=1e-4, atol=1e-5 * max(scale, 1e-6),
                                       msg=lambda m, key=key, cap=cap: f"RBE_FFN_ISA={cap} vs default, {key}: {m}")


def test_unknown_cap_is_ignored(tmp_path):
    default, _ = run_child(tmp_path / "default.pt")
    got, err = run_child(tmp_path / "bogus.pt", "sse9")
    assert got["isa"] == default["isa"]
    assert "RBE_FFN_ISA=sse9 is not one of avx512, avx2, portable: ignored" in err
