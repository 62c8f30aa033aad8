"""Dynamic support: every few steps, move some of each block's kept DCT positions (RigL for RBE).

A fresh RBE layer trains its coefficients at k positions per block drawn at random and then
fixed. Dynamic sparse training (RigL, Evci et al. 2019, "Rigging the lottery") moves the support
during training instead: every ``every`` steps, in each block,

  * drop the n kept coefficients with the smallest |value| (ties: the lower position);
  * regrow n positions among those that were not kept, where |G| is largest (ties: the lower
    position), G = dL/d(all b*b DCT coefficients of the block) on that step's batch;
  * regrown coefficients start at 0, and their optimizer state (Adam/AdamW exp_avg, exp_avg_sq,
    max_exp_avg_sq; SGD momentum_buffer) starts at 0; survivors keep value and state.

n = floor(f_t k + 1/2), at most b*b - k, with f_t = fraction (schedule "constant") or
fraction (1 + cos(pi t / until)) / 2 (schedule "cosine", RigL's): no update at or after step
``until``. The index stays sorted within each block, so values, gradient and optimizer state are
permuted with their positions. Unlike RigL, a position dropped at an update cannot be regrown at
the same update (so exactly n positions of every block move); a regrow of zeros leaves the
layer's function unchanged, only the drop changes it.

The gradient of a block (i, j) at every position, with the DCT convention of the format
(W_ij = Psi^T Chat Psi, Psi[u, n] = psi_u[n]), is

    G_ij = Psi (dy_i^T x_j) Psi^T = (dy_i Psi^T)^T (x_j Psi^T) = Dyh_i^T Xh_j

with x_j [T, b] the j-th segment of the layer's input (zero-padded), dy_i [T, b] the i-th segment
of its output gradient: the product of the transform-domain tiles. It is formed one block-row
at a time ([b, in]), never as a dense [out, in] tensor, and at the kept positions it equals
``coeffs.grad``. An RBEFeedForward's inner input and output gradient (act(pre), dL/dpre) never
exist outside its fused operator: the update recomputes them from the block's input and output
gradient with the weights of the captured step (a copy of the compressed numbers, taken at that
forward), chunk by chunk.

Capture: module hooks record the input (at forward) and the output gradient (when it arrives in
backward) only on steps whose update is due: ``step()`` arms them for the next step's forward
and backward and removes them after the update. A record is made when the output gradient
arrives, so each real backward is recorded once (also under torch.utils.checkpoint, either kind,
whose extra forward gets no gradient) and a forward never backpropagated records nothing;
micro-batches accumulated into one step are all recorded (G is their sum, like the accumulated
``coeffs.grad``).

Distributed (torch.distributed initialized, more than one process): each block-row's G is
all-reduced (summed) before the choice, so every rank scores the same global gradient; the
chosen positions are then broadcast from the group's first rank, so the ranks' indexes, values and
optimizer states stay identical even if a backend's reduction differed in the last bit.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import ops
from .calibrate import dct_matrix
from .modules import RBEFeedForward, RBELinear, _is_dtensor

__all__ = ["DynamicSupport"]

SCHEDULES = ("cosine", "constant")

# per-coefficient optimizer state, position-aligned with coeffs: permuted with it, 0 for regrown entries
_STATE_KEYS = {torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
               torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
               torch.optim.SGD: ("momentum_buffer",)}

# tokens per chunk when an RBEFeedForward's inner activations are recomputed at an update
_RECOMPUTE_TOKENS = 128


def _dct_tiles(a: torch.Tensor, features: int, b: int, psi: torch.Tensor) -> torch.Tensor:
    """a [T, features] -> [T, S*b]: the DCT (a_s Psi^T) of each zero-padded b-wide segment s."""
    s = -(-features // b)
    a = F.pad(a, (0, s * b - features))
    return (a.reshape(a.shape[0], s, b) @ psi.T).reshape(a.shape[0], s * b)


def _row_gradient(xh: torch.Tensor, dyh: torch.Tensor, i: int, b: int) -> torch.Tensor:
    """G of block-row i, [C, b*b] (flat position u*b + v), from the tiles xh [T, C*b], dyh [T, R*b]."""
    g = dyh[:, i * b:(i + 1) * b].T @ xh  # [b (u), C*b (j, v)]
    c = xh.shape[1] // b
    return g.view(b, c, b).permute(1, 0, 2).reshape(c, b * b)


def _largest(score: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, n] column indices (ascending) of the n largest entries of each row of score, ties
    going to the lower column: torch.topk finds the n-th largest value, and of the entries equal to
    it the lowest columns fill what the larger ones leave (a stable sort of whole rows gives the
    same choice at several times the cost)."""
    threshold = torch.topk(score, n, dim=1, sorted=False).values.amin(1, keepdim=True)
    above = score > threshold
    tied = score == threshold
    room = n - above.sum(1, keepdim=True)
    take = above | (tied & (tied.cumsum(1) <= room))
    return take.nonzero()[:, 1].view(score.shape[0], n)


class _Unit:
    """One hooked module (an RBEFeedForward, or an RBELinear used on its own) and what the armed
    step recorded for it: (x, dy[, weight copy]) per backward."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self.layers = [module.fc1, module.fc2] if isinstance(module, RBEFeedForward) else [module]
        self.layer_names = [f"{name}.fc1", f"{name}.fc2"] if len(self.layers) == 2 else [name]
        self.records: list = []
        self.handle = None
        self._copy = None  # (parameter versions, copied weights) of the last forward

    def weights(self):
        """A copy of an FFN's compressed numbers as they are now (the forward's), shared by the
        forwards of one step (same parameter versions): the update recomputes its inner
        activations with them after optimizer.step() has changed the originals."""
        ts = [t for lin in self.layers for t in (lin.basis, lin.coeffs, lin.index, lin.bias)]
        version = tuple(None if t is None else t._version for t in ts)
        if self._copy is None or self._copy[0] != version:
            with torch.no_grad():  # the format numbers (parameters x their scales), as the forward used them
                copies = [t.clone() if t is not None else None
                          for lin in self.layers for t in (*lin.numbers(), lin.index, lin.bias)]
            self._copy = (version, copies)
        return self._copy[1]


class DynamicSupport:
    """Prune-and-regrow of the kept DCT positions of RBE layers during training (RigL).

        ds = rbe_ffn.DynamicSupport(model, optimizer, every=100, fraction=0.3, until=30000)
        for x, y in data:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            ds.step()          # after optimizer.step(), once per training step

    model_or_layers: a module (every RBEFeedForward and every RBELinear not inside one is
    updated; a DistributedDataParallel wrapper is fine), or an iterable of RBEFeedForward /
    RBELinear modules. optimizer: torch.optim.Adam, AdamW or SGD holding those layers' coeffs
    (their per-coefficient state is permuted with the positions). Step t (the t-th call of
    ``step()``) updates when t is a multiple of ``every`` and t < ``until``, dropping and
    regrowing n = round(f_t k) positions per block (module docstring: the rule). ``until``:
    the step where the cosine schedule reaches 0 (RigL stops at 3/4 of training); required for
    schedule="cosine", optional for "constant" (None: never stops).
    process_group: the group whose ranks must agree (default: the default group when
    torch.distributed is initialized with more than one process).

    The module docstring says how the gradient is captured and what it costs.
    """

    def __init__(self, model_or_layers, optimizer, every: int = 100, fraction: float = 0.3, until: int | None = None,
                 schedule: str = "cosine", *, process_group=None):
        self._check_args(optimizer, every, fraction, until, schedule)
        self.every, self.fraction, self.until, self.schedule = every, float(fraction), until, schedule
        self.optimizer = optimizer
        self.process_group = process_group
        self.units = self._find_units(model_or_layers)
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for unit in self.units:
            for lin, name in zip(unit.layers, unit.layer_names):
                if _is_dtensor(lin.coeffs):
                    raise ValueError(f"DynamicSupport: {name} has sharded (FSDP) parameters; only whole "
                                     f"parameters (single process or DistributedDataParallel) are supported")
                if id(lin.coeffs) not in optimized:
                    raise ValueError(f"DynamicSupport: the optimizer does not hold the coeffs of {name}; "
                                     f"pass the optimizer that trains them")
        if all(min(lin.k, lin.block_size ** 2 - lin.k) == 0 for u in self.units for lin in u.layers):
            raise ValueError("DynamicSupport: no layer has positions to move (every layer keeps k = 0 or all "
                             "block_size**2 coefficients)")
        self._step, self._removed = 0, False
        self._arm(self._due(1))

    # ------------------------------------------------------------------ arguments
    @staticmethod
    def _check_args(optimizer, every, fraction, until, schedule) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(optimizer, tuple(_STATE_KEYS)):
            raise TypeError(f"DynamicSupport supports the optimizers {', '.join(c.__name__ for c in _STATE_KEYS)} "
                            f"(whose per-coefficient state it knows how to move), got {type(optimizer).__name__}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive int (steps between updates), got {every!r}")
        if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or isinstance(fraction, torch.Tensor)
                or not (math.isfinite(fraction) and 0 < fraction <= 1)):
            raise ValueError(f"fraction must be a number in (0, 1] (the largest share of each block's kept "
                             f"coefficients moved at an update), got {fraction!r}")
        if until is not None and (isinstance(until, bool) or not isinstance(until, numbers.Integral) or until < 1):
            raise ValueError(f"until must be None or a positive int (the step from which nothing moves), got {until!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "cosine" and until is None:
            raise ValueError("schedule='cosine' decays the fraction to 0 at step `until`: give until (RigL uses 3/4 "
                             "of the training steps), or use schedule='constant'")

    @staticmethod
    def _find_units(model_or_layers) -> list:
        if isinstance(model_or_layers, nn.Module):
            inner = {id(m.fc1) for m in model_or_layers.modules() if isinstance(m, RBEFeedForward)} | \
                    {id(m.fc2) for m in model_or_layers.modules() if isinstance(m, RBEFeedForward)}
            units = [_Unit(m, name or type(m).__name__) for name, m in model_or_layers.named_modules()
                     if isinstance(m, RBEFeedForward) or (isinstance(m, RBELinear) and id(m) not in inner)]
        else:
            try:
                mods = list(model_or_layers)
            except TypeError:
                raise TypeError(f"model_or_layers must be an nn.Module or an iterable of RBEFeedForward/RBELinear "
                                f"modules, got {type(model_or_layers).__name__}") from None
            for i, m in enumerate(mods):
                if not isinstance(m, (RBEFeedForward, RBELinear)):
                    raise TypeError(f"model_or_layers[{i}] must be an RBEFeedForward or RBELinear, got "
                                    f"{type(m).__name__}")
            if len({id(m) for m in mods}) != len(mods):
                raise ValueError("model_or_layers lists a module more than once")
            units = [_Unit(m, f"layers[{i}]") for i, m in enumerate(mods)]
        if not units:
            raise ValueError("DynamicSupport: model_or_layers contains no RBEFeedForward or RBELinear")
        return units

    # ------------------------------------------------------------------ schedule
    def fraction_at(self, step: int) -> float:
        """f_t: the share of each block's kept coefficients moved at step t if t is an update step
        (0 at and after ``until``)."""
        if self.until is not None and step >= self.until:
            return 0.0
        if self.schedule == "constant":
            return self.fraction
        return self.fraction * (1 + math.cos(math.pi * step / self.until)) / 2

    def moved_per_block(self, layer: RBELinear, step: int) -> int:
        """n: positions of each block of ``layer`` dropped and regrown at step t (if an update step)."""
        n = math.floor(self.fraction_at(step) * layer.k + 0.5)
        return min(n, layer.block_size ** 2 - layer.k)

    def _due(self, step: int) -> bool:
        if self._removed or step % self.every:
            return False
        return any(self.moved_per_block(lin, step) > 0 for u in self.units for lin in u.layers)

    @property
    def steps(self) -> int:
        """How many times step() has been called."""
        return self._step

    @property
    def armed(self) -> bool:
        """The hooks record this step's inputs and output gradients (its update is due)."""
        return self.units[0].handle is not None

    def state_dict(self) -> dict:
        return {"step": self._step}

    def load_state_dict(self, state: dict) -> None:
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"DynamicSupport state must be {{'step': int >= 0}}, got {state!r}")
        self._step = int(step)
        self._arm(self._due(self._step + 1))

    # ------------------------------------------------------------------ capture
    def _arm(self, on: bool) -> None:
        for unit in self.units:
            unit.records = []
            unit._copy = None
            if on and unit.handle is None:
                unit.handle = unit.module.register_forward_hook(self._hook(unit), with_kwargs=True)
            elif not on and unit.handle is not None:
                unit.handle.remove()
                unit.handle = None

    def remove(self) -> None:
        """Remove the hooks (no further capture); step() then only counts."""
        self._removed = True
        self._arm(False)

    @staticmethod
    def _hook(unit: _Unit):
        def forward_hook(module, args, kwargs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = (args[0] if args else kwargs["x"]).detach()
            weights = unit.weights() if len(unit.layers) == 2 else None
            records = unit.records

            def on_grad(dy):
                records.append((x, dy.detach(), weights))  # only a real backward gets here

            output.register_hook(on_grad)

        return forward_hook

    @staticmethod
    def _tiles(unit: _Unit, wanted):
        """Yield (layer, xh [T, C*b], dyh [T, R*b]) for the layers of ``wanted`` from the records of
        this step, one layer at a time (T = 0 without any): an FFN's fc2 first (input act(pre), output gradient dy: fc1's
        forward is recomputed), then fc1 (input x, output gradient dL/dpre: the forward and fc2's
        input gradient are recomputed), so only one layer's tiles exist at a time. The consumer
        drops each layer's tiles before asking for the next."""
        lins = unit.layers
        f1 = lins[0]
        dtype, b = f1.coeffs.dtype, f1.block_size
        psi = dct_matrix(b).to(dtype=dtype, device=f1.coeffs.device)
        if len(lins) == 1:
            if not wanted:
                return
            with torch.no_grad():
                xs = [x.reshape(-1, f1.in_features).to(dtype) for x, _, _ in unit.records]
                dys = [dy.reshape(-1, f1.out_features).to(dtype) for _, dy, _ in unit.records]
                x = torch.cat(xs) if xs else f1.coeffs.new_zeros(0, f1.in_features)
                dy = torch.cat(dys) if dys else f1.coeffs.new_zeros(0, f1.out_features)
                del xs, dys
                tiles = (f1, _dct_tiles(x, f1.in_features, b, psi), _dct_tiles(dy, f1.out_features, b, psi))
                del x, dy
            yield tiles
            return
        m = unit.module
        dm, dff, act = m.d_model, m.d_ff, m.activation
        total = sum(x.numel() // dm for x, _, _ in unit.records)
        nm, nf = -(-dm // b) * b, -(-dff // b) * b
        for second in (True, False):
            if not any(lin is lins[1 if second else 0] for lin in wanted):
                continue
            with torch.no_grad():
                xh = f1.coeffs.new_empty(total, nf if second else nm)
                dyh = f1.coeffs.new_empty(total, nm if second else nf)
                t0 = 0
                for x, dy, (p1, c1, i1, bias1, p2, c2, i2, _) in unit.records:
                    x, dy = x.reshape(-1, dm).to(dtype), dy.reshape(-1, dm).to(dtype)
                    for s in range(0, x.shape[0], _RECOMPUTE_TOKENS):
                        xc, dyc = x[s:s + _RECOMPUTE_TOKENS], dy[s:s + _RECOMPUTE_TOKENS].contiguous()
                        t1 = t0 + xc.shape[0]
                        pre = ops.linear(xc, f1.plan, p1, c1, i1, bias1, dm, dff)
                        h = ops.activation(pre, act)
                        if second:
                            xh[t0:t1] = _dct_tiles(h, dff, b, psi)
                            dyh[t0:t1] = _dct_tiles(dyc, dm, b, psi)
                        else:
                            dh = ops.linear_backward(dyc, h, lins[1].plan, p2, c2, i2, dff, dm,
                                                     [True, False, False, False])[0]
                            xh[t0:t1] = _dct_tiles(xc, dm, b, psi)
                            dyh[t0:t1] = _dct_tiles(ops.activation_backward(dh, pre, act), dff, b, psi)
                        t0 = t1
                pre = h = dh = x = dy = xc = dyc = None  # nothing of this layer stays while suspended
                tiles = (lins[1] if second else f1, xh, dyh)
                del xh, dyh
            yield tiles
            del tiles

    def dct_gradient(self, layer: RBELinear) -> torch.Tensor:
        """G [R*C, b*b] of ``layer`` from this process's records of the armed step (flat position
        u*b + v): dL/d(every DCT coefficient of every block). For inspection and tests: it builds
        the whole [R*C, b*b], which update steps never do. Call it after the step's backward and
        before step()."""
        for unit in self.units:
            for lin, xh, dyh in (self._tiles(unit, [layer]) if any(layer is m for m in unit.layers) else ()):
                if lin is layer:
                    with torch.no_grad():
                        R = -(-lin.out_features // lin.block_size)
                        return torch.cat([_row_gradient(xh, dyh, i, lin.block_size) for i in range(R)])
        raise ValueError("dct_gradient: layer is not one of the layers this DynamicSupport updates")

    # ------------------------------------------------------------------ update
    def _group(self):
        """The process group to agree over, or None (single process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def step(self) -> dict | None:
        """Count a training step (call after optimizer.step()); on an update step move each
        block's support and return {"step", "fraction", "moved" (positions moved in all),
        "skipped" (names of layers left unchanged: no gradient recorded, or a non-finite one)};
        otherwise None."""
        self._step += 1
        t = self._step
        try:
            return self._update(t) if self._due(t) else None
        finally:
            self._arm(self._due(t + 1))  # records of this step dropped; the next step captured if due

    def _update(self, t: int) -> dict:
        import torch.distributed as dist

        group = self._group()
        device = self.units[0].layers[0].coeffs.device
        counts = torch.tensor([len(u.records) for u in self.units], dtype=torch.int64, device=device)
        if group is not None:
            dist.all_reduce(counts, group=group)
        if int(counts.sum()) == 0:
            raise RuntimeError(f"DynamicSupport.step(): step {t} is an update step but no output gradient of any "
                               f"RBE layer was recorded: call step() once per training step, after the step's "
                               f"backward and optimizer.step()")
        moved, skipped = 0, []
        with torch.no_grad():
            for unit, count in zip(self.units, counts.tolist()):
                wanted = [lin for lin in unit.layers if self.moved_per_block(lin, t) > 0]
                if count == 0:
                    skipped += [unit.layer_names[unit.layers.index(lin)] for lin in wanted]
                    continue
                for lin, xh, dyh in self._tiles(unit, wanted):
                    name = unit.layer_names[unit.layers.index(lin)]
                    n = self.moved_per_block(lin, t)
                    grown = self._choose(lin, xh, dyh, n, group)
                    del xh, dyh  # before the generator builds the next layer's tiles
                    if grown is None:
                        skipped.append(name)
                        warnings.warn(f"DynamicSupport: step {t}: the gradient of {name} is not finite; its support "
                                      f"is left unchanged at this update", RuntimeWarning, stacklevel=3)
                        continue
                    if group is not None:
                        src = dist.get_global_rank(group, 0) if self.process_group is not None else 0
                        dist.broadcast(grown, src=src, group=group)
                    self._swap(lin, n, grown)
                    moved += n * grown.shape[0]
        return {"step": t, "fraction": self.fraction_at(t), "moved": moved, "skipped": skipped}

    @staticmethod
    def _choose(lin: RBELinear, xh, dyh, n: int, group):
        """[R*C, n] positions to regrow (int64): per block the n not-kept positions of largest |G|
        (ties: the lower position), G all-reduced over the group one block-row at a time; None when
        G is not finite somewhere."""
        import torch.distributed as dist

        b = lin.block_size
        R, C = -(-lin.out_features // b), -(-lin.in_features // b)
        index = lin.index.long()
        grown = torch.empty(R * C, n, dtype=torch.int64, device=index.device)
        finite = True
        for i in range(R):
            g = _row_gradient(xh, dyh, i, b)
            if group is not None:
                dist.all_reduce(g, group=group)
            finite = finite and bool(torch.isfinite(g).all())
            score = g.abs_().scatter_(1, index[i * C:(i + 1) * C], -1.0)  # kept positions are never chosen
            grown[i * C:(i + 1) * C] = _largest(score, n) if finite else 0
        return grown if finite else None

    def _swap(self, lin: RBELinear, n: int, grown: torch.Tensor) -> None:
        """Drop the n smallest |coeffs| of each block, add the positions ``grown`` with value 0, and
        keep index sorted: coeffs, its gradient and its optimizer state are permuted alike (0 for
        the regrown entries)."""
        coeffs = lin.coeffs
        index = lin.index.long()
        slots = torch.sort(coeffs.detach().abs(), dim=1, stable=True).indices  # ties: lower slot = lower position
        survivors = torch.sort(slots[:, n:], dim=1).values
        pos = torch.cat([index.gather(1, survivors), grown], dim=1)
        src = torch.cat([survivors, survivors.new_full(grown.shape, -1)], dim=1)
        order = torch.argsort(pos, dim=1)
        new_index, src = pos.gather(1, order), src.gather(1, order)
        lin.index = new_index.to(lin.index.dtype)  # validated (sorted, unique, in range) before anything moves
        fresh, src = src < 0, src.clamp(min=0)

        def move(t: torch.Tensor) -> None:
            t.copy_(t.gather(1, src).masked_fill_(fresh, 0))

        move(coeffs.detach())  # in place, through the version counter (a pack, autograd's saved-tensor check see it)
        if coeffs.grad is not None:
            move(coeffs.grad)
        state = self.optimizer.state.get(coeffs, {})
        for key in next(keys for cls, keys in _STATE_KEYS.items() if isinstance(self.optimizer, cls)):
            if isinstance(state.get(key), torch.Tensor):  # absent before the first step; None without momentum
                move(state[key])
