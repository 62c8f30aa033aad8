"""CUDA-only checks: the CUDA operators against the CPU operators on the same inputs, moving
modules between devices, half precision and autocast against the dense module's own
half-precision error, and CUDA-specific bad input.

The checks that are the same on every device (the test vectors, gradcheck, opcheck,
torch.compile, checkpointed / chunked variants, saved tensors, corrupted indexes) are the
device-parametrized tests of test_vectors_ffn.py, test_ffn.py, test_compile.py,
test_ffn_memory.py and test_bad_input.py (the `device` fixture in conftest.py); they run
on CUDA where a CUDA device is present.

Every GPU path is tested, through the `path` parameter: "decode" (the default), "dct" (the
DCT-domain dense path, rbe_ffn.dct_path(), csrc/rbe_dct_path.cpp) and "few" (the same with every
forward of at most 128 tokens on the few-token sparse kernel, rbe_cuda_few_rows).

Skipped (with the reason shown) where no CUDA device is present; where one is present the
extension must have been built with its CUDA kernels, else test_cuda_kernels_registered fails.
"""
import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import rbe_ffn

import ffn_reference as R
from conftest import ACTS, TOL, check_close, make_ffn, params_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the CUDA kernels are only compiled (make cuda-check)")

ops = torch.ops.rbe_ffn
OPS = ["encode", "decode", "linear", "linear_backward", "ffn", "ffn_backward", "activation", "activation_backward"]
PATHS = ["decode", "dct", "few"]


def on_path(path):
    """The CUDA operators' path for the block: the default decode path, or a DCT-domain one"""
    if path == "decode":
        return contextlib.nullcontext()
    return rbe_ffn.dct_path(few_tokens=128 if path == "few" else 0)


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
@pytest.mark.parametrize("path", PATHS)
def test_ffn_matches_cpu(shape, activation, checkpoint, dtype, tokens, path):
    d_model, d_ff, b, k = shape
    m = make_ffn(d_model, d_ff, activation, b, k, dtype=dtype, seed=tokens, checkpoint=checkpoint, random_bias=True)
    mc = copy.deepcopy(m).cuda()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, d_model, generator=g, dtype=dtype)
    dy = torch.randn(tokens, d_model, generator=g, dtype=dtype)
    y, grads = R.grads_of(m, x, params_of(m), dy)
    with on_path(path):
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
@pytest.mark.parametrize("path", PATHS)
def test_linear_matches_cpu(shape, bias, dtype, path):
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
    with on_path(path):
        yc, gradsc = R.grads_of(lc, x.cuda(), [lc.get_parameter(n) for n in names], dy.cuda())
    check_close(yc, y, TOL[dtype], "y")
    for name, a, b_ in zip(["x"] + names, gradsc, grads):
        check_close(a, b_, TOL[dtype], f"d/d{name}")


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


# ----------------------------------------------------------------- modules move with .cuda()
def test_module_cuda_roundtrip_and_state_dict():
    m = make_ffn(48, 96, "gelu_tanh", 16, 20, seed=9, random_bias=True)
    mc = copy.deepcopy(m).cuda()
    assert mc.fc1.plan.is_cuda and mc.fc1.index.is_cuda
    x = torch.randn(5, 48)
    check_close(mc(x.cuda()), m(x), 1e-5, "module on CUDA")
    back = make_ffn(48, 96, "gelu_tanh", 16, 20, seed=10, random_bias=True)
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


def dct_half_limit(path, mode):
    """The DCT-domain paths round the transformed activations to the half dtype for the tensor
    cores, a rounding the dense module does not have: an emulation (float64, every rounding of the
    path) put their error at 1.6-1.8x the dense module's under autocast, 1.9-2.0x (bf16) and
    2.1-2.3x (fp16) with half parameters ("cast"), 256 -> 1024, b = 64, k = 300, 256 tokens."""
    # "few": the sparse kernel for the forward up to 128 tokens, but its backward is the dense DCT one
    if path != "decode" and mode == "cast":
        return pytest.mark.xfail(reason="DCT path, half parameters: emulated error 1.9-2.0x (bf16), 2.1-2.3x "
                                 "(fp16) dense's", strict=False)
    return ()


HALF_CASES = [pytest.param(d, m, p, t, marks=dct_half_limit(p, m),
                           id=f"{p}-{m}-{'bf16' if d == torch.bfloat16 else 'f16'}-{t}")
              for t in (256, 8) for d in (torch.bfloat16, torch.float16) for m in ("cast", "autocast") for p in PATHS]


@pytest.mark.parametrize("dtype,mode,path,tokens", HALF_CASES)
def test_half_error_within_twice_dense(dtype, mode, path, tokens):
    """At 256 tokens every path multiplies densely ("few" too: its threshold is 128); at 8 tokens
    "few" runs the few-token kernel on half coefficients."""
    m = make_ffn(256, 1024, "gelu", 64, 300, seed=11, random_bias=True).cuda()
    dense = dense_twin(m)
    x = torch.randn(tokens // 64 or 1, min(tokens, 64), 256, device="cuda")
    dy = torch.randn_like(x)
    y_ref, gx_ref = forward_and_input_grad(dense, x, dy)
    y_rbe32, _ = forward_and_input_grad(m, x, dy)
    assert R.rel_err(y_rbe32, y_ref) < 1e-5  # the two float32 models are the same function
    if mode == "cast":
        md, dd = copy.deepcopy(m).to(dtype), copy.deepcopy(dense).to(dtype)
        with on_path(path):
            y_r, gx_r = forward_and_input_grad(md, x.to(dtype), dy)
        y_d, gx_d = forward_and_input_grad(dd, x.to(dtype), dy)
        assert md.fc1.coeffs.dtype == dtype
    else:
        with torch.autocast("cuda", dtype=dtype):
            with on_path(path):
                y_r, gx_r = forward_and_input_grad(m, x, dy)
            y_d, gx_d = forward_and_input_grad(dense, x, dy)
            assert m(x).dtype == dtype
    e_r, e_d = R.rel_err(y_r, y_ref), R.rel_err(y_d, y_ref)
    ge_r, ge_d = R.rel_err(gx_r, gx_ref), R.rel_err(gx_d, gx_ref)
    print(f"{dtype} {mode}: forward error RBE {e_r:.3g} dense {e_d:.3g}; input grad RBE {ge_r:.3g} dense {ge_d:.3g}")
    assert 0 < e_d < 0.05 and e_r <= 2 * e_d, (e_r, e_d)
    assert 0 < ge_d < 0.05 and ge_r <= 2 * ge_d, (ge_r, ge_d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("path", PATHS)
def test_half_parameter_grads(dtype, path):
    """Parameter gradients in half precision against float32 ones, no worse than 2x the dense
    module's own half-precision weight-gradient error (float32 master weights, autocast)."""
    m = make_ffn(128, 512, "silu", 32, 200, seed=12, random_bias=True).cuda()
    dense = dense_twin(m)
    x = torch.randn(256, 128, device="cuda")

    def grads(model, names):
        model.zero_grad()
        model(x).float().pow(2).mean().backward()
        return [model.get_parameter(n).grad.clone() for n in names]

    rn, dn = ["fc1.coeffs", "fc2.coeffs", "fc1.basis"], ["0.weight", "2.weight"]
    r32, d32 = grads(m, rn), grads(dense, dn)
    with torch.autocast("cuda", dtype=dtype):
        with on_path(path):
            r16 = grads(m, rn)
        d16 = grads(dense, dn)
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


# ----------------------------------------------------------------- bad input
def test_bad_input_cuda():
    """Device mismatches and dtypes only the CUDA kernels take (a corrupted index on CUDA is
    test_bad_input.py's test_corrupted_index_names_block_and_slot[cuda])."""
    m = make_ffn(16, 40, "gelu", 8, 5, random_bias=True).cuda()
    x = torch.randn(3, 16, device="cuda")
    with pytest.raises(ValueError, match="input is on cpu but the layer is on cuda"):
        m(torch.randn(3, 16))  # forgot x.cuda()
    lin = rbe_ffn.RBELinear(16, 40, block_size=8, k=5)
    with pytest.raises(ValueError, match="device"):
        ops.linear(x, lin.plan.cuda(), lin.basis, lin.coeffs, lin.index, None, 16, 40)
    with pytest.raises(TypeError, match="only the CUDA linear"):
        lin.to(torch.bfloat16)(torch.randn(3, 16, dtype=torch.bfloat16))
    with pytest.raises((TypeError, ValueError), match="dtype"):
        lin.cuda()(torch.randn(3, 16, device="cuda", dtype=torch.float64))
    torch.cuda.synchronize()  # nothing asynchronous went wrong either


# ----------------------------------------------------------------- no host synchronisation; CUDA graphs
@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def step(m, x, dy):
    """forward and backward of sum(m(x) * dy)"""
    (m(x) * dy).sum().backward()


@pytest.mark.parametrize("path", PATHS)
def test_unchanged_weights_do_not_synchronise(path):
    """The index is validated once per version: after a first call, forward and backward on the
    same weights run without a host synchronisation; an in-place write to the index makes the
    next call validate it again (which synchronises)."""
    m = make_ffn(64, 256, "gelu", 16, 40, seed=13, random_bias=True).cuda()
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    dy = torch.randn(32, 64, device="cuda")
    with on_path(path):
        step(m, x, dy)
        torch.cuda.synchronize()
        with syncs_are_errors():
            step(m, x, dy)
        with torch.no_grad():
            m.fc1.index.copy_(m.fc1.index.clone())  # same values, new version
        with syncs_are_errors(), pytest.raises(RuntimeError, match="synchroniz"):
            m(x)
        m(x)  # validated again, outside the check
        with syncs_are_errors():
            m(x)


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_training_step_captured_in_a_cuda_graph(path, checkpoint):
    """A forward and a training step (forward, backward) captured in CUDA graphs and replayed on
    new inputs give what eager calls give on those inputs."""
    m = make_ffn(64, 256, "silu", 16, 40, seed=14, random_bias=True, checkpoint=checkpoint).cuda()
    params = params_of(m)
    sx = torch.randn(32, 64, device="cuda", requires_grad=True)
    sdy = torch.randn(32, 64, device="cuda")
    with on_path(path):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (validates the indexes) on a side stream, as torch's docs do
            for _ in range(2):
                m.zero_grad(set_to_none=True)
                sx.grad = None
                step(m, sx, sdy)
        torch.cuda.current_stream().wait_stream(side)
        fwd = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(fwd):
            sy = m(sx)
        m.zero_grad(set_to_none=True)
        sx.grad = None
        train = torch.cuda.CUDAGraph()
        with torch.cuda.graph(train):
            step(m, sx, sdy)
        for seed in (1, 2):
            g = torch.Generator(device="cuda").manual_seed(seed)
            x = torch.randn(32, 64, device="cuda", generator=g)
            dy = torch.randn(32, 64, device="cuda", generator=g)
            with torch.no_grad():
                sx.copy_(x)
                sdy.copy_(dy)
            fwd.replay()
            train.replay()
            got = [sy.clone(), sx.grad.clone()] + [p.grad.clone() for p in params]
            xe = x.clone().requires_grad_()
            want_params = R.grads_of(m, xe, params, dy)
            want = [want_params[0]] + list(want_params[1])
            for a, b in zip(got, want):
                check_close(a, b, 1e-6, f"replay {seed}")


@pytest.mark.parametrize("path", PATHS)
def test_index_written_behind_the_version_counter_stays_memory_safe(path):
    """Writes through .data bypass the version counter, so the index is not validated again: the
    result is then wrong, but nothing is read or written out of bounds (run under
    compute-sanitizer by bench/gpu_check.sh)."""
    m = make_ffn(64, 256, "gelu", 16, 40, seed=15, random_bias=True).cuda()
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    with on_path(path):
        step(m, x, torch.ones(8, 64, device="cuda"))
        m.fc1.index.data[0] = 30000  # outside [0, 256), the version unchanged
        m.fc2.index.data[1] = -7
        step(m, x, torch.ones(8, 64, device="cuda"))
        torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("path", PATHS)
def test_inference_mode(path):
    """Under torch.inference_mode a module's index views keep the buffer's version counter: calls
    on unchanged weights do not synchronise, a corrupted index is still caught. A module built
    inside inference mode holds inference tensors (no version counter): validated at every call."""
    m = make_ffn(64, 256, "gelu", 16, 40, seed=16, random_bias=True).cuda()
    x = torch.randn(8, 64, device="cuda")
    with on_path(path):
        with torch.no_grad():
            want = m(x)
        with torch.inference_mode():
            check_close(m(x), want, 1e-6, "inference_mode")
            with syncs_are_errors():
                m(x)
        with torch.inference_mode():
            mi = copy.deepcopy(m)
            assert mi.fc1.index_bytes.is_inference()
            check_close(mi(x), want, 1e-6, "module built in inference mode")
            with syncs_are_errors(), pytest.raises(RuntimeError, match="synchroniz"):
                mi(x)
        with torch.no_grad():
            m.fc1.index[1, 0] = -1
        with torch.inference_mode(), pytest.raises(IndexError, match="fc1: index is corrupted at block 1, slot 0"):
            m(x)


def test_dct_tables_are_not_built_inside_a_capture():
    """The DCT path's tables of a (block size, dtype) are copied to the device at their first call,
    which a capture forbids: a first call inside one raises a clear error."""
    m = make_ffn(48, 96, "gelu", 24, 30, dtype=torch.float64, seed=17, random_bias=True).cuda()
    x = torch.randn(8, 48, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        m(x)  # validates the indexes (decode path); no other test uses block size 24
        with rbe_ffn.dct_path():
            graph = torch.cuda.CUDAGraph()
            with pytest.raises(RuntimeError, match="tables for block size 24"):
                with torch.cuda.graph(graph):
                    m(x)
