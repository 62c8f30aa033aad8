"""setup.py's CUDA decision, run in a subprocess with a stand-in nvcc: a torch/nvcc CUDA major
version mismatch stops the build with a message naming both versions; a match selects the CUDA
extension; RBE_FFN_NO_CUDA=1 and a CPU-only torch select the CPU build."""
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent("""
    import sys, runpy, setuptools, torch
    from torch.utils import cpp_extension
    torch.version.cuda = sys.argv[1] or None        # what this torch pretends to be built with
    cpp_extension.CUDA_HOME = sys.argv[2] or None   # where nvcc is looked for
    seen = {}
    setuptools.setup = lambda **kw: seen.update(kw) # stop before anything is built
    sys.argv = ["setup.py", "--name"]
    runpy.run_path("setup.py", run_name="__main__")
    print("EXT", "cuda" if any(s.endswith(".cu") for s in seen["ext_modules"][0].sources) else "cpu")
    import os
    print("ARCHS", os.environ.get("TORCH_CUDA_ARCH_LIST"))
""")


def fake_cuda_home(tmp_path, release):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(0o755)
    return str(home)


def run(torch_cuda, cuda_home, env=None, **extra):
    return subprocess.run([sys.executable, "-c", PROBE, torch_cuda, cuda_home], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**(os.environ if env is None else env), **extra})


def test_version_mismatch_stops_with_a_clear_message(tmp_path):
    r = run("13.0", fake_cuda_home(tmp_path, "12.4"))
    assert r.returncode != 0
    assert "is CUDA 12.4" in r.stderr and "built with CUDA 13.0" in r.stderr and "RBE_FFN_NO_CUDA=1" in r.stderr, r.stderr


def test_matching_nvcc_builds_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    r = run("13.0", fake_cuda_home(tmp_path, "13.0"), env=env)
    assert r.returncode == 0, r.stderr
    assert "EXT cuda" in r.stdout
    # no GPU visible here: a default architecture list instead of torch's failing guess
    assert "ARCHS 8.0;8.6;8.9;9.0+PTX" in r.stdout and "TORCH_CUDA_ARCH_LIST unset" in r.stderr
    r = run("13.0", fake_cuda_home(tmp_path / "b", "13.0"), env={**env, "TORCH_CUDA_ARCH_LIST": "9.0"})
    assert "ARCHS 9.0" in r.stdout  # the user's choice is kept


def test_cpu_builds(tmp_path):
    home = fake_cuda_home(tmp_path, "13.0")
    assert "EXT cpu" in run("", home).stdout                        # a CPU-only torch
    assert "EXT cpu" in run("13.0", home, RBE_FFN_NO_CUDA="1").stdout  # asked for
    r = run("13.0", "")                                              # torch has CUDA, no nvcc found
    assert "EXT cpu" in r.stdout and "no nvcc was found" in r.stderr
