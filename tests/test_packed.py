"""One token from packed coefficients (csrc/rbe.h; the operators pack_coeffs, linear_packed,
ffn_packed): their results are the bits of linear and ffn (each token as at one token), on every
kernel set; the modules take them for calls of 1-3 tokens that record nothing (once asked to:
pack_for_inference) and pack again after any tracked change; bad and corrupted packs raise;
opcheck.
"""
import subprocess
import sys

import pytest
import torch

import rbe_ffn
from conftest import ACTS, assert_opcheck, ffn_args, make_ffn, make_linear, same_package_env

ops = torch.ops.rbe_ffn
AVX512 = rbe_ffn.cpu_isa() == "avx512"


def pack(lin):
    return ops.pack_coeffs(lin.coeffs.detach(), lin.index, lin.out_features, lin.in_features, lin.block_size)


def packed_args(m, x):
    f1, f2 = m.fc1, m.fc2
    return (x, f1.plan, pack(f1), f1.basis, f1.bias, pack(f2), f2.basis, f2.bias, m.d_model, m.d_ff, m.activation,
            f1._coeff_scale, f2._coeff_scale, f1._pattern_scale, f2._pattern_scale)


def ffn_ref(m, x):
    f1, f2 = m.fc1, m.fc2
    return ops.ffn(*ffn_args(m, x, 0, False), f1._coeff_scale, f2._coeff_scale, f1._pattern_scale,
                   f2._pattern_scale)[0]


# (d_model, d_ff, block_size, k): b = 64 with edge blocks; twelve block columns (three groups
# of the kernel's four streams); b = 32 with a tail of streams; b = 48 (three groups of 16 rows,
# the last one short); b = 8 (one group of 8 rows); k = 0 (pattern only); every coefficient
SHAPES = [(100, 300, 64, 300), (130, 770, 64, 200), (40, 300, 32, 60), (100, 250, 48, 30), (10, 37, 8, 5),
          (16, 24, 8, 0), (64, 64, 16, 256)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ffn_packed_is_ffn_bitwise(shape):
    """Every token of 1..9 (past the few-token kernels' 8 as well: token by token) has the bits the
    ffn operator gives it at one token; every activation, bias or not, both parametrizations."""
    d_model, d_ff, b, k = shape
    g = torch.Generator().manual_seed(5)
    for act in ACTS:
        for bias, param in ((True, "plain"), (False, "scaled")):
            m = make_ffn(d_model, d_ff, act, block_size=b, k=k, seed=6, bias=bias, random_bias=bias,
                         parametrization=param)
            x = torch.randn(9, d_model, generator=g)
            with torch.no_grad():
                got = ops.ffn_packed(*packed_args(m, x))
                want = torch.cat([ffn_ref(m, x[t:t + 1]) for t in range(9)])
            assert torch.equal(got, want), (act, bias, param)


@pytest.mark.parametrize("shape", [(100, 300, 64, 300), (250, 40, 48, 30), (37, 10, 8, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_linear_packed_is_linear_bitwise(shape):
    in_f, out_f, b, k = shape
    g = torch.Generator().manual_seed(7)
    for param in ("plain", "scaled"):
        lin = make_linear(in_f, out_f, block_size=b, k=k, seed=8, parametrization=param)
        x = torch.randn(3, in_f, generator=g)
        with torch.no_grad():
            got = ops.linear_packed(x, lin.plan, pack(lin), lin.basis, lin.bias, in_f, out_f, lin._coeff_scale,
                                    lin._pattern_scale)
            want = torch.cat([ops.linear(x[t:t + 1], lin.plan, lin.basis, lin.coeffs, lin.index, lin.bias, in_f, out_f,
                                         lin._coeff_scale, lin._pattern_scale) for t in range(3)])
        assert torch.equal(got, want), param


def test_int32_index_packs_alike():
    lin = make_linear(100, 70, block_size=64, k=300, seed=9)
    a = pack(lin)
    b = ops.pack_coeffs(lin.coeffs.detach(), lin.index.to(torch.int32), 70, 100, 64)
    assert torch.equal(a, b)


def test_thread_count_does_not_change_bits():
    m = make_ffn(130, 770, "gelu", block_size=64, k=200, seed=10)
    x = torch.randn(1, 130, generator=torch.Generator().manual_seed(11))
    n = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(ops.ffn_packed(*packed_args(m, x)))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])


SCRIPT = """
import torch, rbe_ffn
from conftest import make_ffn, ffn_args
ops = torch.ops.rbe_ffn
assert rbe_ffn.cpu_isa() == "{isa}", rbe_ffn.cpu_isa()
m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=12, random_bias=True)
x = torch.randn(2, 100, generator=torch.Generator().manual_seed(13))
p1 = ops.pack_coeffs(m.fc1.coeffs.detach(), m.fc1.index, 300, 100, 64)
p2 = ops.pack_coeffs(m.fc2.coeffs.detach(), m.fc2.index, 100, 300, 64)
with torch.no_grad():
    got = ops.ffn_packed(x, m.fc1.plan, p1, m.fc1.basis, m.fc1.bias, p2, m.fc2.basis, m.fc2.bias, 100, 300, "gelu")
    want = torch.cat([ops.ffn(*ffn_args(m, x[t:t + 1], 0, False))[0] for t in range(2)])
    assert torch.equal(got, want)
    bad = p1.clone()
    bad[64:76].view(torch.int32)[2] += 1  # the third block's first step: its neighbours' step counts change
    try:
        ops.ffn_packed(x, m.fc1.plan, bad, m.fc1.basis, m.fc1.bias, p2, m.fc2.basis, m.fc2.bias, 100, 300, "gelu")
    except ValueError as e:
        assert "corrupted" in str(e), e
    else:
        raise AssertionError("a corrupted pack went unreported")
print("ok")
"""


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_other_kernel_sets(isa):
    """Capped to AVX2 (the scalar walk of the pack) or to the portable kernels (which undo the pack
    and run the few-token forward): the same bits as the ffn operator there, and corruption found."""
    if isa == "avx2" and rbe_ffn.cpu_isa() == "portable":
        pytest.skip("this CPU has no AVX2 kernels")
    env = same_package_env()
    env["RBE_FFN_ISA"] = isa
    env["PYTHONPATH"] = env["PYTHONPATH"] + ":" + str(__import__("pathlib").Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(isa=isa)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ---------------------------------------------------------------- the modules
def uses_packed(m) -> bool:
    layers = [m.fc1, m.fc2] if isinstance(m, rbe_ffn.RBEFeedForward) else [m]
    return all(lin.__dict__.get("_pack_memo") is not None for lin in layers)


@pytest.mark.skipif(not AVX512, reason="pack_for_inference packs where the kernels are AVX-512")
def test_pack_for_inference_opts_in_and_out():
    """Nothing is packed unless asked; asked, float32 CPU layers at b <= 64 are packed at once
    (others are left as they are); enable=False drops the packs."""
    m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=27)
    x = torch.randn(1, 100)
    with torch.no_grad():
        m(x)
    assert not uses_packed(m)
    model = torch.nn.Sequential(m, make_linear(130, 10, block_size=128, k=10, seed=28),
                                make_ffn(10, 37, dtype=torch.float64, seed=29))
    assert rbe_ffn.pack_for_inference(model) is model
    assert uses_packed(m) and not uses_packed(model[1]) and not uses_packed(model[2])
    assert m.fc1.packed_nbytes == m.fc1.packed().numel() > 0 and model[1].packed_nbytes == 0
    assert all(lin.use_packed for lin in model.modules() if isinstance(lin, rbe_ffn.RBELinear))
    with torch.no_grad():  # the others compute as before
        model[1](torch.randn(1, 130))
        model[2](torch.randn(1, 10, dtype=torch.float64))
    rbe_ffn.pack_for_inference(model, enable=False)
    assert not any(lin.use_packed or "_pack_memo" in lin.__dict__ for lin in model.modules()
                   if isinstance(lin, rbe_ffn.RBELinear))
    with pytest.raises(TypeError, match="nn.Module"):
        rbe_ffn.pack_for_inference("model")


@pytest.mark.skipif(not AVX512, reason="the modules take the packed operators with the AVX-512 kernels only")
def test_modules_take_packed_for_one_token_without_grad(monkeypatch):
    m = rbe_ffn.pack_for_inference(make_ffn(100, 300, "gelu", block_size=64, k=300, seed=14, random_bias=True))
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(15))
    calls = []
    real = ops.ffn_packed
    monkeypatch.setattr(ops, "ffn_packed", lambda *a: calls.append(1) or real(*a), raising=False)
    y_grad = m(x)  # recorded: the ffn operator
    assert not calls
    with torch.no_grad():
        y = m(x)
    assert calls and torch.equal(y, y_grad.detach())
    assert m.stats["calls"] == 2
    with torch.inference_mode():
        assert torch.equal(m(x), y)
    calls.clear()
    with torch.no_grad():  # three tokens: packed too; four: the few-token operator; the same bits per token
        y3 = m(torch.cat([x, x, x]))
        assert len(calls) == 1
        y4 = m(torch.cat([x, x, x, x]))
        assert len(calls) == 1
    assert all(torch.equal(y3[t], y[0]) for t in range(3)) and all(torch.equal(y4[t], y[0]) for t in range(4))
    lin = rbe_ffn.pack_for_inference(make_linear(100, 70, block_size=64, k=300, seed=16))
    want = lin(x).detach()
    with torch.no_grad():
        assert torch.equal(lin(x), want) and uses_packed(lin)


@pytest.mark.skipif(not AVX512, reason="the modules take the packed operators with the AVX-512 kernels only")
def test_modules_pack_again_after_changes():
    """An optimizer step, load_state_dict, a new index, .to() and a replaced parameter each give
    the next one-token call the new weights."""
    m = rbe_ffn.pack_for_inference(make_ffn(100, 300, "gelu", block_size=64, k=300, seed=17))
    other = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=18)
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(19))

    def check():
        with torch.no_grad():
            got = m(x)
            assert uses_packed(m)
            assert torch.equal(got, ffn_ref(m, x))
        return got

    y0 = check()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(4, 100)).sum().backward()
    opt.step()
    y1 = check()
    assert not torch.equal(y0, y1)
    m.load_state_dict(other.state_dict())
    assert torch.equal(check(), ffn_ref(other, x))
    with torch.no_grad():
        idx = m.fc1.index.clone()
        idx[0] = other.fc2.index[0]  # other sorted, valid positions
        m.fc1.index = idx
    check()
    m.to(torch.float64).to(torch.float32)
    check()
    m.fc2.coeffs = torch.nn.Parameter(m.fc2.coeffs.detach() * 2)
    check()


@pytest.mark.skipif(not AVX512, reason="the modules take the packed operators with the AVX-512 kernels only")
def test_modules_under_autocast_and_half_inputs():
    m = rbe_ffn.pack_for_inference(make_ffn(100, 300, "gelu", block_size=64, k=300, seed=20))
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(21))
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            want = m(x).detach()
            with torch.no_grad():
                got = m(x)
        assert got.dtype == dtype and torch.equal(got, want) and uses_packed(m)
        with torch.no_grad():
            got = m(x.to(dtype))
        assert got.dtype == dtype and torch.equal(got, m(x.to(dtype)).detach())


# ---------------------------------------------------------------- refusals
def test_recorded_calls_are_refused():
    m = make_ffn(10, 37, "gelu", block_size=8, k=5, seed=22)
    x = torch.randn(1, 10, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        ops.ffn_packed(*packed_args(m, x))
    lin = make_linear(10, 12, seed=23)
    with pytest.raises(RuntimeError, match="no backward"):
        ops.linear_packed(torch.randn(1, 10), lin.plan, pack(lin), lin.basis, lin.bias, 10, 12)
    import torch.autograd.forward_ad as fwAD
    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(torch.randn(1, 10), torch.randn(1, 10))
        with pytest.raises(RuntimeError, match="no backward"):
            ops.ffn_packed(*packed_args(m, dual))


def test_bad_packs_raise():
    m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=24)
    x = torch.randn(1, 100)
    args = list(packed_args(m, x))
    p1 = args[2]

    def call(p):
        a = list(args)
        a[2] = p
        with torch.no_grad():
            return ops.ffn_packed(*a)

    with pytest.raises(TypeError, match="uint8"):
        call(p1.to(torch.int32))
    with pytest.raises(ValueError, match="not a pack"):
        call(torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="packs a 100x300"):
        call(args[5])  # fc2's pack for fc1
    with pytest.raises(ValueError, match="header or its size"):
        call(p1[:-1])
    for offset in (0, 1):  # the third block's first step moved: its neighbours' step counts change
        bad = p1.clone()
        bad[64:76].view(torch.int32)[2] += 1 - 2 * offset
        with pytest.raises(ValueError, match="corrupted"):
            call(bad)
    bad = p1.clone()
    masks = 64 + 4 * (m.fc1.coeffs.shape[0] + 1)
    masks = -(-masks // 64) * 64 + -(-m.fc1.coeffs.shape[0] * 4 // 64) * 64  # header, first, nstep: 64-byte padded
    bad[masks] ^= 1  # the first step gains or loses a coefficient
    with pytest.raises(ValueError, match="corrupted"):
        call(bad)
    shifted = torch.empty(p1.numel() + 1, dtype=torch.uint8)
    shifted[1:] = p1  # a view off the 64-byte boundary: copied, then the same result
    assert torch.equal(call(shifted[1:]), call(p1))
    with pytest.raises(TypeError, match="float32"):
        ops.pack_coeffs(m.fc1.coeffs.detach().double(), m.fc1.index, 300, 100, 64)
    big = make_linear(130, 10, block_size=128, k=10, seed=25)
    with pytest.raises(ValueError, match="past the packed kernels"):
        ops.pack_coeffs(big.coeffs.detach(), big.index, 10, 130, 128)
    bad_index = m.fc1.index.clone()
    bad_index[0, 1] = bad_index[0, 0]  # not strictly increasing
    with pytest.raises(IndexError, match="corrupted"):
        ops.pack_coeffs(m.fc1.coeffs.detach(), bad_index, 300, 100, 64)
    with pytest.raises(TypeError, match="float32"):
        with torch.no_grad():
            ops.ffn_packed(*([x.double()] + args[1:]))


def test_opcheck():
    m = make_ffn(40, 100, "gelu", block_size=32, k=60, seed=26, random_bias=True)
    x = torch.randn(2, 40)
    with torch.no_grad():
        assert_opcheck(ops.ffn_packed.default, tuple(packed_args(m, x)))
        lin = m.fc1
        assert_opcheck(ops.linear_packed.default, (x, lin.plan, pack(lin), lin.basis, lin.bias, 40, 100, 1.0, 1.0))
        assert_opcheck(ops.pack_coeffs.default, (lin.coeffs.detach(), lin.index, 100, 40, 32))
