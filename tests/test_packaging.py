"""The wheel route, end to end: `pip wheel --no-build-isolation --no-deps .` gives a wheel that
installs (`pip install --no-deps`) into a fresh venv and runs there, imported from outside the
source tree. The venv reuses this interpreter's packages (torch, numpy, ...) through a .pth file
instead of installing them again; its own site-packages comes first, so the rbe_ffn found is
the wheel's. The build reuses the source tree's build/ folder (objects already compiled there
are not compiled again)."""
import os
import pathlib
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

RUN = textwrap.dedent("""
    import sys, torch, rbe_ffn
    import importlib.metadata as md
    assert rbe_ffn.__file__.startswith(sys.argv[1]), rbe_ffn.__file__
    assert md.version("rbe_ffn") == rbe_ffn.__version__, (md.version("rbe_ffn"), rbe_ffn.__version__)
    torch.manual_seed(0)
    ffn = rbe_ffn.RBEFeedForward(16, 40, block_size=8, k=5)
    x = torch.randn(3, 16, requires_grad=True)
    y = ffn(x)
    y.sum().backward()
    assert y.shape == (3, 16) and torch.isfinite(y).all() and x.grad is not None
    print("OK", rbe_ffn.__version__, rbe_ffn.__file__)
""")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def test_wheel_builds_installs_and_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index", "-w", str(dist),
         str(ROOT)], env=env)
    wheels = list(dist.glob("rbe_ffn-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("rbe_ffn/_C.") and n.endswith(".so") for n in names), names
    assert "rbe_ffn/modules.py" in names and not any(n.startswith(("tests/", "csrc/")) for n in names), names
    meta = zipfile.ZipFile(wheels[0]).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for line in ("Name: rbe_ffn", "Requires-Dist: torch>=2.4", "Requires-Dist: safetensors", "Provides-Extra: hf"):
        assert line in meta, meta

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    py = venv / "bin" / "python"
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip()
    outer = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    (pathlib.Path(purelib) / "outer_site_packages.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
        env=env)
    out = run([str(py), "-c", RUN, str(venv)], cwd=tmp_path, env=env).stdout
    assert out.startswith("OK "), out
