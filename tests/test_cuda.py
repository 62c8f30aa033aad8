"""The operators on CUDA tensors, checked against the CPU operators on the same inputs, against
the independent test vectors, with gradcheck, opcheck and torch.compile, and in half precision
against the dense module's own half-precision error.

Skipped (with the reason shown) where no CUDA device is present; where one is present the
extension must have been built with its CUDA kernels, else test_cuda_kernels_registered fails.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import rbe_ffn

import ffn_reference as R
from test_ffn import make_ffn as make_ffn_cpu
from test_vectors_ffn import CASES, assert_matches, build as build_case, t64

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the CUDA kernels are only compiled (make cuda-check)")

ops = torch.ops.rbe_ffn
ACTS = ["gelu", "gelu_tanh", "relu", "silu"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
OPS = ["encode", "decode", "linear", "linear_backward", "ffn", "ffn_backward", "activation", "activation_backward"]


def make_ffn(d_model, d_ff, activation="gelu", block_size=8, k=5, dtype=torch.float32, seed=0, **kw):
    """test_ffn's fresh RBEFeedForward (CPU, non-zero pattern part), with non-zero biases too."""
    m = make_ffn_cpu(d_model, d_ff, activation, block_size, k, dtype, seed, **kw)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for lin in (m.fc1, m.fc2):
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=torch.float64) * 0.1)
    return m


def params_of(m):
    return [p for n in R.PARAM_NAMES if (p := m.get_parameter(n)) is not None]


def check_close(got, want, tol, what):
    err = R.rel_err(got.cpu(), want.cpu())
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def test_cuda_kernels_registered():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rbe_ffn::{name}", "CUDA"), (
            f"rbe_ffn::{name} has no CUDA kernel: the extension was built without CUDA (see setup.py)")


# ----------------------------------------------------------------- against the CPU operators
SHAPES = [(50, 130, 16, 37), (24, 40, 8, 64), (10, 37, 8, 5), (70, 33, 4, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["standard", "checkpoint"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tokens", [1, 100])
def test_ffn_matches_cpu(shape, activation, checkpoint, dtype, tokens):
    d_model, d_ff, b, k = shape
    m = make_ffn(d_model, d_ff, activation, b, k, dtype=dtype, seed=tokens, checkpoint=checkpoint)
    mc = copy.deepcopy(m).cuda()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, d_model, generator=g, dtype=dtype)
    dy = torch.randn(tokens, d_model, generator=g, dtype=dtype)
    y, grads = R.grads_of(m, x, params_of(m), dy)
    yc, gradsc = R.grads_of(mc, x.cuda(), params_of(mc), dy.cuda())
    assert yc.is_cuda and yc.dtype == dtype
    check_close(yc, y, TOL[dtype], "y")
    for name, a, b_ in zip(("x",) + R.PARAM_NAMES, gradsc, grads):
        assert a.is_cuda and a.dtype == dtype, name
        check_close(a, b_, TOL[dtype], f"d/d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(13, 21, 8, 5), (37, 10, 8, 64), (7, 5, 130, 10), (300, 200, 64, 300)],
                         ids=["13x21_b8", "37x10_b8_kfull", "7x5_b130_int32", "300x200_b64"])
def test_linear_matches_cpu(shape, bias, dtype):
    out, inp, b, k = shape
    lin = rbe_ffn.RBELinear(inp, out, bias=bias, block_size=b, k=k, dtype=dtype,
                            generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lin.basis.normal_(0, 0.1)
    lc = copy.deepcopy(lin).cuda()
    x = torch.randn(3, 5, inp, dtype=dtype)
    dy = torch.randn(3, 5, out, dtype=dtype)
    names = ["basis", "coeffs"] + (["bias"] if bias else [])
    y, grads = R.grads_of(lin, x, [lin.get_parameter(n) for n in names], dy)
    yc, gradsc = R.grads_of(lc, x.cuda(), [lc.get_parameter(n) for n in names], dy.cuda())
    check_close(yc, y, TOL[dtype], "y")
    for name, a, b_ in zip(["x"] + names, gradsc, grads):
        check_close(a, b_, TOL[dtype], f"d/d{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", ["standard", "checkpoint", "chunk1"])
@pytest.mark.parametrize("case", CASES, ids=[c["activation"] for c in CASES])
def test_cuda_matches_vectors(case, variant, dtype):
    m = build_case(case, dtype, variant == "checkpoint", 1 if variant == "chunk1" else 0).cuda()
    x = t64(case["x"]).to(dtype).cuda()
    dy = t64(case["dy"]).to(dtype).cuda()
    y, grads = R.grads_of(m, x, params_of(m), dy)
    assert_matches(y.cpu(), t64(case["y"]).to(dtype), TOL[dtype], "y")
    for name, g in zip(("x",) + R.PARAM_NAMES, grads):
        assert_matches(g.cpu(), t64(case["grad"][name]).to(dtype), TOL[dtype], f"d/d{name}")


def test_cuda_decode_matches_vectors():
    for case in R.load_cases()["decode"]:
        b = case["block_size"]
        idx = torch.tensor(case["index"]).to(torch.int32 if b > 128 else torch.int16)
        w = ops.decode(t64(case["basis"]).cuda(), t64(case["coeffs"]).cuda(), idx.cuda(), case["out"], case["in"], b)
        assert_matches(w.cpu(), t64(case["weight"]), 1e-12, "decode")


# ----------------------------------------------------------------- codec on CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,b,k", [((50, 37), 8, 10), ((64, 64), 16, 256), ((130, 70), 16, 0),
                                       ((33, 17), 4, 7), ((170, 200), 160, 50), ((40, 24), 8, 63)],
                         ids=["50x37_b8", "64x64_b16_full", "130x70_k0", "33x17_b4", "170x200_b160_int32",
                              "40x24_b8"])
def test_encode_decode_match_cpu(shape, b, k, dtype):
    w = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    basis, coeffs, index, err = ops.encode(w, b, k)
    bc, cc, ic, ec = ops.encode(w.cuda(), b, k)
    assert ic.dtype == index.dtype == (torch.int32 if b > 128 else torch.int16)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    check_close(bc, basis, tol, "basis")
    same = (ic.cpu() == index).all(dim=1)
    if b >= 8:  # random blocks: the k largest coefficients are well separated
        assert same.all(), "the CUDA encoder kept other positions"
    else:  # at b = 4 the pattern spans most of the block: what is left is rounding noise, whose
        # order differs between the two encoders; the blocks' errors must still agree (below)
        assert same.float().mean() > 0.5
    if k:
        check_close(cc[same.cuda()], coeffs[same], tol, "coeffs")
    torch.testing.assert_close(ec.cpu(), err, rtol=1e-9, atol=1e-12 * w.double().pow(2).sum().item())
    wd = ops.decode(bc, cc, ic, *shape, b)
    check_close(wd, ops.decode(basis, coeffs, index, *shape, b), tol, "decode")
    # the error the encoder reports is the error of what it stored
    got = (wd.double().cpu() - w.double()).pow(2).sum().item()
    floor = (1e-12 if dtype == torch.float64 else 1e-8) * w.double().pow(2).sum().item()  # rounding of decode
    assert math.isclose(got, ec.sum().item(), rel_tol=1e-6, abs_tol=floor), (got, ec.sum().item())


def test_compress_cuda_weight_end_to_end():
    w = torch.randn(96, 80, device="cuda")
    cw = rbe_ffn.compress(w, 16, 40)
    assert cw.coeffs.is_cuda and cw.index.is_cuda
    ref = rbe_ffn.compress(w.cpu(), 16, 40)
    assert math.isclose(cw.relative_error, ref.relative_error, rel_tol=1e-6)
    assert R.rel_err(cw.decompress().cpu(), ref.decompress()) < 1e-6


# ----------------------------------------------------------------- gradcheck (float64, small weird shapes)
@pytest.mark.parametrize("variant", ["standard", "checkpoint", "chunked"])
@pytest.mark.parametrize("activation", ["gelu", "silu", "gelu_tanh"])
def test_gradcheck_ffn_cuda(activation, variant):
    m = make_ffn(6, 11, activation, block_size=4, k=5, dtype=torch.float64, seed=3,
                 checkpoint=variant == "checkpoint").cuda()
    x = torch.randn(3, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    names = list(R.PARAM_NAMES)
    chunk = 2 if variant == "chunked" else 0

    def f(x, *p):
        return rbe_ffn.rbe_feed_forward(x, (p[0], p[1], m.fc1.index, p[2]), (p[3], p[4], m.fc2.index, p[5]), 6, 11, 4,
                                        activation, variant == "checkpoint", chunk)

    params = [m.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("shape", [(13, 21, 8, 5), (7, 5, 130, 10)], ids=["13x21_b8", "7x5_b130_int32"])
def test_gradcheck_linear_cuda(shape):
    out, inp, b, k = shape
    lin = rbe_ffn.RBELinear(inp, out, block_size=b, k=k, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(2)).cuda()
    basis = torch.randn(lin.basis.shape, dtype=torch.float64, device="cuda", requires_grad=True)
    coeffs = lin.coeffs.detach().clone().requires_grad_()
    bias = torch.randn(out, dtype=torch.float64, device="cuda", requires_grad=True)
    x = torch.randn(2, 3, inp, dtype=torch.float64, device="cuda", requires_grad=True)

    def f(x, basis, coeffs, bias):
        return ops.linear(x, lin.plan, basis, coeffs, lin.index, bias, inp, out)

    assert torch.autograd.gradcheck(f, (x, basis, coeffs, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------- opcheck on every CUDA operator
def _opcheck(op, args):
    result = opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def ffn_args(m, x, chunk=0, keep_pre=True):
    f1, f2 = m.fc1, m.fc2
    return (x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, f2.bias,
            m.d_model, m.d_ff, m.activation, chunk, keep_pre)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_opcheck_cuda(dtype):
    d = lambda t: t.detach()  # noqa: E731
    if dtype != torch.bfloat16:
        w = torch.randn(13, 21, dtype=dtype, device="cuda")
        _opcheck(ops.encode, (w, 8, 5))
        _opcheck(ops.encode, (torch.randn(3, 5, dtype=dtype, device="cuda"), 130, 7))
    m = make_ffn(10, 37, "silu", dtype=torch.float64).to("cuda", dtype)
    f1 = m.fc1
    _opcheck(ops.decode, (d(f1.basis), d(f1.coeffs), f1.index, 37, 10, 8))
    x = torch.randn(2, 3, 10, dtype=dtype, device="cuda", requires_grad=True)
    _opcheck(ops.linear, (x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, 10, 37))
    gy = torch.randn(2, 3, 37, dtype=dtype, device="cuda")
    for mask in ([True] * 4, [True, False, True, False]):
        _opcheck(ops.linear_backward, (gy, d(x), f1.plan, d(f1.basis), d(f1.coeffs), f1.index, 10, 37, mask))
    for keep_pre in (True, False):
        for chunk in (0, 4):
            _opcheck(ops.ffn, ffn_args(m, x, chunk, keep_pre))
            with torch.no_grad():
                y, pre = ops.ffn(*ffn_args(m, d(x), chunk, keep_pre))
            f2 = m.fc2
            _opcheck(ops.ffn_backward, (torch.randn_like(y), d(x), pre, f1.plan, d(f1.basis), d(f1.coeffs), f1.index,
                                        d(f1.bias), d(f2.basis), d(f2.coeffs), f2.index, 10, 37, "silu", chunk,
                                        [True] * 7))
    h = torch.randn(4, 9, dtype=dtype, device="cuda", requires_grad=True)
    _opcheck(ops.activation, (h, "gelu"))
    _opcheck(ops.activation_backward, (torch.randn_like(h), d(h), "gelu_tanh"))


# ----------------------------------------------------------------- variants
@pytest.mark.parametrize("activation", ACTS)
def test_checkpointed_and_chunked_equal_standard(activation):
    base = make_ffn(40, 100, activation, 16, 30, seed=4).cuda()
    x = torch.randn(3, 50, 40, device="cuda")
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


def test_checkpointed_saves_only_the_input():
    m = make_ffn(64, 256, "gelu", 16, 30, checkpoint=True).cuda()
    x = torch.randn(128, 64, device="cuda", requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x).sum().backward()
    big = [tuple(t.shape) for t in saved if t.numel() >= 128 * 256]
    assert big == [], f"a [T, d_ff] tensor was saved: {big}"


# ----------------------------------------------------------------- modules move with .cuda()
def test_module_cuda_roundtrip_and_state_dict():
    m = make_ffn(48, 96, "gelu_tanh", 16, 20, seed=9)
    mc = copy.deepcopy(m).cuda()
    assert mc.fc1.plan.is_cuda and mc.fc1.index.is_cuda
    x = torch.randn(5, 48)
    check_close(mc(x.cuda()), m(x), 1e-5, "module on CUDA")
    back = make_ffn(48, 96, "gelu_tanh", 16, 20, seed=10)
    back.load_state_dict(mc.state_dict())
    check_close(back(x), m(x), 1e-6, "state_dict from CUDA")
    opt = torch.optim.AdamW(mc.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        mc(x.cuda()).pow(2).mean().backward()
        opt.step()
    assert torch.isfinite(mc.fc1.coeffs).all()


# ----------------------------------------------------------------- half precision and autocast
def dense_twin(m):
    """nn.Sequential(Linear, act, Linear) with the dense weights m's compressed numbers describe."""
    act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(), "silu": nn.SiLU()}
    d = nn.Sequential(nn.Linear(m.d_model, m.d_ff), act[m.activation], nn.Linear(m.d_ff, m.d_model))
    with torch.no_grad():
        d[0].weight.copy_(m.fc1.dense_weight())
        d[0].bias.copy_(m.fc1.bias)
        d[2].weight.copy_(m.fc2.dense_weight())
        d[2].bias.copy_(m.fc2.bias)
    return d.to(m.fc1.coeffs.device)


def forward_and_input_grad(model, x, dy):
    x = x.detach().requires_grad_(True)
    y = model(x)
    (gx,) = torch.autograd.grad((y.float() * dy).sum(), [x])
    return y.float(), gx.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("mode", ["cast", "autocast"])
def test_half_error_within_twice_dense(dtype, mode):
    m = make_ffn(256, 1024, "gelu", 64, 300, seed=11).cuda()
    dense = dense_twin(m)
    x = torch.randn(4, 64, 256, device="cuda")
    dy = torch.randn(4, 64, 256, device="cuda")
    y_ref, gx_ref = forward_and_input_grad(dense, x, dy)
    y_rbe32, _ = forward_and_input_grad(m, x, dy)
    assert R.rel_err(y_rbe32, y_ref) < 1e-5  # the two float32 models are the same function
    if mode == "cast":
        md, dd = copy.deepcopy(m).to(dtype), copy.deepcopy(dense).to(dtype)
        y_r, gx_r = forward_and_input_grad(md, x.to(dtype), dy)
        y_d, gx_d = forward_and_input_grad(dd, x.to(dtype), dy)
        assert md.fc1.coeffs.dtype == dtype
    else:
        with torch.autocast("cuda", dtype=dtype):
            y_r, gx_r = forward_and_input_grad(m, x, dy)
            y_d, gx_d = forward_and_input_grad(dense, x, dy)
            assert m(x).dtype == dtype
    e_r, e_d = R.rel_err(y_r, y_ref), R.rel_err(y_d, y_ref)
    ge_r, ge_d = R.rel_err(gx_r, gx_ref), R.rel_err(gx_d, gx_ref)
    print(f"{dtype} {mode}: forward error RBE {e_r:.3g} dense {e_d:.3g}; input grad RBE {ge_r:.3g} dense {ge_d:.3g}")
    assert 0 < e_d < 0.05 and e_r <= 2 * e_d, (e_r, e_d)
    assert 0 < ge_d < 0.05 and ge_r <= 2 * ge_d, (ge_r, ge_d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_parameter_grads(dtype):
    """Parameter gradients in half precision against float32 ones, no worse than 2x the dense
    module's own half-precision weight-gradient error (float32 master weights, autocast)."""
    m = make_ffn(128, 512, "silu", 32, 200, seed=12).cuda()
    dense = dense_twin(m)
    x = torch.randn(256, 128, device="cuda")

    def grads(model, names):
        model.zero_grad()
        model(x).float().pow(2).mean().backward()
        return [model.get_parameter(n).grad.clone() for n in names]

    rn, dn = ["fc1.coeffs", "fc2.coeffs", "fc1.basis"], ["0.weight", "2.weight"]
    r32, d32 = grads(m, rn), grads(dense, dn)
    with torch.autocast("cuda", dtype=dtype):
        r16, d16 = grads(m, rn), grads(dense, dn)
    for a in r16:
        assert a.dtype == torch.float32  # master weights stay float32
    worst_dense = max(R.rel_err(a, b) for a, b in zip(d16, d32))
    for name, a, b in zip(rn, r16, r32):
        e = R.rel_err(a, b)
        assert e <= 2 * worst_dense, (name, e, worst_dense)


@pytest.mark.parametrize("activation", ACTS)
def test_half_activation_kernel(activation):
    x = torch.randn(1000, device="cuda", dtype=torch.bfloat16) * 4
    got = ops.activation(x, activation).float()
    want = ops.activation(x.double(), activation).to(torch.bfloat16).float()
    assert torch.equal(got, want)  # computed in double, rounded once


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("activation", ACTS)
def test_activation_matches_cpu(activation, dtype):
    x = torch.cat([torch.randn(20000, dtype=dtype) * 5,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e4, -1e4, float("inf"), float("-inf"),
                                 float("nan")], dtype=dtype)])
    dy = torch.randn_like(x)
    tol = 3e-7 if dtype == torch.float32 else 1e-14  # double-precision erfc/exp of two libraries
    # atol: near a root of act' the value is tiny and only its absolute error is meaningful
    torch.testing.assert_close(ops.activation(x.cuda(), activation).cpu(), ops.activation(x, activation), rtol=tol,
                               atol=1e-12, equal_nan=True)
    torch.testing.assert_close(ops.activation_backward(dy.cuda(), x.cuda(), activation).cpu(),
                               ops.activation_backward(dy, x, activation), rtol=tol, atol=1e-12, equal_nan=True)


# ----------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("checkpoint", [False, True])
def test_compile_fullgraph_cuda(checkpoint):
    torch._dynamo.reset()
    m = make_ffn(32, 80, "gelu", 16, 20, seed=13, checkpoint=checkpoint).cuda()
    x = torch.randn(4, 7, 32, device="cuda")
    dy = torch.randn_like(x)
    y, g = R.grads_of(m, x, params_of(m), dy)
    cm = torch.compile(m, fullgraph=True)
    yc, gc = R.grads_of(cm, x, params_of(m), dy)
    check_close(yc, y, 1e-6, "compiled forward")
    for a, b in zip(gc, g):
        check_close(a, b, 1e-6, "compiled grad")
    torch._dynamo.reset()


# ----------------------------------------------------------------- bad input
def test_bad_input_cuda():
    m = make_ffn(16, 40, "gelu", 8, 5).cuda()
    x = torch.randn(3, 16, device="cuda")
    with torch.no_grad():
        m.fc1.index[2, 1] = m.fc1.index[2, 0]  # duplicate position
    with pytest.raises(IndexError, match="fc1: index is corrupted at block 2, slot 1"):
        m(x)
    with torch.no_grad():
        m.fc1.index[2, 1] = 64 * 64  # out of range (b = 8)
    with pytest.raises(IndexError, match="index is corrupted"):
        m(x)
    with pytest.raises(ValueError, match="input is on cpu but the layer is on cuda"):
        m(torch.randn(3, 16))  # forgot x.cuda()
    lin = rbe_ffn.RBELinear(16, 40, block_size=8, k=5)
    with pytest.raises(ValueError, match="device"):
        ops.linear(x, lin.plan.cuda(), lin.basis, lin.coeffs, lin.index, None, 16, 40)
    with pytest.raises(TypeError, match="only the CUDA linear"):
        lin.to(torch.bfloat16)(torch.randn(3, 16, dtype=torch.bfloat16))
    with pytest.raises((TypeError, ValueError), match="dtype"):
        lin.cuda()(torch.randn(3, 16, device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.encode(torch.full((8, 8), float("nan"), device="cuda"), 8, 3)
    torch.cuda.synchronize()  # nothing asynchronous went wrong either
