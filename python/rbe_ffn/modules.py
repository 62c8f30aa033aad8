"""nn.Modules: a compressed linear layer and the compressed feed-forward block."""
from __future__ import annotations

import functools
import hashlib
import math
import numbers
import sys
from typing import NamedTuple

import torch
from torch import nn

from . import _C
from ._ops import HALF, get_plan, ops, sixteen_bit_flags
from .codec import CompressedWeight, check_sizes, compress, decompress, index_dtype, num_blocks
from .functional import (_restore, canonical_activation, chunk_tokens_for, cpu_half_input, intermediate_bytes_per_token,
                         keep_pre)


def _is_dtensor(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameters), without importing torch.distributed.tensor
    (slow to import): none can exist before that module is loaded."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _is_fake(t: torch.Tensor) -> bool:
    """t is a FakeTensor (built under FakeTensorMode, as torch.compile's tracing does)."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


@functools.lru_cache(maxsize=None)
def _pattern_energy(block_size: int) -> float:
    """sum_k mean over a block of Phi_k^2 (E = sum_k ||Phi_k||_F^2 / b^2; csrc/rbe_math.h's
    pattern functions on its grid). Every image is separable in the grid's x and y, so it is summed
    from 1-D sums in plain Python: no tensor is made, so it also works for a layer built on the meta
    device or under FakeTensorMode (tests/test_parametrization.py checks it against a decode)."""
    b = block_size
    g = [2.0 * n / (b - 1) - 1.0 for n in range(b)]  # rbe_grid
    s2 = sum(v * v for v in g)
    s4 = sum(v ** 4 for v in g)
    c1 = sum(math.cos(math.pi * v) ** 2 for v in g)
    c2 = sum(math.cos(2.0 * math.pi * v) ** 2 for v in g)
    total = (b * b                          # 1
             + 2 * b * s2                   # d = |(x, y)|: sum of d^2
             + 2 * b * s4 + 2 * s2 * s2     # d^2: sum of (x^2 + y^2)^2
             + 2 * b * c1 + 2 * b * c2      # cos(pi x), cos(pi y), cos(2 pi x), cos(2 pi y)
             + c1 * c1)                     # cos(pi x) cos(pi y)
    return total / (b * b)


def _check_input(name: str, x, weight: torch.Tensor) -> None:
    """An input on another device than the layer, or float32/float64 of the other dtype: say so
    plainly (the operator would complain about its internal plan tensor, which the user never
    created, or with a CUDA-internal message for a CPU input to a CUDA layer). float16/bfloat16
    on the CPU is computed in the layer's dtype (cpu_half_input). Other dtypes (int, complex,
    ...) are left to the operator: "must be float32 or float64"."""
    dtype = weight.dtype
    if isinstance(x, torch.Tensor) and x.device != weight.device:
        if weight.is_meta:  # built on the meta device and never loaded
            raise ValueError(f"{name}: input is on {x.device} but the layer is on meta (shapes only, no values): "
                             "load its values first, e.g. module.load_state_dict(state_dict, assign=True), or "
                             f"module.to_empty(device={str(x.device)!r}) then module.load_state_dict(state_dict)")
        raise ValueError(f"{name}: input is on {x.device} but the layer is on {weight.device}; move the input "
                         f"(x.to({str(weight.device)!r})) or the module")
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float64) and x.dtype != dtype:
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the layer's dtype {dtype}; "
                        f"convert the input or the module (e.g. module.to({x.dtype}))")


def _packed_call(x, *layers: "RBELinear") -> bool:
    """Whether a call may take the packed operators (linear_packed, ffn_packed): the layers asked
    for it (pack_for_inference), at most PACKED_TOKENS tokens (x: the first layer's input, a plain
    float32 CPU tensor: not fake, not a DTensor), x86 kernels (AVX-512 or AVX2; the portable
    ones would undo the pack on every call), nothing for autograd to record, no tracing and no
    functorch transform (those keep the operators they know), and not inside rbe_ffn.dct_path()
    (which routes the operators that have one). The layers' side (float32 on the CPU,
    block_size <= 64) is packed()'s to check. Cheap: it runs on every call."""
    if not all(layer.use_packed for layer in layers):
        return False
    n = layers[0].in_features
    if (type(x) is not torch.Tensor or x.dtype != torch.float32 or not x.is_cpu or not x.dim() or x.shape[-1] != n
            or not 0 < x.numel() <= PACKED_TOKENS * n):
        return False
    if (_kernels_isa() not in PACKED_ISAS or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active() or _C.dct_path_enabled()):
        return False
    if torch.is_grad_enabled():
        if x.requires_grad:
            return False
        for layer in layers:
            if layer.basis.requires_grad or layer.coeffs.requires_grad or (layer.bias is not None
                                                                          and layer.bias.requires_grad):
                return False
    return True


@functools.cache
def _kernels_isa() -> str:
    """rbe_ffn.cpu_isa(), read once (the kernels read RBE_FFN_ISA once too)"""
    return _C.cpu_isa()


PACK_MAX_BLOCK = _C.pack_max_block()  # RBE_PACK_MAX_B of csrc/rbe.h
PACKED_ISAS = ("avx512", "avx2")  # the kernel sets with a packed walk (rbe_one_rows_forward_f32)
# the overloads themselves: calling an OpOverloadPacket resolves the overload in Python every call
_PACKED_OPS = {"ffn": ops.ffn_packed.default, "linear": ops.linear_packed.default}
# The packed operators compute token by token; the few-token kernels apply each coefficient to
# all tokens at once. 768/3072, one process, interleaved (docs/DESIGN.md section 3.2): packed
# 2.4-2.9x faster at 1 token, 1.8x at 2, 1.3x at 3, 0.9-1.1x at 4, 0.6x at 8.
PACKED_TOKENS = 3


def _check_memory_limit(memory_limit_mb):
    """memory_limit_mb as given, if valid: None (no limit) or a finite positive real number of
    MiB (int, float, numpy scalar). bool, inf, nan, <= 0, strings and tensors are refused
    here, once, for every way the value is set (constructor, from_linears, attribute), instead
    of failing at the first forward with an OverflowError or a TypeError about 'int'."""
    if memory_limit_mb is None:
        return None
    if isinstance(memory_limit_mb, bool) or not isinstance(memory_limit_mb, numbers.Real) \
            or isinstance(memory_limit_mb, torch.Tensor):
        raise TypeError(f"memory_limit_mb must be a positive number of MiB or None, got "
                        f"{type(memory_limit_mb).__name__} {memory_limit_mb!r}")
    if not (math.isfinite(memory_limit_mb) and memory_limit_mb > 0):
        raise ValueError(f"memory_limit_mb must be a positive finite number of MiB or None (no limit), "
                         f"got {memory_limit_mb!r}")
    return memory_limit_mb


def index_problem(index: torch.Tensor, block_size: int) -> str | None:
    """What is wrong with an ``index`` tensor [R*C, k] for block size b, or None if it is valid:
    an integer dtype, 2-D, every value in [0, b*b), strictly increasing within each row (so no
    duplicates). Used when loading state (load_state_dict, rbe_ffn.load_safetensors)."""
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        return f"dtype {index.dtype} is not an integer dtype (expected {index_dtype(block_size)})"
    if index.dim() != 2:
        return f"must be 2-D [R*C, k], got shape {tuple(index.shape)}"
    if index.is_meta or index.numel() == 0:
        return None
    n = block_size * block_size
    i = index.long()  # uint64 values >= 2**63 wrap negative and are reported as out of range
    bad = (i < 0) | (i >= n)
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        return f"value {i[r, c].item()} at [{r}, {c}] is outside [0, {n}) for block_size={block_size}"
    if i.shape[1] > 1:
        bad = i[:, 1:] <= i[:, :-1]
        if bad.any():
            r, c = bad.nonzero()[0].tolist()
            what = "duplicate" if i[r, c] == i[r, c + 1] else "unsorted"
            return (f"{what} positions in row {r}: {i[r, c].item()} then {i[r, c + 1].item()} at columns "
                    f"{c}, {c + 1} (each row must be strictly increasing)")
    return None


def _bytes_as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, k * width] uint8 -> [n, k] of dtype, the same memory (no copy)."""
    if data.shape[-1] == 0:  # k = 0: nothing to view (and torch refuses the view of its strides)
        return data.new_empty(data.shape, dtype=dtype)
    return data.view(dtype)


def _as_bytes(index: torch.Tensor) -> torch.Tensor:
    """[n, k] integer tensor -> its raw bytes [n, k * width] uint8."""
    if index.shape[-1] == 0:
        return index.new_empty(index.shape, dtype=torch.uint8)
    return index.contiguous().view(torch.uint8)


# reset_parameters draws at most about this many random numbers at a time (a few MB of temporaries)
_CHUNK_NUMBERS = 1 << 16


def _chunk_blocks(block_size: int, k: int) -> int:
    """Blocks per chunk of random_positions: ~_CHUNK_NUMBERS draws, and at most 2**20 / (b*b) blocks
    when it works on whole blocks (random keys, or the mask of the complement)."""
    n = block_size * block_size
    m = min(k, n - k)
    rows = _CHUNK_NUMBERS // max(m, 1)
    if k > n - k or _by_keys(n, m):
        rows = min(rows, (1 << 20) // n)
    return max(rows, 1)


def _by_keys(n: int, m: int) -> bool:
    """Draw m of n positions by sorting n random keys: faster than redrawing duplicates when m is
    more than about 3/8 of n (many rounds of redraws then; measured at b = 64)."""
    return 8 * m > 3 * n


def random_positions(nblk: int, block_size: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[nblk, k] flat positions in [0, b*b) (index dtype, on the CPU): each row k distinct positions
    drawn uniformly at random without replacement, sorted ascending.

    Draws k positions per row with replacement, sorts each row, and redraws the duplicates (only
    in rows that have some) until none is left: that is the sequence "draw until k distinct" done
    in batches, so every k-subset is equally likely. For k > b*b/2 the b*b - k positions left out
    are drawn that way instead (fewer redraws). Time and memory are O(nblk * k), not O(nblk * b*b)
    as for a random permutation per block, except near k = b*b/2 (3/8 to 5/8 of b*b), where a
    permutation per block (the first positions of an argsort of random keys) is the faster way."""
    n = block_size * block_size
    dt = index_dtype(block_size)
    if k == n:
        return torch.arange(n, dtype=dt, device="cpu").repeat(nblk, 1)
    m = min(k, n - k)  # how many to draw
    if _by_keys(n, m):
        # stable: ties of the float32 keys are then broken the same way by every build
        keys = torch.rand(nblk, n, generator=generator, device="cpu")
        c = keys.argsort(dim=1, stable=True)[:, :m].to(torch.int32).sort(dim=1).values
    else:
        c = torch.randint(0, n, (nblk, m), generator=generator, dtype=torch.int32, device="cpu").sort(dim=1).values
    while m > 1 and not _by_keys(n, m):
        dup = c[:, 1:] == c[:, :-1]
        rows = dup.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        sub, d = c[rows], dup[rows]
        fresh = torch.randint(0, n, (int(d.sum()),), generator=generator, dtype=torch.int32, device="cpu")
        sub[:, 1:][d] = fresh
        c[rows] = sub.sort(dim=1).values
    if m == k:
        return c.to(dt)
    keep = torch.ones(nblk, n, dtype=torch.bool, device="cpu")
    keep.scatter_(1, c.long(), False)
    return torch.arange(n, dtype=dt, device="cpu").expand(nblk, n)[keep].view(nblk, k)


INDEX_SEED_VERSION = 1
"""Version of the generator of seeded positions (``seeded_positions``), stored with every seed:
bumped whenever the positions a given seed produces change."""

_SEED_LIMIT = 1 << 63  # seeds are stored in an int64


def _check_seed(seed, name: str = "index_seed", limit: int = _SEED_LIMIT) -> int:
    """seed as an int if it is one in [0, limit) (a Python or numpy integer, not a bool)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or isinstance(seed, torch.Tensor):
        raise TypeError(f"{name} must be an int in [0, {limit}), got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed < limit:
        raise ValueError(f"{name} must be in [0, {limit}), got {seed}")
    return seed


SEED_STATE_BYTES = 3 * 8
"""Bytes a seeded layer's index costs in a checkpoint: the int64 [3] state_dict entry index_seed."""

VALUES_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The dtypes coefficient values can be stored in (save_safetensors, storage_state_dict)."""


def check_values_dtype(values_dtype) -> torch.dtype | None:
    """values_dtype if it is None or one of VALUES_DTYPES, else a clear error."""
    if values_dtype is None or values_dtype in VALUES_DTYPES:
        return values_dtype
    if not isinstance(values_dtype, torch.dtype):
        raise TypeError(f"values_dtype must be a torch.dtype (torch.float16, torch.bfloat16 or torch.float32) or "
                        f"None, got {type(values_dtype).__name__} {values_dtype!r}")
    raise ValueError(f"values_dtype must be torch.float16, torch.bfloat16 or torch.float32 (or None: the layer's "
                     f"own dtype), got {values_dtype}")


_INDEX_OPTIONS = (None, "stored", "seeded")


def _draw_positions(out: torch.Tensor, block_size: int, k: int, generator) -> None:
    """Fill out [nblk, k] with random_positions, _chunk_blocks(b, k) blocks at a time, in order
    (the chunking is part of what a seed produces: see seeded_positions)."""
    step = _chunk_blocks(block_size, k)
    for s in range(0, out.shape[0], step):
        e = min(s + step, out.shape[0])
        out[s:e].copy_(random_positions(e - s, block_size, k, generator))


def seeded_positions(nblk: int, block_size: int, k: int, seed: int) -> torch.Tensor:
    """[nblk, k] positions (index dtype, on the CPU) that depend on (nblk, b, k, seed) alone.

    Generator version 1 (INDEX_SEED_VERSION): a fresh ``torch.Generator("cpu")`` (torch's CPU
    generator, mt19937) seeded with ``seed``, drawn by random_positions in chunks of
    _chunk_blocks(b, k) blocks (torch.randint / torch.rand, then a stable sort). Always drawn on
    the CPU, so the positions are the same whatever device the layer lives on and however many
    threads run. They are tied to torch keeping those CPU draws stable across releases (which it
    does not promise): a seed is therefore stored with a digest of its
    positions, and a load whose regenerated positions do not match it is refused
    (tests/test_storage.py pins a few small outputs, so a change shows up there first)."""
    check_sizes(block_size, k)
    seed = _check_seed(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty(nblk, k, dtype=index_dtype(block_size), device="cpu")
    _draw_positions(out, block_size, k, g)
    return out


def positions_digest(index: torch.Tensor) -> int:
    """A 64-bit digest of an index (the first 8 bytes of the SHA-256 of its little-endian values,
    as a signed int64): stored with a seed, it detects regenerated positions that differ."""
    data = index.detach().cpu().contiguous()
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "little", signed=True)


PARAMETRIZATIONS = ("scaled", "plain")
"""How an RBE layer's parameters map to its format numbers (see parametrization_scales)."""


def parametrization_scales(block_size: int, k: int, parametrization: str) -> tuple[float, float]:
    """(pattern scale, coefficient scale): the layer's pattern numbers are the ``basis`` parameter
    times the first, its DCT coefficients the ``coeffs`` parameter times the second.

    "plain": (1, 1), the parameters are the format's numbers (what every layer did before; what
    from_compressed / from_linear / replace_mlp build, so converted numbers stay as encoded).
    "scaled" (default for fresh layers): every stored number gets an image of the same norm,
    sized so that a step of +-lr on each of a block's 8 + k numbers (what Adam's first steps do)
    moves the block by about lr * b in Frobenius norm, as the same step moves a dense block of
    b * b entries. A coefficient's image (a DCT basis image) has norm 1, so its scale is
    b / sqrt(k + 8); the pattern images Phi_j have norms of tens (b for the constant one), so
    the pattern's scale is that divided by their RMS norm, b sqrt(E / 8) (E = sum_j ||Phi_j||^2 / b^2).
    Both are rounded up to a power of two (exact conversions). Measured at 128 -> 512, b=32, k=120
    (docs/studies/equal_params.md): with "plain", one Adam step of the pattern numbers moves the
    weight's spectral norm 12x what a dense step does and one of the coefficients 0.32x. In a
    learning-rate sweep on a small LM (600 steps; pattern x0 to x1, coefficients x1 to x6) the
    best multipliers were about x0.1 for the pattern and x4 for the coefficients (x2 and x3 worse,
    x6 about as good), next to this rule's x0.115 and x2.83, rounded up: x0.125 and x4.
    Under Adam the scales act as per-parameter learning-rate multipliers (the state_dict holds the
    format numbers either way, so checkpoints do not depend on the parametrization)."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if parametrization == "plain":
        return 1.0, 1.0
    coeff = block_size / math.sqrt(k + 8)
    pattern = coeff / (block_size * math.sqrt(_pattern_energy(block_size) / 8.0))
    # rounded up to powers of two: then parameters <-> format numbers (state_dict, from_compressed)
    # are exact both ways, and a checkpoint round trip is bitwise
    return 2.0 ** math.ceil(math.log2(pattern) - 1e-9), 2.0 ** math.ceil(math.log2(coeff) - 1e-9)


def _check_ffn_args(activation, bias, block_size, k, checkpoint, memory_limit_mb) -> tuple:
    """The arguments every RBEFeedForward constructor shares, checked in one place (before any
    work): (canonical activation name, memory_limit_mb)."""
    act = canonical_activation(activation)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {bias!r}")
    check_sizes(block_size, k)
    if not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint must be a bool, got {checkpoint!r}")
    return act, _check_memory_limit(memory_limit_mb)


class _PackMemo(NamedTuple):
    """RBELinear.packed()'s cache: the pack of these tensors at these versions and addresses (key),
    with the packed storages kept alive (no later storage can take their addresses)."""
    coeffs: torch.Tensor
    store: torch.Tensor
    key: tuple
    pack: torch.Tensor
    coeffs_storage: torch.Tensor
    store_storage: torch.Tensor


class RBELinear(nn.Module):
    """A linear layer y = x W^T + b whose W [out, in] is stored and trained in RBE form.

    Parameters: ``basis`` [R*C, 8], ``coeffs`` [R*C, k], ``bias`` [out];
    buffer ``index`` [R*C, k] (fixed positions). No dense W is ever kept.
    A fresh layer picks each block's k positions at random (without
    replacement, from torch's global generator or ``generator``) and scales
    the values so the effective weight has nn.Linear's default variance.

    ``index_seed``: the positions are instead generated from this seed alone
    (``seeded_positions``), and the layer's state_dict stores the seed (key
    ``index_seed``, 24 bytes) instead of the index (2k bytes per block) for as
    long as the positions still are the seed's (see ``index_seed``).
    """

    # the seed the positions were generated from (None: explicit positions), the digest of those
    # positions, and (index_bytes tensor, its _version) when they were last found to match
    _index_seed: int | None = None
    _index_digest: int | None = None
    _index_checked: tuple | None = None
    # whether calls of at most PACKED_TOKENS tokens that autograd does not record read packed
    # coefficients (packed(); set by rbe_ffn.pack_for_inference)
    use_packed: bool = False
    # the parametrization (see parametrization_scales): format numbers = parameters x these scales
    parametrization: str = "plain"
    _pattern_scale: float = 1.0
    _coeff_scale: float = 1.0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 64,
                 k: int = 300, *, device=None, dtype=None, generator: torch.Generator | None = None,
                 index_seed: int | None = None, parametrization: str = "scaled"):
        super().__init__()
        if index_seed is not None:
            index_seed = _check_seed(index_seed)
        self._allocate(in_features, out_features, bias, block_size, k, device, dtype, parametrization)
        self._index_seed = index_seed
        self.reset_parameters(generator)

    def _allocate(self, in_features, out_features, bias, block_size, k, device, dtype, parametrization) -> None:
        """Parameters and buffers of the right shapes, uninitialized."""
        check_sizes(block_size, k)
        self.parametrization = parametrization
        self._pattern_scale, self._coeff_scale = parametrization_scales(block_size, k, parametrization)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.k = block_size, k
        dtype = dtype or torch.get_default_dtype()
        nblk = num_blocks(out_features, in_features, block_size)
        self.basis = nn.Parameter(torch.empty(nblk, 8, device=device, dtype=dtype))
        self.coeffs = nn.Parameter(torch.empty(nblk, k, device=device, dtype=dtype))
        # the positions are kept as their raw bytes (see `index`): int16 is the one dtype that gloo
        # and NCCL cannot broadcast, and DistributedDataParallel broadcasts every buffer
        width = torch.empty((), dtype=index_dtype(block_size)).element_size()
        self.register_buffer("index_bytes", torch.empty(nblk, k * width, device=device, dtype=torch.uint8))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.relative_error: float | None = None  # set when built from a dense weight
        self._plan = get_plan(block_size, self.basis.dtype, self.basis.device)

    # The plan (the block size's transform tables) is this layer's own tensor, not a buffer, and
    # not shared with other layers: it is derived from (block_size, dtype, device) alone, so
    # - it has no place in state_dict, and DDP need not broadcast it (DDP broadcasts every
    #   buffer before every forward by default: 2 tables per layer per step for nothing);
    # - it follows the parameters: rebuilt exactly (never cast) by _apply (.to, .double(),
    #   .cuda(), to_empty) and, when the parameters were replaced another way (a module built on
    #   the meta device and then load_state_dict(sd, assign=True), or a parameter assigned
    #   directly), on first use, instead of staying on meta where the operator would see it;
    # - it is one tensor per layer, so an in-place edit, or a layer built under
    #   torch.inference_mode() or FakeTensorMode, affects that layer only.
    # torch.compile sees the same tensor attribute each call (no rebuild once it matches).
    @property
    def plan(self) -> torch.Tensor:
        plan, basis = self._plan, self.basis
        if plan.device != basis.device or plan.dtype != basis.dtype:
            plan = self._plan = get_plan(self.block_size, basis.dtype, basis.device)
        return plan

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh init: each block's k positions at random (without replacement, not the lowest
        frequencies first; from the layer's index seed, when it has one), values scaled so
        Var(W_entry) = k Var(c) / b^2 = 1 / (3 in) as for nn.Linear's default init; zero pattern;
        nn.Linear's bias init. Random numbers come from ``generator`` (or torch's global CPU
        generator), the same on every device; the work is done a chunk of blocks at a time, so its
        transient memory stays small next to the layer's."""
        nblk, k, b, dtype = self.coeffs.shape[0], self.k, self.block_size, self.coeffs.dtype
        if self.coeffs.is_meta or _is_fake(self.coeffs):  # meta device / FakeTensorMode: no values to draw
            if self._index_seed is not None:
                self._index_digest = self._index_checked = None  # positions not drawn yet
            return
        std = b / math.sqrt(3.0 * self.in_features * max(k, 1))
        with torch.no_grad():
            if self._index_seed is not None:
                self._write_seeded(self._index_seed)
            else:
                _draw_positions(self.index, b, k, generator)
            rows = max(1, _CHUNK_NUMBERS // max(k, 1))
            for s in range(0, nblk, rows):
                e = min(s + rows, nblk)
                self.coeffs[s:e].copy_(torch.randn(e - s, k, generator=generator, dtype=dtype, device="cpu").mul_(std))
            self.basis.zero_()
            if k == 0:  # only the pattern is left to carry the weight
                # Var(W_entry) = Var(p) * sum_k mean(Phi_k^2) over a block; the Phi_k are not
                # unit-RMS (their squares sum to ~7 on average), so divide that out.
                sd = 1.0 / math.sqrt(3.0 * self.in_features * _pattern_energy(b))
                self.basis.copy_(torch.empty(nblk, 8, dtype=dtype, device="cpu").normal_(0.0, sd, generator=generator))
            # the draws above are the format's numbers; the parameters hold them over their scales
            self.basis.div_(self._pattern_scale)
            self.coeffs.div_(self._coeff_scale)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.copy_(torch.empty(self.out_features, dtype=dtype, device="cpu").uniform_(-bound, bound,
                                                                                     generator=generator))

    # ``index`` [R*C, k] (int16 for block_size <= 128, else int32) is stored as the uint8 buffer
    # ``index_bytes`` [R*C, k * 2 (or 4)] and read through a zero-copy dtype view. Why: DDP(model)
    # broadcasts every buffer from rank 0 (at construction and, by default, before every forward)
    # and neither gloo nor NCCL can carry int16 ("Invalid scalar type"), while uint8 they can; a
    # uint8 buffer is also never touched by model.half() / .to(torch.bfloat16) / .double(). The
    # state_dict keeps the key "index" with the int16 (int32) values, as before.
    @property
    def index(self) -> torch.Tensor:
        """The fixed positions [R*C, k] (int16, or int32 for block_size > 128): a view of the
        ``index_bytes`` buffer (writes through it change the layer)."""
        store = self.index_bytes
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled() and not store.is_inference():
            # a view made inside inference mode would be an inference tensor, without the
            # buffer's version counter: writes through it would go unseen (by the seed check and
            # the CUDA operators' index validation), and every CUDA call would validate again. (torch.compile
            # supports neither inference-mode query; compiled code takes the plain view.)
            with torch.inference_mode(False):
                return _bytes_as(store, index_dtype(self.block_size))
        return _bytes_as(store, index_dtype(self.block_size))

    @index.setter
    def index(self, value: torch.Tensor) -> None:
        """``layer.index = t`` copies t's positions in (after the load-time checks); the storage stays."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"RBELinear.index must be a tensor, got {type(value).__name__}")
        if value.shape != self.index.shape:
            raise ValueError(f"RBELinear.index must have shape {tuple(self.index.shape)}, got {tuple(value.shape)}")
        problem = index_problem(value, self.block_size)
        if problem is not None:
            raise (TypeError if "dtype" in problem else ValueError)(f"RBELinear.index: {problem}")
        with torch.no_grad():
            self.index.copy_(value)

    # The state_dict holds the format's numbers (the parameters times their scales), whatever the
    # parametrization: a checkpoint means the same weight to every layer and every tool that reads it.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, scale in (("basis", self._pattern_scale), ("coeffs", self._coeff_scale)):
            t = destination.get(prefix + name)
            if scale != 1.0 and t is not None:
                destination[prefix + name] = t * scale if keep_vars else (t * scale).detach()
        store = destination.pop(prefix + "index_bytes", None)
        if store is None:
            return
        # at index_bytes' place: the same key order as before
        if self._seed_holds():
            # on the CPU for a meta layer: the seed is known, and a meta tensor would lose it
            destination[prefix + "index_seed"] = self._seed_state("cpu" if store.is_meta else store.device)
        else:
            destination[prefix + "index"] = _bytes_as(store, index_dtype(self.block_size))

    # ---------------------------------------------------------------- seeded positions
    # A seeded layer's positions are seeded_positions(nblk, b, k, seed); its state_dict then holds
    # index_seed = [INDEX_SEED_VERSION, seed, positions_digest(positions)] (int64 [3]) instead of
    # the index. The claim "these positions are the seed's" must never outlive a change of the
    # positions (an in-place write, layer.index = ..., a load of explicit positions, a support
    # update, to_empty): it is re-checked, whenever it is read, against the digest, and dropped
    # for good once the positions differ. The check is cheap when nothing was written since the
    # last one (the index_bytes tensor is the same and its _version unchanged), a hash of the
    # index otherwise. Writes that bypass the version counter (through .data or a raw pointer) are
    # seen only by a full check (check_index_seed(); save_safetensors does one).
    @property
    def index_seed(self) -> int | None:
        """The seed this layer's positions were generated from, or None: the layer has explicit
        positions (built or loaded with them), or its positions changed since they were generated
        (the seed is then dropped for good; use_seeded_index sets a new one)."""
        return self._index_seed if self._seed_holds() else None

    def check_index_seed(self) -> int | None:
        """index_seed, after hashing the positions whatever their version counter says (catches
        writes through .data or raw pointers, which the cheap check of index_seed misses)."""
        return self._index_seed if self._seed_holds(full=True) else None

    def use_seeded_index(self, seed: int) -> None:
        """Replace the positions by seeded_positions(..., seed) and store the seed instead of the
        index from now on. The coefficient values stay as they are, each now at its block's new
        position: meant for fresh layers (whose values are i.i.d., so they stay a fresh init),
        not for trained or converted ones."""
        seed = _check_seed(seed)
        with torch.no_grad():
            self._write_seeded(seed)

    def _write_seeded(self, seed: int) -> None:
        """index := the seed's positions; the layer claims the seed (nothing drawn on meta/fake)."""
        self._index_seed = seed
        self._index_digest = self._index_checked = None
        if self.index_bytes.is_meta or _is_fake(self.index_bytes):
            return
        pos = seeded_positions(self.index.shape[0], self.block_size, self.k, seed)
        self.index.copy_(pos)
        self._index_digest = positions_digest(pos)
        self._mark_checked()

    def _mark_checked(self) -> None:
        store = self.index_bytes
        try:
            self._index_checked = (store, store._version)
        except RuntimeError:  # inference tensors have no version counter: hash at every check
            self._index_checked = None

    def _seed_holds(self, full: bool = False) -> bool:
        """Whether the positions still are the seed's (dropping the seed for good when not)."""
        if self._index_seed is None:
            return False
        store = self.index_bytes
        if store.is_meta or _is_fake(store):
            return True  # no positions to compare: the seed defines them
        if not full and self._index_checked is not None:
            t, version = self._index_checked
            if t is store:
                try:
                    if store._version == version:
                        return True
                except RuntimeError:
                    pass
        if self._index_digest is None:  # drawn on meta and materialized since: compare with the seed's
            self._index_digest = positions_digest(seeded_positions(store.shape[0], self.block_size, self.k,
                                                                   self._index_seed))
        if positions_digest(self.index) == self._index_digest:
            self._mark_checked()
            return True
        self._index_seed = self._index_digest = self._index_checked = None
        return False

    def _seed_state(self, device) -> torch.Tensor:
        """The state_dict entry index_seed: int64 [INDEX_SEED_VERSION, seed, digest]."""
        if self._index_digest is None:  # meta: the digest of what the seed will give
            self._index_digest = positions_digest(seeded_positions(self.index.shape[0], self.block_size, self.k,
                                                                   self._index_seed))
        return torch.tensor([INDEX_SEED_VERSION, self._index_seed, self._index_digest], dtype=torch.int64,
                            device=device)

    def positions_from_seed_state(self, state) -> tuple[torch.Tensor, int, int]:
        """(positions [R*C, k] on the CPU, seed, digest) of a state_dict entry index_seed for
        this layer, or ValueError naming the problem: not an int64 tensor [3], an unknown
        generator version, a seed out of range, or positions whose digest differs from the one
        recorded (another torch random generator, or a layer of another shape, block_size or k)."""
        if not isinstance(state, torch.Tensor):
            raise ValueError(f"expected a tensor, got {type(state).__name__}")
        if state.dtype != torch.int64 or tuple(state.shape) != (3,):
            raise ValueError(f"must be an int64 tensor [3] (version, seed, digest), got {state.dtype} "
                             f"{list(state.shape)}")
        if state.is_meta:
            raise ValueError("is on the meta device (no values)")
        version, seed, digest = state.tolist()
        if version != INDEX_SEED_VERSION:
            raise ValueError(f"generator version {version} is not known to this rbe_ffn (it knows "
                             f"{INDEX_SEED_VERSION}); load a checkpoint with the explicit index")
        if seed < 0:
            raise ValueError(f"seed {seed} is negative")
        pos = seeded_positions(self.index.shape[0], self.block_size, self.k, seed)
        if positions_digest(pos) != digest:
            raise ValueError(f"the positions generated from seed {seed} do not match the digest recorded with "
                             f"them: this torch ({torch.__version__}) draws other random numbers than the one that "
                             "wrote the state, or it comes from a layer of another shape, block_size or k; load a "
                             "checkpoint with the explicit index")
        problem = index_problem(pos, self.block_size)
        if problem is not None:  # a broken generator: never expected
            raise ValueError(f"the positions generated from seed {seed} are invalid: {problem}")
        return pos, seed, digest

    # the plan follows the parameters' dtype and device, rebuilt exactly (never cast); the index
    # may have been replaced (.to() copies it, to_empty does not): its seed is checked again
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._plan = get_plan(self.block_size, self.basis.dtype, self.basis.device)
        self._index_checked = None
        self.release_packed()  # .to() may swap the parameters' data without a version change
        return self

    # load_state_dict checks the fixed positions before anything of this layer is copied in: a
    # corrupted checkpoint's out-of-range, duplicated or unsorted index would otherwise be
    # accepted silently (wrong outputs, or table reads out of bounds in the kernels). The error
    # goes into error_msgs, so load_state_dict raises its usual RuntimeError naming the key.
    # The key is "index" (int16/int32 values, or any integer dtype holding valid positions); it
    # is stored into the uint8 buffer index_bytes. Or "index_seed" (a seeded layer's): the
    # positions are regenerated from it and checked against its digest, and the layer then claims
    # the seed. Both keys: the index must match the seed's digest (load_safetensors passes both,
    # having regenerated the positions once already). Everything else is the default behaviour.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, skey, store = prefix + "index", prefix + "index_seed", prefix + "index_bytes"
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if own.pop(store, None) is not None and strict:
            unexpected_keys.append(store)  # never written by state_dict(): it would bypass the checks below
        idx = own.pop(key, None)
        seed_state, new_seed = own.pop(skey, None), None
        if skey in state_dict:
            try:
                if key in state_dict:
                    t = seed_state
                    if not (isinstance(t, torch.Tensor) and t.dtype == torch.int64 and tuple(t.shape) == (3,)):
                        raise ValueError("must be an int64 tensor [3] (version, seed, digest)")
                    version, seed, digest = t.tolist()
                    if version != INDEX_SEED_VERSION or seed < 0:
                        raise ValueError(f"unknown generator version {version} or negative seed {seed}")
                    if isinstance(idx, torch.Tensor) and idx.shape == self.index.shape and \
                            index_problem(idx, self.block_size) is None and positions_digest(
                                idx.to(self.index.dtype)) != digest:
                        raise ValueError(f"{key} given with it does not match its digest")
                else:
                    idx, seed, digest = self.positions_from_seed_state(seed_state)
                    idx = idx.to(seed_state.device)
            except ValueError as e:
                error_msgs.append(f"{skey}: {e}")
                return  # nothing of this layer is loaded
            new_seed = (seed, digest)
        if idx is not None or key in state_dict:
            want = self.index
            if not isinstance(idx, torch.Tensor):
                error_msgs.append(f"{key}: expected a tensor, got {type(idx).__name__}")
                return
            if idx.shape != want.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {idx.shape} from checkpoint, "
                                  f"the shape in current model is {want.shape}.")
                return  # nothing of this layer is loaded
            problem = index_problem(idx, self.block_size)
            if problem is not None:
                error_msgs.append(f"{key}: {problem}")
                return  # nothing of this layer is loaded
            own[store] = _as_bytes(idx.to(want.dtype))  # values checked: the cast is exact
        for name, scale in (("basis", self._pattern_scale), ("coeffs", self._coeff_scale)):
            t = own.get(prefix + name)
            if scale != 1.0 and isinstance(t, torch.Tensor) and t.is_floating_point():
                own[prefix + name] = t / scale  # format numbers -> this layer's parameters
        n = len(missing_keys)
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[n:] = [key if k == store else k for k in missing_keys[n:]]
        if new_seed is not None:  # claimed once the positions are found in place (checked lazily)
            self._index_seed, self._index_digest = new_seed
            self._index_checked = None

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, bias: torch.Tensor | None = None, *,
                        parametrization: str = "plain") -> "RBELinear":
        """A layer holding a copy of ``cw``'s numbers (and ``bias``), checked as the constructor and
        load_state_dict check theirs: shapes exact (nothing broadcast), index valid. Its
        parametrization is "plain" unless asked (see parametrization_scales)."""
        if not isinstance(cw, CompressedWeight):
            raise TypeError(f"cw must be a CompressedWeight, got {type(cw).__name__}")
        shape = tuple(cw.shape) if isinstance(cw.shape, (tuple, list, torch.Size)) else ()
        if len(shape) != 2:
            raise ValueError(f"cw.shape must be (out_features, in_features), got {cw.shape!r}")
        out_features, in_features = shape
        for name, t in (("basis", cw.basis), ("coeffs", cw.coeffs), ("index", cw.index), ("bias", bias)):
            if t is None and name == "bias":
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if cw.coeffs.dim() != 2:
            raise ValueError(f"cw.coeffs must be 2-D [blocks, k], got shape {tuple(cw.coeffs.shape)}")
        check_sizes(cw.block_size, cw.k)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"cw.shape: {name} must be a positive int, got {v!r}")
        nblk = num_blocks(out_features, in_features, cw.block_size)
        for name, t, want in (("basis", cw.basis, (nblk, 8)), ("coeffs", cw.coeffs, (nblk, cw.k)),
                              ("index", cw.index, (nblk, cw.k)), ("bias", bias, (out_features,))):
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want} for shape {shape} at "
                                 f"block_size={cw.block_size}, k={cw.k}")
        if cw.coeffs.dtype not in (torch.float32, torch.float64) or cw.basis.dtype != cw.coeffs.dtype:
            raise TypeError(f"basis and coeffs must both be float32 or both float64, got {cw.basis.dtype} and "
                            f"{cw.coeffs.dtype}")
        if bias is not None and not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        problem = index_problem(cw.index, cw.block_size)
        if problem is not None:
            raise ValueError(f"cw.index: {problem}")
        layer = cls.__new__(cls)  # no random init: every number is copied from cw
        nn.Module.__init__(layer)
        layer._allocate(in_features, out_features, bias is not None, cw.block_size, cw.k, cw.coeffs.device,
                        cw.coeffs.dtype, parametrization)
        with torch.no_grad():
            layer.basis.copy_(cw.basis / layer._pattern_scale)
            layer.coeffs.copy_(cw.coeffs / layer._coeff_scale)
            layer.index.copy_(cw.index)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.relative_error = cw.relative_error
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, k: int = 300) -> "RBELinear":
        """Compress an nn.Linear (its weight is [out, in]); ``relative_error`` records the cost."""
        w = linear.weight.detach()
        work = w if w.dtype in (torch.float32, torch.float64) else w.float()
        cw = compress(work.cpu(), block_size, k)
        cw = CompressedWeight(cw.basis.to(w.device), cw.coeffs.to(w.device), cw.index.to(w.device), cw.shape,
                              cw.block_size, cw.relative_error, cw.block_errors)
        bias = None if linear.bias is None else linear.bias.detach().to(cw.coeffs.dtype)
        return cls.from_compressed(cw, bias)

    def numbers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pattern numbers [R*C, 8], coefficients [R*C, k]): the format's numbers of this layer's
        weight, the parameters ``basis`` and ``coeffs`` times their scales (differentiable; the
        parameters themselves when the parametrization is "plain")."""
        basis, coeffs = self.basis, self.coeffs
        if self._pattern_scale != 1.0:
            basis = basis * self._pattern_scale
        if self._coeff_scale != 1.0:
            coeffs = coeffs * self._coeff_scale
        return basis, coeffs

    def set_parametrization(self, parametrization: str) -> None:
        """Switch between "scaled" and "plain" in place, the format numbers unchanged (exactly:
        the scales are powers of two; the forward's results are the same bits either way, and so
        is its speed). The parameters stay the same tensors (optimizers and DDP keep them),
        but an optimizer's state for them (Adam's moments) is in the old units: switch between
        training runs, not inside one."""
        ps, cs = parametrization_scales(self.block_size, self.k, parametrization)
        with torch.no_grad():
            self.basis.mul_(self._pattern_scale / ps)
            self.coeffs.mul_(self._coeff_scale / cs)
        self.parametrization, self._pattern_scale, self._coeff_scale = parametrization, ps, cs

    def packed(self) -> torch.Tensor | None:
        """The coefficients packed for calls of 1-3 tokens (``torch.ops.rbe_ffn.pack_coeffs``; about
        the size of coeffs + index), made on first use and again after coeffs or the index change;
        None where the packed operators do not apply (not float32 on the CPU, block_size > 64).
        Changes are seen through the tensors' version counters (optimizer steps, copy_,
        load_state_dict, DynamicSupport) and a storage swapped in by ``.data = t``; writes that
        bypass them (through ``.data``, a NumPy view, an alias such as the vector a
        vector_to_parameters call was given) are not: call ``release_packed()`` after one. None for
        an inference tensor (no version counter)."""
        # the dicts, not the attributes (a module attribute is a lookup; packed() runs on every
        # packed call); a parametrized coeffs (torch.nn.utils.parametrize) is not there: no pack
        coeffs, store = self._parameters.get("coeffs"), self._buffers.get("index_bytes")
        if coeffs is None or store is None or getattr(type(self), "coeffs", None) is not None:
            return None  # (a subclass's coeffs property: the parameter is not what forward reads)
        try:  # the storage too: `.data = t` swaps it without a version change
            key = (coeffs._version, store._version, coeffs.data_ptr(), store.data_ptr())
        except RuntimeError:  # inference tensors keep no version counter
            return None
        memo = self.__dict__.get("_pack_memo")
        if memo is not None and memo.coeffs is coeffs and memo.store is store and memo.key == key:
            return memo.pack
        if (coeffs.dtype != torch.float32 or not coeffs.is_cpu or self.block_size > PACK_MAX_BLOCK
                or type(coeffs) is not nn.Parameter or _is_fake(coeffs) or _is_dtensor(coeffs)):
            return None  # what the packed operators do not take
        with torch.no_grad():
            pack = ops.pack_coeffs(coeffs.detach(), self.index, self.out_features, self.in_features,
                                   self.block_size)
        # the tensors themselves (no id reuse) and their storages as packed, kept alive so that no
        # later storage can take their addresses (two `.data =` swaps could otherwise come back to
        # the packed address with the same versions)
        self.__dict__["_pack_memo"] = _PackMemo(coeffs, store, key, pack, coeffs.detach(), store.detach())
        return pack

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the packed coefficients this layer holds now (0: none; see pack_for_inference)."""
        memo = self.__dict__.get("_pack_memo")
        return 0 if memo is None else memo.pack.numel()

    def release_packed(self) -> None:
        """Drop the packed coefficients (packed()); the next packed call packs again."""
        self.__dict__.pop("_pack_memo", None)

    def __getstate__(self):
        # copies (copy.deepcopy, pickling, torch.save of the module) start without a pack: theirs
        # would carry this layer's version numbers, which a copy's fresh tensors can match again
        state = super().__getstate__()
        state = dict(state)
        state.pop("_pack_memo", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("RBELinear", x, self.basis)
        x, out_dtype = cpu_half_input(x, self.basis.dtype)
        if _packed_call(x, self):
            pack = self.packed()
            if pack is not None:
                return _restore(_PACKED_OPS["linear"](x, self.plan, pack, self.basis, self.bias, self.in_features,
                                                  self.out_features, self._coeff_scale, self._pattern_scale),
                                out_dtype)
        # the parameters and their scales: the operator applies the scales (docs/DESIGN.md, Parametrization)
        return _restore(ops.linear(x, self.plan, self.basis, self.coeffs, self.index, self.bias, self.in_features,
                                   self.out_features, self._coeff_scale, self._pattern_scale,
                                   sixteen_bit_flags(out_dtype)["bf16_sparse"]), out_dtype)

    def compressed(self) -> CompressedWeight:
        """The format's numbers (see numbers()) as a CompressedWeight."""
        basis, coeffs = self.numbers()
        return CompressedWeight(basis, coeffs, self.index, (self.out_features, self.in_features),
                                self.block_size, self.relative_error)

    def dense_weight(self) -> torch.Tensor:
        """The dense W these numbers describe (a new tensor; for inspection and tests)."""
        with torch.no_grad():
            basis, coeffs = self.numbers()
            return decompress(basis, coeffs, self.index, (self.out_features, self.in_features), self.block_size)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: basis + coeffs + index (bias excluded, as for the dense figure)."""
        return sum(t.numel() * t.element_size() for t in (self.basis, self.coeffs, self.index))

    @property
    def compression_ratio(self) -> float:
        """Dense weight bytes (same value dtype) / stored weight bytes."""
        return self.out_features * self.in_features * self.coeffs.element_size() / self.weight_nbytes

    def storage_bytes(self, index: str | None = None, values_dtype: torch.dtype | None = None) -> int:
        """Bytes of the weight in a checkpoint (basis + coeffs + index or seed; the bias excluded,
        as in weight_nbytes): per block 8 pattern numbers in the layer's dtype, k coefficients in
        ``values_dtype`` (None: the layer's dtype; as save_safetensors(values_dtype=...)), and
        k index entries (int16, int32 for b > 128) unless the index is seeded, which costs
        SEED_STATE_BYTES per layer. ``index``: None counts the index as state_dict() would store it
        now; "stored" and "seeded" count that option whatever the layer holds (to compare options)."""
        if index not in _INDEX_OPTIONS:
            raise ValueError(f"index must be None, 'stored' or 'seeded', got {index!r}")
        values_dtype = check_values_dtype(values_dtype) or self.coeffs.dtype
        if index is None:
            index = "seeded" if self.index_seed is not None else "stored"
        nblk = self.coeffs.shape[0]
        n = nblk * 8 * self.basis.element_size() + nblk * self.k * values_dtype.itemsize
        if index == "seeded":
            return n + SEED_STATE_BYTES
        return n + nblk * self.k * self.index.element_size()

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"block_size={self.block_size}, k={self.k}, compression={self.compression_ratio:.1f}x, "
             f"parametrization={self.parametrization!r}")
        if self.relative_error is not None:
            s += f", relative_error={self.relative_error:.3g}"
        return s


# Tokens per chunk of a block without memory_limit_mb: two tiles of the kernels, so the operator
# keeps each weight's schedules for the whole call and the d_ff-sized transients (and, when
# checkpointed, the recomputed pre-activation) live per chunk, in cache. Measured at 768/3072,
# 2 threads, against all tokens at once: checkpointed step peak 21.3 MiB against 50.4 (dense 45.0),
# step time 0.80-1.07x (1024 tokens) and 0.72x (4096); standard step 0.84x (1024) and 0.76x (4096),
# forward 0.93x and 0.81x; at 1024/4096, 1024 tokens 1.04x (docs/benchmarks.md; the standard
# figures from before the standard block kept fc2's analysed input, 10b502f).
DEFAULT_CHUNK_TOKENS = 128


class RBEFeedForward(nn.Module):
    """act(x W1^T + b1) W2^T + b2 with both weights in RBE form: fc1 expands, fc2 contracts.

    On the CPU tokens are processed in chunks of DEFAULT_CHUNK_TOKENS (forward and
    backward; the d_ff-sized transients live per chunk). checkpoint=True saves only the
    input for backward and recomputes the [T, d_ff] pre-activation chunk by
    chunk: a training step then peaks at about 0.45x a dense block's memory at
    768/3072, 1024 tokens (docs/benchmarks.md). memory_limit_mb instead bounds
    the transient buffers of one chunk of tokens, the kept schedules included.
    ``stats`` counts calls, estimated multiply-adds x2 (FLOPs) of the
    transform-domain algorithm, and the peak transient bytes of one call.
    ``index_seed=s``: fc1's positions from seed 2s, fc2's from 2s + 1 (see
    RBELinear; give each block of a model its own s, e.g. its layer number).
    """

    def __init__(self, d_model: int, d_ff: int, activation="gelu", bias: bool = True, block_size: int = 64,
                 k: int = 300, checkpoint: bool = False, memory_limit_mb: float | None = None, *, device=None,
                 dtype=None, generator: torch.Generator | None = None, index_seed: int | None = None,
                 parametrization: str = "scaled"):
        super().__init__()
        self.activation, memory_limit_mb = _check_ffn_args(activation, bias, block_size, k, checkpoint,
                                                           memory_limit_mb)
        seeds = self._layer_seeds(index_seed)
        self.d_model, self.d_ff = d_model, d_ff
        self.block_size = block_size
        self.checkpoint = checkpoint
        self.memory_limit_mb = memory_limit_mb
        self.fc1 = RBELinear(d_model, d_ff, bias, block_size, k, device=device, dtype=dtype, generator=generator,
                             index_seed=seeds[0], parametrization=parametrization)
        self.fc2 = RBELinear(d_ff, d_model, bias, block_size, k, device=device, dtype=dtype, generator=generator,
                             index_seed=seeds[1], parametrization=parametrization)
        self.reset_stats()

    @staticmethod
    def _layer_seeds(index_seed) -> tuple:
        """(fc1's, fc2's) index seeds for a block seed s: 2s and 2s + 1, so blocks seeded 0, 1, 2, ...
        (e.g. by layer number) never share a layer's positions."""
        if index_seed is None:
            return None, None
        s = _check_seed(index_seed, limit=_SEED_LIMIT // 2)
        return 2 * s, 2 * s + 1

    def set_parametrization(self, parametrization: str) -> None:
        """fc1.set_parametrization and fc2.set_parametrization (see RBELinear's)."""
        parametrization_scales(self.block_size, self.fc1.k, parametrization)  # checked before either changes
        self.fc1.set_parametrization(parametrization)
        self.fc2.set_parametrization(parametrization)

    def use_seeded_index(self, seed: int) -> None:
        """fc1.use_seeded_index(2 * seed) and fc2.use_seeded_index(2 * seed + 1) (see RBELinear's)."""
        s1, s2 = self._layer_seeds(seed)
        self.fc1.use_seeded_index(s1)
        self.fc2.use_seeded_index(s2)

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, activation="gelu", block_size: int = 64, k: int = 300,
                     checkpoint: bool = False, memory_limit_mb: float | None = None) -> "RBEFeedForward":
        """Compress a dense Linear(d_model, d_ff) -> act -> Linear(d_ff, d_model) block."""
        for name, lin in (("fc1", fc1), ("fc2", fc2)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(lin).__name__}")
        activation, memory_limit_mb = _check_ffn_args(activation, fc1.bias is not None, block_size, k, checkpoint,
                                                      memory_limit_mb)
        if fc1.in_features != fc2.out_features or fc1.out_features != fc2.in_features:
            raise ValueError(f"fc1 {fc1.in_features}->{fc1.out_features} and fc2 {fc2.in_features}->"
                             f"{fc2.out_features} do not form a feed-forward block")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("fc1 and fc2 must both have a bias or both have none")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.activation = activation
        m.d_model, m.d_ff = fc1.in_features, fc1.out_features
        m.block_size, m.checkpoint, m.memory_limit_mb = block_size, checkpoint, memory_limit_mb
        m.fc1 = RBELinear.from_linear(fc1, block_size, k)
        m.fc2 = RBELinear.from_linear(fc2, block_size, k)
        m.reset_stats()
        return m

    # a property, so that every assignment (constructor, from_linears, m.memory_limit_mb = ...)
    # goes through _check_memory_limit
    @property
    def memory_limit_mb(self):
        return self._memory_limit_mb

    @memory_limit_mb.setter
    def memory_limit_mb(self, value) -> None:
        self._memory_limit_mb = _check_memory_limit(value)

    def reset_stats(self) -> None:
        self.stats = {"calls": 0, "flops": 0, "peak_intermediate_bytes": 0}

    def chunk_tokens(self) -> int:
        """Tokens per chunk: under memory_limit_mb; else DEFAULT_CHUNK_TOKENS on the CPU and all
        tokens at once (0) elsewhere (the CUDA operators decode the weights once per call and run
        each chunk as its own cuBLAS products: small chunks would only cost launches there)."""
        if self.memory_limit_mb is None:
            return DEFAULT_CHUNK_TOKENS if self.fc1.basis.device.type == "cpu" else 0
        plan = self.fc1.plan
        nf = plan.shape[1] - self.block_size
        return chunk_tokens_for(self.memory_limit_mb, self.d_model, self.d_ff, self.block_size, nf,
                                self.fc1.coeffs.element_size(), self.fc1.coeffs.numel() + self.fc2.coeffs.numel())

    def estimated_flops(self, tokens: int) -> int:
        """2 x multiply-adds of one forward over `tokens` tokens (transforms, sparse products, pattern),
        counting the DCTs in matrix form: an upper bound, as the AVX2 kernels use a fast DCT."""
        return self._per_token_costs(self.fc1.basis.dtype, 0)[0] * tokens

    def _per_token_costs(self, dtype: torch.dtype, itemsize: int) -> tuple[int, int]:
        """(estimated FLOPs, intermediate bytes) per token, kept per (layer dtype, itemsize): the
        shapes, block size and k are fixed at construction, and the plan's pattern rows nf follow
        the dtype. The forward's statistics cost as much Python as a one-token call's other
        bookkeeping."""
        memo = self.__dict__.setdefault("_costs_by_dtype", {})
        costs = memo.get((dtype, itemsize))
        if costs is not None:
            return costs
        b, flops = self.block_size, 0
        nf = self.fc1.plan.shape[1] - b
        for lin in (self.fc1, self.fc2):
            R, C = -(-lin.out_features // b), -(-lin.in_features // b)
            flops += 2 * (C * b * (b + nf) + R * C * (lin.k + 8 + nf) + R * b * (b + nf))
        costs = (flops, intermediate_bytes_per_token(self.d_model, self.d_ff, b, nf, itemsize) if itemsize else 0)
        memo[(dtype, itemsize)] = costs
        return costs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1, f2 = self.fc1, self.fc2
        if f1.use_packed and type(x) is torch.Tensor and x.dtype == torch.float32:
            # generation's path first: packed() gives packs only for float32 CPU coefficients, so the
            # checks below have nothing to add for a float32 CPU input the packs take (3-6% of a
            # one-token call)
            y = self._packed_forward(x, None)
            if y is not None:
                return y
        basis1, basis2 = f1.basis, f2.basis  # (each module attribute is a lookup: fetched once)
        _check_input("RBEFeedForward", x, basis1)
        if _is_dtensor(basis1) or _is_dtensor(basis2):
            raise RuntimeError("RBEFeedForward: the weights of fc1/fc2 are sharded DTensors here. Its forward runs "
                               "one fused operator on both layers' weights and never calls fc1/fc2, so FSDP "
                               "never gathers them: apply fully_shard to the RBEFeedForward, not to its fc1/fc2")
        x, out_dtype = cpu_half_input(x, basis1.dtype)
        if out_dtype is not None and f1.use_packed:  # a half input, computed in float32
            y = self._packed_forward(x, out_dtype)
            if y is not None:
                return y
        chunk = self.chunk_tokens()
        # the parameters and their scales: the operator applies the scales, with no scaled copy of
        # the coefficients (docs/DESIGN.md, Parametrization)
        y, _, _ = ops.ffn(x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, f2.bias,
                       self.d_model, self.d_ff, self.activation, chunk, keep_pre(self.checkpoint),
                       f1._coeff_scale, f2._coeff_scale, f1._pattern_scale, f2._pattern_scale,
                       **sixteen_bit_flags(out_dtype))
        y = _restore(y, out_dtype)
        self._count(x, chunk, basis1.dtype)
        return y

    def _packed_forward(self, x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor | None:
        """The packed operator's result (pack_for_inference) for x (float32), in out_dtype if that
        is a half dtype; None where the packs do not apply (_packed_call, packed())."""
        f1, f2 = self.fc1, self.fc2
        if not _packed_call(x, f1, f2):
            return None
        pack1 = f1.packed()
        pack2 = f2.packed() if pack1 is not None else None  # (no pack of fc2 without one of fc1)
        if pack2 is None:
            return None
        y = _PACKED_OPS["ffn"](x, f1.plan, pack1, f1.basis, f1.bias, pack2, f2.basis, f2.bias, self.d_model,
                               self.d_ff, self.activation, f1._coeff_scale, f2._coeff_scale, f1._pattern_scale,
                               f2._pattern_scale, out_dtype in HALF)
        self._count(x, 0, torch.float32)
        return _restore(y, out_dtype)

    def _count(self, x: torch.Tensor, chunk: int, dtype: torch.dtype) -> None:
        """stats of a call (not under torch.compile)"""
        if torch.compiler.is_compiling():
            return
        tokens = x.numel() // max(self.d_model, 1)
        n = min(chunk, tokens) if chunk else tokens
        tile = -(-n // 64) * 64
        flops, per = self._per_token_costs(dtype, x.element_size())
        peak = per * tile  # bound for a forward + backward; a forward alone uses less
        self.stats["calls"] += 1
        self.stats["flops"] += flops * tokens
        self.stats["peak_intermediate_bytes"] = max(self.stats["peak_intermediate_bytes"], peak)

    @property
    def weight_nbytes(self) -> int:
        return self.fc1.weight_nbytes + self.fc2.weight_nbytes

    def storage_bytes(self, index: str | None = None, values_dtype: torch.dtype | None = None) -> int:
        """fc1's + fc2's RBELinear.storage_bytes (checkpoint bytes of both weights, biases excluded)."""
        return self.fc1.storage_bytes(index, values_dtype) + self.fc2.storage_bytes(index, values_dtype)

    @property
    def compression_ratio(self) -> float:
        dense = 2 * self.d_model * self.d_ff * self.fc1.coeffs.element_size()
        return dense / self.weight_nbytes

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}, checkpoint={self.checkpoint}"
        if self.memory_limit_mb is not None:
            s += f", memory_limit_mb={self.memory_limit_mb}"
        return s


def pack_for_inference(module: nn.Module, enable: bool = True) -> nn.Module:
    """Let every RBELinear in ``module`` (the fc1/fc2 of each RBEFeedForward included) compute
    calls of 1-3 tokens that autograd does not record, as in generation, from packed
    coefficients, with the same bits: at 768/3072 a one-token call 2.4-2.9x faster than without
    packs with AVX-512 kernels, 1.9-2.1x with AVX2 ones, three tokens 1.1-1.3x (docs/DESIGN.md
    section 3.2; against int8 dynamic quantization: docs/benchmarks.md). Each layer keeps a
    pack about the size of its coeffs + index (``packed()``), made here for float32 CPU layers
    and again whenever a tracked write changes coeffs or the index (optimizer steps, copy_,
    load_state_dict). Like a quantized model's prepacked weights, a pack is a copy: after a write
    that bypasses the version counters (through ``.data`` or a NumPy view) call this again.
    Used where the CPU kernels are x86 (``cpu_isa()`` "avx512" or "avx2": each packs its own
    layout, and reads the other's), at block_size <= 64; elsewhere the layers compute as before. ``enable=False`` turns it off and drops the packs. Returns
    ``module``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for layer in module.modules():
        if not isinstance(layer, RBELinear):
            continue
        layer.release_packed()
        layer.use_packed = enable
        if enable and _kernels_isa() in PACKED_ISAS:
            layer.packed()
    return module
