"""Functional forms of the RBE linear layer and feed-forward block."""
from __future__ import annotations

import torch

from ._ops import RBE_TILE, get_plan, ops, sixteen_bit_flags

# Names accepted for the activation: PyTorch's, and the seed design's (DESIGN.md section 4).
_ALIASES = {
    "gelu": "gelu", "Gelu": "gelu", "GeluPytorch": "gelu",
    "gelu_tanh": "gelu_tanh", "GeluApproximate": "gelu_tanh",
    "relu": "relu", "Relu": "relu",
    "silu": "silu", "swish": "silu", "Swish": "silu",
}


def canonical_activation(activation) -> str:
    """'gelu' | 'gelu_tanh' | 'relu' | 'silu' from a name, an alias or an nn activation module
    (nn.GELU, nn.ReLU, nn.SiLU, or a subclass that keeps their forward: one with its own forward
    computes something else, so it is refused rather than taken for the base function)."""
    for base in (torch.nn.GELU, torch.nn.ReLU, torch.nn.SiLU):
        if isinstance(activation, base) and type(activation).forward is not base.forward:
            raise ValueError(f"activation {type(activation).__name__} subclasses nn.{base.__name__} with its own "
                             f"forward: what it computes is unknown, so it cannot be run as "
                             f"{base.__name__.lower()}; pass the activation's name if it is the same function")
    if isinstance(activation, torch.nn.GELU):
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    if isinstance(activation, torch.nn.ReLU):
        return "relu"
    if isinstance(activation, torch.nn.SiLU):
        return "silu"
    if isinstance(activation, str) and activation in _ALIASES:
        return _ALIASES[activation]
    raise ValueError(
        f"unknown activation {activation!r}: expected one of gelu, gelu_tanh, relu, silu "
        f"(aliases {sorted(k for k in _ALIASES if k not in ('gelu', 'gelu_tanh', 'relu', 'silu'))})"
    )


def cpu_half_input(x, dtype: torch.dtype):
    """A float16/bfloat16 input on the CPU to a layer of dtype float32/float64 (typically from
    torch.autocast("cpu", dtype=torch.bfloat16), which makes the layer before this one return
    bfloat16): the CPU kernels compute in the layer's dtype. Returns (the input to compute with,
    the dtype to give the output back in, or None when nothing is cast). The feed-forward
    operators then evaluate the activation in float32 (``f32_activation``) and, for bfloat16,
    run the sparse products and coefficient gradients on bfloat16 operands where the CPU has
    AVX-512 BF16 (``bf16_sparse``): the result is rounded to 16 bits anyway."""
    if (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
            and dtype in (torch.float32, torch.float64)):
        return x.to(dtype), x.dtype
    return x, None


def _restore(y, out_dtype):
    """The output in the input's half dtype (under autocast it already is the autocast dtype)."""
    return y if out_dtype is None or torch.is_autocast_enabled("cpu") else y.to(out_dtype)


def rbe_linear(x, basis, coeffs, index, bias, in_features: int, out_features: int, block_size: int):
    """y = x W^T + bias for a compressed W, computed in the transform domain. x: (*, in)."""
    x, out_dtype = cpu_half_input(x, basis.dtype)
    plan = get_plan(block_size, x.dtype, x.device)
    return _restore(ops.linear(x, plan, basis, coeffs, index, bias, in_features, out_features,
                               bf16_sparse=sixteen_bit_flags(out_dtype)["bf16_sparse"]), out_dtype)


def intermediate_bytes_per_token(d_model: int, d_ff: int, block_size: int, nf: int, itemsize: int) -> int:
    """Transient bytes one token costs inside the feed-forward operator (forward or backward):
    the hidden activation, its recomputed pre-activation, its gradient, and the transformed
    (feature-major) copy of the widest operand, plus the transformed d_model-side operands."""
    rows = block_size + nf
    wide = -(-d_ff // block_size) * rows
    narrow = -(-d_model // block_size) * rows
    return itemsize * (3 * d_ff + wide + 2 * narrow)


# bytes per kept coefficient of the float32 schedules the CPU operator keeps for a whole chunked call
# (csrc/rbe_ops.cpp SchedCache): the one that computes the coefficient gradient with positions and
# work array (16 B; the transposed one when the input gradient is wanted too) + the other (8 B)
SCHED_BYTES_PER_COEFF = 24


def chunk_tokens_for(memory_limit_mb, d_model: int, d_ff: int, block_size: int, nf: int, itemsize: int,
                     kept: int = 0) -> int:
    """Tokens per chunk so that one chunk's transient buffers stay under the limit (0: no chunking).

    kept: the kept coefficients of both weights. When chunks hold several tiles of tokens the float32
    operator keeps both weights' schedules for the whole call instead of rebuilding them per chunk
    (SCHED_BYTES_PER_COEFF each): they count against the limit. When what is left is less than two
    tiles, chunks of at most one tile are used, which need no schedules at all."""
    if memory_limit_mb is None:
        return 0
    per_token = intermediate_bytes_per_token(d_model, d_ff, block_size, nf, itemsize)
    # at most 2**62 tokens: a limit far above any token count means no chunking, and the
    # operators take chunk_tokens as an int64
    limit = min(int(memory_limit_mb * 2**20), 2**62 * per_token)
    sched = SCHED_BYTES_PER_COEFF * kept if itemsize == 4 else 0
    n = (limit - sched) // per_token
    if n <= RBE_TILE:  # no room for cached schedules: one tile at most, block by block
        n = min(limit // per_token, RBE_TILE)
    if n >= RBE_TILE:
        n -= n % RBE_TILE  # whole token tiles: no padding counts against the limit
    return max(n, 1)


def keep_pre(checkpoint: bool) -> bool:
    """Whether the feed-forward operator keeps what its backward needs of the hidden layer (the
    [T, d_ff] pre-activation, or its activation's derivative with fc2's analysed input: DESIGN.md
    section 4): the standard (not checkpointed) block does, unless grad is disabled (no_grad,
    inference_mode), where no backward can follow and writing it cost about 8% of a 64-token
    forward."""
    return not checkpoint and torch.is_grad_enabled()


def rbe_feed_forward(x, fc1, fc2, d_model: int, d_ff: int, block_size: int, activation: str = "gelu",
                     checkpoint: bool = False, chunk_tokens: int = 0):
    """act(x W1^T + b1) W2^T + b2 with W1 [d_ff, d_model], W2 [d_model, d_ff] compressed.

    fc1, fc2: (basis, coeffs, index, bias) tuples (bias may be None), both at block_size.
    checkpoint=False saves x and the pre-activation [T, d_ff] for backward (or, on the CPU where
    _ops.saves_hidden says so, its activation's derivative and fc2's analysed input instead);
    checkpoint=True saves x only and recomputes the pre-activation in backward.
    chunk_tokens > 0 processes that many tokens at a time, forward and backward.
    """
    x, out_dtype = cpu_half_input(x, fc1[0].dtype)
    plan = get_plan(block_size, x.dtype, x.device)
    y, _, _ = ops.ffn(x, plan, *fc1, *fc2, d_model, d_ff, canonical_activation(activation),
                   int(chunk_tokens), keep_pre(checkpoint), **sixteen_bit_flags(out_dtype))
    return _restore(y, out_dtype)
