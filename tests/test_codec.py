"""Tests of the RBE codec: rbe_ffn.compress / decompress and the encode / decode operators.

Every expected value here comes from an implementation written in this file
with plain torch ops straight from DESIGN.md section 2 (closed-form DCT-II
cosines, the 8 pattern images), from the independent vectors in
tests/data/rbe_cases.json, or from a mathematical guarantee (Parseval,
orthonormality); never from the code under test.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import pytest
import torch

import rbe_ffn

ops = torch.ops.rbe_ffn
F64, F32 = torch.float64, torch.float32
CASES = json.loads((pathlib.Path(__file__).parent / "data" / "rbe_cases.json").read_text())


# ---------------------------------------------------------------- independent reference (DESIGN.md section 2)
def ref_psi(b: int) -> torch.Tensor:
    """[b, b] orthonormal DCT-II: psi[u, n] = a_u cos(pi (n + 1/2) u / b), a_0 = sqrt(1/b), a_u = sqrt(2/b)."""
    u = torch.arange(b, dtype=F64)[:, None]
    n = torch.arange(b, dtype=F64)[None, :]
    a = torch.full((b, 1), math.sqrt(2.0 / b), dtype=F64)
    a[0, 0] = math.sqrt(1.0 / b)
    return a * torch.cos(math.pi * (n + 0.5) * u / b)


def ref_patterns(b: int) -> torch.Tensor:
    """[8, b, b]: Phi_k at (row r, column c); x = 2c/(b-1) - 1 (column), y = 2r/(b-1) - 1 (row)."""
    z = 2.0 * torch.arange(b, dtype=F64) / (b - 1) - 1.0
    y = z[:, None].expand(b, b)
    x = z[None, :].expand(b, b)
    d = torch.sqrt(x * x + y * y)
    pi = math.pi
    return torch.stack([
        torch.ones(b, b, dtype=F64), d, d * d,
        torch.cos(pi * x), torch.cos(pi * y), torch.cos(2 * pi * x), torch.cos(2 * pi * y),
        torch.cos(pi * x) * torch.cos(pi * y),
    ])


def ref_decode(basis, coeffs, index, out, inp, b) -> torch.Tensor:
    """Dense [out, in] float64 from the RBE tensors, block by block, in plain torch."""
    R, C = -(-out // b), -(-inp // b)
    psi, phi = ref_psi(b), ref_patterns(b)
    basis, coeffs, index = basis.double(), coeffs.double(), index.long()
    full = torch.zeros(R * b, C * b, dtype=F64)
    for p in range(R * C):
        i, j = divmod(p, C)
        chat = torch.zeros(b * b, dtype=F64)
        chat.index_add_(0, index[p], coeffs[p])
        chat = chat.view(b, b)  # chat[u, v], u = row frequency
        blk = psi.T @ chat @ psi + torch.einsum("k,krc->rc", basis[p], phi)
        full[i * b:(i + 1) * b, j * b:(j + 1) * b] = blk
    return full[:out, :inp]


def random_rbe(out, inp, b, k, dtype=F64, wide=None, seed=0):
    """Random basis / coeffs and a random sorted index of k distinct positions per block."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-out // b) * -(-inp // b)
    basis = torch.randn(nblk, 8, generator=g, dtype=F64).to(dtype)
    coeffs = torch.randn(nblk, k, generator=g, dtype=F64).to(dtype)
    idt = (torch.int32 if b > 128 else torch.int16) if wide is None else (torch.int32 if wide else torch.int16)
    rows = [torch.randperm(b * b, generator=g)[:k].sort().values for _ in range(nblk)]
    index = torch.stack(rows).to(idt) if nblk else torch.zeros(0, k, dtype=idt)
    return basis, coeffs, index


def measured_rel(w: torch.Tensor, d: torch.Tensor) -> float:
    w, d = w.double(), d.double()
    return ((w - d).norm() / w.norm()).item()


def pure_pattern(R, C, b, seed=0):
    """A matrix that is exactly sum_k p_k Phi_k in every block, and its p."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(R * C, 8, generator=g, dtype=F64)
    w = torch.einsum("pk,krc->prc", p, ref_patterns(b)).view(R, C, b, b).permute(0, 2, 1, 3).reshape(R * b, C * b)
    return w.contiguous(), p


def smooth_plus_noise(out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(out, dtype=F64)[:, None] / out
    c = torch.arange(inp, dtype=F64)[None, :] / inp
    s = (torch.sin(2 * math.pi * 1.5 * r + 0.3) * torch.cos(2 * math.pi * 2.0 * c)
         + 0.5 * torch.sin(2 * math.pi * (0.7 * r + 1.2 * c))
         + 0.3 * torch.cos(2 * math.pi * 3.0 * c + 1.0))
    return s + 0.01 * s.std() * torch.randn(out, inp, generator=g, dtype=F64)


def check_layout(cw, out, inp, b, k):
    """Fields have the documented shapes / dtypes and the index is valid."""
    nblk = -(-out // b) * -(-inp // b)
    assert cw.shape == (out, inp) and cw.block_size == b and cw.k == k
    assert cw.basis.shape == (nblk, 8) and cw.coeffs.shape == (nblk, k) and cw.index.shape == (nblk, k)
    assert cw.index.dtype == (torch.int16 if b <= 128 else torch.int32)
    assert cw.block_errors.shape == (nblk,) and cw.block_errors.dtype == F64
    assert bool((cw.block_errors >= 0).all())
    if k:
        ix = cw.index.long()
        assert int(ix.min()) >= 0 and int(ix.max()) < b * b
        if k > 1:
            assert bool((ix[:, 1:] > ix[:, :-1]).all()), "index must be strictly ascending within a block"


# ---------------------------------------------------------------- decode against the independent reference
@pytest.mark.parametrize("out,inp,b,k", [
    (10, 7, 4, 16),     # b=4, every coefficient, edge blocks on both sides
    (9, 6, 4, 3),
    (20, 13, 8, 10),
    (37, 50, 16, 40),
    (70, 130, 64, 300),
    (64, 64, 64, 1),
])
@pytest.mark.parametrize("wide", [False, True])
def test_decode_matches_reference_f64(out, inp, b, k, wide):
    basis, coeffs, index = random_rbe(out, inp, b, k, F64, wide=wide, seed=out * 1000 + inp)
    got = ops.decode(basis, coeffs, index, out, inp, b)
    assert got.shape == (out, inp) and got.dtype == F64
    ref = ref_decode(basis, coeffs, index, out, inp, b)
    assert (got - ref).abs().max().item() < 1e-12
    # the public wrapper gives the same
    assert torch.equal(rbe_ffn.decompress(basis, coeffs, index, (out, inp), b), got)


@pytest.mark.parametrize("out,inp,b,k", [(20, 13, 8, 10), (37, 50, 16, 40), (70, 130, 64, 300)])
def test_decode_matches_reference_f32(out, inp, b, k):
    basis, coeffs, index = random_rbe(out, inp, b, k, F32, seed=7)
    got = ops.decode(basis, coeffs, index, out, inp, b)
    assert got.dtype == F32
    ref = ref_decode(basis, coeffs, index, out, inp, b)  # exact arithmetic on the float32 numbers
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", range(len(CASES["decode"])))
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, 1e-5)])
def test_decode_vectors(case, dtype, tol):
    c = CASES["decode"][case]
    b, out, inp = c["block_size"], c["out"], c["in"]
    idt = torch.int16 if b <= 128 else torch.int32
    basis = torch.tensor(c["basis"], dtype=F64).to(dtype)
    coeffs = torch.tensor(c["coeffs"], dtype=F64).reshape(len(c["coeffs"]), c["k"]).to(dtype)
    index = torch.tensor(c["index"], dtype=torch.int64).reshape(len(c["index"]), c["k"]).to(idt)
    expected = torch.tensor(c["weight"], dtype=F64)
    got = rbe_ffn.decompress(basis, coeffs, index, (out, inp), b)
    assert got.shape == (out, inp) and got.dtype == dtype
    err = (got.double() - expected).abs().max().item()
    assert err < tol * max(1.0, expected.abs().max().item()), f"case {case}: max error {err:.3e}"
    # and our in-test reference agrees with the vectors (pins the reference itself)
    if dtype == F64:
        assert (ref_decode(basis, coeffs, index, out, inp, b) - expected).abs().max().item() < 1e-12


# ---------------------------------------------------------------- DCT
@pytest.mark.parametrize("b", [4, 8, 16, 64, 256])
def test_dct_orthonormal_closed_form(b):
    # closed-form entries, no torch.fft: psi psi^T = I and psi^T psi = I
    psi = ref_psi(b)
    eye = torch.eye(b, dtype=F64)
    assert (psi @ psi.T - eye).abs().max().item() < 1e-13
    assert (psi.T @ psi - eye).abs().max().item() < 1e-13
    # the library's tables use the same DCT (first b analysis rows of the plan are psi)
    plan = rbe_ffn.get_plan(b, F64, "cpu")
    assert (plan[0, :b] - psi).abs().max().item() < 1e-14
    assert (plan[1, :b] - psi).abs().max().item() < 1e-14


@pytest.mark.parametrize("b", [4, 8, 16])
def test_single_coefficient_is_outer_product(b):
    psi = ref_psi(b)
    bb = b * b
    # one block, one coefficient at every (u, v) in turn; stacked as bb independent 1-block decodes
    for o in range(bb):
        u, v = divmod(o, b)
        basis = torch.zeros(1, 8, dtype=F64)
        coeffs = torch.ones(1, 1, dtype=F64)
        index = torch.tensor([[o]], dtype=torch.int16)
        got = ops.decode(basis, coeffs, index, b, b, b)
        assert (got - torch.outer(psi[u], psi[v])).abs().max().item() < 1e-15, (u, v)


def test_single_coefficient_is_outer_product_b64_sample():
    b = 64
    psi = ref_psi(b)
    for u, v in [(0, 0), (0, 63), (63, 0), (1, 2), (37, 5), (63, 63)]:
        got = ops.decode(torch.zeros(1, 8, dtype=F64), torch.full((1, 1), -2.5, dtype=F64),
                         torch.tensor([[u * b + v]], dtype=torch.int16), b, b, b)
        assert (got + 2.5 * torch.outer(psi[u], psi[v])).abs().max().item() < 1e-14, (u, v)


# ---------------------------------------------------------------- encoder guarantees
@pytest.mark.parametrize("b", [4, 8, 16, 64])
def test_pure_pattern_recovered_with_k0(b):
    R, C = (2, 3) if b < 64 else (1, 2)
    w, p = pure_pattern(R, C, b, seed=b)
    cw = rbe_ffn.compress(w, block_size=b, k=0)
    check_layout(cw, R * b, C * b, b, 0)
    d = cw.decompress()
    assert (d - w).abs().max().item() < 1e-10
    assert cw.relative_error < 1e-10 and measured_rel(w, d) < 1e-10
    if b >= 8:
        # the basis has full rank from b = 8 on: the coefficients themselves are recovered
        assert (cw.basis - p).abs().max().item() < 1e-8
    # b = 4: the 8 images are linearly dependent (rank < 8); only the matrix is unique


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, 1e-5)])
@pytest.mark.parametrize("shape,b", [((32, 48), 16), ((37, 10), 8), ((13, 9), 4), ((70, 65), 64)])
def test_full_k_is_lossless(dtype, tol, shape, b):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype)
    cw = rbe_ffn.compress(w, block_size=b, k=b * b)
    check_layout(cw, *shape, b, b * b)
    # every position kept: index is 0..b*b-1 in every block
    assert torch.equal(cw.index.long(), torch.arange(b * b).expand(cw.index.shape[0], -1))
    d = cw.decompress()
    assert d.dtype == dtype
    assert (d.double() - w.double()).abs().max().item() < tol * max(1.0, w.abs().max().item())
    assert cw.relative_error < tol


KS_16 = [0, 1, 2, 5, 10, 20, 50, 100, 150, 200, 255, 256]


def test_error_monotone_in_k_interior_blocks():
    # sides are multiples of b: every block's error is the energy of its dropped DCT
    # coefficients, and a larger k keeps a superset of them, so it can never grow
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(5), dtype=F64)
    prev_rel, prev_blocks = math.inf, None
    for k in KS_16:
        cw = rbe_ffn.compress(w, block_size=16, k=k)
        assert cw.relative_error <= prev_rel, f"k={k}: {cw.relative_error} > {prev_rel}"
        if prev_blocks is not None:
            assert bool((cw.block_errors <= prev_blocks).all()), f"k={k}"
        # kept sets are nested: every position kept at the previous k is still kept
        prev_rel, prev_blocks = cw.relative_error, cw.block_errors
    assert prev_rel < 1e-12


def test_error_monotone_in_k_interior_blocks_of_edge_shape():
    # the full blocks of a matrix with edge blocks obey the same guarantee
    out, inp, b = 37, 53, 16
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(6), dtype=F64)
    R, C = -(-out // b), -(-inp // b)
    full = torch.tensor([(i + 1) * b <= out and (j + 1) * b <= inp for i in range(R) for j in range(C)])
    prev = None
    for k in KS_16:
        e = rbe_ffn.compress(w, block_size=b, k=k).block_errors[full]
        if prev is not None:
            assert bool((e <= prev).all()), f"k={k}"
        prev = e


@pytest.mark.xfail(strict=True, reason=(
    "known: edge blocks are reflect-padded and the k kept coefficients are the largest of the PADDED "
    "block's DCT, while the error counts real entries only; keeping one more coefficient can raise the "
    "real-entry error (e.g. 5x7 Gaussian, seed 1, b=8: k=11 -> 12 raises relative_error 0.59847 -> 0.59906). "
    "Not guaranteed by the design; reported, not hidden."))
def test_error_monotone_in_k_edge_blocks():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=F64)
    prev = math.inf
    for k in range(0, 65):
        rel = rbe_ffn.compress(w, block_size=8, k=k).relative_error
        assert rel <= prev, f"k={k}: {rel} > {prev}"
        prev = rel


def test_kept_coefficients_are_the_largest():
    # with k = b*b every DCT coefficient of the pattern residual is stored (exactly, in float64);
    # a smaller k must keep the k largest magnitudes of each block (ties: lower flat index)
    b, k = 16, 37
    w = torch.randn(32, 40, generator=torch.Generator().manual_seed(14), dtype=F64)
    full = rbe_ffn.compress(w, block_size=b, k=b * b)
    part = rbe_ffn.compress(w, block_size=b, k=k)
    assert torch.equal(part.basis, full.basis)
    for p in range(full.coeffs.shape[0]):
        mag = full.coeffs[p].abs()
        order = sorted(range(b * b), key=lambda o: (-mag[o].item(), o))
        assert part.index[p].tolist() == sorted(order[:k]), p
        assert torch.equal(part.coeffs[p], full.coeffs[p][part.index[p].long()])


@pytest.mark.parametrize("dtype", [F64, F32])
def test_smooth_plus_noise(dtype):
    w = smooth_plus_noise(256, 512).to(dtype)
    cw = rbe_ffn.compress(w, block_size=64, k=300)
    check_layout(cw, 256, 512, 64, 300)
    d = cw.decompress()
    meas = measured_rel(w, d)
    print(f"smooth+1% noise 256x512 {dtype}: relative_error {cw.relative_error:.5f} (measured {meas:.5f})")
    assert cw.relative_error < 0.03
    assert abs(cw.relative_error - meas) < 1e-6


@pytest.mark.parametrize("dtype", [F64, F32])
def test_reported_error_edge_shape(dtype):
    out, inp = 200, 333
    w = smooth_plus_noise(out, inp, seed=1).to(dtype)
    cw = rbe_ffn.compress(w, block_size=64, k=300)
    check_layout(cw, out, inp, 64, 300)
    d = cw.decompress()
    assert d.shape == (out, inp)
    assert cw.relative_error < 0.03
    assert abs(cw.relative_error - measured_rel(w, d)) < 1e-6
    # each block's reported squared error is its measured one over real entries
    b, C = 64, -(-inp // 64)
    # The encoder measures in double against the stored numbers; decompress() then rounds each
    # entry to dtype (|r| <= u |d|, u the unit roundoff), which moves the squared error by at most
    # 2 ||D|| ||r|| + ||r||^2.
    u = torch.finfo(dtype).eps / 2
    diff = (w.double() - d.double())
    for p in range(cw.block_errors.numel()):
        i, j = divmod(p, C)
        sl = (slice(i * b, (i + 1) * b), slice(j * b, (j + 1) * b))
        e = diff[sl].pow(2).sum().item()
        rn = u * d[sl].double().norm().item()
        bound = 2 * math.sqrt(e) * rn + rn * rn + 1e-12 * e
        assert abs(cw.block_errors[p].item() - e) <= bound, (p, cw.block_errors[p].item(), e, bound)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_gaussian_error_is_large_and_honest(dtype):
    w = torch.randn(256, 320, generator=torch.Generator().manual_seed(9), dtype=F64).to(dtype)
    cw = rbe_ffn.compress(w, block_size=64, k=300)
    meas = measured_rel(w, cw.decompress())
    print(f"Gaussian 256x320 {dtype} b=64 k=300: relative_error {cw.relative_error:.4f} (measured {meas:.4f})")
    assert abs(cw.relative_error - meas) < 1e-6
    assert cw.relative_error > 0.5  # white noise in the DCT domain: compression is very lossy


def test_zero_matrix():
    cw = rbe_ffn.compress(torch.zeros(20, 30), block_size=8, k=4)
    assert cw.relative_error == 0.0
    assert torch.equal(cw.decompress(), torch.zeros(20, 30))


# ---------------------------------------------------------------- shapes and sizes
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("out,inp,b,k", [
    (100, 37, 64, 300), (100, 37, 8, 20), (1, 1, 4, 5), (1, 1, 64, 300), (3, 1000, 64, 300), (3, 1000, 16, 7),
    (40, 24, 8, 0), (40, 24, 8, 64), (9, 10, 4, 6), (130, 70, 128, 300), (300, 260, 256, 300),
])
def test_shapes(dtype, out, inp, b, k):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(out + inp), dtype=F64).to(dtype)
    cw = rbe_ffn.compress(w, block_size=b, k=k)
    check_layout(cw, out, inp, b, k)
    assert cw.basis.dtype == dtype and cw.coeffs.dtype == dtype
    d = cw.decompress()
    assert d.shape == (out, inp) and d.dtype == dtype
    assert abs(cw.relative_error - measured_rel(w, d)) < 1e-6
    # decompress is exactly what the stored numbers describe (independent reference)
    ref = ref_decode(cw.basis, cw.coeffs, cw.index, out, inp, b)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert (d.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())
    # the low-level encode returns the same four tensors
    basis, coeffs, index, err = ops.encode(w, b, k)
    assert torch.equal(basis, cw.basis) and torch.equal(coeffs, cw.coeffs)
    assert torch.equal(index, cw.index) and torch.equal(err, cw.block_errors)
    if k == b * b:
        assert cw.relative_error < (1e-10 if dtype == F64 else 1e-5)


def test_single_entry_blocks():
    # 1x1: one block that is 1 real entry of 16; with a pure pattern fit and k=0 the error is
    # measured on that one entry only
    w = torch.tensor([[3.0]], dtype=F64)
    cw = rbe_ffn.compress(w, block_size=4, k=0)
    assert abs(cw.relative_error - measured_rel(w, cw.decompress())) < 1e-12
    # a constant block is a pure pattern (Phi_0 = 1) and reflection keeps it constant
    assert abs(cw.decompress().item() - 3.0) < 1e-12


# ---------------------------------------------------------------- bad input: clear exceptions, never a crash
W8 = torch.randn(16, 24, dtype=F64)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: torch.randn(4, 4, 4), ValueError, "2-D"),
    (lambda: torch.randn(16), ValueError, "2-D"),
    (lambda: torch.zeros(0, 5), ValueError, "empty"),
    (lambda: torch.ones(4, 4, dtype=torch.int32), TypeError, "float32 or float64"),
    (lambda: torch.ones(4, 4, dtype=torch.int64), TypeError, "float32 or float64"),
    (lambda: torch.ones(4, 4, dtype=torch.float16), TypeError, "float32 or float64"),
    (lambda: torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN or infinite"),
    (lambda: torch.tensor([[1.0, float("inf")], [0.0, 1.0]], dtype=F64), ValueError, "NaN or infinite"),
    (lambda: torch.tensor([[1.0, 2.0], [-float("inf"), 1.0]]), ValueError, "NaN or infinite"),
    (lambda: [[1.0, 2.0]], TypeError, "torch.Tensor"),
])
def test_compress_rejects_bad_weight(make, exc, match):
    with pytest.raises(exc, match=match):
        rbe_ffn.compress(make(), block_size=4, k=2)


@pytest.mark.parametrize("b,k,match", [
    (8, -1, "k must be"), (8, 65, "k must be"), (4, 17, "k must be"),
    (3, 2, "block_size"), (257, 2, "block_size"), (0, 0, "block_size"),
    (64.0, 2, "block_size"), ("64", 2, "block_size"), (True, 2, "block_size"), (8, 2.0, "k must be"),
])
def test_compress_rejects_bad_sizes(b, k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rbe_ffn.compress(W8, block_size=b, k=k)


def test_encode_op_rejects_bad_input():
    # the operator checks on its own too (it is public through torch.ops)
    with pytest.raises(ValueError, match="block_size"):
        ops.encode(W8, 3, 2)
    with pytest.raises(ValueError, match="k must be"):
        ops.encode(W8, 8, 65)
    with pytest.raises(ValueError, match="2-D"):
        ops.encode(torch.randn(2, 3, 4), 8, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.encode(torch.ones(8, 8, dtype=torch.int32), 8, 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.encode(torch.full((8, 8), float("nan")), 8, 2)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_non_contiguous_input(dtype):
    base = torch.randn(37, 50, generator=torch.Generator().manual_seed(11), dtype=F64).to(dtype)
    view = base.t()  # [50, 37], not contiguous
    assert not view.is_contiguous()
    a = rbe_ffn.compress(view, block_size=16, k=20)
    b = rbe_ffn.compress(view.contiguous(), block_size=16, k=20)
    for f in ("basis", "coeffs", "index", "block_errors"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.relative_error == b.relative_error and a.shape == (50, 37)
    # a strided (every other column) view as well
    sv = base[:, ::2]
    assert torch.equal(rbe_ffn.compress(sv, 8, 10).coeffs, rbe_ffn.compress(sv.contiguous(), 8, 10).coeffs)
    # decode of non-contiguous parameters
    c = ops.decode(b.basis.t().contiguous().t(), b.coeffs.t().contiguous().t(), b.index, 50, 37, 16)
    assert torch.equal(c, b.decompress())


def _decode_args(b=8, out=16, inp=24, k=5):
    return random_rbe(out, inp, b, k, F64, seed=2) + (out, inp, b)


def _with_index(mutate):
    basis, coeffs, index, out, inp, b = _decode_args()
    index = index.clone()
    mutate(index)
    return basis, coeffs, index, out, inp, b


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("mutate,where", [
    (lambda ix: ix.__setitem__((2, 4), 64), "block 2, slot 4"),      # out of range (b*b = 64)
    (lambda ix: ix.__setitem__((0, 0), -1), "block 0, slot 0"),      # negative
    (lambda ix: ix.__setitem__((5, 3), int(ix[5, 2])), "block 5, slot 3"),  # duplicated
    (lambda ix: ix.__setitem__((1, slice(None)), ix[1].flip(0)), "block 1, slot 1"),  # unsorted
])
def test_decode_rejects_bad_index(mutate, where, wide):
    basis, coeffs, index, out, inp, b = _with_index(mutate)
    if wide:
        index = index.int()
    with pytest.raises(IndexError, match=f"index is corrupted at {where}"):
        ops.decode(basis, coeffs, index, out, inp, b)
    with pytest.raises(IndexError, match="strictly increasing"):
        rbe_ffn.decompress(basis, coeffs, index, (out, inp), b)


def test_decode_rejects_bad_tensors():
    basis, coeffs, index, out, inp, b = _decode_args()
    with pytest.raises(TypeError, match="int16 or int32"):
        ops.decode(basis, coeffs, index.long(), out, inp, b)
    with pytest.raises(TypeError, match="int16 or int32"):
        rbe_ffn.decompress(basis, coeffs, index.long(), (out, inp), b)
    with pytest.raises(ValueError, match="index must have the shape of coeffs"):
        ops.decode(basis, coeffs, index[:, :4], out, inp, b)
    with pytest.raises(ValueError, match="basis must be"):
        ops.decode(basis[:-1], coeffs, index, out, inp, b)
    with pytest.raises(ValueError, match="basis must be"):
        ops.decode(basis, coeffs, index, out + b, inp, b)  # one block row too many for these tensors
    with pytest.raises(ValueError, match="coeffs must be"):
        ops.decode(basis, coeffs[:-1], index[:-1], out, inp, b)
    with pytest.raises(TypeError, match="dtype"):
        ops.decode(basis, coeffs.float(), index, out, inp, b)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.decode(basis.long(), coeffs, index, out, inp, b)
    with pytest.raises(ValueError, match="block_size"):
        ops.decode(basis, coeffs, index, out, inp, 3)
    with pytest.raises(ValueError, match="sizes must be positive"):
        ops.decode(basis, coeffs, index, 0, inp, b)
    with pytest.raises(ValueError, match="block_size"):
        rbe_ffn.decompress(basis, coeffs, index, (out, inp), 8.5)
    with pytest.raises(ValueError, match="block_size"):
        rbe_ffn.decompress(basis, coeffs, index, (out, inp), 8.0)
    with pytest.raises(ValueError, match="shape"):
        rbe_ffn.decompress(basis, coeffs, index, (out, inp, 1), b)
    with pytest.raises(ValueError, match="shape"):
        rbe_ffn.decompress(basis, coeffs, index, (float(out), inp), b)
    # any integer type is fine (torch.Size, 0-d integer tensors)
    ok = rbe_ffn.decompress(basis, coeffs, index, torch.Size([out, inp]), torch.tensor(b))
    assert torch.equal(ok, ops.decode(basis, coeffs, index, out, inp, b))


# ---------------------------------------------------------------- dtypes and threads
@pytest.mark.parametrize("dtype", [F64, F32])
def test_threads_deterministic(dtype):
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(12), dtype=F64).to(dtype)
    old = torch.get_num_threads()
    try:
        res = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            cw = rbe_ffn.compress(w, block_size=16, k=30)
            res.append((cw, cw.decompress()))
    finally:
        torch.set_num_threads(old)
    (a, da), (b, db), (c, dc) = res
    for f in ("basis", "coeffs", "index", "block_errors"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert torch.equal(getattr(a, f), getattr(c, f)), f
    assert a.relative_error == b.relative_error
    assert torch.equal(da, db) and torch.equal(da, dc)


def test_f32_and_f64_agree():
    w = smooth_plus_noise(64, 96, seed=4)
    a = rbe_ffn.compress(w, block_size=32, k=50)
    b = rbe_ffn.compress(w.float(), block_size=32, k=50)
    assert b.basis.dtype == F32 and b.coeffs.dtype == F32 and b.decompress().dtype == F32
    assert abs(a.relative_error - b.relative_error) < 1e-4
    assert (a.decompress() - b.decompress().double()).abs().max().item() < 1e-4


# ---------------------------------------------------------------- storage size
def test_nbytes_and_ratio():
    w = torch.randn(768, 3072, generator=torch.Generator().manual_seed(13))
    t0 = time.perf_counter()
    cw = rbe_ffn.compress(w, block_size=64, k=300)
    dt = time.perf_counter() - t0
    nblk = 12 * 48
    assert cw.index.dtype == torch.int16
    assert cw.nbytes == nblk * (8 * 4 + 300 * 6) == nblk * 1832
    assert cw.compression_ratio == pytest.approx(768 * 3072 * 4 / (nblk * 1832))
    assert 8.9 < cw.compression_ratio < 9.0
    print(f"compress 768x3072 float32 b=64 k=300: {dt * 1e3:.1f} ms on {torch.get_num_threads()} threads, "
          f"ratio {cw.compression_ratio:.2f}x at relative_error {cw.relative_error:.3f}")
    # float64 values double the value bytes; int32 index above b=128
    small = rbe_ffn.compress(torch.randn(64, 64, dtype=F64), block_size=64, k=300)
    assert small.nbytes == 8 * 8 + 300 * (8 + 2)
    wide = rbe_ffn.compress(torch.randn(20, 20), block_size=256, k=10)
    assert wide.nbytes == 8 * 4 + 10 * (4 + 4)
