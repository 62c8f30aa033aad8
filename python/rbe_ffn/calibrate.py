"""Data-aware (calibrated) RBE encoding: minimize the OUTPUT error ||(W - W_rbe) X^T|| on a layer's
real inputs X instead of the weight error ||W - W_rbe|| (issue #13 item 1).

Math (all in float64 on the CPU). With H = X^T X / n [in, in] the output error is, up to the factor n,

    sum_r e_r H e_r^T        e_r = row r of E = W - W_rbe.

Pad W to [R b, C b] (edge blocks by the encoder's even reflection) and H with zero rows/columns. Let
P = blockdiag(Psi, ..., Psi) [C b, C b] (the DCT of every block column) and T the DCT-domain residual
of the weight once the pattern is subtracted: rows i*b + u, columns j*b + v, T[i b + u, j b + v] =
(Psi (W_ij - pattern_ij) Psi^T)[u, v]. Since the DCT of a block's rows (Psi on the left) is orthonormal
and mixes only the b rows of one block row, the error of block row i is tr(D_i Hh D_i^T) with D_i the
DCT-domain error of that block row and Hh = P H P^T: every DCT-domain row (i, u) is an independent
quadratic problem over the C b column frequencies (j, v), and the kept coefficients of row (i, u) are
exactly the positions (u, v) kept in the blocks (i, j). For a support S of row t (kept columns),

    min_x ||t - x||_Hh^2  over x supported on S   =>   Hh_SS x_S = (t Hh)_S                    (1)

(the normal equations; the dropped part t_Sc is compensated through the cross terms Hh_S,Sc). A ridge
lam = damp * mean(diag H) is added to H (GPTQ's dampening): the objective is then the output error
plus lam times the weight error, which keeps (1) positive definite when X has fewer samples than
features or constant-zero features.

Positions (k per block, the format's constraint) are chosen per block by one of:
  * "diag": score t_uv^2 * Hh[jv, jv], the output error of dropping that coefficient alone;
  * "obs" (default): SparseGPT-style. Walk the block columns j in order; pick each block's k
    positions by t_uv^2 / d_jv^2 (d: diagonal of the upper Cholesky factor of Hh^-1 — the optimal-
    brain-surgeon saliency given the columns still to come), then push the error of what was
    dropped onto the later columns (t <- t - err d-row, GPTQ's update), so later blocks choose
    positions on the compensated residual. The values are then solved exactly by (1) on the
    ORIGINAL t, whatever the selection.
The 8 pattern numbers of each block are those of the plain encoder (weight least squares; 8 of b*b
numbers, they carry the smooth part). Finally each block row keeps the better (output error on the
calibration data, after rounding to the weight's dtype) of this encoding and the plain one, so the
result is never worse than the plain encoder on the calibration data.

Cost (n samples, out x in weight, m ~ k C / b kept coefficients per DCT row): H n in^2; Hh 2 b in^2;
"obs" in^3 (inverse and Cholesky) + out in^2; t Hh out in^2; solves out m^3 / 3 (batched Cholesky);
the final comparison out in^2. Edge block rows (out not a multiple of b) count their padded rows in
(1) with the reflected values as targets, so there the solution is not exactly optimal for the real
rows; the per-block-row fallback still guarantees no loss against the plain encoder.
"""
from __future__ import annotations

import math

import torch

__all__ = ["second_moment", "encode_calibrated", "output_error"]

SELECT = ("obs", "diag")


def second_moment(x: torch.Tensor, in_features: int, what: str = "calibration") -> tuple:
    """(H = X^T X / n in float64 [in, in], n) of samples x [..., in], validated."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of sample inputs [n, in_features], got {type(x).__name__}")
    if not (x.dtype.is_floating_point):
        raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or x.shape[-1] != in_features:
        raise ValueError(f"{what} must be sample inputs [n, in_features={in_features}] (leading dims are "
                         f"flattened), got shape {tuple(x.shape)}")
    x = x.detach().reshape(-1, in_features)
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(x.shape)}; at least one sample is needed")
    h = torch.zeros(in_features, in_features, dtype=torch.float64)
    for s in range(0, x.shape[0], 8192):  # bounded float64 copies for big batches
        c = x[s:s + 8192].to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"{what} has non-finite values (inf or nan)")
        h.addmm_(c.T, c)
    h /= x.shape[0]
    check_moment(h, in_features, what)
    return h, x.shape[0]


def check_moment(h: torch.Tensor, in_features: int, what: str = "second_moment") -> torch.Tensor:
    """Validate H [in, in] (finite, symmetric, non-zero) and return it as float64 on the CPU."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [in_features, in_features], got {type(h).__name__}")
    if not h.dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating-point tensor, got {h.dtype}")
    if tuple(h.shape) != (in_features, in_features):
        raise ValueError(f"{what} must be the inputs' second moment X^T X / n of shape [in_features, in_features] = "
                         f"[{in_features}, {in_features}], got shape {tuple(h.shape)}")
    h = h.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{what} has non-finite values (inf or nan)")
    scale = h.abs().max().item()
    if (h - h.T).abs().max().item() > 1e-6 * scale:
        raise ValueError(f"{what} is not symmetric: a second moment X^T X / n is")
    if not torch.diagonal(h).sum().item() > 0:
        raise ValueError(f"{what}: the calibration inputs are all zero (trace of X^T X is {torch.trace(h).item()}); "
                         f"the output error is zero for every encoding")
    return h


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, rows=False):
    """||(w - w_hat) X^T|| / ||w X^T|| from H = X^T X / n (float64). rows=True: the squared error
    per row [out] (unnormalized, i.e. e_r H e_r^T) instead."""
    e = w.double() - w_hat.double()
    per_row = ((e @ h) * e).sum(1).clamp_min(0)
    if rows:
        return per_row
    ref = ((w.double() @ h) * w.double()).sum().clamp_min(0).item()
    num = per_row.sum().item()
    return math.sqrt(num / ref) if ref > 0 else math.sqrt(num)


def _reflect(n: int, length: int) -> torch.Tensor:
    """csrc/rbe_codec.c reflect(): the real index an (edge-block) padded index n reads."""
    m = torch.arange(n) % (2 * length)
    return torch.where(m < length, m, 2 * length - 1 - m)


def dct_matrix(b: int) -> torch.Tensor:
    n = torch.arange(b, dtype=torch.float64)
    u = torch.arange(b, dtype=torch.float64)[:, None]
    psi = torch.cos(math.pi * (n + 0.5) * u / b)
    psi[0] *= math.sqrt(1.0 / b)
    psi[1:] *= math.sqrt(2.0 / b)
    return psi


def pattern_images(b: int) -> torch.Tensor:
    g = torch.arange(b, dtype=torch.float64) * 2.0 / (b - 1) - 1.0
    y, x = torch.meshgrid(g, g, indexing="ij")
    d = torch.sqrt(x * x + y * y)
    pi = math.pi
    return torch.stack([torch.ones_like(x), d, d * d, torch.cos(pi * x), torch.cos(pi * y), torch.cos(2 * pi * x),
                        torch.cos(2 * pi * y), torch.cos(pi * x) * torch.cos(pi * y)])


def _blocks(m: torch.Tensor, b: int) -> torch.Tensor:
    """[R b, C b] -> [R, C, b, b]."""
    R, C = m.shape[0] // b, m.shape[1] // b
    return m.reshape(R, b, C, b).permute(0, 2, 1, 3)


def _unblocks(m: torch.Tensor) -> torch.Tensor:
    """[R, C, b, b] -> [R b, C b]."""
    R, C, b, _ = m.shape
    return m.permute(0, 2, 1, 3).reshape(R * b, C * b)


def _topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """score [R, C, b, b] -> bool mask of the k largest per block (ties: lower flat index)."""
    R, C, b, _ = score.shape
    s = score.reshape(R, C, b * b)
    # stable descending sort: equal scores keep ascending flat order (the plain encoder's tie rule)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros(R, C, b * b, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.view(R, C, b, b)


def _select_obs(t: torch.Tensor, hh: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """SparseGPT-style selection with error compensation across block columns; t [Rb, Cb] (not changed)."""
    n = hh.shape[0]
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hh))
    u = torch.linalg.cholesky(hinv, upper=True)  # hinv = u^T u
    d = torch.diagonal(u)
    work = t.clone()
    R = t.shape[0] // b
    C = n // b
    mask = torch.zeros(R, C, b, b, dtype=torch.bool)
    for j in range(C):
        c0, c1 = j * b, (j + 1) * b
        seg = work[:, c0:c1]
        score = (seg / d[c0:c1]) ** 2
        m = _topk_mask(score.reshape(R, b, 1, b).permute(0, 2, 1, 3), k)[:, 0]  # [R, b(u), b(v)]
        mask[:, j] = m
        keep = m.reshape(R * b, b)  # rows i*b+u, column v
        err = torch.empty_like(seg)
        for q in range(b):
            col = seg[:, q]
            e = torch.where(keep[:, q], 0.0, col) / u[c0 + q, c0 + q]
            err[:, q] = e
            if q + 1 < b:
                seg[:, q + 1:] -= e[:, None] * u[c0 + q, c0 + q + 1:c1][None, :]
        if c1 < n:
            work[:, c1:] -= err @ u[c0:c1, c1:]
    return mask


def _solve_rows(t: torch.Tensor, hh: torch.Tensor, keep: torch.Tensor, budget_bytes: int = 1 << 28) -> torch.Tensor:
    """x [Rb, Cb] supported on keep [Rb, Cb] minimizing sum_rows ||t - x||_hh^2: per row the
    normal equations hh_SS x_S = (t hh)_S, batched Cholesky over rows padded to the longest support."""
    rows, n = t.shape
    y = t @ hh
    counts = keep.sum(1)
    m = int(counts.max().item()) if rows else 0
    x = torch.zeros_like(t)
    if m == 0:
        return x
    # each row's kept columns first (ascending), then padding slots (identity rows, zero right side)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m)[None, :] < counts[:, None]
    chunk = max(1, budget_bytes // (8 * m * m * 3))
    eye = torch.eye(m, dtype=t.dtype)
    for s in range(0, rows, chunk):
        idx, val = order[s:s + chunk], valid[s:s + chunk]
        a = hh[idx[:, :, None], idx[:, None, :]]
        vv = val[:, :, None] & val[:, None, :]
        a = torch.where(vv, a, eye)
        rhs = torch.where(val, torch.gather(y[s:s + chunk], 1, idx), 0.0)
        l, info = torch.linalg.cholesky_ex(a)
        if bool((info != 0).any()):  # not positive definite in float64: fall back to a least-squares solve
            sol = torch.linalg.lstsq(a, rhs[..., None]).solution[..., 0]
        else:
            sol = torch.cholesky_solve(rhs[..., None], l)[..., 0]
        buf = torch.zeros(sol.shape[0], n + 1, dtype=t.dtype)  # column n: where padding slots go
        buf.scatter_(1, torch.where(val, idx, n), torch.where(val, sol, 0.0))
        x[s:s + chunk] = buf[:, :n]
    return x


def encode_calibrated(w: torch.Tensor, block_size: int, k: int, h: torch.Tensor, plain, damp: float = 0.01,
                      select: str = "obs"):
    """(basis, coeffs, index, weight_errors_per_block [R*C], output_error, output_error_plain) of the
    data-aware encoding of w [out, in] given H [in, in] (float64) and the plain encoding `plain`
    (a CompressedWeight: its pattern is reused, and it is the fallback per block row)."""
    from .codec import index_dtype
    from ._ops import ops

    b = block_size
    out, inp = w.shape
    R, C = -(-out // b), -(-inp // b)
    dtype = w.dtype
    w64 = w.detach().to(dtype=torch.float64)
    psi = dct_matrix(b)
    phi = pattern_images(b)

    # DCT-domain residual after the plain pattern (the stored, rounded pattern numbers)
    wp = w64[_reflect(R * b, out)][:, _reflect(C * b, inp)]
    basis = plain.basis
    pat = torch.einsum("nk,krc->nrc", basis.double(), phi).view(R, C, b, b)
    t = _unblocks(psi @ (_blocks(wp, b) - pat) @ psi.T)                     # [Rb, Cb]

    # damped H, padded, in the DCT domain of each block column
    lam = damp * torch.diagonal(h).mean().item()
    hp = torch.zeros(C * b, C * b, dtype=torch.float64)
    hp[:inp, :inp] = h
    hp.diagonal().add_(lam)
    hh = _unblocks(psi @ _blocks(hp, b) @ psi.T)
    hh = (hh + hh.T) / 2

    if k == b * b:
        mask = torch.ones(R, C, b, b, dtype=torch.bool)
    elif select == "diag":
        dg = torch.diagonal(hh).view(C, b)
        mask = _topk_mask(_blocks(t, b) ** 2 * dg[None, :, None, :], k)
    else:
        mask = _select_obs(t, hh, b, k)
    keep = _unblocks(mask)
    x = _solve_rows(t, hh, keep) if k > 0 else torch.zeros_like(t)

    coeffs = _blocks(x, b)[mask].view(R * C, k).to(dtype)
    flat = torch.arange(b * b).view(1, 1, b, b).expand(R, C, b, b)
    index = flat[mask].view(R * C, k).to(index_dtype(b))
    basis = basis.to(dtype)

    # per block row: keep the better of the two on the calibration data (undamped H)
    w_new = ops.decode(basis, coeffs, index, out, inp, b)
    w_old = ops.decode(plain.basis, plain.coeffs, plain.index, out, inp, b)
    e_new = output_error(w64, w_new, h, rows=True)
    e_old = output_error(w64, w_old, h, rows=True)
    pad = R * b - out
    br_new = torch.nn.functional.pad(e_new, (0, pad)).view(R, b).sum(1)
    br_old = torch.nn.functional.pad(e_old, (0, pad)).view(R, b).sum(1)
    use_old = br_old < br_new
    if bool(use_old.any()):
        blk = use_old.repeat_interleave(C)
        coeffs = torch.where(blk[:, None], plain.coeffs, coeffs)
        index = torch.where(blk[:, None], plain.index, index)
        w_new = ops.decode(basis, coeffs, index, out, inp, b)
    err = torch.nn.functional.pad(w64 - w_new.double(), (0, C * b - inp, 0, R * b - out))
    block_err = _blocks(err, b).pow(2).sum((2, 3)).reshape(R * C)
    return (basis, coeffs, index, block_err, output_error(w64, w_new, h), output_error(w64, w_old, h),
            int(use_old.sum().item()))
