"""The "scaled" parametrization of fresh layers (modules.parametrization_scales): the parameters are
the format's numbers over power-of-two scales; everything a user sees of the weight (forward,
state_dict, compressed(), dense_weight(), checkpoints) is the format numbers, and under Adam a step
moves the weight about as much as it moves nn.Linear's."""
import math

import pytest
import torch
from torch import nn

import rbe_ffn
from rbe_ffn.modules import _pattern_energy, parametrization_scales

from conftest import seeded


def test_pattern_energy_matches_the_decoded_images():
    for b in (4, 5, 8, 32, 64, 130, 256):
        idx = torch.int16 if b <= 128 else torch.int32
        phi = torch.ops.rbe_ffn.decode(torch.eye(8, dtype=torch.float64), torch.empty(8, 0, dtype=torch.float64),
                                       torch.empty(8, 0, dtype=idx), b, 8 * b, b)
        assert _pattern_energy(b) == pytest.approx(phi.pow(2).sum().item() / (b * b), rel=1e-12)


def test_scales_follow_the_rule_rounded_to_powers_of_two():
    assert parametrization_scales(64, 300, "plain") == (1.0, 1.0)
    for b, k in ((8, 5), (16, 20), (32, 120), (64, 300), (64, 504), (128, 2000), (64, 0)):
        ps, cs = parametrization_scales(b, k, "scaled")
        coeff = b / math.sqrt(k + 8)
        pattern = coeff / (b * math.sqrt(_pattern_energy(b) / 8))
        for got, want in ((cs, coeff), (ps, pattern)):
            assert math.log2(got) == round(math.log2(got))  # a power of two
            assert want <= got < 2 * want  # rounded up
    # nearly dense: the coefficients' scale is nn.Linear's (1); the pattern's stays small
    assert parametrization_scales(32, 32 * 32 - 8, "scaled")[1] == 1.0
    for bad in ("v1", None, 1):
        with pytest.raises(ValueError, match="parametrization must be one of"):
            rbe_ffn.RBELinear(16, 16, block_size=8, k=4, parametrization=bad)


def _pair(cls_args, seed=0, **kw):
    """(scaled, plain) modules holding the same format numbers (a non-zero pattern included)."""
    cls, args = cls_args
    scaled = cls(*args, generator=seeded(seed), dtype=torch.float64, **kw)
    layers = [scaled] if isinstance(scaled, rbe_ffn.RBELinear) else [scaled.fc1, scaled.fc2]
    with torch.no_grad():
        for i, lin in enumerate(layers):
            lin.basis.copy_(torch.randn(lin.basis.shape, generator=seeded(seed + 10 + i), dtype=torch.float64))
    plain = cls(*args, dtype=torch.float64, parametrization="plain", **kw)
    plain.load_state_dict(scaled.state_dict())
    return scaled, plain


CASES = [(rbe_ffn.RBELinear, (20, 36)), (rbe_ffn.RBEFeedForward, (20, 36, "gelu"))]


@pytest.mark.parametrize("cls_args", CASES, ids=["linear", "ffn"])
def test_scaled_and_plain_are_the_same_function(cls_args):
    kw = {"block_size": 8, "k": 6}
    scaled, plain = _pair(cls_args, **kw)
    layers = lambda m: [m] if isinstance(m, rbe_ffn.RBELinear) else [m.fc1, m.fc2]  # noqa: E731
    for ls, lp in zip(layers(scaled), layers(plain)):
        ps, cs = parametrization_scales(8, 6, "scaled")
        assert ps != 1.0 and cs != 1.0
        assert torch.equal(ls.basis * ps, lp.basis) and torch.equal(ls.coeffs * cs, lp.coeffs)
        assert torch.equal(ls.numbers()[1], lp.coeffs) and torch.equal(ls.dense_weight(), lp.dense_weight())
        assert torch.equal(ls.compressed().coeffs, lp.coeffs)
    x = torch.randn(3, 5, 20, dtype=torch.float64, requires_grad=True)
    assert torch.equal(scaled(x), plain(x))
    # gradients: the chain rule through the scale, nothing else
    gs = torch.autograd.grad(scaled(x).square().sum(), [x] + list(scaled.parameters()))
    gp = torch.autograd.grad(plain(x).square().sum(), [x] + list(plain.parameters()))
    names = ["x"] + [n for n, _ in scaled.named_parameters()]
    for name, a, b in zip(names, gs, gp):
        scale = {"basis": ps, "coeffs": cs}.get(name.rsplit(".", 1)[-1], 1.0)
        torch.testing.assert_close(a, b * scale, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.autograd.gradcheck(lambda x, *p: torch.func.functional_call(scaled, dict(
        zip([n for n, _ in scaled.named_parameters()], p)), (x,)), (x[:1, :2].detach().requires_grad_(),
                                                                  *scaled.parameters()))


def test_state_dict_holds_format_numbers_and_round_trips_bitwise(tmp_path):
    scaled, plain = _pair(CASES[1], block_size=8, k=6)
    sd = scaled.state_dict()
    for name in ("fc1.basis", "fc1.coeffs", "fc2.basis", "fc2.coeffs"):
        assert torch.equal(sd[name], plain.state_dict()[name])
    again = rbe_ffn.RBEFeedForward(20, 36, "gelu", block_size=8, k=6, dtype=torch.float64)
    again.load_state_dict(sd)
    for (n, a), b in zip(scaled.named_parameters(), again.parameters()):
        assert torch.equal(a, b), n
    # the safetensors checkpoint too, and a plain layer's checkpoint loads into a scaled one
    rbe_ffn.save_safetensors(plain, tmp_path / "p.safetensors")
    rbe_ffn.load_safetensors(again, tmp_path / "p.safetensors")
    assert torch.equal(again.fc2.coeffs, scaled.fc2.coeffs)
    # keep_vars: the format numbers stay connected to the parameters
    kv = scaled.state_dict(keep_vars=True)["fc1.coeffs"]
    assert kv.requires_grad and kv.grad_fn is not None


def test_fresh_layer_keeps_nn_linear_variance():
    torch.manual_seed(0)
    for par in ("scaled", "plain"):
        w = rbe_ffn.RBELinear(256, 512, block_size=32, k=120, parametrization=par).dense_weight()
        assert w.var().item() == pytest.approx(1 / (3 * 256), rel=0.05), par
    lin = rbe_ffn.RBELinear(64, 64, block_size=8, k=0)  # pattern only: its init is the format numbers too
    assert lin.dense_weight().var().item() == pytest.approx(1 / (3 * 64), rel=0.3)


def _adam_step_norms(layer_or_linear, x, dy, params):
    """(||dW||_F, ||dW||_2) of the dense weight after one Adam step on `params`."""
    def weight():
        return (layer_or_linear.weight if isinstance(layer_or_linear, nn.Linear)
                else layer_or_linear.dense_weight()).detach().clone()
    before = weight()
    opt = torch.optim.Adam(params, lr=1e-3)
    (layer_or_linear(x) * dy).sum().backward()
    opt.step()
    dw = weight() - before
    return dw.norm().item(), torch.linalg.matrix_norm(dw, 2).item()


def test_adam_step_moves_the_weight_like_dense():
    """The measurement behind the rule (docs/studies/equal_params.md): one Adam step of each group
    of numbers, against nn.Linear's step, at 128 -> 512, b=32, k=120. "plain": the pattern's step
    is about 12x dense's in spectral norm and the coefficients' 0.3x; "scaled" brings both within
    a factor 3 of dense."""
    g = seeded(0)
    x = torch.randn(2048, 128, generator=g)
    dy = torch.randn(2048, 512, generator=g) @ torch.randn(512, 512, generator=g) / 512 ** 0.5
    lin = nn.Linear(128, 512)
    dense_f, dense_2 = _adam_step_norms(lin, x, dy, [lin.weight])
    ratios = {}
    for par in ("plain", "scaled"):
        for group in ("basis", "coeffs"):
            layer = rbe_ffn.RBELinear(128, 512, block_size=32, k=120, parametrization=par, generator=seeded(1))
            f, s = _adam_step_norms(layer, x, dy, [getattr(layer, group)])
            ratios[par, group] = (f / dense_f, s / dense_2)
    assert ratios["plain", "basis"][1] > 5 and ratios["plain", "coeffs"][1] < 0.5
    for group in ("basis", "coeffs"):
        assert 1 / 3 < ratios["scaled", group][1] < 3, (group, ratios)


def test_converted_layers_stay_plain_and_exact():
    w = torch.randn(24, 40, dtype=torch.float64)
    cw = rbe_ffn.compress(w, 8, 10)
    lin = rbe_ffn.RBELinear.from_compressed(cw)
    assert lin.parametrization == "plain" and torch.equal(lin.coeffs, cw.coeffs)
    scaled = rbe_ffn.RBELinear.from_compressed(cw, parametrization="scaled")
    assert torch.equal(scaled.numbers()[1], cw.coeffs) and torch.equal(scaled.dense_weight(), lin.dense_weight())
    ffn = rbe_ffn.RBEFeedForward.from_linears(nn.Linear(16, 40), nn.Linear(40, 16), block_size=8, k=10)
    assert ffn.fc1.parametrization == ffn.fc2.parametrization == "plain"


def test_set_parametrization_is_exact_and_keeps_the_parameters():
    scaled, plain = _pair(CASES[1], block_size=8, k=6)
    params = list(scaled.parameters())
    x = torch.randn(4, 20, dtype=torch.float64)
    y = scaled(x)
    scaled.set_parametrization("plain")
    assert all(a is b for a, b in zip(params, scaled.parameters()))
    assert scaled.fc1.parametrization == "plain" and torch.equal(scaled.fc1.coeffs, plain.fc1.coeffs)
    assert torch.equal(scaled(x), y)
    scaled.set_parametrization("scaled")
    assert torch.equal(scaled(x), y) and scaled.fc2._coeff_scale == 4.0
    with pytest.raises(ValueError, match="parametrization must be one of"):
        scaled.set_parametrization("v2")
    assert scaled.fc1.parametrization == scaled.fc2.parametrization == "scaled"
