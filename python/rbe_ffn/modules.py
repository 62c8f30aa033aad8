"""nn.Modules: a compressed linear layer and the compressed feed-forward block."""
from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import nn

from ._ops import get_plan, ops
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


def _pattern_energy(block_size: int) -> float:
    """sum_k mean over a block of Phi_k^2: the 8 pattern images decoded side by side (on the CPU,
    also for a layer built under torch.device("meta"), where .item() would fail)."""
    eye = torch.eye(8, dtype=torch.float64, device="cpu")
    none = torch.empty(8, 0, dtype=torch.float64, device="cpu")
    phi = ops.decode(eye, none, torch.empty(8, 0, dtype=index_dtype(block_size), device="cpu"), block_size,
                     8 * block_size, block_size)
    return phi.pow(2).sum().item() / (block_size * block_size)


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
        c = torch.rand(nblk, n, generator=generator, device="cpu").argsort(dim=1)[:, :m].to(torch.int32).sort(dim=1).values
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


class RBELinear(nn.Module):
    """A linear layer y = x W^T + b whose W [out, in] is stored and trained in RBE form.

    Parameters: ``basis`` [R*C, 8], ``coeffs`` [R*C, k], ``bias`` [out];
    buffer ``index`` [R*C, k] (fixed positions). No dense W is ever kept.
    A fresh layer picks each block's k positions at random (without
    replacement, from torch's global generator or ``generator``) and scales
    the values so the effective weight has nn.Linear's default variance.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 64,
                 k: int = 300, *, device=None, dtype=None, generator: torch.Generator | None = None):
        super().__init__()
        self._allocate(in_features, out_features, bias, block_size, k, device, dtype)
        self.reset_parameters(generator)

    def _allocate(self, in_features, out_features, bias, block_size, k, device, dtype) -> None:
        """Parameters and buffers of the right shapes, uninitialized."""
        check_sizes(block_size, k)
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
        frequencies first), values scaled so Var(W_entry) = k Var(c) / b^2 = 1 / (3 in) as for
        nn.Linear's default init; zero pattern; nn.Linear's bias init. Random numbers come from
        ``generator`` (or torch's global CPU generator), the same on every device; the work is done
        a chunk of blocks at a time, so its transient memory stays small next to the layer's."""
        nblk, k, b, dtype = self.coeffs.shape[0], self.k, self.block_size, self.coeffs.dtype
        if self.coeffs.is_meta or _is_fake(self.coeffs):  # meta device / FakeTensorMode: no values to draw
            return
        std = b / math.sqrt(3.0 * self.in_features * max(k, 1))
        with torch.no_grad():
            step = _chunk_blocks(b, k)
            for s in range(0, nblk, step):
                e = min(s + step, nblk)
                self.index[s:e].copy_(random_positions(e - s, b, k, generator))
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
        return _bytes_as(self.index_bytes, index_dtype(self.block_size))

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

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        store = destination.pop(prefix + "index_bytes", None)
        if store is not None:  # at index_bytes' place: the same key order as before
            destination[prefix + "index"] = _bytes_as(store, index_dtype(self.block_size))

    # the plan follows the parameters' dtype and device, rebuilt exactly (never cast)
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._plan = get_plan(self.block_size, self.basis.dtype, self.basis.device)
        return self

    # load_state_dict checks the fixed positions before anything of this layer is copied in: a
    # corrupted checkpoint's out-of-range, duplicated or unsorted index would otherwise be
    # accepted silently (wrong outputs, or table reads out of bounds in the kernels). The error
    # goes into error_msgs, so load_state_dict raises its usual RuntimeError naming the key.
    # The key is "index" (int16/int32 values, or any integer dtype holding valid positions); it
    # is stored into the uint8 buffer index_bytes. Everything else is the default behaviour.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, store = prefix + "index", prefix + "index_bytes"
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if own.pop(store, None) is not None and strict:
            unexpected_keys.append(store)  # never written by state_dict(): it would bypass the checks below
        idx = own.pop(key, None)
        if key in state_dict:
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
        n = len(missing_keys)
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[n:] = [key if k == store else k for k in missing_keys[n:]]

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, bias: torch.Tensor | None = None) -> "RBELinear":
        """A layer holding a copy of ``cw``'s numbers (and ``bias``), checked as the constructor and
        load_state_dict check theirs: shapes exact (nothing broadcast), index valid."""
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
                        cw.coeffs.dtype)
        with torch.no_grad():
            layer.basis.copy_(cw.basis)
            layer.coeffs.copy_(cw.coeffs)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("RBELinear", x, self.basis)
        x, out_dtype = cpu_half_input(x, self.basis.dtype)
        return _restore(ops.linear(x, self.plan, self.basis, self.coeffs, self.index, self.bias,
                                   self.in_features, self.out_features), out_dtype)

    def compressed(self) -> CompressedWeight:
        return CompressedWeight(self.basis, self.coeffs, self.index, (self.out_features, self.in_features),
                                self.block_size, self.relative_error)

    def dense_weight(self) -> torch.Tensor:
        """The dense W these numbers describe (a new tensor; for inspection and tests)."""
        with torch.no_grad():
            return decompress(self.basis, self.coeffs, self.index, (self.out_features, self.in_features),
                              self.block_size)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: basis + coeffs + index (bias excluded, as for the dense figure)."""
        return sum(t.numel() * t.element_size() for t in (self.basis, self.coeffs, self.index))

    @property
    def compression_ratio(self) -> float:
        """Dense weight bytes (same value dtype) / stored weight bytes."""
        return self.out_features * self.in_features * self.coeffs.element_size() / self.weight_nbytes

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"block_size={self.block_size}, k={self.k}, compression={self.compression_ratio:.1f}x")
        if self.relative_error is not None:
            s += f", relative_error={self.relative_error:.3g}"
        return s


# Tokens per chunk of a block without memory_limit_mb: two tiles of the kernels, so the operator
# keeps each weight's schedules for the whole call and the d_ff-sized transients (and, when
# checkpointed, the recomputed pre-activation) live per chunk, in cache. Measured at 768/3072,
# 2 threads, against all tokens at once: checkpointed step peak 21.3 MiB against 50.4 (dense 45.0),
# step time 0.80-1.07x (1024 tokens) and 0.72x (4096); standard step 0.84x (1024) and 0.76x (4096),
# forward 0.93x and 0.81x; at 1024/4096, 1024 tokens 1.04x (docs/benchmarks.md).
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
    """

    def __init__(self, d_model: int, d_ff: int, activation="gelu", bias: bool = True, block_size: int = 64,
                 k: int = 300, checkpoint: bool = False, memory_limit_mb: float | None = None, *, device=None,
                 dtype=None, generator: torch.Generator | None = None):
        super().__init__()
        self.activation, memory_limit_mb = _check_ffn_args(activation, bias, block_size, k, checkpoint,
                                                           memory_limit_mb)
        self.d_model, self.d_ff = d_model, d_ff
        self.block_size = block_size
        self.checkpoint = checkpoint
        self.memory_limit_mb = memory_limit_mb
        self.fc1 = RBELinear(d_model, d_ff, bias, block_size, k, device=device, dtype=dtype, generator=generator)
        self.fc2 = RBELinear(d_ff, d_model, bias, block_size, k, device=device, dtype=dtype, generator=generator)
        self.reset_stats()

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
        return self._per_token_costs(self.fc1.plan.shape[1] - self.block_size, 0)[0] * tokens

    def _per_token_costs(self, nf: int, itemsize: int) -> tuple[int, int]:
        """(estimated FLOPs, intermediate bytes) per token, kept per (nf, itemsize) (the shapes, block
        size and k are fixed at construction): the forward's statistics cost as much Python as a
        one-token call's other bookkeeping."""
        key = (nf, itemsize)
        memo = self.__dict__.get("_cost_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        b, flops = self.block_size, 0
        for lin in (self.fc1, self.fc2):
            R, C = -(-lin.out_features // b), -(-lin.in_features // b)
            flops += 2 * (C * b * (b + nf) + R * C * (lin.k + 8 + nf) + R * b * (b + nf))
        costs = (flops, intermediate_bytes_per_token(self.d_model, self.d_ff, b, nf, itemsize) if itemsize else 0)
        self.__dict__["_cost_memo"] = (key, costs)
        return costs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("RBEFeedForward", x, self.fc1.basis)
        chunk = self.chunk_tokens()
        f1, f2 = self.fc1, self.fc2
        if _is_dtensor(f1.basis) or _is_dtensor(f2.basis):
            raise RuntimeError("RBEFeedForward: the weights of fc1/fc2 are sharded DTensors here. Its forward runs "
                               "one fused operator on both layers' weights and never calls fc1/fc2, so FSDP "
                               "never gathers them: apply fully_shard to the RBEFeedForward, not to its fc1/fc2")
        x, out_dtype = cpu_half_input(x, f1.basis.dtype)
        y, _ = ops.ffn(x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, f2.bias,
                       self.d_model, self.d_ff, self.activation, chunk, keep_pre(self.checkpoint))
        y = _restore(y, out_dtype)
        if not torch.compiler.is_compiling():
            tokens = x.numel() // max(self.d_model, 1)
            n = min(chunk, tokens) if chunk else tokens
            tile = -(-n // 64) * 64
            flops, per = self._per_token_costs(f1.plan.shape[1] - self.block_size, x.element_size())
            peak = per * tile  # bound for a forward + backward; a forward alone uses less
            self.stats["calls"] += 1
            self.stats["flops"] += flops * tokens
            self.stats["peak_intermediate_bytes"] = max(self.stats["peak_intermediate_bytes"], peak)
        return y

    @property
    def weight_nbytes(self) -> int:
        return self.fc1.weight_nbytes + self.fc2.weight_nbytes

    @property
    def compression_ratio(self) -> float:
        dense = 2 * self.d_model * self.d_ff * self.fc1.coeffs.element_size()
        return dense / self.weight_nbytes

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}, checkpoint={self.checkpoint}"
        if self.memory_limit_mb is not None:
            s += f", memory_limit_mb={self.memory_limit_mb}"
        return s
