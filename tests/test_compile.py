"""torch.compile(fullgraph=True) traces the RBE operators (fake kernels + autograd
registered in Python) without a graph break, and forward and backward match eager.
Shapes are tiny: compiling dominates the time."""
import pytest
import torch

import rbe_ffn

import ffn_reference as R
from conftest import check_close, make_ffn, params_of


def run(fn, m, x, dy):
    params = [m.get_parameter(n) for n in R.PARAM_NAMES]
    return R.grads_of(fn, x, params, dy)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["standard", "checkpoint", "chunked_checkpoint"])
def test_compile_fullgraph_matches_eager(variant):
    m = make_ffn(checkpoint=variant != "standard", memory_limit_mb=0.003 if variant.startswith("chunked") else None)
    if variant.startswith("chunked"):
        assert 0 < m.chunk_tokens() < 6
    x = torch.randn(2, 3, 10)
    dy = torch.randn_like(x)
    y, g = run(m, m, x, dy)
    cm = torch.compile(m, fullgraph=True)
    yc, gc = run(cm, m, x, dy)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a second call reuses the graph and still agrees
    yc2, _ = run(cm, m, x * 2, dy)
    torch.testing.assert_close(yc2, m(x * 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_compile_fullgraph_gradients_within_1e6(checkpoint, device):
    """A wider block (32 -> 80, b = 16, non-zero biases): compiled y and all 7 gradients within
    1e-6 (relative, norm-wise) of eager."""
    torch._dynamo.reset()
    m = make_ffn(32, 80, "gelu", 16, 20, seed=13, checkpoint=checkpoint, random_bias=True).to(device)
    x = torch.randn(4, 7, 32, device=device)
    dy = torch.randn_like(x)
    y, g = R.grads_of(m, x, params_of(m), dy)
    cm = torch.compile(m, fullgraph=True)
    yc, gc = R.grads_of(cm, x, params_of(m), dy)
    check_close(yc, y, 1e-6, "compiled forward")
    for a, b in zip(gc, g):
        check_close(a, b, 1e-6, "compiled grad")
    torch._dynamo.reset()


def test_compile_linear():
    """RBELinear alone (torch.ops.rbe_ffn.linear and its backward) under fullgraph compile.
    (No pointwise ops around it: those would make inductor build C++ kernels, which is slow.)"""
    lin = rbe_ffn.RBELinear(12, 20, block_size=8, k=6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lin.basis.normal_(0, 0.1)
    x = torch.randn(3, 5, 12, requires_grad=True)
    dy = torch.randn(3, 5, 20)
    params = [x, lin.basis, lin.coeffs, lin.bias]
    y = lin(x)
    g = torch.autograd.grad(y, params, dy)
    cl = torch.compile(lin, fullgraph=True)
    yc = cl(x)
    gc = torch.autograd.grad(yc, params, dy)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_compiled_saved_tensors(checkpoint):
    """The compiled graph keeps the memory contract: checkpointed saves only the input,
    standard saves the input, act'(pre-activation) ([T, d_ff], or in tiles: one tile of 64 tokens,
    ceil(37 / 8) segments of b rows) and fc2's analysed input (ceil(37 / 8) segments of b + nf rows),
    module tensors excluded."""
    m = make_ffn(checkpoint=checkpoint)
    x = torch.randn(4, 7, 10, requires_grad=True)
    cm = torch.compile(m, fullgraph=True)
    cm(x)  # compile outside the hooks
    own = {t.data_ptr() for t in list(m.parameters()) + list(m.buffers()) + [m.fc1.plan, m.fc2.plan]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = cm(x)
    extra = sum(t.numel() * t.element_size() for t in saved if t.numel() and t.data_ptr() not in own)
    assert rbe_ffn._C.ffn_saves_hidden(28, m.chunk_tokens(), "gelu")
    pre = 64 * 5 * 8 * 4 if rbe_ffn._C.ffn_pre_in_tiles(True, False) else 28 * 37 * 4
    assert extra == x.numel() * 4 + (0 if checkpoint else pre + 64 * 5 * m.fc1.plan.shape[1] * 4)
    y.sum().backward()


def test_dynamic_shapes_one_graph_per_side_of_the_few_token_bound():
    """With dynamic shapes, one compiled graph serves every token count above the few-token bound
    (where the standard block keeps fc2's analysed input, whose shape follows the token count) and
    one every count at or below it: the fake kernel compares the symbolic count, it does not fix it."""
    from torch._dynamo.utils import counters
    m = make_ffn(32, 80, "gelu", 16, 20, random_bias=True)
    cm = torch.compile(m, fullgraph=True, dynamic=True)
    counters.clear()
    for i, tokens in enumerate((100, 140, 200, 5, 7, 70)):
        x = torch.randn(tokens, 32)
        dy = torch.randn_like(x)
        y, g = run(m, m, x, dy)
        yc, gc = run(cm, m, x, dy)
        torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
        for a, b in zip(gc, g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == (1 if i < 3 else 2), tokens
