"""rbe_ffn: transformer feed-forward blocks whose weights are stored, trained and
run in a compressed RBE form (pattern + sparse DCT residual per block).

    import rbe_ffn
    cw = rbe_ffn.compress(weight, block_size=64, k=300)   # CompressedWeight
    ffn = rbe_ffn.RBEFeedForward(768, 3072, activation="gelu", checkpoint=True)
    report = rbe_ffn.replace_mlp(model, block_size=64, k=300)   # convert a model's MLPs
    rbe_ffn.distill_model(model, original, batches)              # then match the original's outputs
"""
import contextlib
import os

from . import _ops
from . import _C  # the extension, loaded by _ops once torch is (it links torch's libraries)
from ._ops import get_plan
from .checkpoint import load_safetensors, save_safetensors
from .codec import CompressedWeight, compress, decompress
from .convert import ConversionReport, Distill, replace_mlp
from .distill import DistillReport, distill_model
from .distributed import ddp_ignore_index
from .dynamic import DynamicSupport
from .functional import canonical_activation, rbe_feed_forward, rbe_linear
from .modules import RBEFeedForward, RBELinear, pack_for_inference, seeded_positions
from .storage import storage_report, storage_state_dict

__all__ = [
    "CompressedWeight", "compress", "decompress", "RBELinear", "RBEFeedForward",
    "rbe_linear", "rbe_feed_forward", "canonical_activation", "get_plan",
    "save_safetensors", "load_safetensors", "ddp_ignore_index",
    "replace_mlp", "ConversionReport", "Distill", "distill_model", "DistillReport", "DynamicSupport", "cpu_isa",
    "dct_path",
    "seeded_positions", "storage_report", "storage_state_dict",
]
__version__ = "0.1.0"


def cpu_isa() -> str:
    """The instruction set of the float32 CPU kernels: ``"avx512"``, ``"avx2"`` or ``"portable"``.

    The best this CPU has, capped by the environment variable ``RBE_FFN_ISA`` (one of those
    names), which the kernels read once, at their first call: set it before the process starts
    (or at least before the first CPU forward) to compare paths, e.g. ``RBE_FFN_ISA=avx2``."""
    return _C.cpu_isa()


@contextlib.contextmanager
def dct_path(enabled: bool = True, few_tokens: int = 0):
    """Within this block, route the linear and feed-forward operators of every device through
    the DCT-domain paths (``docs/DESIGN.md`` section 5.1): each weight densified as its
    transform-domain matrix and multiplied with the device's matrix products, between
    per-segment transforms of the activations; forward calls of at most ``few_tokens`` tokens
    take the few-token sparse product instead (no dense tensor of any kind). Same results as the
    default paths to rounding.

    On CUDA these are the paths in preparation for the GPU; they have not run on a GPU yet, so
    the decode path stays the default, and the token count below which the sparse product wins
    is not measured (hence 0, never, unless given). On CPU the transform-domain kernels are
    faster; the switch exists there so that the same code is tested. Process-wide (every
    thread), not per thread; the environment variables ``RBE_FFN_DCT_PATH=1`` and
    ``RBE_FFN_DCT_FEW_TOKENS=n`` set both at import."""
    if isinstance(few_tokens, bool) or not isinstance(few_tokens, int) or few_tokens < 0:
        raise ValueError(f"rbe_ffn.dct_path: few_tokens must be an int >= 0, got {few_tokens!r}")
    previous = _C.set_dct_path(enabled), _C.set_dct_few_tokens(few_tokens)
    try:
        yield
    finally:
        _C.set_dct_path(previous[0])
        _C.set_dct_few_tokens(previous[1])


if os.environ.get("RBE_FFN_DCT_PATH") == "1":
    _C.set_dct_path(True)
    _C.set_dct_few_tokens(int(os.environ.get("RBE_FFN_DCT_FEW_TOKENS", "0")))
