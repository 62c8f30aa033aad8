"""Converting an existing model: find its MLP blocks and swap in RBEFeedForward.

    report = rbe_ffn.replace_mlp(model, block_size=64, k=300)
    print(report)

Layouts recognized (anything else is left alone and listed in the report, never guessed):

* Hugging Face GPT-2 ``GPT2MLP``: ``c_fc`` and ``c_proj`` are ``Conv1D`` layers whose weight is
  stored ``[in, out]`` (``y = x @ W + b``), so the dense ``[out, in]`` matrix is ``W.T``. The
  module becomes :class:`RBEGPT2MLP` (the RBE block, then the original ``dropout``).
* Hugging Face BERT/RoBERTa (also MiniLM, which is a BertModel): ``BertIntermediate``
  (``dense`` + activation) and ``BertOutput`` (``dense``, ``dropout``, ``LayerNorm(h + input)``).
  ``intermediate`` becomes :class:`RBEBertIntermediate`, which runs the whole feed-forward block
  (both matrices, fused), and ``output`` becomes :class:`RBEBertOutput`, which keeps the original
  ``dropout`` and ``LayerNorm`` objects and only drops the dense layer. The layer's own forward code
  (``self.output(self.intermediate(x), x)``) keeps working; the intermediate's output now has
  d_model features instead of d_ff.
* ``nn.Sequential(nn.Linear(d, f), act, nn.Linear(f, d))`` with act ``nn.GELU`` (none or tanh),
  ``nn.ReLU`` or ``nn.SiLU``: replaced by an RBEFeedForward.

The activation is read from the module that applies it (for Hugging Face models that is
``ACT2FN[config.activation_function]`` / ``ACT2FN[config.hidden_act]``), recognized by class:
``gelu``/``gelu_python`` -> "gelu"; ``gelu_new``, ``gelu_pytorch_tanh``, ``gelu_python_tanh``,
``gelu_fast``, ``gelu_accurate`` (all the tanh formula) -> "gelu_tanh"; ``relu``; ``silu``/``swish``.
Any other activation (``quick_gelu``, ``relu2``, ``tanh``, ...) leaves the block alone.

``transformers`` is never imported here: classes are recognized by name and by coming from a
``transformers.*`` module.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .codec import CompressedWeight, check_sizes, compress
from .functional import canonical_activation
from .modules import RBEFeedForward, RBELinear

__all__ = ["replace_mlp", "ConversionReport", "ConvertedLayer", "LeftAlone", "Distill", "RBEGPT2MLP",
           "RBEBertIntermediate", "RBEBertOutput"]

# transformers.activations classes that compute exactly one of our activations
_HF_ACTIVATIONS = {
    "GELUActivation": "gelu",            # "gelu", "gelu_python": x * Phi(x), erf form
    "NewGELUActivation": "gelu_tanh",    # "gelu_new"
    "GELUTanh": "gelu_tanh",             # "gelu_pytorch_tanh", "gelu_python_tanh"
    "PytorchGELUTanh": "gelu_tanh",      # older name of GELUTanh
    "FastGELUActivation": "gelu_tanh",   # "gelu_fast": the same formula, sqrt(2/pi) rounded to 10 digits
    "AccurateGELUActivation": "gelu_tanh",  # "gelu_accurate": the same formula
    "SiLUActivation": "silu",            # "silu"
}
# functions that may be given as config.hidden_act instead of a name
_FUNCTIONS = {F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", F.silu: "silu"}

# (intermediate, output) class pairs with BERT's layout and forward code
_BERT_PAIRS = {("BertIntermediate", "BertOutput"), ("RobertaIntermediate", "RobertaOutput")}
_GPT2_MLPS = {"GPT2MLP"}
_LOOKS_LIKE_MLP = re.compile(r"mlp|feed_?forward|ffn", re.IGNORECASE)


# ------------------------------------------------------------------ replacement modules
class RBEGPT2MLP(nn.Module):
    """A GPT2MLP whose ``c_fc -> act -> c_proj`` is one RBEFeedForward (``ffn``); the original
    ``dropout`` module follows it, as in GPT2MLP.forward."""

    def __init__(self, ffn: RBEFeedForward, dropout: nn.Module):
        super().__init__()
        self.ffn = ffn
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ffn(hidden_states))


class RBEBertIntermediate(nn.Module):
    """Stands where BertIntermediate was, but runs the whole feed-forward block
    (``intermediate.dense -> act -> output.dense``) as one RBEFeedForward (``ffn``), so its output
    has d_model features. The paired :class:`RBEBertOutput` adds dropout, the residual and LayerNorm."""

    def __init__(self, ffn: RBEFeedForward):
        super().__init__()
        self.ffn = ffn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ffn(hidden_states)


class RBEBertOutput(nn.Module):
    """BertOutput without its dense layer (now inside RBEBertIntermediate): ``LayerNorm(dropout(h) +
    input_tensor)`` with the original ``dropout`` and ``LayerNorm`` modules (same state_dict keys)."""

    def __init__(self, dropout: nn.Module, layer_norm: nn.Module):
        super().__init__()
        self.dropout = dropout
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


_OURS = (RBEFeedForward, RBELinear, RBEGPT2MLP, RBEBertIntermediate, RBEBertOutput)


# ------------------------------------------------------------------ report
@dataclass
class ConvertedLayer:
    """One converted MLP block. Errors are relative Frobenius norms: ``error_fc1`` and ``error_fc2``
    are ||W - decoded|| / ||W|| of the two matrices (the encoder's exact figure, at conversion: a
    distillation afterwards changes the matrices and is judged by the output errors instead);
    ``output_error_before/after`` are ||FFN_rbe(x) - FFN_dense(x)|| / ||FFN_dense(x)|| on held-out
    samples, before and after distillation (None without distillation). Distillation keeps the best
    parameters seen on the held-out samples, so ``after <= before``: ``best_step`` is the step they
    come from (0: no step improved on the conversion, which is kept as it was) and
    ``output_error_last`` the held-out error after the last step. The held-out samples both choose
    the step and measure ``after``, so ``after`` is slightly optimistic. Bytes count the two weight
    matrices only (dense: at the model's dtype; RBE: basis + coeffs + index), biases excluded.
    ``error_fc1/2`` are None for a structure-only conversion (``encode=False``). ``aliases``: the
    other paths at which the same block sits (a module registered twice or shared by layers: one RBE
    block is installed at all of them).

    With ``calibration=`` (data-aware encoding), on the block's ``calibration_samples`` captured
    inputs: ``output_error_fc1/fc2`` are ||(W - W_rbe) X^T|| / ||W X^T|| of each matrix on its own
    inputs (fc1: the block input; fc2: act(fc1_dense(x)) of the original block) and
    ``output_error_fc1/fc2_plain`` the same for the plain encoding; ``block_error`` and
    ``block_error_plain`` are the whole block's ||FFN_rbe(x) - FFN_dense(x)|| / ||FFN_dense(x)||
    for the data-aware and the plain conversion (on the first 4096 calibration samples themselves,
    not held out). All None without calibration."""

    path: str
    layout: str
    d_model: int
    d_ff: int
    block_size: int
    k: int
    activation: str
    activation_source: str
    error_fc1: float | None
    error_fc2: float | None
    dense_bytes: int
    rbe_bytes: int
    output_error_before: float | None = None
    output_error_after: float | None = None
    distill_samples: int = 0
    output_error_last: float | None = None
    best_step: int | None = None
    aliases: tuple = ()
    output_error_fc1: float | None = None
    output_error_fc2: float | None = None
    output_error_fc1_plain: float | None = None
    output_error_fc2_plain: float | None = None
    block_error: float | None = None
    block_error_plain: float | None = None
    calibration_samples: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / self.rbe_bytes


@dataclass
class LeftAlone:
    """A module that looked like an MLP block but was not converted, and why."""

    path: str
    type_name: str
    reason: str


@dataclass
class ConversionReport:
    """What replace_mlp did. Iterating, ``len`` and indexing (by position or by module path) go over
    the converted layers; ``left_alone`` lists the MLP-like modules that were not touched, ``skipped``
    the paths of recognized blocks not converted because of ``skip=``."""

    layers: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key) -> ConvertedLayer:
        if isinstance(key, str):
            for layer in self.layers:
                if layer.path == key:
                    return layer
            raise KeyError(f"no converted layer at {key!r}; converted: {[l.path for l in self.layers]}")
        return self.layers[key]

    @property
    def dense_bytes(self) -> int:
        return sum(l.dense_bytes for l in self.layers)

    @property
    def rbe_bytes(self) -> int:
        return sum(l.rbe_bytes for l in self.layers)

    def __str__(self) -> str:
        head = (f"replace_mlp: {len(self.layers)} converted, {len(self.left_alone)} left alone, "
                f"{len(self.skipped)} skipped")
        if self.layers:
            ratio = self.dense_bytes / self.rbe_bytes
            head += (f"; weights {self.dense_bytes:,} B -> {self.rbe_bytes:,} B "
                     + (f"({ratio:.2f}x smaller)" if ratio >= 1 else f"({1 / ratio:.2f}x larger)"))
        lines = [head]
        if self.layers:
            distilled = any(l.output_error_before is not None for l in self.layers)
            calibrated = any(l.block_error is not None for l in self.layers)
            cols = ["path", "layout", "d_model", "d_ff", "b", "k", "activation", "err fc1", "err fc2",
                    "dense B", "RBE B", "ratio"]
            if calibrated:
                cols += ["out fc1 plain", "out fc1 data", "out fc2 plain", "out fc2 data", "block plain",
                         "block data"]
            if distilled:
                cols += ["out err before", "out err after", "best step"]
            rows = []
            for l in self.layers:
                row = [l.path, l.layout, str(l.d_model), str(l.d_ff), str(l.block_size), str(l.k), l.activation,
                       _fmt(l.error_fc1), _fmt(l.error_fc2), f"{l.dense_bytes:,}", f"{l.rbe_bytes:,}",
                       f"{l.compression_ratio:.2f}x"]
                if calibrated:
                    row += [_fmt(l.output_error_fc1_plain), _fmt(l.output_error_fc1), _fmt(l.output_error_fc2_plain),
                            _fmt(l.output_error_fc2), _fmt(l.block_error_plain), _fmt(l.block_error)]
                if distilled:
                    row += ["-" if l.output_error_before is None else f"{l.output_error_before:.4f}",
                            "-" if l.output_error_after is None else f"{l.output_error_after:.4f}",
                            "-" if l.best_step is None else str(l.best_step)]
                rows.append(row)
            lines += _table(cols, rows, left=(0, 1, 6))
            sources = sorted({f"{l.activation} <- {l.activation_source}" for l in self.layers})
            lines.append("activations: " + "; ".join(sources))
            if calibrated:
                lines.append("out/block: relative output errors on the calibration samples, plain vs data-aware "
                             "encoding")
            lines += [f"shared: {l.path} is also at {', '.join(l.aliases)} (one RBE block at every place)"
                      for l in self.layers if l.aliases]
        if self.left_alone:
            lines.append("left alone:")
            lines += ["  " + s for s in _table(["path", "type", "reason"],
                                               [[a.path or "<root>", a.type_name, a.reason] for a in self.left_alone],
                                               left=(0, 1, 2))]
        if self.skipped:
            lines.append("skipped (skip=): " + ", ".join(self.skipped))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ConversionReport(layers={len(self.layers)}, left_alone={len(self.left_alone)}, "
                f"skipped={len(self.skipped)})")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _table(cols, rows, left=()) -> list:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(cols)] + [fmt(r) for r in rows]


# ------------------------------------------------------------------ distillation settings
@dataclass
class Distill:
    """Layer-wise distillation after conversion: each RBE block's compressed parameters (basis,
    coeffs, biases) are trained with Adam on the MSE between its output and the original dense
    block's output, on sample inputs of that block.

    ``inputs`` is one of:
      * a dict ``{module path: tensor [..., d_model]}`` of sample activations (paths as in the report;
        for BERT the ``...intermediate`` path); blocks without an entry are not distilled;
      * a batch for the model, captured through forward pre-hooks on the ORIGINAL model (eval mode,
        no grad) before anything is replaced: a tensor (``model(x)``), a tuple/list (``model(*x)``),
        a dict of keyword arguments (``model(**x)``), or a callable ``f(model)`` that runs it.
    A dict whose keys are all paths of recognized blocks is taken as activations, one with none of
    them as keyword arguments; a mix raises ValueError.

    A random ``holdout`` fraction of each block's samples is kept out of training; the report's
    output errors are measured on it. ``batch_size`` samples (rows) per step. Every ``eval_every``
    steps (None: steps // 20, at least 1) and after the last one the held-out error is measured,
    and the best parameters seen (the converted ones included) are what the block keeps: distilling
    never returns a block worse on the held-out samples than the conversion alone.
    """

    inputs: Any
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 256
    holdout: float = 0.2
    seed: int = 0
    progress: bool = True
    eval_every: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name != "batch_size" else 1):
                raise ValueError(f"distill {name} must be a {'positive' if name == 'batch_size' else 'non-negative'} "
                                 f"int, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0 \
                or not math.isfinite(self.lr):
            raise ValueError(f"distill lr must be a positive number, got {self.lr!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 < self.holdout < 1:
            raise ValueError(f"distill holdout must be a fraction in (0, 1), got {self.holdout!r}")
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int)
                                            or self.eval_every < 1):
            raise ValueError(f"distill eval_every must be a positive int or None, got {self.eval_every!r}")
        if self.inputs is None:
            raise ValueError("distill needs inputs: sample activations per block or a batch of model inputs")


def _as_distill(distill) -> Distill | None:
    if distill is None or isinstance(distill, Distill):
        return distill
    if isinstance(distill, dict):
        known = {f.name for f in fields(Distill)}
        unknown = set(distill) - known
        if unknown:
            raise ValueError(f"distill: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        return Distill(**distill)
    raise TypeError(f"distill must be None, a dict or rbe_ffn.convert.Distill, got {type(distill).__name__}")


# ------------------------------------------------------------------ finding blocks
@dataclass
class _Block:
    path: str
    layout: str
    paths: tuple            # every module path this block replaces, aliases included (for skip=)
    w1: torch.Tensor        # [d_ff, d_model] dense orientation (may be a transposed view)
    b1: torch.Tensor | None
    w2: torch.Tensor        # [d_model, d_ff]
    b2: torch.Tensor | None
    activation: str | None
    activation_source: str
    teacher: Callable       # x -> original dense block's output (no dropout)
    capture: nn.Module      # its forward input is the block's input; filter_fn is asked about it
    install: Callable       # (ffn) -> None, swaps the replacement in at every place the block is
    aliases: tuple = ()     # the other paths of the same module (shared, or registered twice)
    params: tuple = ()      # the original (w1, b1, w2, b2) parameters, None for a missing bias


class _Model:
    """Where every module and tensor of the model is: all paths of a module (a module registered
    twice, or inside a shared parent, has several), the (parent, attribute) slots holding it, and
    the names of every parameter and buffer by object and by storage."""

    def __init__(self, model: nn.Module):
        self.paths = {}
        for p, mod in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(mod), []).append(p)
        self.slots = {}
        for mod in model.modules():
            for name, child in mod._modules.items():
                if child is not None:
                    self.slots.setdefault(id(child), []).append((mod, name))
        self.tensor_names, self.storage_names = {}, {}
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        for n, t in named:
            self.tensor_names.setdefault(id(t), []).append(n)
            key = _storage_key(t)
            if key is not None:
                self.storage_names.setdefault(key, set()).add(n)

    def all_paths(self, m: nn.Module, path: str) -> list:
        ps = self.paths.get(id(m), [path])
        return [path] + [p for p in ps if p != path]

    def install_everywhere(self, m: nn.Module, new: nn.Module) -> None:
        for parent, name in self.slots.get(id(m), ()):
            setattr(parent, name, new)


def _storage_key(t: torch.Tensor):
    if t.is_meta or t.numel() == 0:
        return None
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def _under(name: str, paths) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in paths)


def _tie_problem(info: _Model, params, paths) -> str | None:
    """A parameter of the block that is also used outside it (tied weights, by object or by storage),
    or shared between its two layers: converting would untie them."""
    ps = [p for p in params if p is not None]
    if len({id(p) for p in ps}) < len(ps):
        return "its two layers share a parameter: converting would untie them"
    for p in ps:
        names = set(info.tensor_names.get(id(p), ()))
        key = _storage_key(p)
        sharing = set(info.storage_names.get(key, ())) if key is not None else set()
        outside = sorted(n for n in names | sharing if not _under(n, paths))
        if outside:
            return (f"a weight of the block is tied to {', '.join(outside[:3])}"
                    f"{', ...' if len(outside) > 3 else ''}: converting would untie them")
    return None


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _hook_problem(modules, base: str) -> str | None:
    """A hook on a module that the replacement drops (it would silently stop being called)."""
    for rel_path, mod in modules:
        kinds = [h.strip("_").replace("_hooks", "") for h in _HOOK_DICTS if getattr(mod, h, None)]
        if kinds:
            where = f"{base}.{rel_path}" if rel_path else base
            return (f"{where or '<root>'} has {', '.join(kinds)} hook(s), which the replacement would drop; "
                    f"remove them first (or skip= this block)")
    return None


def _subtree(m: nn.Module, keep=()) -> list:
    """(relative path, module) of m and everything under it, minus the modules in `keep` (kept by the
    replacement, hooks and all) and what is under them."""
    out = []
    keep_ids = {id(k) for k in keep}

    def walk(mod, rel):
        if id(mod) in keep_ids:
            return
        out.append((rel, mod))
        for n, c in mod.named_children():
            walk(c, f"{rel}.{n}" if rel else n)

    walk(m, "")
    return out


def _from_transformers(m) -> bool:
    return type(m).__module__.startswith("transformers.")


def _activation_of(act) -> tuple:
    """(our name or None, a description of where it came from)."""
    desc = type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))
    for base in (nn.GELU, nn.ReLU, nn.SiLU):
        if isinstance(act, base):
            if type(act).forward is not base.forward:
                return None, f"{desc} (a subclass of nn.{base.__name__} with its own forward)"
            name = canonical_activation(act)
            if base is nn.GELU:
                desc = f"nn.GELU(approximate={act.approximate!r})"
            return name, desc
    if isinstance(act, nn.Module) and _from_transformers(act) and type(act).__name__ in _HF_ACTIVATIONS:
        return _HF_ACTIVATIONS[type(act).__name__], desc
    try:
        if act in _FUNCTIONS:
            return _FUNCTIONS[act], desc
    except TypeError:  # unhashable
        pass
    return None, desc


def _conv1d_ok(m) -> bool:
    return (isinstance(m, nn.Module) and type(m).__name__ == "Conv1D" and _from_transformers(m)
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
            and isinstance(getattr(m, "bias", None), torch.Tensor))


def _is_linear(m) -> bool:
    return type(m) is nn.Linear


def _dtype_problem(*ws) -> str | None:
    for w in ws:
        if w.dtype not in (torch.float32, torch.float64):
            return f"dtype {w.dtype}: the RBE kernels take float32 or float64 only"
    return None


def _pair_problem(w1, b1, w2, b2) -> str | None:
    """What keeps two layers from being one feed-forward block, or None. w1 [f, d], w2 [d, f] in
    dense orientation; b1, b2 their biases (or None)."""
    f, d = w1.shape
    if tuple(w2.shape) != (d, f):
        return (f"the two matrices do not form d_model -> d_ff -> d_model: {d} -> {f}, then "
                f"{w2.shape[1]} -> {w2.shape[0]}")
    problem = _dtype_problem(w1, w2)
    if problem is None and (b1 is None) != (b2 is None):
        problem = "one layer has a bias and the other has none"
    return problem


def _preserve_problem(info: _Model, paths, params, dropped, base) -> str | None:
    """What converting this block could not carry over (tied weights, hooks), or None."""
    return _tie_problem(info, params, paths) or _hook_problem(dropped, base)


def _match_gpt2(m, path, info: _Model):
    """A GPT2MLP: c_fc/c_proj Conv1D (weights [in, out]), act, dropout."""
    c_fc, c_proj, act, drop = (getattr(m, a, None) for a in ("c_fc", "c_proj", "act", "dropout"))
    if not (_conv1d_ok(c_fc) and _conv1d_ok(c_proj) and isinstance(drop, nn.Dropout) and act is not None):
        return LeftAlone(path, type(m).__name__, "GPT2MLP without the expected c_fc/c_proj (Conv1D), act, "
                                                 "dropout")
    w1, w2 = c_fc.weight.T, c_proj.weight.T  # Conv1D computes x @ W + b with W [in, out]
    problem = _pair_problem(w1, c_fc.bias, w2, c_proj.bias)
    paths = info.all_paths(m, path)
    params = (c_fc.weight, c_fc.bias, c_proj.weight, c_proj.bias)
    problem = problem or _preserve_problem(info, paths, params, _subtree(m, keep=(drop,)), path)
    if problem:
        return LeftAlone(path, type(m).__name__, problem)
    activation, source = _activation_of(act)

    def teacher(x):
        return c_proj(act(c_fc(x)))

    def install(ffn):
        new = RBEGPT2MLP(ffn, drop)
        new.train(m.training)
        info.install_everywhere(m, new)

    return _Block(path, type(m).__name__, tuple(paths), w1, c_fc.bias, w2, c_proj.bias, activation, source, teacher,
                  m, install, tuple(paths[1:]), params)


def _match_sequential(m, path, info: _Model):
    children = list(m.children())
    linears = [c for c in children if isinstance(c, nn.Linear)]
    if len(linears) < 2:
        return None  # not an MLP
    tname = "Sequential"
    if len(children) != 3 or not (_is_linear(children[0]) and _is_linear(children[2])):
        kinds = ", ".join(type(c).__name__ for c in children[:6]) + (", ..." if len(children) > 6 else "")
        return LeftAlone(path, tname, f"layout ({kinds}) is not (Linear, activation, Linear)")
    fc1, act, fc2 = children
    problem = _pair_problem(fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    paths = info.all_paths(m, path)
    params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    problem = problem or _preserve_problem(info, paths, params, _subtree(m), path)
    if problem:
        return LeftAlone(path, tname, problem)
    activation, source = _activation_of(act)
    if activation is None:  # `activation=` may name an unrecognized activation, never replace other layers
        if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
            return LeftAlone(path, tname, f"the middle module {source} has parameters or buffers: not an activation")
        if isinstance(act, nn.Module) and type(act).__module__.startswith("torch.nn.") and \
                type(act).__module__ != "torch.nn.modules.activation":
            return LeftAlone(path, tname, f"the middle module {source} is not an activation")

    def install(ffn):
        ffn.train(m.training)
        info.install_everywhere(m, ffn)

    return _Block(path, tname, tuple(paths), fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation, source, m, m,
                  install, tuple(paths[1:]), params)


def _match_bert(parent, path, info: _Model):
    """BertLayer-like parent with .intermediate (dense, intermediate_act_fn) and .output (dense, dropout,
    LayerNorm). Returns a _Block, a LeftAlone, or None when the parent has no such pair."""
    inter, out = getattr(parent, "intermediate", None), getattr(parent, "output", None)
    if not (isinstance(inter, nn.Module) and isinstance(out, nn.Module)) or isinstance(inter, _OURS):
        return None
    ti, to = type(inter).__name__, type(out).__name__
    if not (ti.endswith("Intermediate") and to.endswith("Output")):
        return None
    p_inter = f"{path}.intermediate" if path else "intermediate"
    p_out = f"{path}.output" if path else "output"
    pair = f"{ti}+{to}"
    if (ti, to) not in _BERT_PAIRS or not (_from_transformers(inter) and _from_transformers(out)):
        return LeftAlone(p_inter, pair, "not a class pair known to have BERT's layout "
                                        f"(known: {', '.join(sorted('+'.join(p) for p in _BERT_PAIRS))})")
    dense1, act = getattr(inter, "dense", None), getattr(inter, "intermediate_act_fn", None)
    dense2, drop, ln = (getattr(out, a, None) for a in ("dense", "dropout", "LayerNorm"))
    if not (_is_linear(dense1) and _is_linear(dense2) and act is not None and isinstance(drop, nn.Dropout)
            and isinstance(ln, nn.Module)):
        return LeftAlone(p_inter, pair, "without the expected intermediate.dense (Linear), intermediate_act_fn, "
                                        "output.dense (Linear), output.dropout, output.LayerNorm")
    problem = _pair_problem(dense1.weight, dense1.bias, dense2.weight, dense2.bias)
    # the pair is replaced by setting two attributes of the parent: each half must be held by that
    # parent only (a shared parent is one object: replacing in it replaces everywhere)
    for half, p in ((inter, p_inter), (out, p_out)):
        if problem is None and len(info.slots.get(id(half), ())) > 1:
            problem = (f"{p} is also registered in another module: replacing the pair in {path or '<root>'} "
                       f"would leave it there")
    paths = info.all_paths(inter, p_inter) + info.all_paths(out, p_out)
    params = (dense1.weight, dense1.bias, dense2.weight, dense2.bias)
    if problem is None:
        dropped = ([(f"intermediate.{r}" if r else "intermediate", mod) for r, mod in _subtree(inter)]
                   + [(f"output.{r}" if r else "output", mod) for r, mod in _subtree(out, keep=(drop, ln))])
        problem = _preserve_problem(info, paths, params, dropped, path)
    if problem:
        return LeftAlone(p_inter, pair, problem)
    activation, source = _activation_of(act)

    def teacher(x):
        return dense2(act(dense1(x)))

    def install(ffn):
        new_inter, new_out = RBEBertIntermediate(ffn), RBEBertOutput(drop, ln)
        new_inter.train(inter.training)
        new_out.train(out.training)
        parent.intermediate = new_inter
        parent.output = new_out

    aliases = tuple(q for q in info.all_paths(inter, p_inter)[1:])
    return _Block(p_inter, pair, tuple(paths), dense1.weight, dense1.bias, dense2.weight, dense2.bias,
                  activation, source, teacher, inter, install, aliases, params)


def _gated_reason(m) -> str | None:
    for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w2", "w3"), ("fc1", "fc2", "gate"),
                  ("wi_0", "wi_1", "wo")):
        if all(hasattr(m, n) for n in names):
            return f"gated MLP ({', '.join(names)}): three matrices, not supported"
    return None


def _match(m, path, info: _Model):
    """A _Block, a LeftAlone, or None (not an MLP block)."""
    if isinstance(m, _OURS):
        return None
    tname = type(m).__name__
    if tname in _GPT2_MLPS and _from_transformers(m):
        return _match_gpt2(m, path, info)
    if type(m) is nn.Sequential:
        return _match_sequential(m, path, info)
    if _LOOKS_LIKE_MLP.search(tname):
        return LeftAlone(path, tname, _gated_reason(m) or "unknown layout")
    return None


def _scan(model: nn.Module):
    """(blocks, left alone). Each module is looked at once, at its first path: a module registered at
    several places (twice in one parent, or in several parents) is one block with aliases."""
    info = _Model(model)
    blocks, left = [], []
    root = _match(model, "", info)
    if isinstance(root, _Block):
        raise ValueError(f"the model itself is an MLP block ({root.layout}); replace_mlp swaps submodules in "
                         f"place, so wrap it in a parent module (or use RBEFeedForward.from_linears)")
    if isinstance(root, LeftAlone):
        left.append(root)
    seen = {id(model)}

    def visit(mod, path):
        handled = set()
        bert = _match_bert(mod, path, info)
        if bert is not None:
            (blocks if isinstance(bert, _Block) else left).append(bert)
            if isinstance(bert, _Block):
                handled = {"intermediate", "output"}
                seen.update((id(mod.intermediate), id(mod.output)))
        for name, child in mod.named_children():
            if name in handled or id(child) in seen:
                continue
            seen.add(id(child))
            p = f"{path}.{name}" if path else name
            found = _match(child, p, info)
            if isinstance(found, _Block):
                blocks.append(found)
                continue  # nothing inside a recognized block is looked at
            if isinstance(found, LeftAlone):
                left.append(found)
            visit(child, p)

    visit(model, "")
    return blocks, left


def _skipped(paths, skip) -> bool:
    return any(p == s or p.startswith(s + ".") for p in paths for s in skip)


# ------------------------------------------------------------------ distillation
def run_model(model, batch, what: str = "batch"):
    """Run ``model`` on one batch as the conversion and distillation APIs take it: a tensor
    (``model(x)``), a tuple/list (``model(*x)``), a dict of keyword arguments (``model(**x)``), or a
    callable ``f(model)`` that runs it. Returns what the model (or the callable) returns."""
    if callable(batch) and not isinstance(batch, nn.Module):
        return batch(model)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(f"{what} must be a tensor, tuple, list, dict or callable, got {type(batch).__name__}")


def _capture_inputs(model, blocks, inputs):
    """Run the original model on `inputs` and record each block's input (flattened to [N, d_model])."""
    seen = {b.path: [] for b in blocks}
    handles = []

    def hook_for(path):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"distill: could not find the input tensor of {path}")
            seen[path].append(x.detach().reshape(-1, x.shape[-1]).clone())
        return hook

    modes = {m: m.training for m in model.modules()}
    try:
        for b in blocks:
            handles.append(b.capture.register_forward_pre_hook(hook_for(b.path), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            run_model(model, inputs, "distill inputs")
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return {p: torch.cat(xs) for p, xs in seen.items() if xs}


def _samples(model, blocks, inputs, known_paths):
    """Sample inputs per block path: given as activations, or captured from the model. `known_paths`
    (every recognized block, converted or not) decides whether a dict holds activations."""
    paths = set(known_paths)
    if isinstance(inputs, dict) and inputs and all(isinstance(k, str) for k in inputs):
        hits = [k for k in inputs if k in paths]
        if hits and len(hits) != len(inputs):
            raise ValueError(f"distill inputs mixes block paths {hits} with other keys "
                             f"{[k for k in inputs if k not in paths]}: give either sample activations per "
                             f"block path or keyword arguments for the model")
        if hits:
            out = {}
            for k, x in inputs.items():  # entries of blocks left alone or skipped are not used
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"distill inputs[{k!r}] must be a tensor, got {type(x).__name__}")
                out[k] = x.detach().reshape(-1, x.shape[-1])
            return out
    return _capture_inputs(model, blocks, inputs)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _distill(pairs, samples, cfg: Distill):
    """pairs: [(block, ffn, layer record)]. Trains each ffn in place, fills the record's errors."""
    from tqdm.auto import tqdm

    work = []
    for block, ffn, rec in pairs:
        x = samples.get(block.path)
        if x is None:
            continue
        if x.shape[-1] != ffn.d_model:
            raise ValueError(f"distill: samples for {block.path} have {x.shape[-1]} features, the block has "
                             f"d_model={ffn.d_model}")
        if x.shape[0] < 2:
            raise ValueError(f"distill: {block.path} has {x.shape[0]} sample(s); at least 2 are needed "
                             f"(one to train on, one held out)")
        work.append((block, ffn, rec, x))
    bar = tqdm(total=cfg.steps * len(work), desc="distill", disable=not cfg.progress)
    try:
        for n, (block, ffn, rec, x) in enumerate(work):
            # one generator per block: its held-out split and batches do not depend on the other blocks
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n)
            p = ffn.fc1.coeffs
            x = x.to(device=p.device, dtype=p.dtype)
            perm = torch.randperm(x.shape[0], generator=g).to(x.device)
            n_hold = min(max(1, round(cfg.holdout * x.shape[0])), x.shape[0] - 1)
            x_hold, x_train = x[perm[:n_hold]], x[perm[n_hold:]]
            with torch.no_grad():
                y_hold, y_train = block.teacher(x_hold), block.teacher(x_train)
                best = last = rec.output_error_before = _rel(ffn(x_hold), y_hold)
            params = list(ffn.parameters())
            kept = [p.detach().clone() for p in params]  # the best parameters so far: the converted ones
            best_step = 0
            every = cfg.eval_every or max(1, cfg.steps // 20)
            opt = torch.optim.Adam(params, lr=cfg.lr)
            bar.set_postfix_str(block.path)
            for step in range(1, cfg.steps + 1):
                i = torch.randint(0, x_train.shape[0], (min(cfg.batch_size, x_train.shape[0]),), generator=g)
                i = i.to(x.device)
                loss = F.mse_loss(ffn(x_train[i]), y_train[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                if step % every == 0 or step == cfg.steps:
                    with torch.no_grad():
                        last = _rel(ffn(x_hold), y_hold)
                        if last < best:  # a NaN never is
                            best, best_step = last, step
                            for saved, q in zip(kept, params):
                                saved.copy_(q)
            with torch.no_grad():
                for saved, q in zip(kept, params):
                    q.copy_(saved)
                rec.output_error_after = _rel(ffn(x_hold), y_hold)
            rec.output_error_last, rec.best_step = last, best_step
            rec.distill_samples = x_train.shape[0]
            ffn.zero_grad(set_to_none=True)
            ffn.reset_stats()
    finally:
        bar.close()


# ------------------------------------------------------------------ the entry point
def replace_mlp(model: nn.Module, block_size: int = 64, k: int = 300, activation=None, skip=(),
                checkpoint: bool = False, distill=None, filter_fn=None, encode: bool = True,
                calibration=None) -> ConversionReport:
    """Replace the MLP blocks of ``model`` in place by RBE feed-forward blocks and report what was done.

    Recognized layouts (see the module docstring): Hugging Face ``GPT2MLP`` (Conv1D weights, transposed
    here), BERT/RoBERTa ``*Intermediate`` + ``*Output`` pairs, and ``nn.Sequential(nn.Linear, act,
    nn.Linear)``. Each block's two dense matrices are compressed with ``rbe_ffn.compress(block_size,
    k)`` into an :class:`RBEFeedForward` on the original device and dtype (float32/float64; other dtypes
    are left alone). Modules that look like MLPs but have another layout or an unsupported activation
    are left alone and listed in ``report.left_alone`` with the reason.

    What the model means is kept or the block is left alone: a block registered at several places
    (twice in one parent, or shared by several layers) becomes one RBE block installed at every one
    of them (``report[path].aliases``); the compressed parameters take ``requires_grad`` from the
    weights (fc1.basis, fc1.coeffs) and biases they replace; the training flag is kept. Left alone,
    with the reason: blocks whose weights are tied to a tensor outside the block (or to each other),
    blocks with hooks on a module the replacement drops, activations that subclass nn.GELU / nn.ReLU
    / nn.SiLU with their own forward.

    activation: overrides the detected activation of every converted block (name, alias or nn module);
        blocks whose own activation is unsupported are then converted too, with this one.
    skip: module paths (or prefixes: "transformer.h.0" skips everything under it) not to convert;
        names that match nothing are ignored. A single string is one path. A block with several
        paths is skipped when any of them is.
    checkpoint: passed to RBEFeedForward (save only the input for backward).
    distill: None, or a :class:`Distill` / dict of its fields (``inputs``, ``steps``, ``lr``, ...):
        train each converted block to match the original one's outputs; the report then holds
        the output error before and after on held-out samples.
    filter_fn: None, or ``filter_fn(module, path) -> bool`` (as torchao's ``quantize_``), asked about
        each recognized block (``module`` the GPT2MLP / Sequential / BertIntermediate, ``path`` as in
        the report; once per path for a block at several places): only blocks for which it returns
        True everywhere are converted, the others are left alone with the reason.
    encode: False swaps in RBE blocks of the right shapes (block_size, k, bias, activation, dtype,
        device) without running the encoder, with a fresh random init (a private generator: the
        global RNG is untouched), so that a state_dict or safetensors file saved from a converted
        model can be loaded into a freshly built original model. The report's error_fc1/error_fc2
        are None. Cannot be combined with distill.
    calibration: None, or sample inputs for data-aware encoding, in any form ``Distill.inputs``
        takes (a batch for the model, run on the ORIGINAL model with input-capturing hooks, or a dict
        ``{block path: activations [..., d_model]}``). Each block's fc1 is then encoded with
        ``rbe_ffn.compress(..., second_moment=)`` of the block's inputs x, and fc2 with that of
        act(fc1_dense(x)) (the original dense first layer, the converted block's activation), so
        both minimize their output error instead of their weight error; blocks without samples are
        encoded plainly. The report gains the plain vs data-aware output errors. Combines with
        distill (which then starts from the data-aware encoding).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_sizes(block_size, k)
    if activation is not None:
        activation = canonical_activation(activation)
    if isinstance(skip, str):
        skip = (skip,)
    try:
        skip = tuple(skip)
    except TypeError:
        raise TypeError(f"skip must be a collection of module paths, got {type(skip).__name__}") from None
    for s in skip:
        if not isinstance(s, str):
            raise TypeError(f"skip must hold module paths (str), got {s!r}")
    if not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint must be a bool, got {checkpoint!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be None or a callable (module, path) -> bool, got {filter_fn!r}")
    if not isinstance(encode, bool):
        raise TypeError(f"encode must be a bool, got {encode!r}")
    cfg = _as_distill(distill)
    if cfg is not None and not encode:
        raise ValueError("distill needs encode=True: a structure-only conversion has nothing to distill from")
    if calibration is not None and not encode:
        raise ValueError("calibration needs encode=True: a structure-only conversion does not encode")

    blocks, left = _scan(model)
    report = ConversionReport(left_alone=left)
    todo = []
    for b in blocks:
        if _skipped(b.paths, skip):
            report.skipped.append(b.path)
        elif filter_fn is not None and (refused := next(
                (p for p in (b.path,) + b.aliases if not filter_fn(b.capture, p)), None)) is not None:
            report.left_alone.append(LeftAlone(b.path, b.layout, f"filter_fn returned False for {refused}"))
        elif b.activation is None and activation is None:
            report.left_alone.append(LeftAlone(b.path, b.layout, f"activation {b.activation_source} is not "
                                                                 f"supported (gelu, gelu_tanh, relu, silu)"))
        else:
            todo.append(b)

    samples = _samples(model, todo, cfg.inputs, [b.path for b in blocks]) if cfg is not None and todo else {}
    calib = _samples(model, todo, calibration, [b.path for b in blocks]) if calibration is not None and todo else {}

    pairs = []
    for n, b in enumerate(todo):
        act = activation or b.activation
        if encode:
            ffn = RBEFeedForward.from_linears(_linear(b.w1, b.b1), _linear(b.w2, b.b2), activation=act,
                                              block_size=block_size, k=k, checkpoint=checkpoint)
        else:
            ffn = RBEFeedForward(b.w1.shape[1], b.w1.shape[0], act, bias=b.b1 is not None, block_size=block_size,
                                 k=k, checkpoint=checkpoint, device=b.w1.device, dtype=b.w1.dtype,
                                 generator=torch.Generator().manual_seed(n))
        rec = ConvertedLayer(
            path=b.path, layout=b.layout, d_model=ffn.d_model, d_ff=ffn.d_ff, block_size=block_size, k=k,
            activation=act, activation_source=b.activation_source if activation is None else "activation=",
            error_fc1=ffn.fc1.relative_error, error_fc2=ffn.fc2.relative_error,
            dense_bytes=(b.w1.numel() + b.w2.numel()) * b.w1.element_size(), rbe_bytes=ffn.weight_nbytes,
            aliases=b.aliases)
        if b.path in calib:
            _calibrate(b, ffn, rec, calib[b.path], block_size, k, act)
        pairs.append((b, ffn, rec))
        report.layers.append(rec)
    if cfg is not None:
        _distill(pairs, samples, cfg)
    for b, ffn, _ in pairs:
        w1, b1, w2, b2 = b.params
        for lin, w, bias in ((ffn.fc1, w1, b1), (ffn.fc2, w2, b2)):
            lin.basis.requires_grad_(w.requires_grad)
            lin.coeffs.requires_grad_(w.requires_grad)
            if bias is not None:
                lin.bias.requires_grad_(bias.requires_grad)
        b.install(ffn)
    return report


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding these tensors (no copy, no random init) for RBEFeedForward.from_linears."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


_ACT_FN = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def _calibrate(block, ffn, rec, x, block_size, k, act):
    """Re-encode ffn's fc1 and fc2 data-aware from the block's sample inputs x [N, d_model] (ffn holds
    the plain encoding, kept for the comparison); fill rec's output-error fields."""
    from .calibrate import second_moment

    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise ValueError(f"calibration: samples for {block.path} must be a floating-point tensor")
    if x.shape[-1] != ffn.d_model:
        raise ValueError(f"calibration: samples for {block.path} have {x.shape[-1]} features, the block has "
                         f"d_model={ffn.d_model}")
    x = x.detach().reshape(-1, ffn.d_model)
    h1, n = second_moment(x, ffn.d_model, f"calibration samples for {block.path}")
    w1 = block.w1.detach().to("cpu")
    w2 = block.w2.detach().to("cpu")
    b1 = None if block.b1 is None else block.b1.detach().to("cpu", torch.float64)
    fn = _ACT_FN[act]
    # fc2's inputs: act(fc1_dense(x)) of the original block, accumulated in float64 chunks
    h2 = torch.zeros(ffn.d_ff, ffn.d_ff, dtype=torch.float64)
    for s in range(0, n, 4096):
        a = fn(F.linear(x[s:s + 4096].to("cpu", torch.float64), w1.double(), b1))
        h2.addmm_(a.T, a)
    h2 /= n
    dev = ffn.fc1.coeffs.device
    plain = (ffn.fc1, ffn.fc2)
    for name, w, h, bias in (("fc1", w1, h1, block.b1), ("fc2", w2, h2, block.b2)):
        work = w if w.dtype in (torch.float32, torch.float64) else w.float()
        cw = compress(work, block_size, k, second_moment=h)
        setattr(rec, f"output_error_{name}", cw.output_error)
        setattr(rec, f"output_error_{name}_plain", cw.output_error_plain)
        cw = CompressedWeight(cw.basis.to(dev), cw.coeffs.to(dev), cw.index.to(dev), cw.shape, cw.block_size,
                              cw.relative_error, cw.block_errors)
        lin = RBELinear.from_compressed(cw, None if bias is None else bias.detach().to(cw.coeffs.dtype))
        setattr(ffn, name, lin)
    rec.error_fc1, rec.error_fc2 = ffn.fc1.relative_error, ffn.fc2.relative_error
    rec.calibration_samples = n
    # the whole block on the calibration samples, plain vs data-aware
    with torch.no_grad():
        xs = x[:4096].to(device=dev, dtype=ffn.fc1.coeffs.dtype)
        want = block.teacher(xs.to(block.w1.device, block.w1.dtype)).to(xs)
        rec.block_error = _rel(ffn(xs), want)
        data = (ffn.fc1, ffn.fc2)
        ffn.fc1, ffn.fc2 = plain
        rec.block_error_plain = _rel(ffn(xs), want)
        ffn.fc1, ffn.fc2 = data
    ffn.reset_stats()
