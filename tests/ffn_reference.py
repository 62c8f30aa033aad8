"""Pure-PyTorch reference of the RBE format and feed-forward block, written from
DESIGN.md sections 2 and 4 without using the extension's kernels.

Everything here is differentiable with torch autograd, so gradients with respect
to basis / coeffs / bias / input come from autograd through the dense decode.
Shared by the test files (imported as a plain module: tests/ has no __init__).
"""
from __future__ import annotations

import json
import math
import pathlib

import torch
import torch.nn.functional as F

DATA = pathlib.Path(__file__).parent / "data" / "rbe_cases.json"


def load_cases():
    with open(DATA) as f:
        return json.load(f)


def dct_matrix(b: int, dtype=torch.float64) -> torch.Tensor:
    """psi[u, n] = a_u cos(pi (n + 1/2) u / b), orthonormal DCT-II rows."""
    n = torch.arange(b, dtype=torch.float64)
    u = torch.arange(b, dtype=torch.float64)[:, None]
    psi = torch.cos(math.pi * (n + 0.5) * u / b)
    psi[0] *= math.sqrt(1.0 / b)
    psi[1:] *= math.sqrt(2.0 / b)
    return psi.to(dtype)


def pattern_images(b: int, dtype=torch.float64) -> torch.Tensor:
    """[8, b, b]: Phi_k at (row r, column c); x from the column, y from the row."""
    g = torch.arange(b, dtype=torch.float64) * 2.0 / (b - 1) - 1.0
    y, x = torch.meshgrid(g, g, indexing="ij")  # y varies with the row, x with the column
    d = torch.sqrt(x * x + y * y)
    pi = math.pi
    phi = torch.stack([torch.ones_like(x), d, d * d, torch.cos(pi * x), torch.cos(pi * y),
                       torch.cos(2 * pi * x), torch.cos(2 * pi * y), torch.cos(pi * x) * torch.cos(pi * y)])
    return phi.to(dtype)


def decode(basis, coeffs, index, out: int, inp: int, b: int) -> torch.Tensor:
    """Dense [out, inp] weight from RBE tensors (differentiable in basis and coeffs)."""
    dtype = coeffs.dtype
    R, C = -(-out // b), -(-inp // b)
    nblk, k = coeffs.shape
    assert nblk == R * C and basis.shape == (nblk, 8)
    psi = dct_matrix(b, dtype)
    phi = pattern_images(b, dtype)
    chat = torch.zeros(nblk, b * b, dtype=dtype)
    chat = chat.scatter(1, index.long(), coeffs).view(nblk, b, b)  # chat[u, v]
    resid = psi.T @ chat @ psi                                       # sum c psi_u psi_v^T
    blocks = torch.einsum("nk,krc->nrc", basis, phi) + resid          # [nblk, b, b]
    w = blocks.view(R, C, b, b).permute(0, 2, 1, 3).reshape(R * b, C * b)
    return w[:out, :inp]


ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def ffn(x, fc1, fc2, d_model: int, d_ff: int, b: int, activation: str):
    """act(x W1^T + b1) W2^T + b2 with fc = (basis, coeffs, index, bias)."""
    w1 = decode(fc1[0], fc1[1], fc1[2], d_ff, d_model, b)
    w2 = decode(fc2[0], fc2[1], fc2[2], d_model, d_ff, b)
    return F.linear(ACT[activation](F.linear(x, w1, fc1[3])), w2, fc2[3])


def module_ffn(m, x):
    """The reference evaluated on an RBEFeedForward's format numbers (its parameters times their
    scales: autograd reaches the parameters)."""
    f1, f2 = m.fc1, m.fc2
    (b1, c1), (b2, c2) = f1.numbers(), f2.numbers()
    return ffn(x, (b1, c1, f1.index, f1.bias), (b2, c2, f2.index, f2.bias),
               m.d_model, m.d_ff, m.block_size, m.activation)


PARAM_NAMES = ("fc1.basis", "fc1.coeffs", "fc1.bias", "fc2.basis", "fc2.coeffs", "fc2.bias")


def grads_of(fn, x, params, dy):
    """y = fn(x) and the gradients of sum(y * dy) w.r.t. x and params (list of tensors)."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    gs = torch.autograd.grad((y * dy).sum(), [x, *params], allow_unused=True)
    return y.detach(), list(gs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| (computed in float64)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num
