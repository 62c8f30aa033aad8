"""Fake (meta) kernels and autograd formulas of the rbe_ffn operators.

The schemas and CPU kernels live in C++ (csrc/rbe_ops.cpp, CUDA in cuda/);
this module teaches torch.compile their output shapes and teaches autograd
their derivatives, each backward being a registered operator itself, so
``torch.compile(fullgraph=True)`` traces forward and backward without a break.
"""
from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as fwAD

from . import _C  # noqa: F401  (loads the operator library)

ops = torch.ops.rbe_ffn

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "none")
RBE_TILE = 64  # tokens per tile of the C kernels (csrc/rbe.h)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _one_device(op: str, **tensors) -> None:
    """The fake kernels also serve the Meta dispatch key: a call on real CPU/CUDA tensors of
    which one (the plan, the bias, the index, ...) is on the meta device is dispatched here,
    and would return uninitialized memory on the real device. Refuse tensors on different
    devices, as the real kernels do (under FakeTensorMode all are fake, on one device)."""
    named = [(n, t.device) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    first, dev = named[0]
    for name, d in named[1:]:
        if d != dev:
            hint = ""
            if "meta" in (d.type, dev.type):
                hint = ("; a tensor on the meta device holds no values: load them first (e.g. "
                        "module.load_state_dict(state_dict, assign=True) with every key, or "
                        "module.to_empty(device=...) then load_state_dict)")
            raise ValueError(f"rbe_ffn.{op}: {name} is on {d} but {first} is on {dev}; all tensors must be "
                             f"on one device{hint}")


# ---------------------------------------------------------------- plans
# Eigenvalues of the d-pattern below tol * max are dropped: 1e-15 keeps float64
# exact to ~1e-14; 1e-9 is far below float32 rounding and keeps fewer rows.
PLAN_TOL = {torch.float64: 1e-15}
DEFAULT_PLAN_TOL = 1e-9
_MASTERS: dict = {}  # (block size, tol) -> the float64 CPU tables; never handed out
_CONVERTED: dict = {}  # (block size, dtype, device) -> those tables converted; never handed out


def _plan_tol(dtype: torch.dtype) -> float:
    return PLAN_TOL.get(dtype, DEFAULT_PLAN_TOL)


def _fake_mode_active() -> bool:
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _master_plan(block_size: int, tol: float) -> torch.Tensor:
    """ops.make_plan(block_size, tol), computed once per process (it takes ~1 s at b = 256).
    Built outside every mode the caller may be in (inference_mode, FakeTensorMode, a
    torch.device context), so the cached tensor is an ordinary CPU tensor; callers only ever
    receive copies of it, so no mode and no in-place edit can leak from one user to another."""
    key = (int(block_size), float(tol))
    master = _MASTERS.get(key)
    if master is None:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.inference_mode(False), torch.device("cpu"):
            master = ops.make_plan(int(block_size), float(tol))
        _MASTERS[key] = master
    return master


@torch.library.register_fake("rbe_ffn::make_plan")
def _make_plan_fake(block_size, tol):
    return torch.empty(_master_plan(block_size, tol).shape, dtype=torch.float64)


def get_plan(block_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The [3, b+nf, b] tables of a block size (analysis rows, synthesis rows, fast-DCT tables;
    see csrc/rbe.h) in `dtype` on `device`: a new tensor on every call, converted from the
    float64 tables (computed once per block size), never cast from another dtype's copy.

    Each caller owns its copy: an in-place edit of one module's plan changes nothing else,
    and a copy made under torch.inference_mode() or FakeTensorMode is that caller's alone
    (an inference or fake tensor, as its other tensors are), never one that a module built
    later would receive."""
    device = torch.device(device)
    tol = _plan_tol(dtype)
    if torch.compiler.is_compiling():
        # traced by torch.compile: a cached table enters the graph as an input (no per-call
        # cost but the copy); with a cold cache, make_plan itself is traced into the graph
        tables = _CONVERTED.get((int(block_size), dtype, device))
        if tables is not None:
            return tables.clone()
        return ops.make_plan(int(block_size), tol).to(device=device, dtype=dtype)
    if _fake_mode_active():  # tracing: a fake tensor of the right shape, from the fake kernel
        return ops.make_plan(int(block_size), tol).to(device=device, dtype=dtype)
    if device.index is None and device.type not in ("cpu", "meta"):
        device = torch.device(device.type, torch.get_device_module(device.type).current_device())
    key = (int(block_size), dtype, device)
    tables = _CONVERTED.get(key)
    if tables is None:  # the conversion is cached so that a call copies on the device, not from the host
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.inference_mode(False):
            tables = _master_plan(block_size, tol).to(device=device, dtype=dtype)
        _CONVERTED[key] = tables
    return tables.clone()


# ---------------------------------------------------------------- first-order autograd
_DOUBLE_BACKWARD = (
    "rbe_ffn: double backward (a gradient of a gradient: torch.autograd.grad(..., create_graph=True) "
    "then differentiating the result, torch.autograd.functional.hessian/hvp/vhp, gradient penalties "
    "through the layer) is not supported by the rbe_ffn operators; only first-order reverse mode "
    "(loss.backward(), torch.autograd.grad) is")
_FORWARD_MODE = (
    "rbe_ffn.{op}: forward-mode automatic differentiation (torch.func.jvp, torch.func.jacfwd, "
    "torch.func.hessian, torch.autograd.forward_ad dual tensors) is not supported by the rbe_ffn "
    "operators; use reverse mode (loss.backward(), torch.autograd.grad, or torch.autograd.functional.jacobian "
    "/ vjp) instead")
_FUNC_TRANSFORMS = (
    "rbe_ffn.{op}: torch.func gradient transforms (torch.func.grad, grad_and_value, vjp, jacrev, "
    "hessian, and per-sample gradients with vmap(grad(...))) are not supported by the rbe_ffn "
    "operators; use torch.autograd (loss.backward() or torch.autograd.grad) and, for per-sample "
    "gradients, one backward per sample. torch.func.vmap and functional_call of the forward alone "
    "work")


def _first_order_only(backward):
    """The backward operators (linear_backward, ffn_backward, activation_backward) have no
    derivatives of their own. Under create_graph=True torch would otherwise give their
    outputs no grad_fn, and double backward through them would silently return zero/None.
    Make that an error: each output gets a DelayedError node (raises when differentiated)
    whose edges lead to every input of the backward that requires grad (the incoming
    gradient, x, the parameters). Those edges matter: with the error node hanging off a
    detached copy only (as @once_differentiable does), torch.autograd.grad(g, x) never visits
    it and returns None, and torch.autograd.functional.hvp/hessian return zeros."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        tensors = [g for g in grads if isinstance(g, torch.Tensor)] + list(ctx.saved_tensors)
        deps = [t for t in tensors if t.requires_grad]
        if not deps:
            return out

        def guard(t):
            err = torch._C._functions.DelayedError(_DOUBLE_BACKWARD.encode(), 1 + len(deps))
            return err(t.detach(), *deps)[0]

        return tuple(None if t is None else guard(t) for t in out)

    return wrapper


def _has_tangent(args) -> bool:
    if fwAD._current_level < 0:  # no dual level entered: the common case, no tensor can carry a tangent
        return False
    return any(isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


_autograd_lib = torch.library.Library("rbe_ffn", "IMPL")


def _register_autograd(name: str, backward, setup_context) -> None:
    """torch.library.register_autograd(f"rbe_ffn::{name}", _first_order_only(backward), setup_context=...),
    done by hand (the same two calls it makes) so that the Autograd kernel first refuses, in
    words, what the formula cannot do. Without this:
    - forward mode (torch.func.jvp, jacfwd, forward_ad) silently gave a zero tangent (the op
      has no forward-mode formula and its inputs do not require grad, so autograd was skipped);
    - torch.func.grad/jacrev/vjp raised "it must override the setup_context staticmethod"."""
    from torch._library.autograd import Info, make_autograd_impl

    impl = make_autograd_impl(getattr(ops, name).default, Info(_first_order_only(backward), setup_context))

    def kernel(keyset, *args):
        if _has_tangent(args):
            raise NotImplementedError(_FORWARD_MODE.format(op=name))
        if torch._C._are_functorch_transforms_active() and torch.is_grad_enabled() \
                and torch._C._any_requires_grad(*args):
            raise NotImplementedError(_FUNC_TRANSFORMS.format(op=name))
        return impl(keyset, *args)

    _autograd_lib.impl(name, kernel, "Autograd", with_keyset=True)


# ---------------------------------------------------------------- codec
@torch.library.register_fake("rbe_ffn::encode")
def _encode_fake(weight, block_size, k):
    out, inp = weight.shape
    nblk = _cdiv(out, block_size) * _cdiv(inp, block_size)
    idx = torch.int32 if block_size > 128 else torch.int16
    return (
        weight.new_empty((nblk, 8)),
        weight.new_empty((nblk, k)),
        weight.new_empty((nblk, k), dtype=idx),
        weight.new_empty((nblk,), dtype=torch.float64),
    )


@torch.library.register_fake("rbe_ffn::decode")
def _decode_fake(basis, coeffs, index, out_features, in_features, block_size):
    _one_device("decode", basis=basis, coeffs=coeffs, index=index)
    return basis.new_empty((out_features, in_features))


# ---------------------------------------------------------------- linear
@torch.library.register_fake("rbe_ffn::linear")
def _linear_fake(x, plan, basis, coeffs, index, bias, in_features, out_features, coeff_scale=1.0, pattern_scale=1.0,
                 bf16_sparse=False):
    _one_device("linear", x=x, plan=plan, basis=basis, coeffs=coeffs, index=index, bias=bias)
    torch._check(x.shape[-1] == in_features, lambda: f"rbe_ffn: input must have last dimension {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("rbe_ffn::linear_backward")
def _linear_backward_fake(grad, x, plan, basis, coeffs, index, in_features, out_features, output_mask,
                          coeff_scale=1.0, pattern_scale=1.0, bf16_sparse=False):
    _one_device("linear_backward", grad=grad, x=x, plan=plan, basis=basis, coeffs=coeffs, index=index)
    e = x.new_empty((0,))
    return (
        x.new_empty(x.shape) if output_mask[0] else e,
        basis.new_empty(basis.shape) if output_mask[1] else e.clone(),
        coeffs.new_empty(coeffs.shape) if output_mask[2] else e.clone(),
        x.new_empty((out_features,)) if output_mask[3] else e.clone(),
    )


def _linear_setup(ctx, inputs, output):
    x, plan, basis, coeffs, index, bias, in_features, out_features, *rest = inputs
    ctx.save_for_backward(x, plan, basis, coeffs, index)
    ctx.sizes = (in_features, out_features)
    ctx.rest = tuple(rest)  # coeff_scale, pattern_scale, bf16_sparse (those given)


def _linear_backward(ctx, grad):
    x, plan, basis, coeffs, index = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[2], need[3], need[5]]
    dx, db, dc, dbias = ops.linear_backward(grad, x, plan, basis, coeffs, index, *ctx.sizes, mask, *ctx.rest)
    pick = lambda t, on: t if on else None  # noqa: E731
    return (pick(dx, mask[0]), None, pick(db, mask[1]), pick(dc, mask[2]), None, pick(dbias, mask[3]), None,
            None) + (None,) * len(ctx.rest)


_register_autograd("linear", _linear_backward, _linear_setup)


# ---------------------------------------------------------------- feed-forward
@torch.library.register_fake("rbe_ffn::ffn")
def _ffn_fake(x, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2, bias2,
              d_model, d_ff, activation, chunk_tokens, keep_pre, coeff_scale1=1.0, coeff_scale2=1.0,
              pattern_scale1=1.0, pattern_scale2=1.0, f32_activation=False, bf16_sparse=False):
    _one_device("ffn", x=x, plan=plan, basis1=basis1, coeffs1=coeffs1, index1=index1, bias1=bias1,
                basis2=basis2, coeffs2=coeffs2, index2=index2, bias2=bias2)
    torch._check(x.shape[-1] == d_model, lambda: f"rbe_ffn: input must have last dimension {d_model}")
    hidden = _saved_hidden_fake(x, plan, d_model, d_ff, activation, chunk_tokens, keep_pre)
    if hidden.dim() == 4 and _C.ffn_pre_in_tiles(x.dtype == torch.float32, bf16_sparse):
        # act'(h) in tiles: [tiles, ceil(d_ff / b), b, RBE_TILE]
        pre = x.new_empty((hidden.shape[0], hidden.shape[1], plan.shape[2], RBE_TILE))
    else:
        pre = x.new_empty((*x.shape[:-1], d_ff)) if keep_pre else x.new_empty((0,))
    return x.new_empty(x.shape), pre, hidden


def saves_hidden(tokens, chunk_tokens: int, activation: str) -> bool:
    """_C.ffn_saves_hidden's rule (csrc/rbe_ops.cpp), written so that a symbolic token count
    (torch.compile with dynamic shapes) is compared rather than fixed to one value, and only where
    the static arguments leave the answer open: a compiled graph then serves every token count on
    the same side of each comparison. tests/test_ffn.py checks it
    gives the C++ answers. It reads the DCT-domain switch (rbe_ffn.dct_path) when traced: set the
    switch before compiling."""
    return (activation in ("gelu", "gelu_tanh", "silu") and not _C.dct_path_enabled() and tokens > _C.FEW_TOKENS
            and (chunk_tokens <= 0 or chunk_tokens % RBE_TILE == 0 or chunk_tokens >= tokens))


def _saved_hidden_fake(x, plan, d_model, d_ff, activation, chunk_tokens, keep_pre):
    """ffn's third result: on the CPU, with keep_pre, where saves_hidden says so, fc2's analysed
    input [tiles, ceil(d_ff / b), b + nf, RBE_TILE] (plan: [3, b + nf, b]); else empty."""
    tokens = x.numel() // d_model if d_model else 0
    if not (keep_pre and x.device.type == "cpu" and saves_hidden(tokens, chunk_tokens, activation)):
        return x.new_empty((0,))
    b, rows = plan.shape[2], plan.shape[1]
    return x.new_empty((-(-tokens // RBE_TILE), -(-d_ff // b), rows, RBE_TILE))


@torch.library.register_fake("rbe_ffn::ffn_backward")
def _ffn_backward_fake(grad, x, pre, hidden, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2,
                       d_model, d_ff, activation, chunk_tokens, output_mask, coeff_scale1=1.0, coeff_scale2=1.0,
                       pattern_scale1=1.0, pattern_scale2=1.0, f32_activation=False, bf16_sparse=False):
    _one_device("ffn_backward", grad=grad, x=x, pre=pre, hidden=hidden, plan=plan, basis1=basis1, coeffs1=coeffs1,
                index1=index1, bias1=bias1, basis2=basis2, coeffs2=coeffs2, index2=index2)
    shapes = [x.shape, basis1.shape, coeffs1.shape, (d_ff,), basis2.shape, coeffs2.shape, (d_model,)]
    return tuple(x.new_empty(s) if on else x.new_empty((0,)) for s, on in zip(shapes, output_mask))


def _ffn_setup(ctx, inputs, output):
    (x, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2, bias2,
     d_model, d_ff, activation, chunk_tokens, keep_pre, *rest) = inputs
    _, pre, hidden = output
    # checkpointed (keep_pre=False): pre and hidden are empty tensors, so only x is saved
    ctx.save_for_backward(x, pre, hidden, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2)
    ctx.args = (d_model, d_ff, activation, chunk_tokens)
    # coeff_scale1, coeff_scale2, pattern_scale1, pattern_scale2, f32_activation, bf16_sparse (those
    # given): the backward evaluates the activation's derivative as the forward evaluated the
    # activation, and takes the forward's word for bfloat16 sparse operands
    ctx.rest = tuple(rest)
    ctx.mark_non_differentiable(pre, hidden)
    # pre and hidden never receive a gradient: without this autograd would materialize
    # zero tensors of their sizes in every backward.
    ctx.set_materialize_grads(False)


def _ffn_backward(ctx, grad, _grad_pre, _grad_hidden):
    x, pre, hidden, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2 = ctx.saved_tensors
    n_inputs = 15 + len(ctx.rest)
    if grad is None:  # possible once grads are not materialized; y took no part in the loss
        return (None,) * n_inputs
    need = ctx.needs_input_grad
    # inputs: x plan basis1 coeffs1 index1 bias1 basis2 coeffs2 index2 bias2 ...
    mask = [need[0], need[2], need[3], need[5], need[6], need[7], need[9]]
    grads = ops.ffn_backward(grad.contiguous(), x, pre, hidden, plan, basis1, coeffs1, index1, bias1,
                             basis2, coeffs2, index2, *ctx.args, mask, *ctx.rest)
    dx, db1, dc1, dbias1, db2, dc2, dbias2 = (g if on else None for g, on in zip(grads, mask))
    return (dx, None, db1, dc1, None, dbias1, db2, dc2, None, dbias2) + (None,) * (n_inputs - 10)


_register_autograd("ffn", _ffn_backward, _ffn_setup)


# ---------------------------------------------------------------- activations
@torch.library.register_fake("rbe_ffn::activation")
def _activation_fake(x, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("rbe_ffn::activation_backward")
def _activation_backward_fake(grad, x, activation):
    _one_device("activation_backward", grad=grad, x=x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _activation_setup(ctx, inputs, output):
    x, activation = inputs
    ctx.save_for_backward(x)
    ctx.activation = activation


def _activation_bwd(ctx, grad):
    (x,) = ctx.saved_tensors
    return ops.activation_backward(grad.contiguous(), x, ctx.activation), None


_register_autograd("activation", _activation_bwd, _activation_setup)


# ---------------------------------------------------------------- packed coefficients (few tokens)
# pack_coeffs regroups a float32 CPU weight's coefficients for one-token products; linear_packed
# and ffn_packed compute token by token from such packs (each token's bits are those of linear and
# ffn at one token; csrc/rbe.h). They are for inference: there is no backward, and a call that
# autograd would have to record is refused. RBELinear and RBEFeedForward take them, once asked
# (pack_for_inference), for calls of 1-3 tokens that record nothing (docs/DESIGN.md section 3.2).
@torch.library.register_fake("rbe_ffn::pack_coeffs")
def _pack_coeffs_fake(coeffs, index, out_features, in_features, block_size):
    _one_device("pack_coeffs", coeffs=coeffs, index=index)
    return coeffs.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)


@torch.library.register_fake("rbe_ffn::linear_packed")
def _linear_packed_fake(x, plan, pack, basis, bias, in_features, out_features, coeff_scale=1.0, pattern_scale=1.0):
    _one_device("linear_packed", x=x, plan=plan, pack=pack, basis=basis, bias=bias)
    torch._check(x.shape[-1] == in_features, lambda: f"rbe_ffn: input must have last dimension {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("rbe_ffn::ffn_packed")
def _ffn_packed_fake(x, plan, pack1, basis1, bias1, pack2, basis2, bias2, d_model, d_ff, activation,
                     coeff_scale1=1.0, coeff_scale2=1.0, pattern_scale1=1.0, pattern_scale2=1.0,
                     f32_activation=False):
    _one_device("ffn_packed", x=x, plan=plan, pack1=pack1, basis1=basis1, bias1=bias1, pack2=pack2, basis2=basis2,
                bias2=bias2)
    torch._check(x.shape[-1] == d_model, lambda: f"rbe_ffn: input must have last dimension {d_model}")
    return x.new_empty(x.shape)


_INFERENCE_ONLY = (
    "rbe_ffn.{op} computes from packed coefficients for inference and has no backward; call it "
    "under torch.no_grad() / torch.inference_mode(), or use rbe_ffn.{full} (RBELinear and "
    "RBEFeedForward take {op} only for calls that autograd does not record)")


def _register_inference_only(name: str, full: str) -> None:
    """The Autograd kernel of an operator without a derivative: a call that autograd would record
    (grad mode on and an input requiring grad, or a forward-mode tangent) raises instead of
    returning a result whose gradient would silently be missing."""
    op = getattr(ops, name).default

    def kernel(keyset, *args):
        if _has_tangent(args):
            raise NotImplementedError(_FORWARD_MODE.format(op=name))
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            raise RuntimeError(_INFERENCE_ONLY.format(op=name, full=full))
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _autograd_lib.impl(name, kernel, "Autograd", with_keyset=True)


_register_inference_only("linear_packed", "linear")
_register_inference_only("ffn_packed", "ffn")


# ---------------------------------------------------------------- autocast (CUDA)
def _autocast_cuda(op):
    """The AutocastCUDA kernel of a forward operator: under torch.autocast("cuda"), every
    float32/half CUDA tensor argument (input, parameters, plan) is cast to the autocast
    dtype, as autocast does for matmul-like ops (float64 stays float64), and the op runs
    in that dtype (its products accumulate in float32). Backward needs no kernel of its
    own: autograd carries the half-precision gradients back through the casts."""

    def kernel(*args):
        dtype = torch.get_autocast_dtype("cuda")

        def cast(a):
            if isinstance(a, torch.Tensor) and a.is_cuda and a.is_floating_point() and a.dtype != torch.float64:
                return a.to(dtype)
            return a

        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)):
            return op(*[cast(a) for a in args])

    return kernel


# ---------------------------------------------------------------- autocast (CPU)
HALF = (torch.float16, torch.bfloat16)


def sixteen_bit_flags(result_dtype) -> dict:
    """What a float32 layer's operators may relax when their result is rounded to result_dtype
    (None: not rounded): the activation in float32 for either 16-bit type, bfloat16 operands in
    the sparse products for bfloat16 (docs/DESIGN.md section 4, 16-bit results on the CPU)."""
    return {"f32_activation": result_dtype in HALF, "bf16_sparse": result_dtype == torch.bfloat16}


def _autocast_cpu(op):
    """The AutocastCPU kernel of a forward operator: under torch.autocast("cpu"), the CPU kernels
    compute in the layer's own dtype (float32 or float64: the plan's, argument 1), a float16 or
    bfloat16 input is cast up to it, and the output (the first result) is cast to the autocast
    dtype, as nn.Linear's output is under autocast, so a converted block hands the next layer the
    dtype a dense one would. A float64 layer stays float64, as autocast leaves float64 alone.
    Parameters and their gradients stay in the layer's dtype; autograd carries the gradient
    back through the casts. A float32 layer whose output goes to a 16-bit dtype gets the op's
    f32_activation (ffn) and, for bfloat16, bf16_sparse (ffn, linear) set."""
    names = [a.name for a in op._schema.arguments]
    flags = {n: names.index(n) for n in ("f32_activation", "bf16_sparse") if n in names}

    def kernel(x, plan, *rest, **kwargs):
        out_dtype = torch.get_autocast_dtype("cpu")
        compute = plan.dtype
        if x.dtype in HALF and compute in (torch.float32, torch.float64):
            x = x.to(compute)
        if compute == torch.float32:  # the output is rounded to out_dtype
            for flag, on in sixteen_bit_flags(out_dtype).items():
                if not on or flag not in flags:
                    continue
                at = flags[flag] - 2  # its position in rest
                if len(rest) > at:
                    rest = rest[:at] + (True,) + rest[at + 1:]
                else:
                    kwargs[flag] = True
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            out = op(x, plan, *rest, **kwargs)
        if compute != torch.float32 or out_dtype == torch.float32:
            return out
        if isinstance(out, tuple):  # ffn: (y, pre, hidden); pre and hidden stay internal, in the compute dtype
            return (out[0].to(out_dtype),) + tuple(out[1:])
        return out.to(out_dtype)

    return kernel


_autocast_lib = torch.library.Library("rbe_ffn", "IMPL")
for _name in ("linear", "ffn"):
    _autocast_lib.impl(_name, _autocast_cuda(getattr(ops, _name).default), "AutocastCUDA")
for _name in ("linear", "ffn", "linear_packed", "ffn_packed"):
    _autocast_lib.impl(_name, _autocast_cpu(getattr(ops, _name).default), "AutocastCPU")
