"""One token from packed coefficients (csrc/rbe.h; the operators pack_coeffs, linear_packed,
ffn_packed): their results are the bits of linear and ffn (each token as at one token), on every
kernel set and from either layout (a pack made by another kernel set included); the modules take
them for calls of 1-3 tokens that record nothing (once asked to: pack_for_inference) and pack
again after any tracked change; bad and corrupted packs raise; opcheck.
"""
import copy
import io
import subprocess
import sys

import pytest
import torch

import rbe_ffn
from conftest import ACTS, assert_opcheck, ffn_args, make_ffn, make_linear, same_package_env

ops = torch.ops.rbe_ffn
PACKED = rbe_ffn.cpu_isa() in ("avx512", "avx2")  # kernel sets with a packed walk
NO_PACKED = "the modules take the packed operators with the x86 kernels only (AVX-512 or AVX2)"
STEPS, ROWS = 0, 1  # the layouts (csrc/rbe.h): RBE_PACK_STEPS, RBE_PACK_ROWS


def layout(p):
    """The layout a pack's header names (its seventh int64)"""
    return int(p[:64].view(torch.int64)[6])


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


# (d_model, d_ff, block_size, k): b = 64 with edge blocks; 13 block columns (three groups of
# the kernel's four streams and a tail); b = 32 with a tail of streams; b = 48 (three groups of 16 rows,
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
        for threads in (1, 2, 5, 5):  # 5 on this 2-core machine: items change threads (balanced_for)
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(ops.ffn_packed(*packed_args(m, x)))
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


SCRIPT = """
import sys, torch, rbe_ffn
from conftest import make_ffn, ffn_args
ops = torch.ops.rbe_ffn
assert rbe_ffn.cpu_isa() == "{isa}", rbe_ffn.cpu_isa()
m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=12, random_bias=True)
x = torch.randn(2, 100, generator=torch.Generator().manual_seed(13))
p1 = ops.pack_coeffs(m.fc1.coeffs.detach(), m.fc1.index, 300, 100, 64)
p2 = ops.pack_coeffs(m.fc2.coeffs.detach(), m.fc2.index, 100, 300, 64)
assert int(p1[48:56].view(torch.int64)) == {layout}
theirs = torch.load(sys.argv[1])  # the packs of the calling process's kernel set
torch.save((p1, p2), sys.argv[2])
with torch.no_grad():
    want = torch.cat([ops.ffn(*ffn_args(m, x[t:t + 1], 0, False))[0] for t in range(2)])
    for q1, q2 in ((p1, p2), theirs):
        got = ops.ffn_packed(x, m.fc1.plan, q1, m.fc1.basis, m.fc1.bias, q2, m.fc2.basis, m.fc2.bias, 100, 300,
                             "gelu")
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
def test_other_kernel_sets(isa, tmp_path):
    """Capped to AVX2 (its walk of its own layout, and the scalar walk of AVX-512's) or to the
    portable kernels (which undo a pack of either layout and run the few-token forward): the same
    bits as the ffn operator there, from its own packs and from this process's, whose kernels read
    its packs back alike; corruption found."""
    if isa == "avx2" and rbe_ffn.cpu_isa() == "portable":
        pytest.skip("this CPU has no AVX2 kernels")
    m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=12, random_bias=True)
    mine, theirs = tmp_path / "mine.pt", tmp_path / "theirs.pt"
    torch.save((pack(m.fc1), pack(m.fc2)), mine)
    env = same_package_env()
    env["RBE_FFN_ISA"] = isa
    env["PYTHONPATH"] = env["PYTHONPATH"] + ":" + str(__import__("pathlib").Path(__file__).parent)
    script = SCRIPT.format(isa=isa, layout=ROWS if isa == "avx2" else STEPS)
    r = subprocess.run([sys.executable, "-c", script, str(mine), str(theirs)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(13))
    p1, p2 = torch.load(theirs)
    with torch.no_grad():
        got = ops.ffn_packed(*packed_args(m, x)[:2], p1, m.fc1.basis, m.fc1.bias, p2, *packed_args(m, x)[6:])
    assert torch.equal(got, torch.cat([ffn_ref(m, x[t:t + 1]) for t in range(2)]))


def test_layout_follows_the_kernels():
    """AVX2 packs its own layout (RBE_PACK_ROWS) where the sources fit 16 bits, and AVX-512's
    elsewhere: a weight with 1026 block columns of 64 (65664 >= 65536), the same bits either way;
    AVX-512 and the portable kernels pack RBE_PACK_STEPS."""
    lin = make_linear(100, 70, block_size=64, k=300, seed=9)
    assert layout(pack(lin)) == (ROWS if rbe_ffn.cpu_isa() == "avx2" else STEPS)
    wide = make_linear(65664, 5, block_size=64, k=3, seed=34)
    assert layout(pack(wide)) == STEPS
    narrow = make_linear(65472, 5, block_size=64, k=3, seed=35)  # 1023 block columns: 65472 < 65536
    assert layout(pack(narrow)) == (ROWS if rbe_ffn.cpu_isa() == "avx2" else STEPS)
    for w in (wide, narrow):
        x = torch.randn(1, w.in_features, generator=torch.Generator().manual_seed(36))
        with torch.no_grad():
            got = ops.linear_packed(x, w.plan, pack(w), w.basis, w.bias, w.in_features, 5)
            want = ops.linear(x, w.plan, w.basis, w.coeffs, w.index, w.bias, w.in_features, 5)
        assert torch.equal(got, want)


# ---------------------------------------------------------------- the modules
def uses_packed(m) -> bool:
    layers = [m.fc1, m.fc2] if isinstance(m, rbe_ffn.RBEFeedForward) else [m]
    return all(lin.__dict__.get("_pack_memo") is not None for lin in layers)


@pytest.fixture
def packed_calls(monkeypatch):
    """The calls the modules make to the packed operators, counted (the operators themselves run)."""
    calls = []
    table = dict(rbe_ffn.modules._PACKED_OPS)
    for key, real in table.items():
        table[key] = lambda *a, _real=real, _name=key + "_packed": calls.append(_name) or _real(*a)
    monkeypatch.setattr(rbe_ffn.modules, "_PACKED_OPS", table)
    return calls


@pytest.mark.skipif(not PACKED, reason="pack_for_inference packs where the kernels are AVX-512 or AVX2")
def test_pack_for_inference_opts_in_and_out(packed_calls):
    """Nothing is packed unless asked; asked, float32 CPU layers at b <= 64 are packed at once
    (others are left as they are and compute as before); enable=False drops the packs."""
    m = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=27)
    x = torch.randn(1, 100)
    with torch.no_grad():
        m(x)
    assert not uses_packed(m) and not packed_calls
    model = torch.nn.Sequential(m, make_linear(130, 10, block_size=128, k=10, seed=28),
                                make_ffn(10, 37, dtype=torch.float64, seed=29))
    assert rbe_ffn.pack_for_inference(model) is model
    assert uses_packed(m) and not uses_packed(model[1]) and not uses_packed(model[2])
    assert m.fc1.packed_nbytes == m.fc1.packed().numel() > 0 and model[1].packed_nbytes == 0
    assert all(lin.use_packed for lin in model.modules() if isinstance(lin, rbe_ffn.RBELinear))
    with torch.no_grad():
        model[1](torch.randn(1, 130))
        model[2](torch.randn(1, 10, dtype=torch.float64))
        assert not packed_calls
        m(x)
        assert packed_calls == ["ffn_packed"]
    rbe_ffn.pack_for_inference(model, enable=False)
    assert not any(lin.use_packed or "_pack_memo" in lin.__dict__ for lin in model.modules()
                   if isinstance(lin, rbe_ffn.RBELinear))
    with torch.no_grad():
        m(x)
    assert packed_calls == ["ffn_packed"]
    with pytest.raises(TypeError, match="nn.Module"):
        rbe_ffn.pack_for_inference("model")


@pytest.mark.skipif(not PACKED, reason=NO_PACKED)
def test_modules_take_packed_for_one_to_three_tokens_without_grad(packed_calls):
    m = rbe_ffn.pack_for_inference(make_ffn(100, 300, "gelu", block_size=64, k=300, seed=14, random_bias=True))
    g = torch.Generator().manual_seed(15)
    x = torch.randn(1, 100, generator=g)
    y_grad = m(x)  # recorded: the ffn operator
    assert not packed_calls
    with torch.no_grad():
        y = m(x)
    assert packed_calls and torch.equal(y, y_grad.detach())
    assert m.stats["calls"] == 2
    with torch.inference_mode():
        assert torch.equal(m(x), y)
    for tokens, packed in ((2, True), (3, True), (4, False)):  # distinct tokens, a 3-D input
        xs = torch.randn(1, tokens, 100, generator=g)
        packed_calls.clear()
        with torch.no_grad():
            got = m(xs)
        assert bool(packed_calls) == packed, tokens
        assert got.shape == xs.shape and torch.equal(got[0], ffn_ref(m, xs[0])), tokens
    lin = rbe_ffn.pack_for_inference(make_linear(100, 70, block_size=64, k=300, seed=16))
    want = lin(x).detach()
    packed_calls.clear()
    with torch.no_grad():
        assert torch.equal(lin(x), want) and packed_calls == ["linear_packed"]


@pytest.mark.skipif(not PACKED, reason=NO_PACKED)
def test_modules_pack_again_after_changes(packed_calls):
    """An optimizer step, load_state_dict (with and without assign), a new index, a round trip
    through float64 with the values changed there, a replaced parameter, DynamicSupport's regrowth
    and set_parametrization each give the next packed call the new weights; a write through .data
    needs pack_for_inference again (documented)."""
    m = rbe_ffn.pack_for_inference(make_ffn(100, 300, "gelu", block_size=64, k=300, seed=17))
    other = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=18)
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(19))

    def check():
        packed_calls.clear()
        with torch.no_grad():
            got = m(x)
            assert packed_calls == ["ffn_packed"]
            assert torch.equal(got, ffn_ref(m, x))
        return got

    y0 = check()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(4, 100)).sum().backward()
    opt.step()
    assert not torch.equal(y0, check())
    m.load_state_dict(other.state_dict())
    assert torch.equal(check(), ffn_ref(other, x))
    m.load_state_dict(make_ffn(100, 300, "gelu", block_size=64, k=300, seed=30).state_dict(), assign=True)
    check()
    with torch.no_grad():
        idx = m.fc1.index.clone()
        idx[0] = other.fc2.index[0]  # other sorted, valid positions
        m.fc1.index = idx
    check()
    m.to(torch.float64)
    with torch.no_grad():
        m.fc1.coeffs.mul_(1.5)
    m.to(torch.float32)
    check()
    m.fc2.coeffs = torch.nn.Parameter(m.fc2.coeffs.detach() * 2)
    check()
    m.set_parametrization("scaled")
    check()
    ds = rbe_ffn.DynamicSupport(m, torch.optim.SGD(m.parameters(), lr=0.1), every=1, fraction=0.3, until=10)
    m(torch.randn(4, 100)).sum().backward()
    versions = m.fc1.coeffs._version, m.fc2.coeffs._version
    ds.step()
    # the regrowth moves coeffs through their version counter (not .data), as it moves the index
    assert m.fc1.coeffs._version > versions[0] and m.fc2.coeffs._version > versions[1]
    check()
    with torch.no_grad():
        m.fc1.coeffs.data.mul_(3)  # bypasses the version counters
    rbe_ffn.pack_for_inference(m)
    check()
    for _ in range(2):  # `.data = t` swaps the storage (no version change), twice in a row as well
        m.fc1.coeffs.data = m.fc1.coeffs.detach() * 2
        check()
        m.fc1.coeffs.data = m.fc1.coeffs.detach() * 2
        m.fc1.coeffs.data = m.fc1.coeffs.detach() * 0.5
        check()


@pytest.mark.skipif(not PACKED, reason=NO_PACKED)
def test_copies_start_without_a_pack(packed_calls):
    """A deep copy or a pickled module carries no pack: its own (fresh) version numbers could match
    the original's, and then a copy trained after the original was packed would compute with the
    original's old numbers."""
    base = make_ffn(100, 300, "gelu", block_size=64, k=300, seed=31)
    a = rbe_ffn.pack_for_inference(copy.deepcopy(base))
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    a(torch.randn(4, 100)).sum().backward()
    opt.step()
    x = torch.randn(1, 100)
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    for b in (copy.deepcopy(a), torch.load(buf, weights_only=False)):
        assert not uses_packed(b) and b.fc1.use_packed
        packed_calls.clear()
        with torch.no_grad():
            got = b(x)
        assert packed_calls == ["ffn_packed"] and torch.equal(got, ffn_ref(b, x))


@pytest.mark.skipif(not PACKED, reason=NO_PACKED)
def test_tracing_and_dct_path_keep_the_operators(packed_calls, monkeypatch):
    """Inside rbe_ffn.dct_path() and while torch.jit traces (a trace would bake the packed branch
    and its pack in as constants) the modules call the operators they always call."""
    m = rbe_ffn.pack_for_inference(make_ffn(100, 300, "gelu", block_size=64, k=300, seed=32))
    x = torch.randn(1, 100)
    with torch.no_grad():
        with rbe_ffn.dct_path():
            m(x)
        assert not packed_calls
        with monkeypatch.context() as mp:
            mp.setattr(torch.jit, "is_tracing", lambda: True)
            m(x)
        assert not packed_calls
        m(x)
    assert packed_calls


@pytest.mark.skipif(not PACKED, reason=NO_PACKED)
def test_modules_under_autocast_and_half_inputs(packed_calls):
    m = rbe_ffn.pack_for_inference(make_ffn(100, 300, "gelu", block_size=64, k=300, seed=20))
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(21))
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            want = m(x).detach()
            packed_calls.clear()
            with torch.no_grad():
                got = m(x)
        assert got.dtype == dtype and torch.equal(got, want) and packed_calls
        packed_calls.clear()
        with torch.no_grad():
            got = m(x.to(dtype))
        assert packed_calls and got.dtype == dtype and torch.equal(got, m(x.to(dtype)).detach())


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
        with pytest.raises(NotImplementedError, match="forward-mode"):
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
    with pytest.raises(ValueError, match="bytes where its header says"):
        call(p1[:-1])
    for offset in (0, 1):  # the third block's (AVX2's layout: block row's) first step moved: its neighbours'
        # step counts change
        bad = p1.clone()
        bad[64:76].view(torch.int32)[2] += 1 - 2 * offset
        with pytest.raises(ValueError, match="corrupted"):
            call(bad)
    bad = p1.clone()
    if layout(p1) == STEPS:
        bad[mask_offset(m.fc1)] ^= 1  # the first step gains or loses a coefficient
    else:
        bad[src_offset(m.fc1, p1):src_offset(m.fc1, p1) + 2] = 0xFF  # a source past the input
    with pytest.raises(ValueError, match="corrupted"):
        call(bad)
    bad = p1.clone()
    bad[:64].view(torch.int64)[6] = 2  # no such layout
    with pytest.raises(ValueError, match="header is wrong"):
        call(bad)
    assert torch.equal(call(torch.stack([p1, p1], 1)[:, 0]), call(p1))  # not contiguous: copied
    bad = p1.clone()
    bad[:64].view(torch.int64)[1] = -1  # the header's out
    with pytest.raises(ValueError, match="packs a -1x100 weight"):
        call(bad)
    with torch.no_grad(), pytest.raises(ValueError, match="sizes must be"):
        ops.linear_packed(x, m.fc1.plan, p1, m.fc1.basis, None, 100, -300)
    # a pack claiming b = 128 for a b = 128 layer (the plan allows it): refused before any walk
    lin = rbe_ffn.RBELinear(128, 128, block_size=128, k=0)
    blob = torch.zeros(192, dtype=torch.uint8)
    blob[:64] = torch.tensor([0x314B434150454252, 128, 128, 128, 0, 0, 0, 0], dtype=torch.int64).view(torch.uint8)
    with torch.no_grad(), pytest.raises(ValueError, match="past the packed kernels"):
        ops.linear_packed(torch.randn(1, 128), lin.plan, blob, lin.basis, lin.bias, 128, 128)
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




def mask_offset(lin):
    """Where a pack's masks start: the header, first [nblk + 1] int32, nstep [nblk * groups], each
    64-byte aligned (csrc/rbe_ops.cpp, pack_layout)."""
    nblk, groups = lin.coeffs.shape[0], -(-lin.block_size // 16)
    up = lambda n: -(-n // 64) * 64  # noqa: E731
    return 64 + up(4 * (nblk + 1)) + up(nblk * groups)


def src_offset(lin, p):
    """RBE_PACK_ROWS: where a pack's sources start: the header, first [R + 1] int32, gsteps [R * 4 * gr]
    uint16, lane_row [R * 4 * gr * 8], val [steps * 8] float32, each 64-byte aligned
    (csrc/rbe_ops.cpp, pack_layout)."""
    rows, gr = -(-lin.out_features // lin.block_size), -(-lin.block_size // 8)
    steps = int(p[:64].view(torch.int64)[5])
    up = lambda n: -(-n // 64) * 64  # noqa: E731
    return 64 + up(4 * (rows + 1)) + up(2 * rows * 4 * gr) + up(rows * 4 * gr * 8) + up(4 * steps * 8)


def test_stray_lane_is_corrupt():
    """b = 8: a group of 8 rows (AVX-512's layout: of 16 lanes; AVX2's: 8, exactly); a coefficient
    moved to a lane past the rows (a mask bit for a ninth row; a lane naming row 8) is refused
    by every walk (the portable and AVX2 ones: test_other_kernel_sets' corruption)."""
    lin = make_linear(16, 24, block_size=8, k=5, seed=33)
    p = pack(lin)
    x = torch.randn(1, 16)
    bad = p.clone()
    if layout(p) == STEPS:
        masks = bad[mask_offset(lin):mask_offset(lin) + 2].view(torch.int16)
        m0 = int(masks[0]) & 0xFFFF
        masks[0] = ((m0 & (m0 - 1)) | 0x8000) - 0x10000  # a coefficient moved to lane 15: the count stays k
    else:
        lane_row = 64 + 64 + 64  # header, first [4], gsteps [3 * 4 * 1]
        bad[lane_row] = 8  # the first group's first lane (the longest list): row 8 of a block of 8
    with torch.no_grad(), pytest.raises(ValueError, match="corrupted"):
        ops.linear_packed(x, lin.plan, bad, lin.basis, lin.bias, 16, 24)


def test_opcheck():
    m = make_ffn(40, 100, "gelu", block_size=32, k=60, seed=26, random_bias=True)
    x = torch.randn(2, 40)
    with torch.no_grad():
        assert_opcheck(ops.ffn_packed.default, tuple(packed_args(m, x)))
        lin = m.fc1
        assert_opcheck(ops.linear_packed.default, (x, lin.plan, pack(lin), lin.basis, lin.bias, 40, 100, 1.0, 1.0))
        assert_opcheck(ops.pack_coeffs.default, (lin.coeffs.detach(), lin.index, 100, 40, 32))
