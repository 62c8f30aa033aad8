"""Bad input gives a clear exception, never a crash or a silent wrong answer; the
edge cases that are valid (no tokens, NaN) behave like the dense module."""
import copy

import pytest
import torch
import torch.nn.functional as F

import rbe_ffn

import ffn_reference as R
from conftest import ACTS, make_ffn, make_linear, make_small_ffn

ops = torch.ops.rbe_ffn


# ----------------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("shape", [(2, 3, 9), (4, 11), (16,), (3, 16), (2, 1)],
                         ids=["9_same_blocks", "11", "16_1d", "16_two_blocks", "1"])
def test_wrong_last_dimension(shape):
    m = make_small_ffn()
    with pytest.raises(ValueError, match="last dimension 10"):
        m(torch.randn(*shape))
    with pytest.raises(ValueError, match="last dimension 10"):
        m.fc1(torch.randn(*shape))
    with pytest.raises(ValueError, match="last dimension 10"):
        m(torch.tensor(1.0))  # 0-d


# (float16 / bfloat16 inputs to a float32 layer are computed in float32: tests/test_cpu_half.py)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.complex64])
def test_non_float_input(dtype):
    m = make_small_ffn()
    x = torch.ones(3, 10).to(dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        m(x)
    with pytest.raises(TypeError, match="float32 or float64"):
        m.fc1(x)
    with pytest.raises(TypeError, match="float32 or float64"):
        rbe_ffn.rbe_feed_forward(x, (m.fc1.basis, m.fc1.coeffs, m.fc1.index, m.fc1.bias),
                                 (m.fc2.basis, m.fc2.coeffs, m.fc2.index, m.fc2.bias), 10, 37, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_says_cuda_only(dtype):
    m = make_small_ffn().to(dtype)  # a consistent half-precision module: its dtype is not the problem, the CPU is
    with pytest.raises(TypeError, match="float32 or float64.*only the CUDA"):
        m(torch.ones(3, 10, dtype=dtype))


@pytest.mark.parametrize("module", ["ffn", "linear"])
def test_input_on_another_device_than_the_layer(module):
    # a layer on the meta device stands in for a CUDA layer given a CPU input (no GPU here)
    m = rbe_ffn.RBEFeedForward(10, 37, block_size=8, k=5, device="meta")
    layer = m if module == "ffn" else m.fc1
    with pytest.raises(ValueError, match="input is on cpu but the layer is on meta"):
        layer(torch.ones(3, 10))


def test_mixed_dtypes():
    m = make_small_ffn()  # float32
    with pytest.raises(TypeError, match=r"input dtype torch.float64 does not match the layer's dtype torch.float32"):
        m(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        m.fc1(torch.randn(3, 10, dtype=torch.float64))
    md = make_small_ffn(dtype=torch.float64)
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        md(torch.randn(3, 10))
    # the operators themselves (functional path: the plan follows x, the weights do not)
    x = torch.randn(3, 10, dtype=torch.float64)
    with pytest.raises(TypeError, match="basis and coeffs must have the input's dtype"):
        rbe_ffn.rbe_linear(x, m.fc1.basis, m.fc1.coeffs, m.fc1.index, None, 10, 37, 8)
    with pytest.raises(TypeError, match="bias must have the input's dtype"):
        rbe_ffn.rbe_linear(x, md.fc1.basis, md.fc1.coeffs, md.fc1.index, m.fc1.bias, 10, 37, 8)
    with pytest.raises(TypeError, match="plan must have the input's dtype"):
        ops.linear(x, m.fc1.plan, md.fc1.basis, md.fc1.coeffs, md.fc1.index, None, 10, 37)
    # a module half converted
    mixed = make_small_ffn()
    mixed.fc2.double()
    with pytest.raises(TypeError, match="fc2: basis and coeffs must have the input's dtype"):
        mixed(torch.randn(3, 10))


# ----------------------------------------------------------------- corrupted index
def corrupt(kind):
    def f(lin):
        idx = lin.index
        if kind == "out_of_range":
            idx[1, -1] = 64  # b*b at b=8
        elif kind == "negative":
            idx[2, 0] = -1
        elif kind == "duplicate":
            idx[3, 2] = idx[3, 1]
        elif kind == "unsorted":
            idx[4] = idx[4].flip(0)
        elif kind == "large":
            idx[0, -1] = 30000
    return f


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
@pytest.mark.parametrize("kind", ["out_of_range", "negative", "duplicate", "unsorted", "large"])
def test_corrupted_index(kind, layer):
    m = make_small_ffn()
    x = torch.randn(2, 3, 10, requires_grad=True)
    with torch.no_grad():
        corrupt(kind)(getattr(m, layer))
    with pytest.raises(IndexError, match=f"{layer}: index is corrupted"):
        m(x)
    m.checkpoint = True
    with pytest.raises(IndexError, match="index is corrupted"):
        m(x)
    lin = getattr(m, layer)
    with pytest.raises(IndexError, match="index is corrupted"):
        lin(torch.randn(3, lin.in_features))
    with pytest.raises(IndexError, match="index is corrupted"):
        lin.dense_weight()


def test_corrupted_index_names_block_and_slot(device):
    """The error says which layer, block and slot; out-of-range positions are caught; a NaN
    weight is refused by encode. On every device."""
    m = make_ffn(16, 40, "gelu", 8, 5, random_bias=True).to(device)
    x = torch.randn(3, 16, device=device)
    with torch.no_grad():
        m.fc1.index[2, 1] = m.fc1.index[2, 0]  # duplicate position
    with pytest.raises(IndexError, match="fc1: index is corrupted at block 2, slot 1"):
        m(x)
    with torch.no_grad():
        m.fc1.index[2, 1] = 64 * 64  # out of range (b = 8)
    with pytest.raises(IndexError, match="index is corrupted"):
        m(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.encode(torch.full((8, 8), float("nan"), device=device), 8, 3)
    if device == "cuda":
        torch.cuda.synchronize()  # nothing asynchronous went wrong either


def test_index_corrupted_between_forward_and_backward():
    """Changing the index in place after forward is caught (autograd's version counter),
    and the backward operator checks the index itself too."""
    m = make_small_ffn()
    x = torch.randn(5, 10, requires_grad=True)
    y = m(x)
    with torch.no_grad():
        m.fc1.index[0, 0] = 64
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    f1, f2 = m.fc1, m.fc2
    with pytest.raises(IndexError, match="fc1: index is corrupted"):
        ops.ffn_backward(torch.ones(5, 10), x.detach(), torch.zeros(5, 37), torch.empty(0), f1.plan, f1.basis.detach(),
                         f1.coeffs.detach(), f1.index, f1.bias.detach(), f2.basis.detach(), f2.coeffs.detach(),
                         f2.index, 10, 37, "gelu", 0, [True] * 7)
    with pytest.raises(IndexError, match="index is corrupted"):
        ops.linear_backward(torch.ones(5, 37), x.detach(), f1.plan, f1.basis.detach(), f1.coeffs.detach(), f1.index,
                            10, 37, [True] * 4)


def ffn_with_index(m, x, index1=None, index2=None):
    """The ffn operator on m's weights, with other index tensors than m's own (the module
    keeps its index as bytes and checks what is assigned to it, so the operator's own checks
    are reached this way)."""
    f1, f2 = m.fc1, m.fc2
    i1 = f1.index if index1 is None else index1
    i2 = f2.index if index2 is None else index2
    y, _, _ = ops.ffn(x, f1.plan, f1.basis, f1.coeffs, i1, f1.bias, f2.basis, f2.coeffs, i2, f2.bias, m.d_model,
                      m.d_ff, m.activation, 0, True)
    return y


def test_index_wrong_dtype_and_shape():
    m = make_small_ffn()
    x = torch.randn(4, 10)
    for bad, err, pattern in [
        (m.fc2.index.long(), TypeError, "fc2: index must be int16 or int32, got Long"),
        (m.fc2.index.float(), TypeError, "index must be int16 or int32"),
        (m.fc2.index.to(torch.uint8), TypeError, "index must be int16 or int32"),
        (m.fc2.index[:, :4].contiguous(), ValueError, "fc2: index must have the shape of coeffs"),
        (m.fc2.index[:-1].contiguous(), ValueError, "index must have the shape of coeffs"),
        (m.fc2.index.reshape(-1), ValueError, "index must have the shape of coeffs"),
    ]:
        with pytest.raises(err, match=pattern):
            ffn_with_index(m, x, index2=bad)
    # int32 where int16 is the default: accepted, same answer
    assert torch.equal(ffn_with_index(m, x, index1=m.fc1.index.int()), m(x))


def test_index_assignment_is_checked():
    m = make_small_ffn()
    x = torch.randn(4, 10)
    for bad, err, pattern in [
        (m.fc2.index.float(), TypeError, "RBELinear.index: dtype torch.float32 is not an integer dtype"),
        (m.fc2.index[:, :4], ValueError, r"RBELinear.index must have shape \(10, 5\), got \(10, 4\)"),
        (m.fc2.index.reshape(-1), ValueError, "RBELinear.index must have shape"),
        (m.fc2.index.flip(1), ValueError, "unsorted positions in row 0"),
        (m.fc2.index.tolist(), TypeError, "RBELinear.index must be a tensor, got list"),
    ]:
        mm = copy.deepcopy(m)
        with pytest.raises(err, match=pattern):
            mm.fc2.index = bad
        assert torch.equal(mm.fc2.index, m.fc2.index)  # unchanged
    # a valid index of another integer dtype is copied in (as int16): same answer
    mm = copy.deepcopy(m)
    mm.fc1.index = m.fc1.index.long()
    assert mm.fc1.index.dtype == torch.int16 and torch.equal(mm(x), m(x))
    # a new index changes the layer
    mm.fc1.index = torch.arange(5, dtype=torch.int16).expand_as(m.fc1.index)
    assert not torch.equal(mm(x), m(x)) and torch.equal(mm.fc1.index[3], torch.arange(5, dtype=torch.int16))


def test_non_contiguous_index_is_read_correctly():
    m = make_small_ffn()
    x = torch.randn(4, 10)
    wide = torch.zeros(m.fc1.index.shape[0], 2 * m.fc1.index.shape[1], dtype=m.fc1.index.dtype)
    wide[:, ::2] = m.fc1.index
    assert not wide[:, ::2].is_contiguous()
    assert torch.equal(ffn_with_index(m, x, index1=wide[:, ::2]), m(x))


# ----------------------------------------------------------------- k / block size mismatches
def test_state_dict_from_other_k_or_block_size():
    m = make_small_ffn()
    for other in (rbe_ffn.RBEFeedForward(10, 37, "gelu", block_size=8, k=6),
                  rbe_ffn.RBEFeedForward(10, 37, "gelu", block_size=16, k=5),
                  rbe_ffn.RBEFeedForward(10, 36, "gelu", block_size=8, k=5)):
        with pytest.raises(RuntimeError, match="size mismatch"):
            m.load_state_dict(other.state_dict())


def test_tensors_of_another_k_or_block_size():
    m = make_small_ffn()
    x = torch.randn(3, 10)
    mm = copy.deepcopy(m)
    mm.fc1.coeffs = torch.nn.Parameter(torch.zeros(m.fc1.coeffs.shape[0], 6))  # k=6 values, k=5 positions
    with pytest.raises(ValueError, match="fc1: index must have the shape of coeffs"):
        mm(x)
    mm = copy.deepcopy(m)
    mm.fc1.basis = torch.nn.Parameter(torch.zeros(4, 8))  # the block count of another block size
    with pytest.raises(ValueError, match=r"fc1: basis must be \[10, 8\]"):
        mm(x)
    # a plan of another block size does not fit the weights
    with pytest.raises(ValueError, match="basis must be"):
        ops.linear(x, rbe_ffn.get_plan(16, torch.float32, "cpu"), m.fc1.basis, m.fc1.coeffs, m.fc1.index, None, 10, 37)
    # k larger than b*b
    with pytest.raises(ValueError, match="k <= 64"):
        ops.linear(x, m.fc1.plan, m.fc1.basis, torch.zeros(10, 65), torch.zeros(10, 65, dtype=torch.int16), None,
                   10, 37)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="block_size"):
        rbe_ffn.RBELinear(10, 10, block_size=3)
    with pytest.raises(ValueError, match="block_size"):
        rbe_ffn.RBELinear(10, 10, block_size=257)
    with pytest.raises(ValueError, match="k must be"):
        rbe_ffn.RBELinear(10, 10, block_size=8, k=65)
    with pytest.raises(ValueError, match="k must be"):
        rbe_ffn.RBELinear(10, 10, block_size=8, k=-1)
    with pytest.raises(ValueError, match="in_features"):
        rbe_ffn.RBELinear(0, 10, block_size=8, k=5)
    with pytest.raises(ValueError, match="out_features"):
        rbe_ffn.RBELinear(10, 2.5, block_size=8, k=5)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="memory_limit_mb"):
            rbe_ffn.RBEFeedForward(10, 37, block_size=8, k=5, memory_limit_mb=bad)


def test_bad_operator_arguments():
    m = make_small_ffn()
    x = torch.randn(3, 10)
    f1, f2 = m.fc1, m.fc2
    args = [x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, f2.bias, 10, 37,
            "gelu", 0, True]
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        ops.ffn(*args[:12], "tanh", 0, True)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 0"):
        ops.ffn(*args[:13], -1, True)
    with pytest.raises(ValueError, match="fc1.bias must be"):
        ops.ffn(*args[:5], torch.zeros(36), *args[6:])
    with pytest.raises(ValueError, match="plan must be"):
        ops.ffn(x, f1.plan[0], *args[2:])
    with torch.no_grad():
        y, pre, hidden = ops.ffn(*args)
    with pytest.raises(ValueError, match="grad must match"):
        ops.ffn_backward(torch.randn(4, 10), x, pre, hidden, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis,
                         f2.coeffs, f2.index, 10, 37, "gelu", 0, [True] * 7)
    with pytest.raises(ValueError, match="pre-activation"):
        ops.ffn_backward(torch.randn(3, 10), x, pre[:2], hidden, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias,
                         f2.basis, f2.coeffs, f2.index, 10, 37, "gelu", 0, [True] * 7)


def test_bad_saved_hidden():
    """ffn_backward takes `hidden` only as ffn returned it: with its pre, in its shape, for a call
    that saves one; a mismatch is refused before any kernel reads it. What the forward saved
    decides the backward: switching the DCT-domain path on in between changes nothing."""
    m = make_small_ffn()
    f1, f2 = m.fc1, m.fc2
    x, dy = torch.randn(130, 10), torch.randn(130, 10)
    args = [x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, f2.bias, 10, 37,
            "gelu", 0, True]
    with torch.no_grad():
        y, pre, hidden = ops.ffn(*args)
    assert hidden.numel() > 0

    def backward(pre, hidden, chunk=0, activation="gelu"):
        return ops.ffn_backward(dy, x, pre, hidden, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis,
                                f2.coeffs, f2.index, 10, 37, activation, chunk, [True] * 7)

    want = backward(pre, hidden)  # as returned: accepted
    with rbe_ffn.dct_path():
        assert all(torch.equal(a, b) for a, b in zip(backward(pre, hidden), want))
    with pytest.raises(ValueError, match="without its pre"):
        backward(torch.empty(0), hidden)
    if pre.dim() == 4:  # act'(h) in tiles (ffn_pre_in_tiles: float32 on the x86 kernels)
        for bad in (pre.double(), pre[:2], pre.transpose(2, 3).contiguous().transpose(2, 3)):
            with pytest.raises(ValueError, match=r"saved act'\(h\) in tiles must be"):
                backward(bad, hidden)
    else:
        with pytest.raises(ValueError, match="saved pre-activation has 130 tokens of Double"):
            backward(pre.double(), hidden)
    with pytest.raises(ValueError, match="saved hidden input must be"):
        backward(pre, hidden[:2])
    with pytest.raises(ValueError, match="saved hidden input must be"):
        backward(pre, hidden.double())
    with pytest.raises(ValueError, match="saved hidden input must be"):
        backward(pre, hidden.transpose(2, 3).contiguous().transpose(2, 3))  # its shape, not contiguous
    with pytest.raises(ValueError, match="does not save"):
        backward(pre, hidden, chunk=100)  # chunks of 100 tokens keep h instead
    with pytest.raises(ValueError, match="does not save"):
        backward(pre, hidden, activation="relu")  # relu keeps h


def test_plan_with_asymmetric_pattern_rows():
    # the CPU kernels project the half sums x[n] + x[b-1-n] on the pattern rows, which the plans
    # rbe_ffn builds make mirror-symmetric; a plan that is not is refused, in either dtype
    for dtype in (torch.float32, torch.float64):
        m = make_small_ffn().to(dtype)
        f1, f2 = m.fc1, m.fc2
        x = torch.randn(3, 10, dtype=dtype)
        for slab in (0, 1):
            plan = f1.plan.clone()
            plan[slab, 8 + 5, 0] += 1e-3  # a pattern row (b = 8)
            with pytest.raises(ValueError, match="mirror-symmetric"):
                ops.linear(x, plan, f1.basis, f1.coeffs, f1.index, f1.bias, 10, 37)
            with pytest.raises(ValueError, match="mirror-symmetric"), torch.no_grad():
                ops.ffn(x, plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, f2.bias, 10,
                        37, "gelu", 0, True)


# ----------------------------------------------------------------- no tokens
@pytest.mark.parametrize("variant", ["standard", "checkpoint", "chunked"])
@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10), (0, 3, 10)])
def test_zero_tokens(shape, variant):
    m = make_small_ffn(checkpoint=variant == "checkpoint", memory_limit_mb=0.001 if variant == "chunked" else None)
    x = torch.randn(*shape, requires_grad=True)
    y = m(x)
    assert y.shape == shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == shape
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, n
        assert torch.equal(p.grad, torch.zeros_like(p)), n
    m.zero_grad()
    lx = torch.randn(*shape, requires_grad=True)
    ly = m.fc1(lx)
    assert ly.shape == (*shape[:-1], 37)
    ly.sum().backward()
    for n, p in m.fc1.named_parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), n


# ----------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_nan_propagates_like_dense(activation, checkpoint):
    m = make_small_ffn(activation, checkpoint=checkpoint)
    x = torch.randn(2, 70, 10)  # 140 tokens: three token tiles
    x[0, 1, 3] = float("nan")
    x[1, 5, :] = float("nan")
    x.requires_grad_()
    y = m(x)
    y_dense = R.module_ffn(m, x)  # the dense FFN with the decoded weights
    # NaN in: NaN out, on exactly the tokens the dense module gives NaN, and nowhere else
    nan_tok = torch.isnan(y_dense).all(-1)
    assert nan_tok[0, 1] and nan_tok[1, 5]
    assert torch.equal(~torch.isfinite(y), ~torch.isfinite(y_dense))
    assert (~torch.isfinite(y)).any(-1).nonzero().tolist() == [[0, 1], [1, 5]]
    fine = torch.isfinite(y).all(-1)
    assert R.rel_err(y[fine], y_dense[fine]) < 1e-5
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_dense,) = torch.autograd.grad(y_dense.sum(), x)
    assert torch.equal(torch.isfinite(gx).all(-1), torch.isfinite(gx_dense).all(-1))
    assert R.rel_err(gx[fine], gx_dense[fine]) < 1e-5


@pytest.mark.parametrize("checkpoint", [False, True])
def test_infinite_input_raises(checkpoint):
    # the DCT would turn +-inf into NaN over its segment where a dense layer gives +-inf: refuse
    m = make_small_ffn(checkpoint=checkpoint)
    lin = rbe_ffn.RBELinear(10, 12, block_size=4, k=6)
    for sign in (1.0, -1.0):
        x = torch.randn(3, 10)
        x[1, 7] = sign * float("inf")
        for layer in (m, lin):
            with pytest.raises(ValueError, match="input has infinite values"):
                layer(x)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_infinite_upstream_gradient_propagates(checkpoint):
    # a loss scaler's overflowed gradient must come back non-finite (so the step is skipped), not raise
    m = make_small_ffn(checkpoint=checkpoint)
    x = torch.randn(3, 10, requires_grad=True)
    g = torch.ones(3, 10)
    g[1, 2] = float("inf")
    m(x).backward(g)
    assert not torch.isfinite(x.grad).all() and not torch.isfinite(m.fc2.coeffs.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_finite_input_raises_or_matches_dense(dtype):
    # near the type's maximum the transforms would overflow where the dense product does not:
    # a clear error, never a silent non-finite output; below the limit, the dense result
    big = torch.finfo(dtype).max / 4
    lin = rbe_ffn.RBELinear(16, 8, block_size=8, k=20, dtype=dtype)
    x = torch.randn(5, 16, dtype=dtype)
    with pytest.raises(ValueError, match="beyond what the .* transform-domain kernels take"):
        lin(x * big / x.abs().max())
    m = make_small_ffn(dtype=dtype)
    with pytest.raises(ValueError, match="beyond what the"):
        m(torch.full((2, 10), big, dtype=dtype))
    # a large but admissible input: finite, and the dense product's value
    scale = torch.finfo(dtype).max / 1e6 / 16 / 8
    xs = x * scale
    y = lin(xs)
    assert torch.isfinite(y).all()
    ref = xs @ lin.dense_weight().T + lin.bias
    assert R.rel_err(y / scale, ref / scale) < (1e-5 if dtype == torch.float32 else 1e-12)  # (norms of y overflow)


def test_overflow_inside_the_block_raises():
    # finite, admissible inputs whose product overflows float32 (dense would give inf): a clear error
    lin = rbe_ffn.RBELinear(16, 8, block_size=8, k=20)
    with torch.no_grad():
        lin.coeffs.fill_(1e30)
    with pytest.raises(ValueError, match="overflowed float32"):
        lin(torch.full((2, 16), 1e30))


def test_nan_in_parameters_propagates():
    m = make_small_ffn()
    x = torch.randn(3, 10)
    with torch.no_grad():
        m.fc2.coeffs[0, 0] = float("nan")
    y = m(x)
    assert torch.equal(torch.isnan(y), torch.isnan(R.module_ffn(m, x)))
    assert torch.isnan(y).any()


def test_corrupted_index_first_position_over_threads():
    """The index copy and its check run over ranges of blocks in torch's thread pool: with bad
    positions in several ranges (at 2 threads the first half and the second), the error names
    the first, at any thread count."""
    lin = make_linear(512, 512, block_size=16, k=200, seed=3)  # 1024 blocks: several ranges
    with torch.no_grad():
        lin.index[900, 5] = lin.index[900, 4]
        lin.index[700, 7] = -1
        lin.index[300, 3] = lin.index[300, 2]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with pytest.raises(IndexError, match="index is corrupted at block 300, slot 3"):
                lin(torch.randn(2, 512))
    finally:
        torch.set_num_threads(threads)
