"""Helpers for torch.distributed training of models with RBE layers."""
from __future__ import annotations

import torch
from torch import nn

from .modules import RBELinear


def ddp_ignore_index(model: nn.Module) -> list[str]:
    """Tell DistributedDataParallel(model) to leave the RBE layers' fixed buffers alone.

    DDP broadcasts every buffer from rank 0 when it is built; gloo and NCCL cannot carry
    int16, the dtype of ``index`` for block_size <= 128, so ``DDP(model)`` fails with
    "Invalid scalar type". ``index`` never changes during training and ``plan`` is derived
    from the block size, so they need no syncing. Every rank must build the same ``index``
    itself: the same seed, or the same state_dict / checkpoint. Call this on the model you
    pass to DDP, before wrapping it; returns the names now ignored.
    """
    names = [f"{prefix}.{b}" if prefix else b
             for prefix, m in model.named_modules() if isinstance(m, RBELinear) for b in ("index", "plan")]
    before = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    ignored = before + [n for n in names if n not in before]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return ignored
