"""Shared test helpers: the model and input factories, the `device` fixture, and small
assertion helpers used by more than one test file. One definition each.

Test modules import the plain functions from here (``from conftest import make_ffn``: tests/
is on sys.path, as for ffn_reference.py) and receive the fixtures (`device`, `saved`,
`one_thread`) by name. Test modules never import each other. The pure-PyTorch reference stays
in ffn_reference.py; the 2-process gloo harness of test_ddp.py / test_fsdp.py is in
distributed_helpers.py (the spawned workers import it, not this file).
"""
from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from torch.library import opcheck

import rbe_ffn
from rbe_ffn.functional import intermediate_bytes_per_token

import ffn_reference as R

ACTS = ["gelu", "gelu_tanh", "relu", "silu"]
"""Every activation the operators implement."""

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
"""Relative tolerance against the independent vectors / the CPU result, per dtype."""

# ----------------------------------------------------------------- devices
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""Devices a device-parametrized test runs on: "cpu" always, "cuda" only where a CUDA device is
present. Where none is, the "cuda" parameter is not generated at all (rather than skipped), so
the CPU-only run does not report a skip per test; tests/test_cuda.py's own skip reason says
that CUDA was not tested."""


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device of a device-parametrized test (see DEVICES)."""
    return request.param


# ----------------------------------------------------------------- factories
def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (all random draws in the tests are reproducible)."""
    return torch.Generator().manual_seed(seed)


def randomize_basis(m, generator=0):
    """Give every RBELinear in m a non-zero pattern part (fresh init leaves basis at 0 when k > 0):
    basis ~ N(0, 1 / (3 in_features)), drawn in float64 from `generator` (a torch.Generator, or a
    seed). Returns m."""
    g = generator if isinstance(generator, torch.Generator) else seeded(generator)
    with torch.no_grad():
        for lin in [mod for mod in m.modules() if isinstance(mod, rbe_ffn.RBELinear)]:
            lin.basis.copy_(torch.randn(lin.basis.shape, generator=g, dtype=torch.float64)
                            / math.sqrt(3 * lin.in_features))
    return m


def make_ffn(d_model=10, d_ff=37, activation="gelu", block_size=8, k=5, dtype=torch.float32, seed=0, *,
             basis_std=None, random_bias=False, **kw):
    """A fresh RBEFeedForward on the CPU, built from generator `seed`, with a non-zero pattern part;
    parametrization "plain" unless given (tests of the "scaled" one: tests/test_parametrization.py).

    basis_std=None: both layers' basis as randomize_basis (scaled by fan-in), from the same generator.
    basis_std=(s1, s2): fc1.basis ~ N(0, s1^2), fc2.basis ~ N(0, s2^2), drawn in place (make_small_ffn).
    random_bias: also non-zero biases, N(0, 0.1^2) from a second generator seeded seed + 1000
    (fresh init may leave them small; the CUDA-vs-CPU comparisons want them to matter).
    Other keyword arguments (checkpoint, memory_limit_mb, bias, ...) go to RBEFeedForward.
    """
    g = seeded(seed)
    kw.setdefault("parametrization", "plain")  # the parameters are the format's numbers (they are set below)
    m = rbe_ffn.RBEFeedForward(d_model, d_ff, activation, block_size=block_size, k=k, dtype=dtype, generator=g,
                               **kw)
    if basis_std is None:
        randomize_basis(m, g)
    else:
        with torch.no_grad():
            m.fc1.basis.normal_(0, basis_std[0], generator=g)
            m.fc2.basis.normal_(0, basis_std[1], generator=g)
    if random_bias:
        gb = seeded(seed + 1000)
        with torch.no_grad():
            for lin in (m.fc1, m.fc2):
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=gb, dtype=torch.float64) * 0.1)
    return m


def make_small_ffn(activation="gelu", dtype=torch.float32, *, seed=0, d_model=10, d_ff=37, block_size=8, k=5, **kw):
    """The small 10 -> 37 -> 10 block (b = 8, k = 5) of the bad-input, checkpoint and reliability
    tests: fc1.basis ~ N(0, 0.2^2), fc2.basis ~ N(0, 0.1^2)."""
    return make_ffn(d_model, d_ff, activation, block_size, k, dtype, seed, basis_std=(0.2, 0.1), **kw)


def make_linear(in_features=10, out_features=12, block_size=8, k=5, seed=0, basis_std=0.2, **kw):
    """A fresh RBELinear from generator `seed` with basis ~ N(0, basis_std^2)."""
    g = seeded(seed)
    kw.setdefault("parametrization", "plain")  # the parameters are the format's numbers (basis is set below)
    lin = rbe_ffn.RBELinear(in_features, out_features, block_size=block_size, k=k, generator=g, **kw)
    with torch.no_grad():
        lin.basis.normal_(0, basis_std, generator=g)
    return lin


def limit_for_chunk(m, chunk: int) -> float:
    """memory_limit_mb that makes the module process `chunk` tokens at a time."""
    nf = m.fc1.plan.shape[1] - m.block_size
    per = intermediate_bytes_per_token(m.d_model, m.d_ff, m.block_size, nf, m.fc1.coeffs.element_size())
    return (chunk + 0.5) * per / 2**20


def params_of(m):
    """m's parameters in R.PARAM_NAMES order, leaving out absent biases."""
    return [p for n in R.PARAM_NAMES if (p := m.get_parameter(n)) is not None]


def ffn_args(m, x, chunk=0, keep_pre=True, bias=True):
    """The arguments of torch.ops.rbe_ffn.ffn for module m and input x."""
    f1, f2 = m.fc1, m.fc2
    return (x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias if bias else None, f2.basis, f2.coeffs, f2.index,
            f2.bias if bias else None, m.d_model, m.d_ff, m.activation, chunk, keep_pre)


# ----------------------------------------------------------------- scripts and subprocesses
def load_script(relpath: str):
    """A script of the repository (bench/..., examples/...) imported as a module, by its path."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), relpath)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def same_package_env() -> dict:
    """os.environ with PYTHONPATH led by the directory of the rbe_ffn these tests import, so that a
    script run in a subprocess imports the same package (a worktree's python/, not an editable
    install's)."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(rbe_ffn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# ----------------------------------------------------------------- assertions
def assert_opcheck(op, args):
    """torch.library.opcheck passes every one of its checks."""
    result = opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def check_close(got, want, tol, what):
    """Norm-wise relative error of got vs want (compared on the CPU) below tol."""
    err = R.rel_err(got.cpu(), want.cpu())
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


# ----------------------------------------------------------------- safetensors files
def split_safetensors(data: bytes):
    """(header dict, body bytes) of a safetensors file's contents."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    """A safetensors file's contents from a header dict and a body (inverse of split_safetensors)."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


@pytest.fixture
def saved(tmp_path):
    """(make_small_ffn(), path): the module saved with rbe_ffn.save_safetensors under tmp_path."""
    m = make_small_ffn()
    path = tmp_path / "ffn.safetensors"
    rbe_ffn.save_safetensors(m, path)
    return m, path


@pytest.fixture
def one_thread():
    """Run the test with torch's intra-op thread count at 1 (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Block(torch.nn.Module):
    """A residual block around a plain Sequential MLP (what replace_mlp converts)."""

    def __init__(self, mlp):
        super().__init__()
        self.norm = torch.nn.LayerNorm(mlp[0].in_features)
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))
