"""Quantization peers of the conversion studies (examples/convert_minilm.py, examples/convert_char_lm.py):
weight-only fake quantization, so that an RBE conversion can be compared at equal or smaller bytes.

Each function takes a float weight matrix and returns (the dequantized weight, the bytes its quantized
form takes: codes + scales), so the bytes per weight of a peer are counted by the same formula in
every study.
"""
from __future__ import annotations

import copy

import torch

# QLoRA's NormalFloat-4 levels as bitsandbytes tabulates them (8 positive and 7 negative normal quantiles
# plus an exact 0, normalised to [-1, 1]; the construction with offset 0.9677083 gives them to 1 ulp)
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230731010437, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def int8_rowwise(w):
    """Symmetric int8 with one float32 absmax scale per row: (n + 4 rows) bytes."""
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return (w / scale).round().clamp(-127, 127) * scale, w.numel() + 4 * w.shape[0]


def nf4(w, block=64):
    """NF4 (QLoRA's 16 levels) over blocks of 64 consecutive weights, one float32 absmax per block:
    (n / 2 + 4 n / 64) bytes."""
    if w.numel() % block:
        raise ValueError(f"nf4: {w.numel()} weights are not a multiple of the block of {block}")
    flat = w.reshape(-1, block)
    absmax = flat.abs().amax(1, keepdim=True).clamp_min(1e-12)
    q = NF4_LEVELS.to(w.dtype)[((flat / absmax).unsqueeze(-1) - NF4_LEVELS.to(w.dtype)).abs().argmin(-1)]
    return (q * absmax).reshape(w.shape), w.numel() // 2 + 4 * flat.shape[0]


PEERS = (("int8 per-row absmax", int8_rowwise), ("NF4 (blocks of 64, fp32 absmax)", nf4))
"""(name, quantizer) of every peer, in the order the studies report them."""


def quantized(model, fn, linears):
    """A copy of ``model`` whose weight matrices ``linears(copy)`` (an iterable of nn.Linear) are
    fake-quantized by ``fn``; returns (the copy, bytes per weight of those matrices)."""
    m = copy.deepcopy(model)
    nbytes = n = 0
    with torch.no_grad():
        for lin in linears(m):
            q, b = fn(lin.weight)
            lin.weight.copy_(q)
            nbytes, n = nbytes + b, n + q.numel()
    return m, nbytes / n
