"""The feed-forward and linear operators on CPU: gradcheck, opcheck, agreement with a
pure-PyTorch reference (tests/ffn_reference.py, written from DESIGN.md), the
accuracy bar of the format, and the equivalence of the standard, checkpointed and
chunked variants. Tests that take `device` (conftest.py) run on the CPU and, where
present, on CUDA.
"""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rbe_ffn

import ffn_reference as R
from conftest import ACTS, DEVICES, assert_opcheck, check_close, ffn_args, limit_for_chunk, make_ffn, params_of

ops = torch.ops.rbe_ffn


# ----------------------------------------------------------------- gradcheck
def relu_safe_input(m, shape, margin=1e-3, seed=0):
    """An input whose pre-activations all stay `margin` away from 0 (relu's kink)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        x = torch.randn(*shape, generator=g, dtype=m.fc1.basis.dtype)
        with torch.no_grad():
            h = F.linear(x, m.fc1.dense_weight(), m.fc1.bias)
        if h.abs().min() > margin:
            return x
    raise AssertionError("no input away from relu's kink found")


@pytest.mark.parametrize("variant", ["standard", "checkpoint", "chunked", "chunked_checkpoint"])
@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_ffn(activation, variant):
    m = make_ffn(10, 37, activation, block_size=8, k=5, dtype=torch.float64, seed=1,
                 checkpoint=variant.endswith("checkpoint"))
    x = relu_safe_input(m, (2, 3, 10)).requires_grad_()
    if variant.startswith("chunked"):
        m.memory_limit_mb = limit_for_chunk(m, 4)
        assert 0 < m.chunk_tokens() < 6
    names = list(R.PARAM_NAMES)

    def f(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x,))

    params = [m.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(13, 21, 8, 5), (37, 10, 8, 64), (7, 5, 130, 10)],
                         ids=["13x21_b8", "37x10_b8_kfull", "7x5_b130_int32"])
def test_gradcheck_linear(shape, bias, device):
    out, inp, b, k = shape
    g = torch.Generator().manual_seed(2)
    lin = rbe_ffn.RBELinear(inp, out, bias=bias, block_size=b, k=k, dtype=torch.float64, generator=g)
    assert lin.index.dtype == (torch.int32 if b > 128 else torch.int16)
    basis = torch.randn(lin.basis.shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    lin = lin.to(device)
    coeffs = lin.coeffs.detach().clone().requires_grad_()
    x = torch.randn(2, 3, inp, generator=g, dtype=torch.float64).to(device).requires_grad_()
    inputs = [x, basis, coeffs]
    if bias:
        inputs.append(torch.randn(out, generator=g, dtype=torch.float64).to(device).requires_grad_())

    def f(x, basis, coeffs, bias=None):
        return ops.linear(x, lin.plan, basis, coeffs, lin.index, bias, inp, out)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("variant", ["standard", "checkpoint", "chunked"])
@pytest.mark.parametrize("activation", ["gelu", "silu", "gelu_tanh"])
def test_gradcheck_ffn_functional(activation, variant, device):
    """rbe_feed_forward called directly with an explicit chunk size (2 of 3 tokens), b = 4,
    non-zero biases."""
    m = make_ffn(6, 11, activation, block_size=4, k=5, dtype=torch.float64, seed=3,
                 checkpoint=variant == "checkpoint", random_bias=True).to(device)
    x = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    names = list(R.PARAM_NAMES)
    chunk = 2 if variant == "chunked" else 0

    def f(x, *p):
        return rbe_ffn.rbe_feed_forward(x, (p[0], p[1], m.fc1.index, p[2]), (p[3], p[4], m.fc2.index, p[5]), 6, 11, 4,
                                        activation, variant == "checkpoint", chunk)

    params = [m.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------- opcheck
def test_opcheck_make_plan():
    # no tensor arguments: opcheck still runs all its checks (schema, fake, aot dispatch)
    assert_opcheck(ops.make_plan, (8, 1e-9))
    assert_opcheck(ops.make_plan, (13, 1e-15))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_codec(dtype):
    w = torch.randn(13, 21, dtype=dtype)
    assert_opcheck(ops.encode, (w, 8, 5))
    assert_opcheck(ops.encode, (torch.randn(3, 5, dtype=dtype), 130, 7))  # int32 index
    basis, coeffs, index, _ = ops.encode(w, 8, 5)
    assert_opcheck(ops.decode, (basis, coeffs, index, 13, 21, 8))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear(bias):
    g = torch.Generator().manual_seed(3)
    lin = rbe_ffn.RBELinear(21, 13, bias=bias, block_size=8, k=5, dtype=torch.float64, generator=g)
    x = torch.randn(2, 3, 21, generator=g, dtype=torch.float64, requires_grad=True)
    assert_opcheck(ops.linear, (x, lin.plan, lin.basis, lin.coeffs, lin.index, lin.bias, 21, 13))
    gy = torch.randn(2, 3, 13, dtype=torch.float64)
    d = lambda t: t.detach()  # noqa: E731  (the backward operator has no autograd of its own)
    for mask in ([True] * 4, [True, False, True, False], [False, True, False, True]):
        assert_opcheck(ops.linear_backward, (gy, d(x), lin.plan, d(lin.basis), d(lin.coeffs), lin.index, 21, 13, mask))


# 6 tokens (the few-token path); 130 (three tiles), where the standard forward also returns fc2's
# analysed input, unless the chunks (100) are not whole tiles
@pytest.mark.parametrize("tokens,chunk", [(6, 0), (6, 4), (130, 0), (130, 64), (130, 100)])
@pytest.mark.parametrize("keep_pre", [True, False])
def test_opcheck_ffn(keep_pre, tokens, chunk):
    m = make_ffn(10, 37, "silu", dtype=torch.float64)
    x = torch.randn(2, tokens // 2, 10, dtype=torch.float64, requires_grad=True)
    assert_opcheck(ops.ffn, ffn_args(m, x, chunk, keep_pre))
    assert_opcheck(ops.ffn, ffn_args(m, x, chunk, keep_pre, bias=False))
    hidden = ops.ffn(*ffn_args(m, x.detach(), chunk, keep_pre))[2]
    assert (hidden.numel() > 0) == (keep_pre and tokens == 130 and chunk != 100)


@pytest.mark.parametrize("tokens,chunk", [(5, 0), (5, 4), (130, 0), (130, 64)])
@pytest.mark.parametrize("keep_pre", [True, False])
def test_opcheck_ffn_backward(keep_pre, tokens, chunk):
    m = make_ffn(10, 37, "gelu_tanh", dtype=torch.float64)
    x = torch.randn(tokens, 10, dtype=torch.float64)
    with torch.no_grad():
        y, pre, hidden = ops.ffn(*ffn_args(m, x, chunk, keep_pre))
    gy = torch.randn_like(y)
    f1, f2 = m.fc1, m.fc2
    d = lambda t: t.detach()  # noqa: E731
    for mask in ([True] * 7, [False, True, False, True, False, True, False], [True] + [False] * 6):
        assert_opcheck(ops.ffn_backward, (gy, x, pre, hidden, f1.plan, d(f1.basis), d(f1.coeffs), f1.index,
                                          d(f1.bias), d(f2.basis), d(f2.coeffs), f2.index, 10, 37, "gelu_tanh", chunk,
                                          mask))


SCALES = (4.0, 0.5, 0.125, 2.0)  # coeff_scale1, coeff_scale2, pattern_scale1, pattern_scale2


@pytest.mark.parametrize("keep_pre", [True, False])
def test_opcheck_ffn_scales(keep_pre):
    m = make_ffn(10, 37, "gelu", dtype=torch.float64)
    d = lambda t: t.detach()  # noqa: E731
    for tokens in (3, 20):  # the few-token forward and the tile path
        x = torch.randn(tokens, 10, dtype=torch.float64, requires_grad=True)
        assert_opcheck(ops.ffn, ffn_args(m, x, 0, keep_pre) + SCALES)
        with torch.no_grad():
            y, pre, hidden = ops.ffn(*ffn_args(m, x, 0, keep_pre), *SCALES)
        f1, f2 = m.fc1, m.fc2
        assert_opcheck(ops.ffn_backward, (torch.randn_like(y), d(x), pre, hidden, f1.plan, d(f1.basis), d(f1.coeffs),
                                          f1.index, d(f1.bias), d(f2.basis), d(f2.coeffs), f2.index, 10, 37, "gelu",
                                          0, [True] * 7, *SCALES))


@pytest.mark.parametrize("tokens,chunk", [(1, 0), (5, 0), (8, 3), (70, 0), (200, 64), (300, 128)])
@pytest.mark.parametrize("keep_pre", [True, False], ids=["standard", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scales_are_the_numbers_times_the_scales(tokens, chunk, keep_pre, dtype):
    """ffn(..., basis, coeffs, scales) is ffn(..., basis * pattern_scale, coeffs * coeff_scale):
    bitwise for powers of two, in every path (the scales go into the schedules' values and a copy
    of the pattern numbers where the products run on schedules, onto the transformed input and
    output gradient elsewhere); the gradients of the numbers passed in are their scales times
    those of the scaled numbers, bitwise too."""
    m = make_ffn(24, 50, "gelu", dtype=dtype, random_bias=True, seed=31)
    f1, f2 = m.fc1, m.fc2
    x = torch.randn(tokens, 24, dtype=dtype, generator=torch.Generator().manual_seed(tokens))
    cs1, cs2, ps1, ps2 = SCALES

    def run(b1, c1, b2, c2, *scales):
        args = (x, f1.plan, b1, c1, f1.index, f1.bias.detach(), b2, c2, f2.index, f2.bias.detach(), 24, 50, "gelu",
                chunk, keep_pre)
        y, pre, hidden = ops.ffn(*args, *scales)
        gy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
        grads = ops.ffn_backward(gy, x, pre, hidden, f1.plan, b1, c1, f1.index, f1.bias.detach(), b2, c2, f2.index,
                                 24, 50, "gelu", chunk, [True] * 7, *scales)
        return y, grads

    b1, c1, b2, c2 = (t.detach() for t in (f1.basis, f1.coeffs, f2.basis, f2.coeffs))
    y, g = run(b1, c1, b2, c2, *SCALES)
    y_ref, g_ref = run(b1 * ps1, c1 * cs1, b2 * ps2, c2 * cs2)
    assert torch.equal(y, y_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):  # dx db1 dc1 dbias1 db2 dc2 dbias2
        scale = {1: ps1, 2: cs1, 4: ps2, 5: cs2}.get(i, 1.0)
        assert torch.equal(a, b * scale), i
    # any other finite scales are the same function up to rounding
    check_close(run(b1, c1, b2, c2, 3.0, 1.0, 1.0, 0.3)[0], run(b1, c1 * 3.0, b2 * 0.3, c2)[0],
                1e-6 if dtype == torch.float32 else 1e-14, "scales 3 and 0.3")


@pytest.mark.parametrize("tokens", [1, 5, 70, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_scales_are_the_numbers_times_the_scales(tokens, dtype):
    """The same for the linear operator (RBELinear): forward and every gradient, bitwise."""
    lin = make_ffn(24, 50, "gelu", dtype=dtype, random_bias=True, seed=37).fc1
    x = torch.randn(tokens, 24, dtype=dtype, generator=torch.Generator().manual_seed(tokens))
    gy = torch.randn(tokens, 50, dtype=dtype, generator=torch.Generator().manual_seed(6))
    b, c, bias = lin.basis.detach(), lin.coeffs.detach(), lin.bias.detach()
    cs, ps = 0.25, 8.0

    def run(basis, coeffs, *scales):
        y = ops.linear(x, lin.plan, basis, coeffs, lin.index, bias, 24, 50, *scales)
        return y, ops.linear_backward(gy, x, lin.plan, basis, coeffs, lin.index, 24, 50, [True] * 4, *scales)

    y, g = run(b, c, cs, ps)
    y_ref, g_ref = run(b * ps, c * cs)
    assert torch.equal(y, y_ref)
    for i, (a, r) in enumerate(zip(g, g_ref)):  # dx dbasis dcoeffs dbias
        assert torch.equal(a, r * {1: ps, 2: cs}.get(i, 1.0)), i
    assert_opcheck(ops.linear, (x.requires_grad_(), lin.plan, lin.basis, lin.coeffs, lin.index, lin.bias, 24, 50,
                                cs, ps))
    with pytest.raises(ValueError, match="the scales of the linear layer"):
        ops.linear(x, lin.plan, b, c, lin.index, bias, 24, 50, float("nan"))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_scales_must_be_finite_and_nonzero(bad):
    m = make_ffn(10, 37, "gelu")
    with pytest.raises(ValueError, match=r"the scales of fc2 \(coeff_scale, pattern_scale\) must be finite"):
        ops.ffn(*ffn_args(m, torch.randn(3, 10)), 1.0, bad)
    with pytest.raises(ValueError, match=r"the scales of fc1 \(coeff_scale, pattern_scale\) must be finite"):
        ops.ffn(*ffn_args(m, torch.randn(3, 10)), 1.0, 1.0, bad, 1.0)


@pytest.mark.parametrize("activation", ACTS + ["none"])
def test_opcheck_activation(activation):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert_opcheck(ops.activation, (x, activation))
    assert_opcheck(ops.activation_backward, (torch.randn(3, 7, dtype=torch.float64), x.detach(), activation))
    assert_opcheck(ops.activation, (torch.randn(2, 5, 3).transpose(0, 2), activation))  # non-contiguous


# bfloat16 only where the CUDA kernels are (the CPU operators refuse half precision)
OPCHECK_ALL = [(d, t) for d in DEVICES for t in (torch.float32, torch.float64)] + (
    [("cuda", torch.bfloat16)] if "cuda" in DEVICES else [])


@pytest.mark.parametrize("device,dtype", OPCHECK_ALL, ids=lambda v: str(v).replace("torch.", ""))
def test_opcheck_every_operator(device, dtype):
    """Every operator of a float32 / float64 (/ bfloat16) module on one device, biases included."""
    d = lambda t: t.detach()  # noqa: E731
    if dtype != torch.bfloat16:
        w = torch.randn(13, 21, dtype=dtype, device=device)
        assert_opcheck(ops.encode, (w, 8, 5))
        assert_opcheck(ops.encode, (torch.randn(3, 5, dtype=dtype, device=device), 130, 7))
    m = make_ffn(10, 37, "silu", dtype=torch.float64, random_bias=True).to(device, dtype)
    f1 = m.fc1
    assert_opcheck(ops.decode, (d(f1.basis), d(f1.coeffs), f1.index, 37, 10, 8))
    x = torch.randn(2, 3, 10, dtype=dtype, device=device, requires_grad=True)
    assert_opcheck(ops.linear, (x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, 10, 37))
    gy = torch.randn(2, 3, 37, dtype=dtype, device=device)
    for mask in ([True] * 4, [True, False, True, False]):
        assert_opcheck(ops.linear_backward, (gy, d(x), f1.plan, d(f1.basis), d(f1.coeffs), f1.index, 10, 37, mask))
    for keep_pre in (True, False):
        for chunk in (0, 4):
            assert_opcheck(ops.ffn, ffn_args(m, x, chunk, keep_pre))
            with torch.no_grad():
                y, pre, hidden = ops.ffn(*ffn_args(m, d(x), chunk, keep_pre))
            f2 = m.fc2
            assert_opcheck(ops.ffn_backward, (torch.randn_like(y), d(x), pre, hidden, f1.plan, d(f1.basis),
                                              d(f1.coeffs), f1.index, d(f1.bias), d(f2.basis), d(f2.coeffs),
                                              f2.index, 10, 37, "silu", chunk, [True] * 7))
    h = torch.randn(4, 9, dtype=dtype, device=device, requires_grad=True)
    assert_opcheck(ops.activation, (h, "gelu"))
    assert_opcheck(ops.activation_backward, (torch.randn_like(h), d(h), "gelu_tanh"))


# ----------------------------------------------------------------- agreement with the reference
def compare_with_reference(m, x, tol=1e-5):
    """Module (float32) vs the float64 reference on the same numbers: y and all 7 gradients."""
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    own = dict(m.named_parameters())
    names = [n for n in R.PARAM_NAMES if n in own]  # biases may be absent
    params = [m.get_parameter(n) for n in names]
    y, grads = R.grads_of(m, x, params, dy)
    p64 = dict(zip(names, (p.detach().double().requires_grad_() for p in params)))
    fc1 = (p64["fc1.basis"], p64["fc1.coeffs"], m.fc1.index, p64.get("fc1.bias"))
    fc2 = (p64["fc2.basis"], p64["fc2.coeffs"], m.fc2.index, p64.get("fc2.bias"))
    p64 = list(p64.values())
    yr, gr = R.grads_of(lambda x: R.ffn(x, fc1, fc2, m.d_model, m.d_ff, m.block_size, m.activation),
                        x.double(), p64, dy.double())
    assert R.rel_err(y, yr) < tol
    for i, (a, b) in enumerate(zip(grads, gr)):
        assert R.rel_err(a, b) < tol, f"gradient {i}: {R.rel_err(a, b)}"


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("size", [(768, 3072, 64, 300, (2, 8)), (100, 300, 64, 300, (3, 5)),
                                  (10, 37, 8, 5, (2, 3))], ids=["768x3072", "100x300", "10x37"])
def test_reference_agreement_float32(size, activation):
    d_model, d_ff, b, k, lead = size
    m = make_ffn(d_model, d_ff, activation, block_size=b, k=k, seed=4)
    x = torch.randn(*lead, d_model, generator=torch.Generator().manual_seed(5))
    compare_with_reference(m, x)


@pytest.mark.parametrize("variant", ["checkpoint", "chunked", "no_bias"])
def test_reference_agreement_variants(variant):
    m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=6, bias=variant != "no_bias",
                 checkpoint=variant == "checkpoint")
    x = torch.randn(4, 40, 100, generator=torch.Generator().manual_seed(8))
    if variant == "chunked":
        m.memory_limit_mb = limit_for_chunk(m, 64)
        assert m.chunk_tokens() == 64
    compare_with_reference(m, x)


@pytest.mark.parametrize("size", [(13, 29, 4, 16, 130), (13, 29, 5, 7, 3), (33, 65, 32, 1024, 9),
                                  (64, 128, 64, 0, 64), (21, 50, 130, 17, 65), (7, 9, 200, 3, 1)],
                         ids=["b4", "b5", "k_full", "k0", "b130_int32", "b200_one_token"])
def test_reference_agreement_weird_block_sizes_float64(size):
    d_model, d_ff, b, k, tokens = size
    m = make_ffn(d_model, d_ff, "silu", block_size=b, k=k, dtype=torch.float64, seed=3)
    compare_with_reference(m, torch.randn(tokens, d_model, dtype=torch.float64), tol=1e-12)


def test_reference_agreement_block_256_float32():
    m = make_ffn(300, 520, "gelu", block_size=256, k=100, seed=3)
    compare_with_reference(m, torch.randn(70, 300))


def test_reference_agreement_float64_odd_shapes():
    m = make_ffn(37, 61, "silu", block_size=16, k=33, dtype=torch.float64, seed=9)
    x = torch.randn(3, 70, 37, dtype=torch.float64)
    y = m(x)
    assert R.rel_err(y, R.module_ffn(m, x)) < 1e-12


def test_input_layouts():
    """(*, d_model) inputs of any layout: 1-D, non-contiguous, expanded, many leading dims."""
    m = make_ffn(10, 37, "gelu", seed=10)
    base = torch.randn(4, 3, 10)
    want = m(base.contiguous())
    # 1-D: one token, as a [1, 10] batch gives it (a call of at most 8 tokens runs the few-token
    # kernels, whose rounding differs from the tiles': test_few_tokens.py)
    torch.testing.assert_close(m(base[1, 2]), m(base[1, 2:3])[0], rtol=0, atol=0)
    assert R.rel_err(m(base[1, 2]), want[1, 2]) < 1e-5
    xt = base.transpose(0, 1).contiguous().transpose(0, 1)                       # non-contiguous view
    assert not xt.is_contiguous()
    assert torch.equal(m(xt), want)
    assert torch.equal(m(base.view(2, 2, 3, 10)), want.view(2, 2, 3, 10))
    xe = base[:1, :1].expand(4, 3, 10)                                           # stride 0
    assert torch.equal(m(xe), want[:1, :1].expand(4, 3, 10))
    # gradients with a non-contiguous upstream gradient
    x = base.clone().requires_grad_()
    dy = torch.randn(3, 4, 10).transpose(0, 1)
    m(x).backward(dy)
    x2 = base.clone().requires_grad_()
    m(x2).backward(dy.contiguous())
    assert torch.equal(x.grad, x2.grad)


# ----------------------------------------------------------------- accuracy of the format
def smooth_weight(out, inp, noise, g):
    """A smooth low-frequency matrix (RMS 1) plus `noise` x RMS Gaussian noise, scaled like nn.Linear."""
    r = torch.linspace(0, 1, out, dtype=torch.float64)[:, None]
    c = torch.linspace(0, 1, inp, dtype=torch.float64)[None, :]
    w = torch.zeros(out, inp, dtype=torch.float64)
    for _ in range(6):
        fr, fc, pr, pc, amp = torch.rand(5, generator=g, dtype=torch.float64)
        w += (2 * amp - 1) * torch.cos(math.pi * (1 + 3 * fr) * r + 2 * math.pi * pr) \
            * torch.cos(math.pi * (1 + 3 * fc) * c + 2 * math.pi * pc)
    w /= w.pow(2).mean().sqrt()
    w += noise * torch.randn(out, inp, generator=g, dtype=torch.float64)
    return (w / math.sqrt(inp)).float()


def independent_relative_error(w, b, k):
    """||W - encode/decode(W)|| / ||W|| computed here: least-squares pattern fit, orthonormal
    DCT of the rest, energy of all but the k largest coefficients (Parseval). Multiples of b only."""
    w = w.double()
    out, inp = w.shape
    assert out % b == 0 and inp % b == 0
    blocks = w.view(out // b, b, inp // b, b).permute(0, 2, 1, 3).reshape(-1, b * b)   # [nblk, b*b]
    phi = R.pattern_images(b).reshape(8, b * b)                                         # [8, b*b]
    p = torch.linalg.lstsq(phi.T, blocks.T).solution                                    # [8, nblk]
    resid = (blocks - (phi.T @ p).T).view(-1, b, b)
    psi = R.dct_matrix(b)
    e = (psi @ resid @ psi.T).reshape(-1, b * b).pow(2)
    dropped = e.sum(1) - e.topk(k, dim=1).values.sum(1)
    return math.sqrt(dropped.sum().item() / w.pow(2).sum().item())


def dense_and_rbe(kind, d_model=768, d_ff=3072, seed=11):
    g = torch.Generator().manual_seed(seed)
    fc1, fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
    with torch.no_grad():
        if kind == "smooth":
            fc1.weight.copy_(smooth_weight(d_ff, d_model, 0.01, g))
            fc2.weight.copy_(smooth_weight(d_model, d_ff, 0.01, g))
        else:
            fc1.weight.normal_(0, 1 / math.sqrt(d_model), generator=g)
            fc2.weight.normal_(0, 1 / math.sqrt(d_ff), generator=g)
    m = rbe_ffn.RBEFeedForward.from_linears(fc1, fc2, "gelu", block_size=64, k=300)
    x = torch.randn(64, d_model, generator=g)
    return fc1, fc2, m, x


def test_accuracy_smooth_weights():
    fc1, fc2, m, x = dense_and_rbe("smooth")
    with torch.no_grad():
        y_dense = fc2(F.gelu(fc1(x)))
        y = m(x)
    err = R.rel_err(y, y_dense)
    print(f"smooth + 1% noise, b=64 k=300: weight errors {m.fc1.relative_error:.4f} {m.fc2.relative_error:.4f}, "
          f"FFN output error {err:.2e}")
    assert m.fc1.relative_error < 2e-2 and m.fc2.relative_error < 2e-2  # DESIGN.md: "about 0.02"
    assert err < 1e-2


def test_accuracy_gaussian_weights_documented():
    """Gaussian (trained-like) weights compress badly at k=300: the error is large, and it is
    exactly what an independent encode/decode predicts."""
    fc1, fc2, m, x = dense_and_rbe("gauss")
    with torch.no_grad():
        y_dense = fc2(F.gelu(fc1(x)))
        y = m(x)
        # independent: decode the stored numbers here, run the dense FFN in float64
        w1 = R.decode(m.fc1.basis.double(), m.fc1.coeffs.double(), m.fc1.index, 3072, 768, 64)
        w2 = R.decode(m.fc2.basis.double(), m.fc2.coeffs.double(), m.fc2.index, 768, 3072, 64)
        y_ref = F.linear(F.gelu(F.linear(x.double(), w1, fc1.bias.double())), w2, fc2.bias.double())
    err, err_ref = R.rel_err(y, y_dense), R.rel_err(y_ref, y_dense)
    e1, e2 = independent_relative_error(fc1.weight, 64, 300), independent_relative_error(fc2.weight, 64, 300)
    print(f"Gaussian weights, b=64 k=300: weight errors {m.fc1.relative_error:.4f} (independent {e1:.4f}) "
          f"{m.fc2.relative_error:.4f} (independent {e2:.4f}); FFN output error {err:.4f} (independent {err_ref:.4f})")
    assert abs(err - err_ref) < 1e-4 * err_ref
    assert abs(m.fc1.relative_error - e1) < 1e-6 * e1 and abs(m.fc2.relative_error - e2) < 1e-6 * e2
    assert R.rel_err(w1, fc1.weight) == pytest.approx(e1, rel=1e-6)  # the decode error is the reported one
    assert e1 > 0.1 and e2 > 0.1 and err > 0.1


# ----------------------------------------------------------------- variants agree
def grads_for(m, x, dy):
    params = [m.get_parameter(n) for n in R.PARAM_NAMES]
    return R.grads_of(m, x, params, dy)


@pytest.mark.parametrize("activation", ACTS)
def test_checkpoint_equals_standard(activation):
    m = make_ffn(96, 200, activation, block_size=16, k=40, seed=12)
    x = torch.randn(3, 50, 96)
    dy = torch.randn_like(x)
    y, g = grads_for(m, x, dy)
    m.checkpoint = True
    yc, gc = grads_for(m, x, dy)
    assert torch.equal(yc, y)  # bitwise: the forward is the same computation
    for a, b in zip(gc, g):
        assert R.rel_err(a, b) < 1e-6


@pytest.mark.parametrize("parametrization", ["plain", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTS)
def test_standard_keeping_hidden_equals_checkpointed(activation, dtype, parametrization):
    """Beyond the few-token path, on chunks of whole tiles, the standard forward keeps act'(h) and
    fc2's analysed input instead of h (ffn_saves_hidden: gelu, gelu_tanh and silu), so that its
    backward evaluates no activation and analyses no [T, d_ff] input. The same kernels compute the
    same numbers there as in the checkpointed recompute: every gradient is bitwise the checkpointed
    one, with fc2's scales too (the kept input is the unscaled one), with the 16-bit results' flags
    (float32 activation, bfloat16 sparse operands), and with only fc2's gradients asked for. Where
    h is kept (relu, chunks of 100 tokens), the same holds."""
    m = make_ffn(48, 200, activation, block_size=16, k=40, dtype=dtype, seed=23, random_bias=True,
                 parametrization=parametrization)
    params = params_of(m)
    fc1 = (m.fc1.basis, m.fc1.coeffs, m.fc1.index, m.fc1.bias)
    fc2 = (m.fc2.basis, m.fc2.coeffs, m.fc2.index, m.fc2.bias)
    scales = (m.fc1._coeff_scale, m.fc2._coeff_scale, m.fc1._pattern_scale, m.fc2._pattern_scale)
    assert (scales == (1.0,) * 4) == (parametrization == "plain")
    flag_sets = [{}] + ([{"f32_activation": True, "bf16_sparse": True}] if dtype == torch.float32 else [])
    for (tokens, chunk), flags in itertools.product(((130, 0), (300, 64), (300, 128), (300, 100)), flag_sets):
        x = torch.randn(tokens, 48, dtype=dtype)
        dy = torch.randn_like(x)
        results = []
        for checkpoint in (False, True):
            def f(t):
                return ops.ffn(*ffn_args(m, t, chunk, not checkpoint), *scales, **flags)[0]
            results.append(R.grads_of(f, x, params, dy))
        (y, g), (yc, gc) = results
        assert torch.equal(yc, y), (tokens, chunk)
        for i, (a, b) in enumerate(zip(gc, g)):
            assert torch.equal(a, b), (tokens, chunk, flags, i)
        with torch.no_grad():
            _, pre, hidden = ops.ffn(*ffn_args(m, x, chunk, True), *scales, **flags)
        assert (hidden.numel() > 0) == (activation != "relu" and chunk != 100), (tokens, chunk)
        tiled = hidden.numel() > 0 and rbe_ffn._C.ffn_pre_in_tiles(dtype == torch.float32, flags.get("bf16_sparse", False))
        assert pre.dim() == (4 if tiled else 2)
        if tiled:  # act'(h) in tiles [tiles, ceil(200 / 16), 16, 64]: zero past the tokens and features
            tok = pre.permute(0, 3, 1, 2).reshape(pre.shape[0] * 64, -1)
            assert pre.shape[1:] == (13, 16, 64) and not tok[tokens:].any() and not tok[:, 200:].any()
            if not flags:
                with torch.no_grad():
                    _, h, _ = ops.ffn(*ffn_args(m, x, 100, True), *scales)  # chunks of 100 tokens keep h
                assert torch.equal(tok[:tokens, :200], ops.activation_backward(torch.ones_like(h), h, activation))
        # fc2's gradients alone: fc1's part of the backward is skipped, act'(h) is not read
        fc2_only = [False] * 4 + [True] * 3
        rest = (m.fc1.plan, *(t.detach() for t in (m.fc1.basis, m.fc1.coeffs)), m.fc1.index, m.fc1.bias.detach(),
                m.fc2.basis.detach(), m.fc2.coeffs.detach(), m.fc2.index, 48, 200, activation, chunk, fc2_only)
        std = ops.ffn_backward(dy, x, pre, hidden, *rest, *scales, **flags)
        ckpt = ops.ffn_backward(dy, x, x.new_empty(0), x.new_empty(0), *rest, *scales, **flags)
        for i, (a, b) in enumerate(zip(std, ckpt)):
            assert torch.equal(a, b) and (a.numel() > 0) == fc2_only[i], (tokens, chunk, flags, i)


def test_saves_hidden_rule_is_the_operators():
    """The fake kernel's copy of the rule (_ops.saves_hidden, written for symbolic token counts)
    gives the C++ operator's answers (_C.ffn_saves_hidden), on and off the DCT-domain path."""
    from rbe_ffn import _C
    from rbe_ffn._ops import saves_hidden
    for dct in (False, True):
        with rbe_ffn.dct_path(dct):
            for activation in ACTS + ["none"]:
                for chunk in (0, 1, 7, 63, 64, 100, 128, 192, 1000):
                    for tokens in range(0, 300, 3):
                        assert saves_hidden(tokens, chunk, activation) == _C.ffn_saves_hidden(tokens, chunk, activation), (
                            dct, activation, chunk, tokens)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_chunked_equals_unchunked(checkpoint):
    """Chunking does not change the per-token arithmetic (tokens are tiled by 64 inside each
    chunk, and a token's result does not depend on its tile-mates), so y and dL/dx are bitwise
    equal for every chunk size, measured and asserted, including chunks that are not multiples
    of 64 (then tiles straddle differently). Parameter gradients are sums over tokens: chunks of
    several whole tiles sum them tile by tile in the same order as one call (the coefficient sums
    held in the kept schedules between chunks, RBE_SUMS_*; the biases and pattern numbers in
    place), so they are bitwise equal too; other chunkings group the tokens into other tiles, and
    agree to 1e-6."""
    m = make_ffn(96, 200, "gelu", block_size=16, k=40, seed=13, checkpoint=checkpoint)
    x = torch.randn(3, 100, 96)  # 300 tokens: chunks leave a partial tile
    dy = torch.randn_like(x)
    y, g = grads_for(m, x, dy)
    params = [m.get_parameter(n) for n in R.PARAM_NAMES]
    fc1 = (m.fc1.basis, m.fc1.coeffs, m.fc1.index, m.fc1.bias)
    fc2 = (m.fc2.basis, m.fc2.coeffs, m.fc2.index, m.fc2.bias)
    for chunk in (64, 128, 192, 1, 7, 16, 17, 100):  # <= 16 tokens: 16-lane tiles
        yc, gc = R.grads_of(lambda t: rbe_ffn.rbe_feed_forward(t, fc1, fc2, 96, 200, 16, "gelu", checkpoint, chunk),
                            x, params, dy)
        assert torch.equal(yc, y), chunk
        assert torch.equal(gc[0], g[0]), chunk  # dL/dx is per token as well
        for a, b in zip(gc, g):
            assert R.rel_err(a, b) < 1e-6, chunk
            if chunk in (128, 192):
                assert torch.equal(a, b), chunk
    # the module path: memory_limit_mb picks whole tiles (64 tokens here)
    m.memory_limit_mb = limit_for_chunk(m, 64)
    assert m.chunk_tokens() == 64
    yc, gc = grads_for(m, x, dy)
    assert torch.equal(yc, y)
    for a, b in zip(gc, g):
        assert R.rel_err(a, b) < 1e-6


@pytest.mark.parametrize("activation", ACTS)
def test_checkpointed_and_chunked_equal_standard(activation, device):
    """Checkpointed forward bitwise equal to the standard one; checkpointed gradients and the
    functional path with 37-token chunks (standard and checkpointed) within 1e-6."""
    base = make_ffn(40, 100, activation, 16, 30, seed=4, random_bias=True).to(device)
    x = torch.randn(3, 50, 40, device=device)
    dy = torch.randn_like(x)
    y, g = R.grads_of(base, x, params_of(base), dy)
    ck = copy.deepcopy(base)
    ck.checkpoint = True
    yk, gk = R.grads_of(ck, x, params_of(ck), dy)
    assert torch.equal(yk, y), "checkpointed forward must be bitwise equal to the standard one"
    for a, b in zip(gk, g):
        check_close(a, b, 1e-6, "checkpointed grad")
    for checkpoint in (False, True):
        ch = copy.deepcopy(base)
        ch.checkpoint = checkpoint
        fc = ch.fc1
        y2, g2 = R.grads_of(lambda x: rbe_ffn.rbe_feed_forward(
            x, (fc.basis, fc.coeffs, fc.index, fc.bias), (ch.fc2.basis, ch.fc2.coeffs, ch.fc2.index, ch.fc2.bias),
            40, 100, 16, activation, checkpoint, 37), x, params_of(ch), dy)
        check_close(y2, y, 1e-6, "chunked forward")
        for a, b in zip(g2, g):
            check_close(a, b, 1e-6, "chunked grad")


@pytest.mark.parametrize("checkpoint", [False, True])
def test_inside_torch_utils_checkpoint(checkpoint):
    from torch.utils.checkpoint import checkpoint as ckpt

    m = make_ffn(24, 50, "silu", seed=14, checkpoint=checkpoint)
    x = torch.randn(2, 9, 24)
    dy = torch.randn_like(x)
    y, g = grads_for(m, x, dy)
    params = [m.get_parameter(n) for n in R.PARAM_NAMES]
    yc, gc = R.grads_of(lambda t: ckpt(m, t, use_reentrant=False), x, params, dy)
    assert torch.equal(yc, y)
    for a, b in zip(gc, g):
        assert R.rel_err(a, b) < 1e-6


def test_parameter_gradients_accumulate():
    m = make_ffn(10, 37, "gelu", seed=15)
    x = torch.randn(5, 10)
    m(x).sum().backward()
    first = [m.get_parameter(n).grad.clone() for n in R.PARAM_NAMES]
    m(x).sum().backward()
    for n, g in zip(R.PARAM_NAMES, first):
        torch.testing.assert_close(m.get_parameter(n).grad, 2 * g)


def test_only_some_parameters_trainable():
    """Frozen parameters get no gradient; the others match the all-trainable run."""
    m = make_ffn(10, 37, "gelu", seed=16)
    x = torch.randn(6, 10, requires_grad=True)
    m(x).square().sum().backward()
    full = {n: m.get_parameter(n).grad.clone() for n in R.PARAM_NAMES}
    gx = x.grad.clone()
    m.zero_grad(set_to_none=True)
    x.grad = None
    m.fc1.requires_grad_(False)
    m(x).square().sum().backward()
    for n in R.PARAM_NAMES:
        if n.startswith("fc1"):
            assert m.get_parameter(n).grad is None
        else:
            torch.testing.assert_close(m.get_parameter(n).grad, full[n], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, gx, rtol=1e-6, atol=1e-7)


def test_double_backward_raises_not_silent():
    """The backward operators have no derivatives: a gradient of a gradient through them must
    raise, not silently come out as zero. First-order gradients under create_graph stay right."""
    m = make_ffn(10, 37, "gelu", dtype=torch.float64, seed=17)
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    for loss_fn in (lambda y: y.square().sum(), lambda y: y.sum() + x.square().sum()):
        (gx,) = torch.autograd.grad(loss_fn(m(x)), x, create_graph=True)
        (gx_plain,) = torch.autograd.grad(loss_fn(m(x)), x)
        assert torch.equal(gx.detach(), gx_plain)
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()
    (g,) = torch.autograd.grad(m.fc1(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ops.activation(a, "silu").square().sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def grads_at_threads(m, x, dy, repeats=1):
    """{n: [grads_for(m, x, dy) repeated]} at 1 and 2 intra-op threads (the count restored)."""
    threads = torch.get_num_threads()
    try:
        runs = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            runs[n] = [grads_for(m, x, dy) for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    return runs


def test_deterministic_and_thread_count_independent():
    """Same inputs, same bits run to run; y and dL/dx (per token) do not depend on the
    thread count; parameter gradients (sums over tokens) agree to 1e-6."""
    m = make_ffn(96, 200, "gelu", block_size=16, k=40, seed=18)
    x = torch.randn(300, 96)
    dy = torch.randn_like(x)
    runs = grads_at_threads(m, x, dy, repeats=2)
    for n, ((y0, g0), (y1, g1)) in runs.items():
        assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1)), n
    (y1, g1), (y2, g2) = runs[1][0], runs[2][0]
    assert torch.equal(y1, y2) and torch.equal(g1[0], g2[0])
    for a, b in zip(g1, g2):
        assert R.rel_err(a, b) < 1e-6


@pytest.mark.parametrize("checkpoint", [False, True])
def test_same_bits_whichever_thread_takes_an_item(checkpoint):
    """The kernels' work items are shared out as the threads run (csrc/rbe_ops.cpp balanced_for): a
    thread done with its own share takes what is left of the others'. With more threads than this
    machine's cores (threads lose their core mid-region, so items change hands), the output, the
    input gradient and every parameter gradient keep the bits of one thread, call after call."""
    m = make_ffn(96, 256, "gelu", block_size=16, k=40, seed=23, checkpoint=checkpoint, parametrization="scaled")
    x = torch.randn(700, 96)  # six chunks of the default 128 tokens, the last one partial
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, g1 = grads_for(m, x, dy)
        for n in (3, 4, 7):
            torch.set_num_threads(n)
            for _ in range(2):
                y, g = grads_for(m, x, dy)
                assert torch.equal(y, y1) and all(torch.equal(a, b) for a, b in zip(g, g1)), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_one_pass_backward_same_bits_as_two(checkpoint):
    """fc1 here has 3 block columns: at 1 thread its input and coefficient gradients run as one pass
    over the transposed schedule, at 2 threads (fewer than two columns a thread) as two passes
    (csrc/rbe_ops.cpp cols_carry_coeffs). Both give the same bits, so the thread count does not
    change any gradient."""
    m = make_ffn(48, 200, "gelu", block_size=16, k=40, seed=21, checkpoint=checkpoint)
    x = torch.randn(300, 48)
    dy = torch.randn_like(x)
    runs = grads_at_threads(m, x, dy)
    (y1, g1), (y2, g2) = runs[1][0], runs[2][0]
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("chunk", [0, 128, 100])
def test_input_gradient_handed_on_same_bits(activation, checkpoint, chunk):
    """Where fc2's one-pass backward runs (its coefficient gradient wanted, float32, x86 kernels),
    its input gradient goes straight on to fc1 (rbe_grad_next_f32: times act'(h), fc1's bias sums
    and the analysis of fc1's output gradient in the same kernel) instead of through a token-major
    [T, d_ff] buffer. With fc2's coefficients frozen the buffer is used: every other gradient keeps
    its bits, fc1's bias sums included (both sum in token order)."""
    m = make_ffn(48, 200, activation, block_size=16, k=40, seed=23, checkpoint=checkpoint, random_bias=True)
    x = torch.randn(300, 48)
    dy = torch.randn_like(x)
    fc1 = (m.fc1.basis, m.fc1.coeffs, m.fc1.index, m.fc1.bias)
    fc2 = (m.fc2.basis, m.fc2.coeffs, m.fc2.index, m.fc2.bias)
    rest = [m.fc1.basis, m.fc1.coeffs, m.fc1.bias, m.fc2.basis, m.fc2.bias]
    frozen = (m.fc2.basis, m.fc2.coeffs.detach(), m.fc2.index, m.fc2.bias)
    _, handed = R.grads_of(lambda t: rbe_ffn.rbe_feed_forward(t, fc1, fc2, 48, 200, 16, activation, checkpoint, chunk),
                           x, rest, dy)
    _, stored = R.grads_of(lambda t: rbe_ffn.rbe_feed_forward(t, fc1, frozen, 48, 200, 16, activation, checkpoint,
                                                              chunk), x, rest, dy)
    for name, a, b in zip(["x", "fc1.basis", "fc1.coeffs", "fc1.bias", "fc2.basis", "fc2.bias"], handed, stored):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("checkpoint", [False, True])
def test_gradient_subsets_match_full(checkpoint):
    """Every subset of requested gradients (the output_mask of ffn_backward) gives the same
    numbers as the full backward: x alone, parameters alone, one layer alone, biases alone."""
    m = make_ffn(24, 50, "gelu_tanh", seed=19, checkpoint=checkpoint)
    x = torch.randn(2, 40, 24)
    dy = torch.randn_like(x)
    names = list(R.PARAM_NAMES)
    _, full = R.grads_of(m, x, [m.get_parameter(n) for n in names], dy)
    full = dict(zip(["x"] + names, full))
    subsets = [["x"], names, ["fc1.basis", "fc1.coeffs", "fc1.bias"], ["fc2.basis", "fc2.coeffs", "fc2.bias"],
               ["fc1.bias", "fc2.bias"], ["x", "fc2.coeffs"], ["fc1.coeffs"]]
    for subset in subsets:
        xs = x.detach().requires_grad_("x" in subset)
        wanted = [m.get_parameter(n) for n in subset if n != "x"]
        for n in names:
            m.get_parameter(n).requires_grad_(n in subset)
        inputs = ([xs] if "x" in subset else []) + wanted
        gs = torch.autograd.grad(m(xs), inputs, dy)
        for n, g in zip([s for s in subset if s == "x"] + [s for s in subset if s != "x"], gs):
            assert R.rel_err(g, full[n]) < 1e-6, (subset, n)
    m.requires_grad_(True)


@pytest.mark.parametrize("tokens", [1, 5, 9, 16])
def test_few_token_tiles_equal_full_tiles(tokens):
    """Tiles of at most 16 tokens are computed on 16 lanes instead of 64, and a single tile's
    backward works block by block without schedules. Against the same tokens followed by 64
    others whose output gradient is zero (two tiles: full width, scheduled), a token's output and
    input gradient, dbasis and dbias must be bitwise equal (the extra tokens add exact zeros);
    dcoeffs sums the same products, but the scheduled kernel reduces coefficients in pairs (another
    association), so it agrees to rounding. The forward of at most 16 tokens runs the few-token
    kernels instead (test_few_tokens.py), which agree with the tiles to rounding; the 16-lane
    forward tile is reached as a chunk of a longer call instead: chunks of 64 tokens, a last chunk
    of `tokens` against the same tokens in a full chunk, bitwise."""
    g = torch.Generator().manual_seed(21)
    lin = rbe_ffn.RBELinear(96, 200, block_size=16, k=40, generator=g)
    with torch.no_grad():
        lin.basis.normal_(0, 0.1, generator=g)
    x = torch.randn(tokens + 64, 96, generator=g)
    gy = torch.randn(tokens + 64, 200, generator=g)
    gy[tokens:] = 0
    plan = lin.plan
    small = ops.linear_backward(gy[:tokens], x[:tokens], plan, lin.basis.detach(), lin.coeffs.detach(), lin.index,
                                96, 200, [True] * 4)
    full = ops.linear_backward(gy, x, plan, lin.basis.detach(), lin.coeffs.detach(), lin.index, 96, 200, [True] * 4)
    assert torch.equal(small[0], full[0][:tokens]), "dx"
    assert torch.equal(small[1], full[1]), "dbasis"
    assert torch.equal(small[3], full[3]), "dbias"
    assert R.rel_err(small[2], full[2]) < 1e-6, "dcoeffs"
    with torch.no_grad():
        m = make_ffn(96, 200, "gelu", block_size=16, k=40, seed=22)
        assert R.rel_err(lin(x[:tokens]), lin(x)[:tokens]) < 1e-6  # the few-token kernels
        assert R.rel_err(m(x[:tokens]), m(x)[:tokens]) < 1e-6
        xx = torch.cat([x, torch.randn(64, 96, generator=g)])  # 128 + tokens tokens
        m.memory_limit_mb = limit_for_chunk(m, 64)
        assert m.chunk_tokens() == 64
        last = m(xx[:64 + tokens])[64:]  # its last chunk: one tile of `tokens` (16 lanes at most 16)
        assert torch.equal(last, m(xx[:128])[64:64 + tokens])  # the same tokens in a full 64-lane chunk


def test_pre_activation_kept_only_with_grad(monkeypatch):
    """The standard block keeps the [T, d_ff] pre-activation for backward only when grad is
    enabled: under no_grad and inference_mode no backward can follow, so the operator is asked not
    to write it (same output bits); with grad the standard block keeps it, the checkpointed not."""
    import rbe_ffn.modules as modules

    asked = []

    class Spy:
        def __getattr__(self, name):
            op = getattr(ops, name)
            if name != "ffn":
                return op
            return lambda *args, **kw: asked.append(args[14]) or op(*args, **kw)  # keep_pre

    monkeypatch.setattr(modules, "ops", Spy())
    m = make_ffn(24, 50, "gelu", seed=23)
    x = torch.randn(70, 24)
    y = m(x)
    with torch.no_grad():
        y0 = m(x)
    with torch.inference_mode():
        y1 = m(x)
    m.checkpoint = True
    m(x)
    assert asked == [True, False, False, False]
    assert torch.equal(y.detach(), y0) and torch.equal(y0, y1)
    with torch.no_grad():
        yf = rbe_ffn.functional.rbe_feed_forward(x, (m.fc1.basis, m.fc1.coeffs, m.fc1.index, m.fc1.bias),
                                                 (m.fc2.basis, m.fc2.coeffs, m.fc2.index, m.fc2.bias), 24, 50, 8)
    assert torch.equal(yf, y0)
