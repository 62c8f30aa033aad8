"""float16/bfloat16 on the CPU: under torch.autocast("cpu") and as plain half inputs.

The CPU kernels compute in the layer's dtype (float32 here); a half input is cast up, the output
is given back in the input's half dtype (under autocast: in the autocast dtype, as nn.Linear's
output is), parameters and their gradients stay float32. The error against float32 must be no
worse than 2x the dense module's own bfloat16 error (issue #11).
"""
import contextlib

import pytest
import torch
from torch import nn

import rbe_ffn

ACTS = ["gelu", "gelu_tanh", "relu", "silu"]


def make(activation="gelu", checkpoint=False, seed=0):
    torch.manual_seed(seed)
    return rbe_ffn.RBEFeedForward(64, 160, activation=activation, block_size=16, k=60, checkpoint=checkpoint)


def dense_twin(m):
    """The dense module with the decoded weights of m (the same function in float32)."""
    act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(), "silu": nn.SiLU()}
    d = nn.Sequential(nn.Linear(m.d_model, m.d_ff), act[m.activation], nn.Linear(m.d_ff, m.d_model))
    with torch.no_grad():
        d[0].weight.copy_(m.fc1.dense_weight()), d[0].bias.copy_(m.fc1.bias)
        d[2].weight.copy_(m.fc2.dense_weight()), d[2].bias.copy_(m.fc2.bias)
    return d


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_autocast_bf16_trains_with_float32_parameters(activation, checkpoint):
    m = make(activation, checkpoint)
    dense = dense_twin(m)
    model = nn.Sequential(nn.Linear(32, 64), m, nn.Linear(64, 8))
    x = torch.randn(5, 7, 32)
    with torch.no_grad():
        ref = model(x)  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
        assert h.dtype == torch.bfloat16  # what the block receives from a dense layer under autocast
        y = m(h)
        assert y.dtype == torch.bfloat16  # what a dense block would hand on
        yd = dense(h)
        out = model[2](y)
    # error against float32 no worse than 2x the dense module's own bfloat16 error
    y32 = m(h.float())
    err_rbe, err_dense = rel(y, y32), rel(yd, dense(h.float()))
    assert err_rbe <= 2 * err_dense, (err_rbe, err_dense)
    assert rel(out, ref) < 0.05
    out.float().pow(2).sum().backward()
    for p in m.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    # the gradients match the float32 model's to bfloat16 accuracy
    g16 = [p.grad.clone() for p in m.parameters()]
    model.zero_grad()
    model(x).pow(2).sum().backward()
    for a, b in zip(g16, m.parameters()):
        assert rel(a, b.grad) < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_without_autocast(dtype):
    m = make()
    lin = m.fc1
    x = torch.randn(4, 64).to(dtype).requires_grad_()
    for layer, ref in ((m, m(x.detach().float())), (lin, lin(x.detach().float()))):
        y = layer(x)
        assert y.dtype == dtype  # back in the input's dtype
        assert rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)  # the output's rounding
        y.float().sum().backward()
        assert x.grad.dtype == dtype and all(p.grad.dtype == torch.float32 for p in layer.parameters())
        x.grad = None
        layer.zero_grad()


def test_functional_api_takes_half_inputs():
    m = make()
    f1 = (*m.fc1.numbers(), m.fc1.index, m.fc1.bias)  # the format numbers (parameters x scales)
    f2 = (*m.fc2.numbers(), m.fc2.index, m.fc2.bias)
    x = torch.randn(3, 64)
    y = rbe_ffn.rbe_feed_forward(x.bfloat16(), f1, f2, 64, 160, 16, "gelu")
    assert y.dtype == torch.bfloat16 and rel(y, m(x)) < 1e-2
    z = rbe_ffn.rbe_linear(x.half(), *f1, 64, 160, 16)
    assert z.dtype == torch.float16 and rel(z, m.fc1(x)) < 2e-3


def test_float64_layer_under_autocast_stays_float64():
    m = make().double()
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float64 and torch.equal(y, m(x))


# ---- the activation evaluated in float32 when the result is 16-bit (f32_activation) ----
class _Calls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the values of `flags` in every call of the operators `ops` (by name, op -> list)."""

    def __init__(self, ops=("rbe_ffn::ffn", "rbe_ffn::ffn_backward"), flags=("f32_activation", "bf16_sparse")):
        super().__init__()
        self.ops, self.flags, self.seen = ops, flags, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in self.ops:
            names = [a.name for a in func._schema.arguments]
            flags = tuple(bool(kwargs.get(f, args[names.index(f)] if len(args) > names.index(f) else False))
                          for f in self.flags)
            self.seen.setdefault(name, []).append(flags)
        return func(*args, **kwargs)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_16bit_results_evaluate_the_activation_in_float32(checkpoint):
    m = make(checkpoint=checkpoint)
    x = torch.randn(6, 64)

    def calls(fn):
        with _Calls() as rec:
            fn().float().sum().backward()
        return rec.seen

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = calls(lambda: m(x))
    plain_bf16 = calls(lambda: m(x.bfloat16().requires_grad_()))
    functional = calls(lambda: rbe_ffn.rbe_feed_forward(x.bfloat16().requires_grad_(),
                                                        (*m.fc1.numbers(), m.fc1.index, m.fc1.bias),
                                                        (*m.fc2.numbers(), m.fc2.index, m.fc2.bias), 64, 160, 16))
    plain_fp16 = calls(lambda: m(x.half().requires_grad_()))
    with torch.autocast("cpu", dtype=torch.float16):
        under_fp16_autocast = calls(lambda: m(x))
    float32 = calls(lambda: m(x))
    want = {"rbe_ffn::ffn": [(True, True)], "rbe_ffn::ffn_backward": [(True, True)]}
    assert under_autocast == want and plain_bf16 == want and functional == want
    # float16 keeps float32 sparse operands (bfloat16 ones would be coarser than the result)
    fp16 = {"rbe_ffn::ffn": [(True, False)], "rbe_ffn::ffn_backward": [(True, False)]}
    assert plain_fp16 == fp16 and under_fp16_autocast == fp16
    assert float32 == {"rbe_ffn::ffn": [(False, False)], "rbe_ffn::ffn_backward": [(False, False)]}


def _op_args(m, x, keep_pre):
    f1, f2 = m.fc1, m.fc2
    return (x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, f2.bias,
            m.d_model, m.d_ff, m.activation, 0, keep_pre)


@pytest.mark.parametrize("tokens", [3, 150])  # the few-token kernels, and tiles with schedules
@pytest.mark.parametrize("activation", ACTS)
def test_f32_activation_is_float32_close_and_changes_only_what_it_should(activation, tokens):
    from rbe_ffn._ops import ops
    m = make(activation)
    x = torch.randn(tokens, 64)
    g = torch.randn(tokens, 64)
    mask = [True] * 7
    results = {}
    for dtype in (torch.float32, torch.float64):
        mm = m.to(dtype)
        for keep_pre in (True, False):
            args = _op_args(mm, x.to(dtype), keep_pre)
            for flag in (False, True):
                y, pre, hidden = ops.ffn(*args, f32_activation=flag)
                grads = ops.ffn_backward(g.to(dtype), args[0], pre, hidden, *args[1:9], *args[10:14], mask,
                                         f32_activation=flag)
                results[dtype, keep_pre, flag] = (y, *grads)
    for keep_pre in (True, False):
        exact, fast = results[torch.float32, keep_pre, False], results[torch.float32, keep_pre, True]
        for a, b in zip(exact, fast):  # the activation's float32 error is about 1e-6 relative
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5 * a.abs().max().item())
        if activation == "relu":  # exact in float32 anyway: the flag changes nothing
            assert all(torch.equal(a, b) for a, b in zip(exact, fast))
        else:  # the flag reaches the kernels, forward and backward
            assert not torch.equal(exact[0], fast[0]) and not torch.equal(exact[1], fast[1])
        # float64 layers ignore it
        assert all(torch.equal(a, b) for a, b in zip(results[torch.float64, keep_pre, False],
                                                     results[torch.float64, keep_pre, True]))


# one tile (no schedule: float32 operands); three tiles, the last of 2 tokens; three full ones
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("tokens", [40, 130, 192])
def test_bf16_sparse_is_bfloat16_close(tokens, checkpoint):
    """bf16_sparse: the sparse products and the coefficient gradients on bfloat16 operands (AVX-512
    BF16 CPUs, calls of more than one tile). The forward and every gradient stay within bfloat16
    rounding of the float32 ones (the C tests check the kernels against the rounded operands to
    float32 accuracy; bench/bf16_error.py's test bounds the module's error by dense bf16's)."""
    from rbe_ffn import _C
    from rbe_ffn._ops import ops
    m = make()
    x, g = torch.randn(tokens, 64), torch.randn(tokens, 64)
    args = _op_args(m, x, not checkpoint)
    res = {}
    for flag in (False, True):
        y, pre, hidden = ops.ffn(*args, bf16_sparse=flag)
        res[flag] = (y, *ops.ffn_backward(g, x, pre, hidden, *args[1:9], *args[10:14], [True] * 7, bf16_sparse=flag))
    if not (_C.bf16_sparse() and tokens > 64):  # not on this CPU, or a single tile: float32 operands
        assert all(torch.equal(a, b) for a, b in zip(res[False], res[True]))
        return
    names = ["y", "dx", "dbasis1", "dcoeffs1", "dbias1", "dbasis2", "dcoeffs2", "dbias2"]
    for name, a, b in zip(names, res[False], res[True]):
        assert rel(b, a) < 2e-2, name
    assert not torch.equal(res[False][0], res[True][0]) and not torch.equal(res[False][3], res[True][3])
    if checkpoint:  # the recompute takes the flag as the forward did: the standard backward's results
        std_args = _op_args(m, x, True)
        y, pre, hidden = ops.ffn(*std_args, bf16_sparse=True)
        std = (y, *ops.ffn_backward(g, x, pre, hidden, *std_args[1:9], *std_args[10:14], [True] * 7, bf16_sparse=True))
        assert torch.equal(std[0], res[True][0])
        for name, a, b in zip(names[1:], std[1:], res[True][1:]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item(), msg=name)


@pytest.mark.parametrize("tokens", [40, 130])
def test_linear_takes_bf16_sparse_too(tokens):
    """RBELinear under bf16 autocast (or with a bfloat16 input) passes bf16_sparse to the linear
    operators; its output and gradients stay within bfloat16 rounding of float32."""
    from rbe_ffn import _C
    from rbe_ffn._ops import ops
    lin = make().fc1
    x = torch.randn(tokens, 64)

    def seen():
        return _Calls(("rbe_ffn::linear", "rbe_ffn::linear_backward"), ("bf16_sparse",))

    want = {"rbe_ffn::linear": [(True,)], "rbe_ffn::linear_backward": [(True,)]}
    for ctx, inp in ((lambda: torch.autocast("cpu", dtype=torch.bfloat16), x), (contextlib.nullcontext, x.bfloat16())):
        with seen() as rec:
            with ctx():
                y = lin(inp.clone().requires_grad_())
            y.float().sum().backward()
        assert rec.seen == want
    with seen() as rec:
        lin(x.clone().requires_grad_()).sum().backward()
    assert rec.seen == {"rbe_ffn::linear": [(False,)], "rbe_ffn::linear_backward": [(False,)]}
    g = torch.randn(tokens, 160)
    args = (x, lin.plan, lin.basis, lin.coeffs, lin.index, lin.bias, 64, 160)
    res = {flag: (ops.linear(*args, bf16_sparse=flag),
                  *ops.linear_backward(g, *args[:5], 64, 160, [True] * 4, bf16_sparse=flag)) for flag in (False, True)}
    if not (_C.bf16_sparse() and tokens > 64):
        assert all(torch.equal(a, b) for a, b in zip(res[False], res[True]))
        return
    for a, b in zip(res[False], res[True]):
        assert rel(b, a) < 2e-2
    # the forward rows, the input gradient's columns and the coefficient gradients all take it
    assert not any(torch.equal(res[False][i], res[True][i]) for i in (0, 1, 3))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_autocast_same_bits_at_any_thread_count(checkpoint):
    """Under bf16 autocast, where the CPU has AVX-512 BF16, the scheduled kernels take bfloat16
    operands and each thread rounds a source tile once for the items it takes
    (csrc/rbe_ops.cpp balanced_for; rbe.h, `rounded`). With 3 and 5 threads on this 2-core machine
    items change hands: the output and every gradient keep the bits of one thread."""
    torch.manual_seed(3)
    m = rbe_ffn.RBEFeedForward(96, 256, block_size=16, k=40, checkpoint=checkpoint)
    x = torch.randn(700, 96)  # six chunks of the default 128 tokens, several tiles each

    def run():
        xx = x.clone().requires_grad_(True)
        for p in m.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xx)
        y.float().pow(2).sum().backward()
        return [y, xx.grad] + [p.grad.clone() for p in m.parameters()]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = run()
        for n in (3, 5, 5):
            torch.set_num_threads(n)
            got = run()
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), n
    finally:
        torch.set_num_threads(threads)
