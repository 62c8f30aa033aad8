"""Whole-model distillation: train a converted model (the student) to match the original (the teacher).

    report = rbe_ffn.distill_model(student, teacher, batches, objective="kl", steps=500, lr=1e-4)
    print(report)

Layer-wise distillation (``replace_mlp(distill=...)``) fits each block to its own dense original on
the original model's activations, so the errors of the blocks still add up through the layers.
Distilling the whole model compares what the user cares about (the logits of an LM, the embeddings
of an encoder) and lets every block compensate for the others.

What it promises:

* it never returns a student worse on its held-out batches than it started: the held-out
  objective is measured before the first step and every ``eval_every`` steps, and the best
  parameters seen (the start included) are what the student keeps;
* the teacher runs in eval mode under ``torch.inference_mode()`` (no graph, no gradients, nothing
  saved) and is left as it was;
* the student runs in eval mode (dropout off: the target is deterministic, and the held-out
  objective must be too) with every RBEFeedForward at ``checkpoint=True`` (only the block's input
  is saved for backward); the training flags, ``checkpoint`` and ``requires_grad`` of its modules
  and parameters are restored afterwards.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .convert import run_model
from .modules import PARAMETRIZATIONS, RBEFeedForward, RBELinear

__all__ = ["distill_model", "DistillReport", "OBJECTIVES", "SCHEDULES"]

OBJECTIVES = ("kl", "mse", "cosine")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class DistillReport:
    """What distill_model did. Objectives are on the held-out batches (lower is better):
    ``before`` at the start, ``best`` the lowest seen (the parameters the student keeps, from
    ``best_step``; 0: no step improved on the start, which is kept as it was), ``last`` at the last
    evaluation, ``after`` measured again once the best parameters are back (equal to ``best`` up to
    rounding). The held-out batches both choose the step and measure ``after``, so ``after`` is
    slightly optimistic: judge the result on data of your own. ``steps`` optimizer steps were run
    (``stopped`` says why it stopped: ``"steps"``, ``"patience"``, ``"max_seconds"`` or
    ``"diverged"``, a non-finite training loss); ``samples`` the batch rows (first dimension of
    the compared outputs) and ``tokens`` the input tokens (non-padding where an ``attention_mask``
    is given; None when the batches hold no integer ids) that went through the student in those
    steps. ``history`` is [(step, held-out objective)] of every evaluation."""

    objective: str
    before: float
    best: float
    after: float
    last: float
    best_step: int
    steps: int
    stopped: str
    samples: int
    tokens: int | None
    seconds: float
    train_batches: int
    holdout_batches: int
    trained_parameters: int
    history: list = field(default_factory=list)

    def __str__(self) -> str:
        tok = "-" if self.tokens is None else f"{self.tokens:,}"
        return (f"distill_model ({self.objective}): held-out {self.before:.6g} -> {self.after:.6g} "
                f"(best step {self.best_step} of {self.steps}, stopped: {self.stopped}); "
                f"{self.samples:,} samples, {tok} tokens, {self.train_batches} train / "
                f"{self.holdout_batches} held-out batches, {self.trained_parameters:,} parameters trained, "
                f"{self.seconds:.1f} s")


# ------------------------------------------------------------------ objectives
def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softmax over the last dimension at `temperature`, averaged over
    the positions and scaled by temperature^2 (so its gradients keep their size as T changes)."""
    t = temperature
    s = F.log_softmax(student.float() / t, dim=-1).reshape(-1, student.shape[-1])
    p = F.log_softmax(teacher.float() / t, dim=-1).reshape(-1, teacher.shape[-1])
    return F.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)


def _mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher)


def _cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over the last dimension, averaged over the positions."""
    return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()


def _default_outputs(objective: str) -> Callable:
    def outputs(model, batch):
        return _pick(run_model(model, batch), objective)
    return outputs


def _pick(out, objective: str) -> torch.Tensor:
    """The tensor to compare in a model's output: itself if a tensor; else ``logits`` (for "kl") or
    ``last_hidden_state`` (the others) when present, then the other of the two, then the first
    element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    order = ("logits", "last_hidden_state") if objective == "kl" else ("last_hidden_state", "logits")
    for name in order:
        v = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"distill_model: cannot tell which output of the model to compare (got "
                    f"{type(out).__name__}); give outputs=lambda model, batch: <tensor>")


def lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (1 to ``steps``) as a fraction of the peak: a linear
    warm-up from 1/warmup to 1 over the first ``warmup`` steps, then ``schedule`` over the rest:
    "constant" 1, "linear" or "cosine" from 1 down towards 0 (the last step gets a small positive
    rate, 1/(steps - warmup) for "linear"; nothing is spent on a step at lr 0)."""
    if step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    t = (step - warmup - 1) / (steps - warmup)
    return 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------ batches
def _tokens(batch) -> int | None:
    """Input tokens in a batch: the attention mask's sum where a dict has one, else the element count
    of the first integer tensor (input ids); None when there is none (a callable, float inputs)."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        items = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
    else:
        items = [batch]
    for v in items:
        if isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and not v.dtype.is_complex \
                and v.dtype != torch.bool:
            return v.numel()
    return None


def _as_list(batches, what: str) -> list:
    if isinstance(batches, (torch.Tensor, dict)) or callable(batches) and not isinstance(batches, (list, tuple)):
        raise TypeError(f"distill_model: {what} must be an iterable of batches (e.g. a list), got one "
                        f"{type(batches).__name__}; wrap a single batch in a list")
    try:
        out = list(batches)
    except TypeError:
        raise TypeError(f"distill_model: {what} must be an iterable of batches, got "
                        f"{type(batches).__name__}") from None
    for i, b in enumerate(out):
        if not (isinstance(b, (torch.Tensor, tuple, list, dict)) or callable(b) and not isinstance(b, nn.Module)):
            raise TypeError(f"distill_model: {what}[{i}] must be a tensor, tuple, list, dict or callable, got "
                            f"{type(b).__name__}")
    return out


def _positive_int(name, v, allow_none=False, minimum=1):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        kind = "a positive int" if minimum == 1 else "a non-negative int"
        raise ValueError(f"distill_model: {name} must be {kind}{' or None' if allow_none else ''}, got {v!r}")


def _positive_number(name, v, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
        raise ValueError(f"distill_model: {name} must be a positive number{' or None' if allow_none else ''}, "
                         f"got {v!r}")


# ------------------------------------------------------------------ the entry point
def distill_model(student: nn.Module, teacher: nn.Module, batches, *, objective="kl", outputs=None,
                  temperature: float = 1.0, holdout=0.2, steps: int = 100, lr: float = 1e-4,
                  eval_every: int | None = None, patience: int | None = None, train: str = "rbe",
                  schedule: str = "constant", warmup: int = 0, parametrization: str | None = None,
                  max_seconds: float | None = None, progress: bool = True, seed: int = 0) -> DistillReport:
    """Train ``student`` (a converted model) in place to match ``teacher`` (the original) on ``batches``.

    batches: an iterable of batches, each run as ``model(x)`` for a tensor, ``model(*x)`` for a
        tuple/list, ``model(**x)`` for a dict, or ``f(model)`` for a callable. It is read once into
        a list; training cycles through the training batches in a seeded random order.
    objective: ``"kl"`` (KL(teacher || student) of the softmax over the last dimension at
        ``temperature``, times temperature^2: logits of an LM), ``"mse"`` (mean squared error),
        ``"cosine"`` (1 - cosine similarity over the last dimension: hidden states or embeddings
        of an encoder), or a callable ``f(student_out, teacher_out) -> scalar tensor``.
    outputs: None, or ``f(model, batch) -> tensor`` giving what to compare (e.g. pooled
        embeddings, or the logits at non-padding positions). None runs the model on the batch and
        takes the tensor it returns, else its ``logits`` (``"kl"``) or ``last_hidden_state`` (the
        others), else the first element of a tuple.
    holdout: a fraction in (0, 1) of the batches (whole batches, chosen with ``seed``; at least one
        held out, one trained on) or an iterable of held-out batches of its own. The held-out
        objective (the mean over held-out batches, weighted by their rows) chooses the parameters
        kept and early stopping. The teacher's outputs on them are computed once and kept (memory:
        one output per held-out batch; the training batches' are recomputed every step).
    steps: at most this many optimizer steps (Adam, peak learning rate ``lr``). eval_every: steps
        between held-out evaluations (None: steps // 20, at least 1); the last step is always evaluated.
    schedule: the learning rate over the steps after ``warmup`` linear warm-up steps (0: none):
        ``"constant"``, or ``"linear"`` / ``"cosine"`` decay towards 0 at ``steps`` (see lr_factor).
        A decay is planned over ``steps``: a run cut short by ``patience`` or ``max_seconds`` ends
        before its rate is low, so with a decay set ``steps`` to what the time allows.
    patience: None (no early stopping), or stop after this many evaluations in a row without a new
        best. max_seconds: None, or stop after the step that passes this much wall time.
    train: ``"rbe"`` trains the compressed parameters only (every parameter of the student's
        RBEFeedForward / RBELinear modules: basis, coeffs, biases), ``"all"`` every floating-point
        parameter of the student.
    parametrization: None (the layers as they are), or ``"scaled"`` / ``"plain"``: every RBELinear of
        the student is switched to it for the run and back afterwards (``set_parametrization``: the
        format numbers unchanged, exactly). Under Adam it sets the pattern numbers' and the
        coefficients' learning rates apart (see parametrization_scales); converted layers are
        "plain".
    progress: a tqdm bar (the training loss and the best held-out objective).

    Returns a :class:`DistillReport`. The student keeps the best parameters seen on the held-out
    batches, the start included: it is never returned worse there than it started.
    """
    # ---- validation, in one place
    if not isinstance(student, nn.Module):
        raise TypeError(f"distill_model: student must be a torch.nn.Module, got {type(student).__name__}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"distill_model: teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if student is teacher:
        raise ValueError("distill_model: student and teacher are the same module; convert a copy "
                         "(copy.deepcopy(model) before replace_mlp) and pass the original as teacher")
    shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    if shared:
        raise ValueError(f"distill_model: student and teacher share {len(shared)} parameter tensor(s); "
                         f"training the student would change the teacher: give the student its own copy")
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"distill_model: objective must be one of {OBJECTIVES} or a callable "
                             f"(student_out, teacher_out) -> scalar, got {objective!r}")
        name = objective
        fn = {"kl": lambda s, t: _kl(s, t, temperature), "mse": _mse, "cosine": _cosine}[objective]
    elif callable(objective):
        name, fn = getattr(objective, "__name__", "callable"), objective
    else:
        raise TypeError(f"distill_model: objective must be a name {OBJECTIVES} or a callable, got "
                        f"{type(objective).__name__}")
    if outputs is not None and not callable(outputs):
        raise TypeError(f"distill_model: outputs must be None or a callable (model, batch) -> tensor, got "
                        f"{type(outputs).__name__}")
    _positive_number("temperature", temperature)
    _positive_int("steps", steps, minimum=0)
    _positive_number("lr", lr)
    _positive_int("eval_every", eval_every, allow_none=True)
    _positive_int("patience", patience, allow_none=True)
    _positive_int("seed", seed, minimum=0)
    _positive_number("max_seconds", max_seconds, allow_none=True)
    if schedule not in SCHEDULES:
        raise ValueError(f"distill_model: schedule must be one of {SCHEDULES}, got {schedule!r}")
    _positive_int("warmup", warmup, minimum=0)
    if warmup > steps:
        raise ValueError(f"distill_model: warmup ({warmup} steps) is longer than steps ({steps})")
    if parametrization is not None and parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"distill_model: parametrization must be None or one of {PARAMETRIZATIONS}, "
                         f"got {parametrization!r}")
    if train not in ("rbe", "all"):
        raise ValueError(f"distill_model: train must be 'rbe' (the compressed parameters) or 'all', got {train!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"distill_model: progress must be a bool, got {progress!r}")

    data = _as_list(batches, "batches")
    g = torch.Generator().manual_seed(seed)
    if isinstance(holdout, (int, float)) and not isinstance(holdout, bool):
        if not 0 < holdout < 1:
            raise ValueError(f"distill_model: holdout must be a fraction in (0, 1) or an iterable of held-out "
                             f"batches, got {holdout!r}")
        if len(data) < 2:
            raise ValueError(f"distill_model: holdout={holdout} splits the batches, but there are {len(data)}; "
                             f"give at least 2 (one held out, one to train on) or a separate held-out iterable")
        perm = torch.randperm(len(data), generator=g).tolist()
        n_hold = min(max(1, round(holdout * len(data))), len(data) - 1)
        held, data = [data[i] for i in perm[:n_hold]], [data[i] for i in perm[n_hold:]]
    elif holdout is None or isinstance(holdout, bool):
        raise TypeError(f"distill_model: holdout must be a fraction in (0, 1) or an iterable of held-out batches, "
                        f"got {holdout!r}")
    else:
        held = _as_list(holdout, "holdout")
        if not held:
            raise ValueError("distill_model: the held-out iterable is empty")
    if not data:
        raise ValueError("distill_model: no batches to train on")

    if train == "rbe":
        owners = [m for m in student.modules() if isinstance(m, (RBEFeedForward, RBELinear))]
        if not owners:
            raise ValueError("distill_model: train='rbe' but the student has no RBEFeedForward / RBELinear "
                             "module (convert it with rbe_ffn.replace_mlp first, or train='all')")
        params = list({id(p): p for m in owners for p in m.parameters()}.values())
    else:
        params = list(student.parameters())
    params = [p for p in params if p.dtype.is_floating_point]
    if not params:
        raise ValueError("distill_model: the student has no floating-point parameters to train")

    get = outputs if outputs is not None else _default_outputs(name)

    # ---- set up; everything changed here is put back in `finally`
    t0 = time.perf_counter()
    modes = {m: m.training for m in list(student.modules()) + list(teacher.modules())}
    ckpt = {m: m.checkpoint for m in student.modules() if isinstance(m, RBEFeedForward)}
    grads = {p: p.requires_grad for p in student.parameters()}
    layouts = {m: m.parametrization for m in student.modules() if isinstance(m, RBELinear)}
    trained = {id(p) for p in params}
    from tqdm.auto import tqdm
    bar = tqdm(total=steps, desc="distill_model", disable=not progress)
    try:
        student.eval()
        teacher.eval()
        for m in ckpt:
            m.checkpoint = True
        if parametrization is not None:
            for m in layouts:
                m.set_parametrization(parametrization)
        for p in student.parameters():
            p.requires_grad_(id(p) in trained)

        def target(batch):
            with torch.inference_mode():
                t = get(teacher, batch)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"distill_model: outputs gave the teacher a {type(t).__name__}, not a tensor")
            return t.clone()  # a normal tensor: inference tensors cannot be saved for backward

        def loss_of(batch, t):
            s = get(student, batch)
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"distill_model: outputs gave the student a {type(s).__name__}, not a tensor")
            if s.shape != t.shape:
                raise ValueError(f"distill_model: student output {tuple(s.shape)} and teacher output "
                                 f"{tuple(t.shape)} differ in shape")
            loss = fn(s, t)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("distill_model: the objective must return a scalar tensor")
            return loss.reshape(()), s

        held_targets = [target(b) for b in held]
        weights = [t.numel() // max(t.shape[-1], 1) if t.dim() else 1 for t in held_targets]

        def evaluate() -> float:
            total = 0.0
            with torch.no_grad():
                for b, t, w in zip(held, held_targets, weights):
                    total += w * float(loss_of(b, t)[0])
            return total / sum(weights)

        before = best = last = evaluate()
        if not math.isfinite(before):
            raise ValueError(f"distill_model: the held-out objective at the start is {before}; check the "
                             f"outputs and the objective")
        history = [(0, before)]
        kept = [p.detach().clone() for p in params]
        best_step, stale, stopped, done = 0, 0, "steps", 0
        samples, tokens = 0, 0
        every = eval_every or max(1, steps // 20)
        opt = torch.optim.Adam(params, lr=lr)
        order: list = []
        for step in range(1, steps + 1):
            if not order:
                order = torch.randperm(len(data), generator=g).tolist()
            batch = data[order.pop()]
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, steps, schedule, warmup)
            t = target(batch)
            loss, s = loss_of(batch, t)
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                stopped = "diverged"
                break
            loss.backward()
            opt.step()
            done = step
            samples += s.shape[0] if s.dim() else 1
            n_tok = _tokens(batch)
            tokens = None if tokens is None or n_tok is None else tokens + n_tok
            bar.update(1)
            if step % every == 0 or step == steps:
                last = evaluate()
                history.append((step, last))
                if last < best:  # a NaN never is
                    best, best_step, stale = last, step, 0
                    for saved, q in zip(kept, params):
                        saved.copy_(q.detach())
                else:
                    stale += 1
                bar.set_postfix(loss=f"{loss.item():.4g}", held_out=f"{last:.4g}", best=f"{best:.4g}")
                if patience is not None and stale >= patience:
                    stopped = "patience"
                    break
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                stopped = "max_seconds"
                break
        with torch.no_grad():
            for saved, q in zip(kept, params):
                q.copy_(saved)
        opt = None
        after = evaluate()
    finally:
        bar.close()
        for p, r in grads.items():
            p.requires_grad_(r)
            if id(p) in trained:
                p.grad = None
        for m, c in ckpt.items():
            m.checkpoint = c
        if parametrization is not None:
            for m, layout in layouts.items():
                m.set_parametrization(layout)
        for m, t in modes.items():
            m.training = t
        for m in student.modules():
            if isinstance(m, RBEFeedForward):
                m.reset_stats()
    return DistillReport(objective=name, before=before, best=best, after=after, last=last, best_step=best_step,
                         steps=done, stopped=stopped, samples=samples, tokens=tokens,
                         seconds=time.perf_counter() - t0, train_batches=len(data), holdout_batches=len(held),
                         trained_parameters=sum(p.numel() for p in params), history=history)
