"""nn.Modules: a compressed linear layer and the compressed feed-forward block."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ._ops import get_plan, ops
from .codec import CompressedWeight, check_sizes, compress, decompress, index_dtype, num_blocks
from .functional import canonical_activation, check_cpu_half, chunk_tokens_for, intermediate_bytes_per_token


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
    created, or with a CUDA-internal message for a CPU input to a CUDA layer); float16/bfloat16
    on the CPU (e.g. from CPU autocast): what to do. Other dtypes (int, complex, ...) are left to
    the operator: "must be float32 or float64"."""
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
    check_cpu_half(name, x)


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
        self.register_buffer("index", torch.empty(nblk, k, device=device, dtype=index_dtype(block_size)))
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
        nn.Linear's default init; zero pattern; nn.Linear's bias init."""
        nblk, k, b, dtype = self.coeffs.shape[0], self.k, self.block_size, self.coeffs.dtype
        pos = torch.rand(nblk, b * b, generator=generator).argsort(dim=1)[:, :k].sort(dim=1).values
        std = b / math.sqrt(3.0 * self.in_features * max(k, 1))
        coeffs = torch.randn(nblk, k, generator=generator, dtype=dtype) * std
        basis = torch.zeros(nblk, 8, dtype=dtype)
        if k == 0:  # only the pattern is left to carry the weight
            # Var(W_entry) = Var(p) * sum_k mean(Phi_k^2) over a block; the Phi_k are not
            # unit-RMS (their squares sum to ~7 on average), so divide that out.
            basis.normal_(0.0, 1.0 / math.sqrt(3.0 * self.in_features * _pattern_energy(b)), generator=generator)
        with torch.no_grad():
            self.index.copy_(pos)
            self.coeffs.copy_(coeffs)
            self.basis.copy_(basis)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.copy_(torch.empty(self.out_features, dtype=dtype).uniform_(-bound, bound,
                                                                                     generator=generator))

    # the plan follows the parameters' dtype and device, rebuilt exactly (never cast)
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._plan = get_plan(self.block_size, self.basis.dtype, self.basis.device)
        return self

    # load_state_dict checks the fixed positions before anything of this layer is copied in: a
    # corrupted checkpoint's out-of-range, duplicated or unsorted index would otherwise be
    # accepted silently (wrong outputs, or table reads out of bounds in the kernels). The error
    # goes into error_msgs, so load_state_dict raises its usual RuntimeError naming the key;
    # a wrong shape is left to the default message. Everything else is the default behaviour.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "index"
        idx = state_dict.get(key)
        if isinstance(idx, torch.Tensor) and idx.shape == self.index.shape:
            problem = index_problem(idx, self.block_size)
            if problem is not None:
                error_msgs.append(f"{key}: {problem}")
                return  # nothing of this layer is loaded
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, bias: torch.Tensor | None = None) -> "RBELinear":
        out_features, in_features = cw.shape
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
        return ops.linear(x, self.plan, self.basis, self.coeffs, self.index, self.bias,
                          self.in_features, self.out_features)

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


class RBEFeedForward(nn.Module):
    """act(x W1^T + b1) W2^T + b2 with both weights in RBE form: fc1 expands, fc2 contracts.

    checkpoint=True saves only the input for backward and recomputes the
    [T, d_ff] pre-activation; memory_limit_mb bounds the transient buffers of
    one chunk of tokens (forward and backward) by processing tokens in chunks.
    ``stats`` counts calls, estimated multiply-adds x2 (FLOPs) of the
    transform-domain algorithm, and the peak transient bytes of one call.
    """

    def __init__(self, d_model: int, d_ff: int, activation="gelu", bias: bool = True, block_size: int = 64,
                 k: int = 300, checkpoint: bool = False, memory_limit_mb: float | None = None, *, device=None,
                 dtype=None, generator: torch.Generator | None = None):
        super().__init__()
        self.activation = canonical_activation(activation)
        _check_memory_limit(memory_limit_mb)
        self.d_model, self.d_ff = d_model, d_ff
        self.block_size = block_size
        self.checkpoint = bool(checkpoint)
        self.memory_limit_mb = memory_limit_mb
        self.fc1 = RBELinear(d_model, d_ff, bias, block_size, k, device=device, dtype=dtype, generator=generator)
        self.fc2 = RBELinear(d_ff, d_model, bias, block_size, k, device=device, dtype=dtype, generator=generator)
        self.reset_stats()

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, activation="gelu", block_size: int = 64, k: int = 300,
                     checkpoint: bool = False, memory_limit_mb: float | None = None) -> "RBEFeedForward":
        """Compress a dense Linear(d_model, d_ff) -> act -> Linear(d_ff, d_model) block."""
        if fc1.in_features != fc2.out_features or fc1.out_features != fc2.in_features:
            raise ValueError(f"fc1 {fc1.in_features}->{fc1.out_features} and fc2 {fc2.in_features}->"
                             f"{fc2.out_features} do not form a feed-forward block")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("fc1 and fc2 must both have a bias or both have none")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.activation = canonical_activation(activation)
        m.d_model, m.d_ff = fc1.in_features, fc1.out_features
        m.block_size, m.checkpoint, m.memory_limit_mb = block_size, bool(checkpoint), memory_limit_mb
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
        """Tokens per chunk under memory_limit_mb (0 = all tokens at once)."""
        plan = self.fc1.plan
        nf = plan.shape[1] - self.block_size
        return chunk_tokens_for(self.memory_limit_mb, self.d_model, self.d_ff, self.block_size, nf,
                                self.fc1.coeffs.element_size())

    def estimated_flops(self, tokens: int) -> int:
        """2 x multiply-adds of one forward over `tokens` tokens (transforms, sparse products, pattern),
        counting the DCTs in matrix form: an upper bound, as the AVX2 kernels use a fast DCT."""
        b, nf = self.block_size, self.fc1.plan.shape[1] - self.block_size
        total = 0
        for lin in (self.fc1, self.fc2):
            R, C = -(-lin.out_features // b), -(-lin.in_features // b)
            per_tok = C * b * (b + nf) + R * C * (lin.k + 8 + nf) + R * b * (b + nf)
            total += 2 * per_tok * tokens
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("RBEFeedForward", x, self.fc1.basis)
        chunk = self.chunk_tokens()
        f1, f2 = self.fc1, self.fc2
        y, _ = ops.ffn(x, f1.plan, f1.basis, f1.coeffs, f1.index, f1.bias, f2.basis, f2.coeffs, f2.index, f2.bias,
                       self.d_model, self.d_ff, self.activation, chunk, not self.checkpoint)
        if not torch.compiler.is_compiling():
            tokens = x.numel() // max(self.d_model, 1)
            nf = f1.plan.shape[1] - self.block_size
            n = min(chunk, tokens) if chunk else tokens
            tile = -(-n // 64) * 64
            per = intermediate_bytes_per_token(self.d_model, self.d_ff, self.block_size, nf, x.element_size())
            peak = per * tile  # bound for a forward + backward; a forward alone uses less
            self.stats["calls"] += 1
            self.stats["flops"] += self.estimated_flops(tokens)
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
