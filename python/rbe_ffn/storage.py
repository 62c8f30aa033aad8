"""What a module's RBE weights cost in a checkpoint, and the state_dict that stores them cheaper.

Two storage options cut a checkpoint below the in-memory form (basis + coeffs float32, index int16):

- a seeded index (``RBELinear(..., index_seed=s)``, ``layer.use_seeded_index(s)``): the
  state_dict holds the seed (24 bytes per layer) instead of 2k bytes per block;
- ``values_dtype`` = float16 / bfloat16: the coefficient values stored at half width and cast back
  to the layer's dtype on load. Only ``coeffs``: the 8 pattern numbers per block keep the layer's
  dtype (rounding them costs 2-11x the output error of rounding all k coefficients, for 16 of
  1232 bytes per block at b = 64, k = 300; docs/benchmarks.md, Storage options).

``storage_report`` gives bytes, bytes per block and the compression ratio for any combination, so
quality figures can be compared at equal bytes.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import RBELinear, check_values_dtype


def _rbe_layers(module: nn.Module) -> dict:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return {name: m for name, m in module.named_modules() if isinstance(m, RBELinear)}


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def cast_values(t: torch.Tensor, values_dtype: torch.dtype, name: str) -> torch.Tensor:
    """t cast to values_dtype, refusing finite values the dtype cannot hold (they would become
    inf): a ValueError naming the tensor, the largest magnitude and the dtype's limit."""
    out = t.detach().to(values_dtype)
    overflow = torch.isinf(out) & torch.isfinite(t)
    if overflow.any():
        big = t.detach()[torch.isfinite(t)].abs().max().item()
        hint = " (bfloat16 has float32's range)" if values_dtype == torch.float16 else ""
        raise ValueError(f"{name}: values up to {big:.6g} do not fit in {values_dtype} (largest finite "
                         f"{torch.finfo(values_dtype).max:.6g}); store them in a wider values_dtype{hint}")
    return out


def storage_state_dict(module: nn.Module, values_dtype: torch.dtype | None = None) -> dict:
    """``module.state_dict()`` with every RBELinear's ``coeffs`` in ``values_dtype`` (float16,
    bfloat16 or float32; None: unchanged), for torch.save and the like. Seeded layers already store
    their seed instead of their index. ``module.load_state_dict`` takes it back as it is (the
    values are cast to the layers' dtype as they are copied in). Values beyond the dtype's range
    are a ValueError, never inf."""
    values_dtype = check_values_dtype(values_dtype)
    layers = _rbe_layers(module)
    sd = module.state_dict()
    if values_dtype is None:
        return sd
    for name in layers:
        key = _key(name, "coeffs")
        if key in sd and sd[key].dtype != values_dtype:
            sd[key] = cast_values(sd[key], values_dtype, key)
    return sd


def storage_report(module: nn.Module, index: str | None = None, values_dtype: torch.dtype | None = None) -> dict:
    """Checkpoint bytes of the RBE weights of ``module`` (every RBELinear in it; biases and other
    parameters excluded), with the storage options of ``RBELinear.storage_bytes``: ``index`` None
    (as state_dict() stores it now), "stored" or "seeded"; ``values_dtype`` of the coefficients.

    Returns {"layers", "blocks", "bytes", "bytes_per_block", "dense_bytes", "compression_ratio"}:
    dense_bytes are those of the same weights stored densely in the same value dtype
    (``values_dtype``, or the layers' own), compression_ratio = dense_bytes / bytes."""
    layers = _rbe_layers(module)
    if not layers:
        raise ValueError("module has no RBELinear layers")
    values_dtype = check_values_dtype(values_dtype)
    nbytes = blocks = dense = 0
    for m in layers.values():
        nbytes += m.storage_bytes(index, values_dtype)
        blocks += m.coeffs.shape[0]
        dense += m.out_features * m.in_features * (values_dtype or m.coeffs.dtype).itemsize
    return {"layers": len(layers), "blocks": blocks, "bytes": nbytes, "bytes_per_block": nbytes / blocks,
            "dense_bytes": dense, "compression_ratio": dense / nbytes}
