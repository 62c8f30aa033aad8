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
from conftest import randomize_basis, seeded


# ----------------------------------------------------------------- structure
def test_linear_parameters_and_buffers():
    lin = rbe_ffn.RBELinear(21, 37, bias=True, block_size=8, k=5)
    assert (lin.in_features, lin.out_features, lin.block_size, lin.k) == (21, 37, 8, 5)
    nblk = 5 * 3
    assert dict((n, tuple(p.shape)) for n, p in lin.named_parameters()) == {
        "basis": (nblk, 8), "coeffs": (nblk, 5), "bias": (37,)}
    buffers = dict(lin.named_buffers())
    assert set(buffers) == {"index_bytes"}  # index: its raw bytes (DDP can broadcast uint8, not int16)
    assert lin.plan.shape[0] == 3 and lin.plan.dtype == torch.float32  # the layer's own tensor, not a buffer
    assert buffers["index_bytes"].shape == (nblk, 10) and buffers["index_bytes"].dtype == torch.uint8
    assert lin.index.shape == (nblk, 5) and lin.index.dtype == torch.int16 and not lin.index.requires_grad
    assert lin.index.data_ptr() == buffers["index_bytes"].data_ptr()  # a view, no copy
    sd = lin.state_dict()
    assert list(sd) == ["basis", "coeffs", "bias", "index"]  # plan is not saved
    assert sd["index"].dtype == torch.int16 and torch.equal(sd["index"], lin.index)
    wide = rbe_ffn.RBELinear(300, 10, block_size=130, k=3)
    assert wide.index.dtype == torch.int32 and wide.index_bytes.shape == (3, 12)
    assert wide.state_dict()["index"].dtype == torch.int32

    nob = rbe_ffn.RBELinear(21, 37, bias=False, block_size=8, k=5)
    assert nob.bias is None and set(nob.state_dict()) == {"basis", "coeffs", "index"}
    randomize_basis(nob)
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
    lin = rbe_ffn.RBELinear(inp, out, block_size=b, k=k, generator=seeded(1))
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
    v = [rbe_ffn.RBELinear(inp, out, block_size=16, k=0, generator=seeded(s)).dense_weight().pow(2).mean().item()
         for s in range(40)]
    assert abs(sum(v) / len(v) * 3 * inp - 1) < 0.2


def test_fresh_init_positions():
    b, k = 16, 40
    lin = rbe_ffn.RBELinear(160, 96, block_size=b, k=k, generator=seeded(2))
    idx = lin.index.long()
    assert idx.min() >= 0 and idx.max() < b * b
    assert (idx[:, 1:] > idx[:, :-1]).all()  # sorted, hence distinct within a block
    assert not (idx == torch.arange(k)).all(dim=1).any()  # no block is just the lowest frequencies
    u, v = idx // b, idx % b
    assert u.max() == b - 1 and v.max() == b - 1  # high frequencies are used
    assert abs(idx.double().mean().item() / (b * b / 2) - 1) < 0.1  # spread over the whole block
    assert len({tuple(r) for r in idx.tolist()}) == idx.shape[0]  # blocks draw their own positions
    # seeded: same generator seed, same layer
    again = rbe_ffn.RBELinear(160, 96, block_size=b, k=k, generator=seeded(2))
    assert torch.equal(again.index, lin.index) and torch.equal(again.coeffs, lin.coeffs)
    other = rbe_ffn.RBELinear(160, 96, block_size=b, k=k, generator=seeded(3))
    assert not torch.equal(other.index, lin.index)


@pytest.mark.parametrize("k", [2, 3, 6, 7, 9, 13, 14])
def test_fresh_init_positions_uniform_over_subsets(k):
    """Every k-subset of a 4x4 block's 16 positions equally likely, for each way of drawing them
    (redrawn duplicates: k = 2, 3, 6; sorted random keys: 7; the complement of those: 9, 13, 14):
    Pearson's chi-square over the C(16, k) subsets, ~50 blocks each, seeded, so it cannot flake. The
    bound is the mean + 6 standard deviations of chi-square with C(16, k) - 1 degrees of freedom."""
    subsets = math.comb(16, k)
    lin = rbe_ffn.RBELinear(4 * 150, 4 * subsets // 3, bias=False, block_size=4, k=k, generator=seeded(5))
    rows = lin.index.long()
    assert (rows[:, 1:] > rows[:, :-1]).all()
    nblk = rows.shape[0]
    keys = (1 << rows).sum(dim=1)  # a bit mask per block
    counts = torch.bincount(keys, minlength=1 << 16).double()
    seen = counts > 0
    assert int(seen.sum()) == subsets  # every subset occurs, and nothing else
    expected = nblk / subsets
    chi2 = ((counts[seen] - expected) ** 2 / expected).sum().item()
    df = subsets - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)


@pytest.mark.parametrize("k", [1, 5, 31, 32, 33, 60, 63])
def test_fresh_init_positions_uniform_per_position(k):
    """Every position of an 8x8 block is chosen with probability k/64: the counts over 2000 blocks,
    normalized by the per-block variance p(1-p), have mean 64 and standard deviation ~11.4 under
    uniform sampling without replacement (seeded; bound at mean + 6 sd)."""
    lin = rbe_ffn.RBELinear(8 * 50, 8 * 40, bias=False, block_size=8, k=k, generator=seeded(6))
    idx = lin.index.long()
    nblk = idx.shape[0]
    assert (idx[:, 1:] > idx[:, :-1]).all()
    counts = torch.bincount(idx.flatten(), minlength=64).double()
    p = k / 64
    t = ((counts - nblk * p) ** 2).sum().item() / (nblk * p * (1 - p))
    assert t < 64 + 6 * math.sqrt(2 * 63) * 64 / 63, t


@pytest.mark.parametrize("b, k", [(8, 0), (8, 64), (16, 1), (256, 1), (256, 65535), (256, 65536)])
def test_fresh_init_positions_extremes(b, k):
    lin = rbe_ffn.RBELinear(b + 3, b, block_size=b, k=k, generator=seeded(7))
    idx = lin.index.long()
    assert idx.shape == (2, k)
    if k > 0:
        assert idx.min() >= 0 and idx.max() < b * b and (idx[:, 1:] > idx[:, :-1]).all()
    if k == b * b:
        assert torch.equal(idx, torch.arange(b * b).expand(2, -1))
    # reproducible from the global seed too
    torch.manual_seed(11)
    a = rbe_ffn.RBELinear(b + 3, b, block_size=b, k=k)
    torch.manual_seed(11)
    assert torch.equal(rbe_ffn.RBELinear(b + 3, b, block_size=b, k=k).index, a.index)


@pytest.mark.parametrize("shape", [(1024, 4096, 32, 64), (512, 2048, 16, 200)])
def test_fresh_init_transient_memory(shape):
    """Constructing a layer allocates less than twice its own bytes in all (the layer included): no
    [blocks, b*b] temporaries (an argsort of b*b keys per block cost ~1 GB for a 4096 x 16384 block)."""
    from rbe_ffn._profiling import peak_live_bytes

    d, f, b, k = shape
    rbe_ffn.RBEFeedForward(8, 8, block_size=b, k=1)  # the cached plan of this block size
    made = []
    peak = peak_live_bytes(lambda: made.append(rbe_ffn.RBEFeedForward(d, f, block_size=b, k=k, generator=seeded(0))))
    own = sum(t.numel() * t.element_size() for t in made[0].state_dict().values())
    assert peak < 2 * own, (peak, own)


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


BAD_FFN_ARGS = [  # (keyword arguments, exception, message)
    (dict(memory_limit_mb=-1), ValueError, "memory_limit_mb"),
    (dict(memory_limit_mb=0), ValueError, "memory_limit_mb"),
    (dict(memory_limit_mb=float("nan")), ValueError, "memory_limit_mb"),
    (dict(memory_limit_mb=float("inf")), ValueError, "memory_limit_mb"),
    (dict(memory_limit_mb=True), TypeError, "memory_limit_mb"),
    (dict(memory_limit_mb="8"), TypeError, "memory_limit_mb"),
    (dict(activation="tanh"), ValueError, "unknown activation"),
    (dict(activation=nn.Tanh()), ValueError, "unknown activation"),
    (dict(block_size=3), ValueError, "block_size"),
    (dict(k=65), ValueError, "k must be"),
    (dict(k=2.0), ValueError, "k must be"),
    (dict(checkpoint="yes"), TypeError, "checkpoint must be a bool"),
    (dict(checkpoint=1), TypeError, "checkpoint must be a bool"),
]


@pytest.mark.parametrize("bad, exc, msg", BAD_FFN_ARGS)
def test_every_ffn_constructor_checks_its_arguments(bad, exc, msg):
    """RBEFeedForward(...) and RBEFeedForward.from_linears(...) refuse the same arguments, before any work."""
    kw = dict(activation="gelu", block_size=8, k=5, checkpoint=False, memory_limit_mb=None) | bad
    with pytest.raises(exc, match=msg):
        rbe_ffn.RBEFeedForward(24, 40, **kw)
    with pytest.raises(exc, match=msg):
        rbe_ffn.RBEFeedForward.from_linears(nn.Linear(24, 40), nn.Linear(40, 24), **kw)


def test_constructors_accept_the_same_good_arguments():
    kw = dict(activation=nn.GELU(approximate="tanh"), block_size=8, k=5, checkpoint=True, memory_limit_mb=0.5)
    for m in (rbe_ffn.RBEFeedForward(24, 40, **kw),
              rbe_ffn.RBEFeedForward.from_linears(nn.Linear(24, 40), nn.Linear(40, 24), **kw)):
        assert (m.activation, m.checkpoint, m.memory_limit_mb, m.block_size) == ("gelu_tanh", True, 0.5, 8)
        assert m.fc1.k == m.fc2.k == 5
    with pytest.raises(TypeError, match="bias must be a bool"):
        rbe_ffn.RBEFeedForward(24, 40, bias="no", block_size=8, k=5)
    with pytest.raises(TypeError, match="fc1 must be an nn.Linear"):
        rbe_ffn.RBEFeedForward.from_linears("fc1", nn.Linear(40, 24), block_size=8, k=5)


def test_from_compressed_checks_shapes_and_index():
    """Nothing is broadcast or copied unchecked: a wrong-shaped tensor or an invalid index is an error."""
    cw = rbe_ffn.compress(torch.randn(37, 21), block_size=8, k=5)  # 5 x 3 = 15 blocks
    ok = rbe_ffn.RBELinear.from_compressed(cw, torch.zeros(37))
    torch.testing.assert_close(ok.dense_weight(), cw.decompress())

    def with_(**kw):
        return rbe_ffn.codec.CompressedWeight(**{f: kw.get(f, getattr(cw, f)) for f in
                                                 ("basis", "coeffs", "index", "shape", "block_size")})
    cases = [
        (with_(basis=cw.basis[:1]), None, ValueError, r"basis has shape \(1, 8\), expected \(15, 8\)"),
        (with_(coeffs=cw.coeffs[:1]), None, ValueError, "coeffs has shape"),
        (with_(coeffs=cw.coeffs[:, :1]), None, ValueError, "index has shape"),  # k is read from coeffs
        (with_(index=cw.index[:1]), None, ValueError, "index has shape"),
        (cw, torch.zeros(1), ValueError, r"bias has shape \(1,\)"),
        (cw, torch.zeros(37, dtype=torch.int64), TypeError, "bias must be a floating-point"),
        (with_(index=cw.index.flip(1)), None, ValueError, "unsorted"),
        (with_(index=torch.full_like(cw.index, 64)), None, ValueError, "outside"),
        (with_(shape=(37, 21, 1)), None, ValueError, "cw.shape"),
        (with_(shape=(37, 0)), None, ValueError, "in_features"),
        (with_(block_size=3), None, ValueError, "block_size"),
        (with_(basis=cw.basis.double()), None, TypeError, "basis and coeffs"),
        ("cw", None, TypeError, "CompressedWeight"),
    ]
    for c, bias, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            rbe_ffn.RBELinear.from_compressed(c, bias)


# ----------------------------------------------------------------- serialization
def test_state_dict_round_trip():
    a = randomize_basis(rbe_ffn.RBEFeedForward(10, 37, "silu", block_size=8, k=5, generator=seeded(1)), 1)
    b = rbe_ffn.RBEFeedForward(10, 37, "silu", block_size=8, k=5, generator=seeded(2))
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
    m = randomize_basis(rbe_ffn.RBEFeedForward(37, 61, "gelu", block_size=16, k=33, generator=seeded(3)), 3)
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
    m = randomize_basis(rbe_ffn.RBEFeedForward(10, 37, "relu", block_size=8, k=5, checkpoint=True, memory_limit_mb=0.01,
                                         generator=seeded(4)), 4)
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
    a = randomize_basis(rbe_ffn.RBEFeedForward(10, 37, alias, block_size=8, k=5, generator=seeded(5)), 5)
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
        ys[name] = randomize_basis(rbe_ffn.RBEFeedForward(10, 37, name, block_size=8, k=5, generator=seeded(6)), 6)(x)
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
    # the estimate follows the layer's dtype (float64's plan keeps more pattern rows)
    c = rbe_ffn.RBEFeedForward(128, 256, block_size=64, k=30)
    f32 = c.estimated_flops(1)
    c.double()
    assert c.estimated_flops(1) == rbe_ffn.RBEFeedForward(128, 256, block_size=64, k=30,
                                                         dtype=torch.float64).estimated_flops(1) != f32
    c(torch.randn(1, 128, dtype=torch.float64))
    assert c.stats["flops"] == c.estimated_flops(1)
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


def test_index_storage_survives_dtype_casts_and_loads_old_state_dicts():
    """index (int16) lives in the uint8 buffer index_bytes: float casts never touch it, the
    state_dict key stays "index" with int16 values, so state_dicts saved before load as they are."""
    torch.manual_seed(0)
    m = rbe_ffn.RBEFeedForward(16, 40, block_size=8, k=5)
    idx = m.fc1.index.clone()
    for cast in (lambda t: t.half(), lambda t: t.to(torch.bfloat16), lambda t: t.double(), lambda t: t.float()):
        m = cast(m)
        assert m.fc1.index.dtype == torch.int16 and torch.equal(m.fc1.index, idx)
        assert m.fc1.index_bytes.dtype == torch.uint8
    assert m.fc1.basis.dtype == torch.float32

    # a state_dict as written before the byte storage: plain int16 "index" tensors
    old = {k: v.clone() for k, v in m.state_dict().items()}
    assert {k: v.dtype for k, v in old.items() if k.endswith("index")} == {"fc1.index": torch.int16,
                                                                          "fc2.index": torch.int16}
    fresh = rbe_ffn.RBEFeedForward(16, 40, block_size=8, k=5)
    assert not torch.equal(fresh.fc1.index, idx)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.fc1.index, idx) and torch.equal(fresh.fc2.index, m.fc2.index)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), m(x))
    # load_state_dict(assign=True) and missing / stray keys name "index"
    fresh = rbe_ffn.RBEFeedForward(16, 40, block_size=8, k=5)
    fresh.load_state_dict(old, assign=True)
    assert torch.equal(fresh.fc2.index, m.fc2.index) and fresh.fc2.index_bytes.dtype == torch.uint8
    r = fresh.load_state_dict({k: v for k, v in old.items() if k != "fc2.index"}, strict=False)
    assert r.missing_keys == ["fc2.index"] and r.unexpected_keys == []
    raw = dict(old, **{"fc2.index_bytes": m.fc2.index_bytes.clone()})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"fc2.index_bytes\""):
        fresh.load_state_dict(raw)
    bad = dict(old, **{"fc2.index": old["fc2.index"][:, :3]})
    with pytest.raises(RuntimeError, match=r"size mismatch for fc2.index: copying a param with shape "
                                           r"torch.Size\(\[10, 3\]\)"):
        fresh.load_state_dict(bad)
