"""The DCT-domain paths (csrc/rbe_dct_path.cpp, docs/DESIGN.md section 5.1): the GPU paths in
preparation, written with ATen operations only, so the very code CUDA would run is run here on
CPU tensors, against the pure-PyTorch reference (ffn_reference.py) and the default path. The
`dct` fixture runs each test twice: every forward densified (few_tokens=0), and every forward of
these small token counts through the few-token sparse product (few_tokens=64; on CPU its
coefficient product is the ATen model the CUDA kernel is compared with). tests/test_cuda.py runs
the same comparisons on a GPU."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rbe_ffn
from rbe_ffn._ops import ops
from conftest import ACTS, TOL, assert_opcheck, ffn_args, make_ffn, make_linear, params_of, same_package_env

import ffn_reference as R

# d_model, d_ff, block size, k: edge blocks on both sides; one block column (d_model < b); every
# coefficient kept; none kept (pattern only)
SHAPES = [(96, 200, 16, 40), (10, 37, 8, 5), (64, 96, 32, 1024), (40, 72, 8, 0)]
SHAPE_IDS = ["96x200_b16", "10x37_b8", "64x96_b32_kfull", "40x72_b8_k0"]


@pytest.fixture(params=[0, 64], ids=["dense", "few"])
def dct(request):
    with rbe_ffn.dct_path(few_tokens=request.param):
        yield request.param


def grads(fn, x, params, dy):
    return R.grads_of(fn, x, params, dy)


def backward_args(m, x, chunk):
    """ffn_backward's arguments after (grad, x, pre) and before the mask, for module m"""
    f1, f2 = m.fc1, m.fc2
    return (f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, m.d_model, m.d_ff,
            m.activation, chunk)


def assert_all_close(got, want, tol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what}: output {i}"
        if a is not None:
            err = R.rel_err(a, b)
            assert err < tol, f"{what}: output {i} relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("parametrization", ["plain", "scaled"])
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ffn_matches_reference(shape, activation, checkpoint, parametrization, dct):
    d, f, b, k = shape
    m = make_ffn(d, f, activation, block_size=b, k=k, dtype=torch.float64, seed=3, random_bias=True,
                 checkpoint=checkpoint, parametrization=parametrization)
    x = torch.randn(2, 9, d, dtype=torch.float64)
    dy = torch.randn_like(x)
    params = params_of(m)
    got = grads(m, x, params, dy)
    want = grads(lambda t: R.module_ffn(m, t), x, params, dy)
    assert_all_close([got[0], *got[1]], [want[0], *want[1]], TOL[torch.float64], "ffn")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("parametrization", ["plain", "scaled"])
@pytest.mark.parametrize("shape", [(13, 21, 8, 5), (37, 10, 8, 64), (7, 5, 130, 10), (70, 150, 16, 0)],
                         ids=["13x21_b8", "37x10_b8_kfull", "7x5_b130_int32", "70x150_b16_k0"])
def test_linear_matches_reference(shape, bias, parametrization, dct):
    out, inp, b, k = shape
    lin = make_linear(inp, out, block_size=b, k=k, seed=4, bias=bias, parametrization=parametrization).double()
    x = torch.randn(3, inp, dtype=torch.float64)
    dy = torch.randn(3, out, dtype=torch.float64)
    params = [p for p in (lin.basis, lin.coeffs, lin.bias) if p is not None]

    def ref(t):
        basis, coeffs = lin.numbers()
        return torch.nn.functional.linear(t, R.decode(basis, coeffs, lin.index, out, inp, b), lin.bias)

    got, want = grads(lin, x, params, dy), grads(ref, x, params, dy)
    assert_all_close([got[0], *got[1]], [want[0], *want[1]], TOL[torch.float64], "linear")


@pytest.mark.parametrize("checkpoint", [False, True])
def test_float32_close_to_float64_reference(checkpoint, dct):
    m = make_ffn(96, 200, "gelu", block_size=16, k=40, seed=5, random_bias=True, checkpoint=checkpoint)
    x = torch.randn(4, 33, 96)
    dy = torch.randn_like(x)
    got = grads(m, x, params_of(m), dy)
    m64 = m.double()
    want = grads(lambda t: R.module_ffn(m64, t), x.double(), params_of(m64), dy.double())
    assert_all_close([got[0], *got[1]], [want[0], *want[1]], TOL[torch.float32], "float32")


@pytest.mark.parametrize("keep_pre", [True, False])
def test_chunks_change_nothing_but_rounding(keep_pre, dct):
    m = make_ffn(96, 200, "silu", block_size=16, k=40, dtype=torch.float64, seed=6, random_bias=True)
    x = torch.randn(50, 96, dtype=torch.float64)
    dy = torch.randn_like(x)
    results = []
    for chunk in (0, 7, 16):
        y, pre, hidden = ops.ffn(*ffn_args(m, x, chunk, keep_pre))
        g = ops.ffn_backward(dy, x, pre, hidden, *backward_args(m, x, chunk), [True] * 7)
        assert hidden.numel() == 0  # the DCT-domain forward keeps h, never fc2's analysed input
        results.append([y, pre, *g] if keep_pre else [y, *g])
    for other in results[1:]:
        assert_all_close(other, results[0], 1e-13, "chunked")


@pytest.mark.parametrize("wanted", [[True, False, False, False, False, False, False],
                                    [False, True, True, False, False, False, False],
                                    [False, False, False, False, True, True, True],
                                    [False, True, False, True, False, False, True]])
@pytest.mark.parametrize("keep_pre", [True, False])
def test_ffn_backward_output_mask(wanted, keep_pre):
    """Each gradient asked for alone equals the default path's; the others come back empty."""
    m = make_ffn(40, 72, "gelu", block_size=8, k=9, dtype=torch.float64, seed=7, random_bias=True)
    x = torch.randn(11, 40, dtype=torch.float64)
    dy = torch.randn_like(x)
    args = ffn_args(m, x, 0, keep_pre)
    with rbe_ffn.dct_path():  # the DCT-domain forward keeps h, never fc2's analysed input
        y, pre, hidden = ops.ffn(*args)
    assert hidden.numel() == 0
    want = ops.ffn_backward(dy, x, pre, hidden, *backward_args(m, x, 0), wanted)
    with rbe_ffn.dct_path():
        got = ops.ffn_backward(dy, x, pre, hidden, *backward_args(m, x, 0), wanted)
    for on, a, b in zip(wanted, got, want):
        assert a.numel() == (b.numel() if on else 0)
        if on:
            assert R.rel_err(a, b) < TOL[torch.float64]


def test_zero_tokens(dct):
    m = make_ffn(40, 72, "gelu", block_size=8, k=9, dtype=torch.float64, seed=8)
    x = torch.zeros(0, 40, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 40)
    y.sum().backward()
    for p in params_of(m):
        assert p.grad is not None and not p.grad.any()


def test_gradcheck(dct):
    m = make_ffn(10, 37, "gelu", block_size=8, k=5, dtype=torch.float64, seed=1)
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    names = list(R.PARAM_NAMES)

    def f(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x,))

    params = [m.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_opcheck(dct):
    m = make_ffn(40, 72, "gelu", block_size=8, k=9, seed=9)
    x = torch.randn(5, 40, requires_grad=True)
    assert_opcheck(ops.ffn.default, ffn_args(m, x, 0, False))


def test_switch_is_scoped_and_nested():
    assert rbe_ffn._C.set_dct_path(False) is False  # off by default
    assert rbe_ffn._C.set_dct_few_tokens(0) == 0
    with rbe_ffn.dct_path(few_tokens=16):
        assert rbe_ffn._C.set_dct_path(True) is True
        assert rbe_ffn._C.set_dct_few_tokens(16) == 16
        with rbe_ffn.dct_path(False):
            assert rbe_ffn._C.set_dct_path(False) is False
            assert rbe_ffn._C.set_dct_few_tokens(0) == 0
        assert rbe_ffn._C.set_dct_path(True) is True
        assert rbe_ffn._C.set_dct_few_tokens(16) == 16
    assert rbe_ffn._C.set_dct_path(False) is False
    assert rbe_ffn._C.set_dct_few_tokens(0) == 0
    for bad in (-1, 2.0, True, None):
        with pytest.raises(ValueError, match="few_tokens must be an int >= 0"):
            with rbe_ffn.dct_path(few_tokens=bad):
                pass


def test_few_tokens_threshold_splits_by_call():
    """A call of n tokens takes the sparse product when n <= few_tokens: its output then differs
    from the densified one in the last bits, and equals it to rounding."""
    m = make_ffn(96, 200, "gelu", block_size=16, k=40, seed=11, random_bias=True)
    x = torch.randn(8, 96)
    with torch.no_grad(), rbe_ffn.dct_path():
        dense = m(x)
    for few, sparse in ((7, False), (8, True)):
        with torch.no_grad(), rbe_ffn.dct_path(few_tokens=few):
            y = m(x)
        assert R.rel_err(y, dense) < TOL[torch.float32]
        assert torch.equal(y, dense) is not sparse, few


def test_environment_variables_turn_it_on():
    code = "import rbe_ffn; print(rbe_ffn._C.set_dct_path(False), rbe_ffn._C.set_dct_few_tokens(0))"
    for value, want in (("1", "True 12"), ("0", "False 0")):
        env = dict(same_package_env(), RBE_FFN_DCT_PATH=value, RBE_FFN_DCT_FEW_TOKENS="12")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


def test_bad_input_refused_as_on_the_default_path(dct):
    """The CPU operators check the input before either path: an infinite input is refused, and a
    corrupted index too (tests/test_bad_input.py passes whole under RBE_FFN_DCT_PATH=1)."""
    m = make_ffn(40, 72, "gelu", block_size=8, k=9, seed=10)
    x = torch.randn(3, 40)
    x[1, 7] = float("inf")
    with pytest.raises(ValueError, match="input has infinite values"):
        m(x)
    with torch.no_grad():
        m.fc2.index[3, 2] = 64
    with pytest.raises(IndexError, match="fc2: index is corrupted at block 3, slot 2"):
        m(torch.randn(3, 40))
