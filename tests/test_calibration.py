"""Data-aware encoding (issue #13 item 1): compress(..., calibration=X) minimizes the output error
||(W - W_rbe) X^T|| instead of the weight error; replace_mlp(..., calibration=...) uses each block's
captured inputs."""
from __future__ import annotations

import math

import pytest
import torch

import rbe_ffn
from rbe_ffn.calibrate import output_error

import ffn_reference as R
from conftest import seeded


def correlated_inputs(n, d, seed=0, decay=1.0, dtype=torch.float64):
    """X = Z A with A's singular values 1 / i**decay (a decaying input spectrum)."""
    g = seeded(seed)
    s = torch.arange(1, d + 1, dtype=torch.float64) ** -decay
    u = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ ((u * s) @ v)).to(dtype)


def moment(x):
    x = x.double()
    return x.T @ x / x.shape[0]


def weight(out, inp, seed=1, dtype=torch.float64):
    return torch.randn(out, inp, generator=seeded(seed), dtype=dtype)


@pytest.mark.parametrize("select", ["obs", "diag"])
@pytest.mark.parametrize("shape", [(48, 64), (40, 52)])  # exact blocks; edge blocks on both sides
def test_lower_output_error_on_correlated_inputs(shape, select):
    b = 8
    w = weight(*shape)
    x = correlated_inputs(600, shape[1])
    h = moment(x)
    for k in (2, 8, 20, 40):
        plain = rbe_ffn.compress(w, b, k)
        cw = rbe_ffn.compress(w, b, k, calibration=x, select=select)
        want_plain = output_error(w, plain.decompress(), h)
        assert cw.output_error_plain == pytest.approx(want_plain, rel=1e-9)
        assert cw.output_error == pytest.approx(output_error(w, cw.decompress(), h), rel=1e-9)
        assert cw.output_error <= cw.output_error_plain
        assert cw.output_error < 0.9 * cw.output_error_plain, (k, cw.output_error, cw.output_error_plain)
        # the weight error is reported for the data-aware numbers, and is exact
        assert cw.relative_error == pytest.approx(R.rel_err(cw.decompress(), w), rel=1e-9)
        assert cw.block_errors.sum().item() == pytest.approx(((cw.decompress() - w) ** 2).sum().item(), rel=1e-9)
        # the format's invariants: k per block, ascending positions, the plain pattern
        idx = cw.index.long()
        assert cw.index.dtype == plain.index.dtype and cw.coeffs.shape == plain.coeffs.shape
        assert bool((idx[:, 1:] > idx[:, :-1]).all())
        assert torch.equal(cw.basis, plain.basis)


def test_never_worse_than_plain():
    """Weight smooth + noise: the plain encoder is already good; whatever happens, the data-aware
    result is never above it on the calibration data (block rows fall back to it)."""
    b = 8
    g = seeded(5)
    r = torch.linspace(-1, 1, 32, dtype=torch.float64)
    w = torch.sin(3 * r)[:, None] * torch.cos(2 * r)[None, :] + 1e-3 * torch.randn(32, 32, generator=g, dtype=torch.float64)
    for x in (correlated_inputs(20, 32, seed=2), torch.randn(3, 32, generator=g, dtype=torch.float64)):
        for k in (1, 4, 16):
            cw = rbe_ffn.compress(w, b, k, calibration=x)
            assert cw.output_error <= cw.output_error_plain


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lossless_at_full_k(dtype):
    b = 8
    w = weight(20, 28, dtype=dtype)
    x = correlated_inputs(100, 28, dtype=dtype)
    cw = rbe_ffn.compress(w, b, b * b, calibration=x)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert cw.output_error < tol and cw.output_error_plain < tol
    assert R.rel_err(cw.decompress(), w) < tol
    assert cw.relative_error < tol
    assert cw.coeffs.dtype == dtype and cw.basis.dtype == dtype


def test_white_inputs_match_plain():
    """H = identity: the output error is the weight error; both encoders target the same thing."""
    b = 8
    w = weight(32, 48)
    for k in (4, 16, 40):
        plain = rbe_ffn.compress(w, b, k)
        cw = rbe_ffn.compress(w, b, k, second_moment=torch.eye(48, dtype=torch.float64))
        assert cw.output_error_plain == pytest.approx(plain.relative_error, rel=1e-9)
        assert cw.output_error <= plain.relative_error * (1 + 1e-12)
        assert cw.output_error >= 0.97 * plain.relative_error  # nothing to gain from white inputs
        assert cw.relative_error == pytest.approx(cw.output_error, rel=1e-9)


def test_samples_and_moment_agree():
    b = 8
    w = weight(16, 24)
    x = correlated_inputs(50, 24).reshape(5, 10, 24)  # leading dims are flattened
    a = rbe_ffn.compress(w, b, 6, calibration=x)
    c = rbe_ffn.compress(w, b, 6, second_moment=moment(x.reshape(-1, 24)))
    assert torch.equal(a.index, c.index)
    torch.testing.assert_close(a.coeffs, c.coeffs, rtol=1e-9, atol=1e-12)


def test_plain_default_unchanged():
    """No calibration: the plain encoder's numbers, bitwise, and no output-error fields."""
    w = weight(24, 40, dtype=torch.float32)
    a = rbe_ffn.compress(w, 8, 10)
    basis, coeffs, index, err = torch.ops.rbe_ffn.encode(w.contiguous(), 8, 10)
    assert torch.equal(a.basis, basis) and torch.equal(a.coeffs, coeffs) and torch.equal(a.index, index)
    assert a.output_error is None and a.output_error_plain is None


def test_least_squares_matches_brute_force():
    """The kept values minimize the damped output error tr(E (H + lam I) E^T) over the chosen
    positions: solve the same objective with torch.linalg.lstsq over the dense parametrization
    (W_rbe = pattern + sum_q c_q psi_u psi_v^T, only the c_q free) and compare."""
    b, out, inp, k, damp = 4, 8, 12, 5, 0.01
    w = weight(out, inp, seed=3)
    x = correlated_inputs(40, inp, seed=4)
    h = moment(x)
    cw = rbe_ffn.compress(w, b, k, calibration=x, damp=damp)
    assert cw.plain_block_rows == 0  # the solution under test is the data-aware one everywhere
    psi = R.dct_matrix(b)
    C = inp // b
    pattern = R.decode(cw.basis, torch.zeros_like(cw.coeffs), cw.index, out, inp, b)
    # columns of the design: one per kept coefficient, its dense [out, in] image
    cols = []
    for blk in range(cw.index.shape[0]):
        i, j = divmod(blk, C)
        for q in cw.index[blk].long().tolist():
            u, v = divmod(q, b)
            img = torch.zeros(out, inp, dtype=torch.float64)
            img[i * b:(i + 1) * b, j * b:(j + 1) * b] = torch.outer(psi[u], psi[v])
            cols.append(img)
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(inp, dtype=torch.float64)
    half = torch.linalg.cholesky(hd)  # tr(E hd E^T) = ||E half||_F^2
    a = torch.stack([(img @ half).reshape(-1) for img in cols], 1)
    rhs = ((w - pattern) @ half).reshape(-1)
    c = torch.linalg.lstsq(a, rhs[:, None]).solution[:, 0]
    torch.testing.assert_close(cw.coeffs.reshape(-1), c, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(10, 7), "in_features=12"),
    (torch.randn(12), r"\[n, in_features=12\]"),
    (torch.empty(0, 12), "empty"),
    (torch.full((4, 12), float("nan")), "non-finite"),
    (torch.tensor([[1.0] * 11 + [float("inf")]]), "non-finite"),
    (torch.zeros(4, 12), "all zero"),
    (torch.ones(4, 12, dtype=torch.int64), "floating-point"),
])
def test_bad_calibration(bad, match):
    w = weight(8, 12)
    with pytest.raises(ValueError, match=match):
        rbe_ffn.compress(w, 4, 3, calibration=bad)


@pytest.mark.parametrize("bad, match", [
    (torch.eye(11), r"\[12, 12\]"),
    (torch.randn(12, 12), "not symmetric"),
    (torch.full((12, 12), float("inf")), "non-finite"),
])
def test_bad_second_moment(bad, match):
    with pytest.raises(ValueError, match=match):
        rbe_ffn.compress(weight(8, 12), 4, 3, second_moment=bad)


def test_bad_options():
    w, x = weight(8, 12), torch.randn(5, 12)
    with pytest.raises(ValueError, match="not both"):
        rbe_ffn.compress(w, 4, 3, calibration=x, second_moment=moment(x))
    with pytest.raises(ValueError, match="select"):
        rbe_ffn.compress(w, 4, 3, calibration=x, select="best")
    with pytest.raises(ValueError, match="damp"):
        rbe_ffn.compress(w, 4, 3, calibration=x, damp=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        rbe_ffn.compress(w, 4, 3, calibration=[[1.0] * 12])


# ----------------------------------------------------------------- replace_mlp(calibration=)
def tiny_gpt2(d=32, f=64, layers=2, seed=0):
    transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=4, n_inner=f, vocab_size=61, n_positions=32,
                                  activation_function="gelu_new", bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).to(torch.float64).eval()
    g = seeded(seed)
    with torch.no_grad():
        # correlated token embeddings (a decaying spectrum) and MLP weights at a 1/sqrt(fan_in) scale
        m.transformer.wte.weight.copy_(correlated_inputs(61, d, seed=seed + 7, decay=1.0) * 3)
        for name, p in m.named_parameters():
            if "mlp.c_" in name:
                fan_in = p.shape[0] if p.dim() == 2 else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (1.5 / math.sqrt(fan_in) if p.dim() == 2
                                                                             else 0.5))
    return m


def test_replace_mlp_calibration_gpt2():
    import copy

    model = tiny_gpt2()
    ids = torch.randint(0, 61, (4, 24), generator=seeded(3))
    plain_model, data_model = copy.deepcopy(model), copy.deepcopy(model)
    captured = rbe_ffn.convert._capture_inputs(model, rbe_ffn.convert._scan(model)[0], ids)
    plain = rbe_ffn.replace_mlp(plain_model, block_size=8, k=12)
    report = rbe_ffn.replace_mlp(data_model, block_size=8, k=12, calibration=ids)
    assert len(report) == 2
    for lp, ld in zip(plain, report):
        assert ld.calibration_samples == 4 * 24
        assert lp.block_error is None and lp.output_error_fc1 is None
        assert ld.output_error_fc1 < ld.output_error_fc1_plain and ld.output_error_fc2 < ld.output_error_fc2_plain
        assert ld.block_error < 0.9 * ld.block_error_plain, (ld.block_error, ld.block_error_plain)
        # the plain column is the plain conversion's error on the same inputs
        x = captured[ld.path]
        mlp_dense = model.get_submodule(ld.path)
        with torch.no_grad():
            want = mlp_dense.c_proj(mlp_dense.act(mlp_dense.c_fc(x)))
            got_plain = plain_model.get_submodule(ld.path).ffn(x)
            got_data = data_model.get_submodule(ld.path).ffn(x)
        assert R.rel_err(got_plain, want) == pytest.approx(ld.block_error_plain, rel=1e-9)
        assert R.rel_err(got_data, want) == pytest.approx(ld.block_error, rel=1e-9)
        # fc1's reported output error is its own on the block inputs
        w1 = mlp_dense.c_fc.weight.T
        fc1 = data_model.get_submodule(ld.path).ffn.fc1
        assert ld.output_error_fc1 == pytest.approx(
            R.rel_err(x @ fc1.dense_weight().T, x @ w1.T), rel=1e-9)
    text = str(report)
    assert "out fc1 plain" in text and "block data" in text
    # the whole model's logits move less from the dense model's than with the plain conversion
    with torch.no_grad():
        ref = model(ids).logits
        assert R.rel_err(data_model(ids).logits, ref) < R.rel_err(plain_model(ids).logits, ref)


def test_replace_mlp_calibration_activations_dict():
    """Sample activations per block path (as Distill takes them); blocks without any stay plain."""
    model = tiny_gpt2(layers=2)
    x = correlated_inputs(80, 32, seed=9)
    report = rbe_ffn.replace_mlp(model, block_size=8, k=12, calibration={"transformer.h.0.mlp": x})
    assert report[0].block_error is not None and report[0].calibration_samples == 80
    assert report[1].block_error is None and report[1].output_error_fc1 is None


def test_replace_mlp_calibration_bad():
    model = tiny_gpt2(layers=1)
    with pytest.raises(ValueError, match="d_model=32"):
        rbe_ffn.replace_mlp(model, block_size=8, k=12, calibration={"transformer.h.0.mlp": torch.randn(5, 7)})
    with pytest.raises(ValueError, match="non-finite"):
        rbe_ffn.replace_mlp(model, block_size=8, k=12,
                            calibration={"transformer.h.0.mlp": torch.full((5, 32), float("nan"))})
    with pytest.raises(ValueError, match="empty"):
        rbe_ffn.replace_mlp(model, block_size=8, k=12, calibration={"transformer.h.0.mlp": torch.empty(0, 32)})
    with pytest.raises(ValueError, match="encode=True"):
        rbe_ffn.replace_mlp(model, block_size=8, k=12, calibration=torch.zeros(1, 4, dtype=torch.long),
                            encode=False)
    # nothing was replaced by the failed calls
    assert type(model.transformer.h[0].mlp).__name__ == "GPT2MLP"


def test_replace_mlp_calibration_then_distill():
    """Distillation starts from the data-aware encoding: its held-out 'before' error is the data-aware
    block's, lower than the plain conversion's on the same held-out samples."""
    import copy

    model = tiny_gpt2(layers=1)
    ids = torch.randint(0, 61, (4, 24), generator=seeded(4))
    cfg = dict(inputs=ids, steps=3, progress=False)
    plain = rbe_ffn.replace_mlp(copy.deepcopy(model), block_size=8, k=12, distill=cfg)
    data = rbe_ffn.replace_mlp(copy.deepcopy(model), block_size=8, k=12, distill=cfg, calibration=ids)
    assert data[0].output_error_before < 0.9 * plain[0].output_error_before
    assert data[0].output_error_after <= data[0].output_error_before
    assert "out err before" in str(data) and "block data" in str(data)
