"""The float32 activations (vectorized where the CPU allows) against their definition.

The definition is the formula evaluated in double and rounded once to float32, which is
what the float64 operator computes; the float32 path must agree with it bitwise over a
dense grid, in the tails and on non-finite inputs, and agree with torch to float rounding.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import rbe_ffn  # noqa: F401  (loads the operators)
from conftest import load_script

ops = torch.ops.rbe_ffn
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 3e38, -3e38, float("inf"), -float("inf"), float("nan")]
TORCH = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def grid():
    return torch.cat([torch.linspace(-30, 30, 200_001), torch.tensor(SPECIAL)])


def same_bits(a, b):
    both_nan = torch.isnan(a) & torch.isnan(b)
    return torch.equal(a.view(torch.int32)[~both_nan], b.view(torch.int32)[~both_nan]) and torch.equal(
        torch.isnan(a), torch.isnan(b))


@pytest.mark.parametrize("act", list(TORCH))
def test_float32_equals_rounded_definition(act):
    x = grid()
    assert same_bits(ops.activation(x, act), ops.activation(x.double(), act).float())
    ones = torch.ones_like(x)
    assert same_bits(ops.activation_backward(ones, x, act),
                     ops.activation_backward(ones.double(), x.double(), act).float())


def test_gelu_table_is_the_generators_output():
    """csrc/rbe_gelu_table.h, the polynomials of the AVX-512 gelu (csrc/rbe_act.c), is what
    csrc/gen_gelu_table.py writes (and the generator is deterministic)."""
    gen = load_script("csrc/gen_gelu_table.py")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "rbe_gelu_table.h")
    with open(path) as f:
        assert f.read() == gen.header()


@pytest.mark.parametrize("act", list(TORCH))
def test_matches_torch(act):
    x = torch.linspace(-30, 30, 20_001, dtype=torch.float64, requires_grad=True)
    y = ops.activation(x.detach(), act)
    ref = TORCH[act](x)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(ops.activation_backward(torch.ones_like(y), x.detach(), act), g, rtol=1e-12,
                               atol=1e-14)
    xf = x.detach().float()
    torch.testing.assert_close(ops.activation(xf, act), TORCH[act](xf), rtol=2e-6, atol=1e-6)
