"""Helpers for torch.distributed training of models with RBE layers.

None is needed: ``DistributedDataParallel(model)`` works as it is, and so does FSDP2's
``fully_shard`` applied to each RBEFeedForward (and each RBELinear used on its own) and then
to the root. RBELinear keeps its int16 ``index`` as the uint8 buffer ``index_bytes``, which
gloo and NCCL can broadcast, so DDP gives every rank rank 0's index when it is built.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .modules import RBELinear


def ddp_ignore_index(model: nn.Module) -> list[str]:
    """Deprecated: ``DistributedDataParallel(model)`` needs nothing any more.

    Tells DDP (through its private ``_set_params_and_buffers_to_ignore_for_model``) to leave
    the RBE layers' fixed buffers (``index_bytes``) alone: they are then neither
    broadcast when DDP is built nor before each forward, and every rank must build the same
    index itself (same seed, or the same state_dict). Returns the names now ignored.
    """
    warnings.warn("rbe_ffn.ddp_ignore_index is no longer needed: DistributedDataParallel(model) works as it is "
                  "(and then makes every rank's index equal to rank 0's)", DeprecationWarning, stacklevel=2)
    names = [f"{prefix}.{b}" if prefix else b
             for prefix, m in model.named_modules() if isinstance(m, RBELinear) for b in ("index_bytes",)]
    before = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    ignored = before + [n for n in names if n not in before]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return ignored
