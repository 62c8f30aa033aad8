"""The few-token forward of the CPU operators (csrc/rbe.h, "few tokens"): calls of at most
FEW_TOKENS = 16 tokens run kernels vectorized along features instead of 64- or 16-token tiles
(one 8-lane vector per coefficient for 2..8 tokens, 16 lanes for 9..16). Against the dense decode (tests/ffn_reference.py) at
1..17 tokens (17: the tile path again), in float32 and float64, every activation, bias on and off,
forward with and without grad; a token's result does not depend on the other tokens of the call
(whatever their number, so whatever the vector width), on the chunking or on the thread count.
"""
import pytest
import torch
import torch.nn.functional as F

import ffn_reference as R
import rbe_ffn
from conftest import ACTS, limit_for_chunk, make_ffn, make_linear

FEW = 16  # the most tokens of a call that takes the few-token forward (rbe_ops.cpp FEW_TOKENS)
NARROW = 8  # the most tokens of the 8-lane few-token kernels (rbe_x86_impl.h few_lanes)
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def test_constants():
    assert rbe_ffn._C.FEW_TOKENS == FEW


def dense(lin, x):
    return F.linear(x, R.decode(lin.basis, lin.coeffs, lin.index, lin.out_features, lin.in_features,
                                lin.block_size), lin.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_ffn_against_dense_decode(dtype, bias):
    """Tokens 1..17 through 100 -> 300 -> 100 at b = 64 (edge blocks, both layers several
    block rows and columns), every activation."""
    g = torch.Generator().manual_seed(31)
    for act in ACTS:
        m = make_ffn(100, 300, act, block_size=64, k=300, dtype=dtype, seed=32, bias=bias, random_bias=bias)
        for tokens in range(1, FEW + 2):
            x = torch.randn(tokens, 100, generator=g, dtype=dtype)
            with torch.no_grad():
                err = R.rel_err(m(x), R.module_ffn(m, x))
            assert err < TOL[dtype], (act, tokens, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_against_dense_decode(dtype, bias):
    """RBELinear at tokens 1..17, b = 16 with a partial edge block, leading batch dimensions."""
    g = torch.Generator().manual_seed(33)
    lin = make_linear(70, 45, block_size=16, k=40, seed=34, bias=bias, dtype=dtype)
    if bias:
        with torch.no_grad():
            lin.bias.normal_(0, 0.3, generator=g)
    for tokens in range(1, FEW + 2):
        x = torch.randn(1, tokens, 70, generator=g, dtype=dtype)
        with torch.no_grad():
            err = R.rel_err(lin(x), dense(lin, x))
        assert err < TOL[dtype], (tokens, err)


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_forward_with_grad(checkpoint, activation):
    """With grad the standard block saves the few-token pre-activation for backward (the
    checkpointed one recomputes it with the tile kernels): output and every gradient match the
    reference."""
    m = make_ffn(100, 300, activation, block_size=64, k=300, seed=35, checkpoint=checkpoint, random_bias=True)
    g = torch.Generator().manual_seed(36)
    for tokens in (1, 3, NARROW, NARROW + 1, FEW):
        x = torch.randn(tokens, 100, generator=g)
        dy = torch.randn(tokens, 100, generator=g)
        params = [m.get_parameter(n) for n in R.PARAM_NAMES]
        y, grads = R.grads_of(m, x, params, dy)
        yr, gr = R.grads_of(lambda x: R.module_ffn(m, x), x, params, dy)
        assert R.rel_err(y, yr) < 2e-5, tokens
        for name, a, b in zip(("x",) + R.PARAM_NAMES, grads, gr):
            assert R.rel_err(a, b) < 2e-5, (tokens, name, R.rel_err(a, b))


def test_token_independent_of_the_others():
    """A token's few-token result is the same bits alone (scalar), among 3 (8 lanes), among 10 or
    16 (16 lanes) and chunk by chunk (memory_limit_mb: chunks of 3 tokens); within rounding of the
    tile path (17 tokens). The same for RBELinear."""
    m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=37, random_bias=True)
    lin = make_linear(70, 45, block_size=16, k=40, seed=43, bias=True)
    x = torch.randn(FEW + 1, 100, generator=torch.Generator().manual_seed(38))
    xl = torch.randn(FEW + 1, 70, generator=torch.Generator().manual_seed(44))
    with torch.no_grad():
        y16 = {}
        for mod, inp in ((m, x), (lin, xl)):
            y16[mod] = mod(inp[:FEW])
            for t in range(FEW):
                assert torch.equal(mod(inp[t:t + 1]), y16[mod][t:t + 1]), t
            assert torch.equal(mod(inp[2:5]), y16[mod][2:5])
            assert torch.equal(mod(inp[5:15]), y16[mod][5:15])
            y17 = mod(inp)  # the tile kernels
            assert R.rel_err(y16[mod], y17[:FEW]) < 1e-5
        m.memory_limit_mb = limit_for_chunk(m, 3)
        assert m.chunk_tokens() == 3
        assert torch.equal(m(x[:FEW]), y16[m])


def test_thread_count_independent():
    """float32 few-token results (forward, and the backward from the saved pre-activation) are
    the same bits at 1, 2 and 5 threads (5 on this 2-core machine: threads lose their core
    mid-region and others take their items, csrc/rbe_ops.cpp balanced_for)."""
    m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=39, random_bias=True)
    lin = make_linear(70, 45, block_size=16, k=40, seed=40)
    x = torch.randn(12, 100, generator=torch.Generator().manual_seed(41))  # 16 lanes
    xl = torch.randn(12, 70, generator=torch.Generator().manual_seed(42))
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 5, 5):
            torch.set_num_threads(n)
            y, grads = R.grads_of(m, x, [m.get_parameter(n) for n in R.PARAM_NAMES], dy)
            with torch.no_grad():
                runs.append((y, grads[0], lin(xl)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
