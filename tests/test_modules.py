"""RBELinear and RBEFeedForward as nn.Modules: parameters and buffers, fresh
initialization, conversion from nn.Linear, serialization, dtype moves, repr,
compression ratio, activation names and statistics."""
import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rbe_ffn

import ffn_reference as R


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randomize(m, seed=0):
    """Non-zero pattern coefficients (fresh init leaves basis at 0 when k > 0)."""
    g = gen(seed)
    with torch.no_grad():
        for lin in [mod for mod in m.modules() if isinstance(mod, rbe_ffn.RBELinear)]:
            lin.basis.normal_(0, 1 / math.sqrt(3 * lin.in_features), generator=g)
    return m


# ----------------------------------------------------------------- structure
def test_linear_parameters_and_buffers():
    lin = rbe_ffn.RBELinear(21, 37, bias=True, block_size=8, k=5)
    assert (lin.in_features, lin.out_features, lin.block_size, lin.k) == (21, 37, 8, 5)
    nblk = 5 * 3
    assert dict((n, tuple(p.shape)) for n, p in lin.named_parameters()) == {
        "basis": (nblk, 8), "coeffs": (nblk, 5), "bias": (37,)}
    buffers = dict(lin.named_buffers())
    assert set(buffers) == {"index"}  # the plan is the layer's own tensor, not a buffer (see RBELinear.plan)
    assert lin.plan.shape[0] == 3 and lin.plan.dtype == torch.float32
    assert buffers["index"].shape == (nblk, 5) and buffers["index"].dtype == torch.int16
    assert not buffers["index"].requires_grad
    assert set(lin.state_dict()) == {"basis", "coeffs", "bias", "index"}  # plan is not saved
    assert rbe_ffn.RBELinear(300, 10, block_size=130, k=3).index.dtype == torch.int32

    nob = rbe_ffn.RBELinear(21, 37, bias=False, block_size=8, k=5)
    assert nob.bias is None and set(nob.state_dict()) == {"basis", "coeffs", "index"}
    randomize(nob)
    x = torch.randn(4, 21)
    torch.testing.assert_close(nob(x), x @ nob.dense_weight().T, rtol=1e-5, atol=1e-5)


def test_ffn_structure():
    m = rbe_ffn.RBEFeedForward(10, 37, "relu", block_size=8, k=5)
    assert set(n for n, _ in m.named_parameters()) == {f"fc{i}.{p}" for i in (1, 2) for p in ("basis", "coeffs", "bias")}
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.in_features, m.fc2.out_features) == (10, 37, 37, 10)
    assert m.fc1.plan is m.fc2.plan or torch.equal(m.fc1.plan, m.fc2.plan)


# ----------------------------------------------------------------- fresh init
@pytest.mark.parametrize("shape", [(256, 512, 64, 300), (100, 300, 64, 300), (96, 200, 8, 5), (768, 3072, 64, 300)])
def test_fresh_init_variance(shape):
    inp, out, b, k = shape
    lin = rbe_ffn.RBELinear(inp, out, block_size=b, k=k, generator=gen(1))
    w = lin.dense_weight()
    assert w.shape == (out, inp)
    target = 1 / (3 * inp)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    assert abs(w.pow(2).mean().item() / target - 1) < 0.2
    assert abs(w.var().item() / target - 1) < 0.2
    assert abs(lin.bias.var().item() / target - 1) < 0.2
    assert lin.bias.abs().max() <= 1 / math.sqrt(inp)


def test_fresh_init_variance_pattern_only():
    """k=0: only the 8 pattern numbers carry the weight; still nn.Linear's variance (averaged over seeds)."""
    inp, out = 50, 70
    v = [rbe_ffn.RBELinear(inp, out, block_size=16, k=0, generator=gen(s)).dense_weight().pow(2).mean().item()
         for s in range(40)]
    assert abs(sum(v) / len(v) * 3 * inp - 1) < 0.2


def test_fresh_init_positions():
    b, k = 16, 40
    lin = rbe_ffn.RBELinear(160, 96, block_size=b, k=k, generator=gen(2))
    idx = lin.index.long()
    assert idx.min() >= 0 and idx.max() < b * b
    assert (idx[:, 1:] > idx[:, :-1]).all()  # sorted, hence distinct within a block
    assert not (idx == torch.arange(k)).all(dim=1).any()  # no block is just the lowest frequencies
    u, v = idx // b, idx % b
    assert u.max() == b - 1 and v.max() == b - 1  # high frequencies are used
    assert abs(idx.double().mean().item() / (b * b / 2) - 1) < 0.1  # spread over the whole block
    assert len({tuple(r) for r in idx.tolist()}) == idx.shape[0]  # blocks draw their own positions
    # seeded: same generator seed, same layer
    again = rbe_ffn.RBELinear(160, 96, block_size=b, k=k, generator=gen(2))
    assert torch.equal(again.index, lin.index) and torch.equal(again.coeffs, lin.coeffs)
    other = rbe_ffn.RBELinear(160, 96, block_size=b, k=k, generator=gen(3))
    assert not torch.equal(other.index, lin.index)


def test_fresh_ffn_output_scale_like_dense():
    """A fresh RBEFeedForward produces outputs of the scale a fresh dense FFN does."""
    torch.manual_seed(0)
    m = rbe_ffn.RBEFeedForward(256, 1024, "gelu", block_size=64, k=300)
    dense = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    x = torch.randn(64, 256)
    with torch.no_grad():
        ratio = m(x).std().item() / dense(x).std().item()
    assert 0.7 < ratio < 1.4


# ----------------------------------------------------------------- conversion
@pytest.mark.parametrize("shape", [(21, 37, 8), (70, 100, 16), (5, 3, 4)])
def test_from_linear_full_k_reproduces(shape):
    inp, out, b = shape
    torch.manual_seed(0)
    dense = nn.Linear(inp, out)
    lin = rbe_ffn.RBELinear.from_linear(dense, block_size=b, k=b * b)
    assert lin.relative_error < 1e-6
    x = torch.randn(3, 4, inp)
    with torch.no_grad():
        assert R.rel_err(lin(x), dense(x)) < 1e-5
        torch.testing.assert_close(lin(x), dense(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin.dense_weight(), dense.weight, rtol=1e-5, atol=1e-5)


def test_from_linears_ffn_full_k():
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(24, 40), nn.Linear(40, 24)
    m = rbe_ffn.RBEFeedForward.from_linears(fc1, fc2, activation=nn.GELU(approximate="tanh"), block_size=8, k=64)
    assert m.activation == "gelu_tanh" and (m.d_model, m.d_ff) == (24, 40)
    x = torch.randn(7, 24)
    with torch.no_grad():
        torch.testing.assert_close(m(x), fc2(F.gelu(fc1(x), approximate="tanh")), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feed-forward"):
        rbe_ffn.RBEFeedForward.from_linears(nn.Linear(24, 40), nn.Linear(41, 24))
    with pytest.raises(ValueError, match="bias"):
        rbe_ffn.RBEFeedForward.from_linears(nn.Linear(24, 40), nn.Linear(40, 24, bias=False))


# ----------------------------------------------------------------- serialization
def test_state_dict_round_trip():
    a = randomize(rbe_ffn.RBEFeedForward(10, 37, "silu", block_size=8, k=5, generator=gen(1)), 1)
    b = rbe_ffn.RBEFeedForward(10, 37, "silu", block_size=8, k=5, generator=gen(2))
    sd = a.state_dict()
    assert not any("plan" in key for key in sd)
    b.load_state_dict(sd)  # strict
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and ta.dtype == tb.dtype and torch.equal(ta, tb)
    x = torch.randn(4, 10)
    assert torch.equal(a(x), b(x))
    # through bytes, loadable with weights_only
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    c = rbe_ffn.RBEFeedForward(10, 37, "silu", block_size=8, k=5)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(c(x), a(x))


def test_dtype_moves_and_plan_follows():
    m = randomize(rbe_ffn.RBEFeedForward(37, 61, "gelu", block_size=16, k=33, generator=gen(3)), 3)
    x = torch.randn(5, 37, dtype=torch.float64)
    y32 = m(x.float())
    md = m.double()
    assert md is m
    for lin in (m.fc1, m.fc2):
        assert lin.basis.dtype == lin.coeffs.dtype == lin.bias.dtype == lin.plan.dtype == torch.float64
        assert lin.index.dtype == torch.int16
        # rebuilt at float64 precision, not a cast of the float32 table
        assert torch.equal(lin.plan, rbe_ffn.get_plan(16, torch.float64, "cpu"))
    y64 = m(x)
    assert y64.dtype == torch.float64
    assert R.rel_err(y64, R.module_ffn(m, x)) < 1e-12
    assert R.rel_err(y32, y64) < 1e-5
    m.to(torch.float32)
    assert m.fc1.plan.dtype == torch.float32 and torch.equal(m.fc1.plan, rbe_ffn.get_plan(16, torch.float32, "cpu"))
    assert torch.equal(m(x.float()), y32)


def test_deepcopy_and_pickle():
    m = randomize(rbe_ffn.RBEFeedForward(10, 37, "relu", block_size=8, k=5, checkpoint=True, memory_limit_mb=0.01,
                                         generator=gen(4)), 4)
    x = torch.randn(2, 6, 10)
    y = m(x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone(x), y)
        assert (clone.checkpoint, clone.memory_limit_mb, clone.activation) == (True, 0.01, "relu")
        with torch.no_grad():
            clone.fc1.coeffs.add_(1.0)
        assert torch.equal(m(x), y)  # the copy owns its tensors
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)


# ----------------------------------------------------------------- repr, sizes
def test_extra_repr():
    lin = rbe_ffn.RBELinear(768, 3072, block_size=64, k=300)
    r = repr(lin)
    for s in ("in_features=768", "out_features=3072", "bias=True", "block_size=64", "k=300", "compression=8.9x"):
        assert s in r, r
    conv = rbe_ffn.RBELinear.from_linear(nn.Linear(20, 30), block_size=8, k=10)
    assert "relative_error=" in repr(conv)
    m = rbe_ffn.RBEFeedForward(16, 40, "Swish", block_size=8, k=5, checkpoint=True, memory_limit_mb=32)
    r = repr(m)
    for s in ("d_model=16", "d_ff=40", "activation='silu'", "checkpoint=True", "memory_limit_mb=32", "(fc1)", "(fc2)"):
        assert s in r, r


def test_compression_ratio():
    lin = rbe_ffn.RBELinear(768, 3072, block_size=64, k=300)
    nblk = 12 * 48
    stored = nblk * 8 * 4 + nblk * 300 * 4 + nblk * 300 * 2  # basis, coeffs (float32), index (int16)
    assert lin.weight_nbytes == stored
    assert lin.compression_ratio == pytest.approx(768 * 3072 * 4 / stored)
    assert lin.compression_ratio == pytest.approx(8.94, abs=0.01)  # DESIGN.md: 8.9x
    m = rbe_ffn.RBEFeedForward(768, 3072, block_size=64, k=300)
    assert m.weight_nbytes == 2 * stored
    assert m.compression_ratio == pytest.approx(8.94, abs=0.01)
    assert m.double().compression_ratio == pytest.approx(2 * 768 * 3072 * 8 / (2 * nblk * (8 * 8 + 300 * 8 + 300 * 2)))


# ----------------------------------------------------------------- activations
@pytest.mark.parametrize("alias,name", [("Gelu", "gelu"), ("GeluPytorch", "gelu"), ("GeluApproximate", "gelu_tanh"),
                                        ("Relu", "relu"), ("Swish", "silu"), ("gelu", "gelu"),
                                        ("gelu_tanh", "gelu_tanh"), ("relu", "relu"), ("silu", "silu")])
def test_activation_aliases(alias, name):
    assert rbe_ffn.canonical_activation(alias) == name
    a = randomize(rbe_ffn.RBEFeedForward(10, 37, alias, block_size=8, k=5, generator=gen(5)), 5)
    assert a.activation == name
    x = torch.randn(6, 10)
    want = R.module_ffn(a, x)  # reference with the canonical activation's torch definition
    assert R.rel_err(a(x), want) < 1e-5


def test_activation_modules_and_unknown():
    assert rbe_ffn.canonical_activation(nn.GELU()) == "gelu"
    assert rbe_ffn.canonical_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert rbe_ffn.canonical_activation(nn.ReLU()) == "relu"
    assert rbe_ffn.canonical_activation(nn.SiLU()) == "silu"
    for bad in ("tanh", "GELU", "", None, nn.Tanh()):
        with pytest.raises(ValueError, match="unknown activation"):
            rbe_ffn.RBEFeedForward(10, 37, bad, block_size=8, k=5)


def test_gelu_variants_differ():
    """GeluApproximate is the tanh form, not the erf form: the aliases are not all one function."""
    x = torch.randn(6, 10)
    ys = {}
    for name in ("Gelu", "GeluPytorch", "GeluApproximate"):
        ys[name] = randomize(rbe_ffn.RBEFeedForward(10, 37, name, block_size=8, k=5, generator=gen(6)), 6)(x)
    assert torch.equal(ys["Gelu"], ys["GeluPytorch"])
    assert not torch.allclose(ys["Gelu"], ys["GeluApproximate"], rtol=0, atol=1e-7)


# ----------------------------------------------------------------- statistics
def test_stats_per_module():
    a = rbe_ffn.RBEFeedForward(768, 3072, block_size=64, k=300)
    b = rbe_ffn.RBEFeedForward(10, 37, block_size=8, k=5)
    assert a.stats == {"calls": 0, "flops": 0, "peak_intermediate_bytes": 0}
    a(torch.randn(2, 8, 768))
    a(torch.randn(3, 768))
    assert a.stats["calls"] == 2
    assert a.stats["flops"] == a.estimated_flops(16) + a.estimated_flops(3)
    assert a.stats["peak_intermediate_bytes"] > 0
    assert b.stats["calls"] == 0 and b.stats["flops"] == 0  # per module, not global
    b(torch.randn(5, 10))
    assert b.stats["calls"] == 1 and a.stats["calls"] == 2
    # DESIGN.md section 3: about 0.47 M multiply-adds per token per 768 -> 3072 layer
    per_layer_macs = a.estimated_flops(1) / 2 / 2
    assert 0.4e6 < per_layer_macs < 0.55e6
    assert a.estimated_flops(10) == 10 * a.estimated_flops(1)
    # the peak only grows with the token count; a memory limit caps it
    peak = a.stats["peak_intermediate_bytes"]
    a(torch.randn(200, 768))
    assert a.stats["peak_intermediate_bytes"] > peak
    a.reset_stats()
    assert a.stats == {"calls": 0, "flops": 0, "peak_intermediate_bytes": 0}
    a.memory_limit_mb = 8
    a(torch.randn(1000, 768))
    assert 0 < a.stats["peak_intermediate_bytes"] <= 8 * 2**20


# ----------------------------------------------------------------- training
def test_training_updates_compressed_parameters():
    """A few Adam steps on the compressed parameters fit a target better (the stored numbers are trained)."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
    m = rbe_ffn.RBEFeedForward(16, 48, "gelu", block_size=8, k=20, checkpoint=True)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(128, 16)
    with torch.no_grad():
        yt = target(x)
    index_before = [m.fc1.index.clone(), m.fc2.index.clone()]
    losses = []
    for _ in range(30):
        loss = F.mse_loss(m(x), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(m.fc1.index, index_before[0]) and torch.equal(m.fc2.index, index_before[1])
