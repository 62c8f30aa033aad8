"""Dynamic support (rbe_ffn.DynamicSupport): the DCT-domain gradient it scores positions with,
the prune-and-regrow rule, the optimizer state it moves, its schedule, training with it, and
two gloo processes choosing the same positions as one process on the whole batch."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import rbe_ffn
from rbe_ffn.calibrate import _blocks, dct_matrix
from rbe_ffn.modules import index_problem

from conftest import Block, make_ffn, make_linear, seeded
from distributed_helpers import WORLD, init_process_group, run_world

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def rbe_layers(model):
    return [m for m in model.modules() if isinstance(m, rbe_ffn.RBELinear)]


def scatter(lin, values):
    """values [R*C, k] at lin's positions -> [R*C, b*b] (0 elsewhere)."""
    b = lin.block_size
    return values.new_zeros(values.shape[0], b * b).scatter_(1, lin.index.long(), values)


def kept_mask(lin):
    b = lin.block_size
    return torch.zeros(lin.coeffs.shape[0], b * b, dtype=torch.bool).scatter_(1, lin.index.long(), True)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class Wrapped(nn.Module):
    """An FFN run under torch.utils.checkpoint (its forward is recomputed in backward)."""

    def __init__(self, ffn, reentrant):
        super().__init__()
        self.ffn, self.reentrant = ffn, reentrant

    def forward(self, x):
        return torch_checkpoint(self.ffn, x, use_reentrant=self.reentrant)



# ------------------------------------------------------------------ the gradient G
CASES = ["ffn", "ffn_checkpoint", "linear", "torch_checkpoint", "torch_checkpoint_reentrant", "two_microbatches",
         "ffn_strided", "linear_strided"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES + ["ffn_scaled", "linear_scaled"])
def test_gradient_at_kept_positions_is_coeffs_grad(case, dtype):
    """G (from the transform-domain tiles) at the kept positions equals the kernels' coeffs.grad;
    a capture made twice (recomputed forwards) or missed (a micro-batch) would double or miss it.
    G is the format numbers' gradient: a "scaled" layer's coeffs.grad is it times the scale."""
    par = "scaled" if case.endswith("scaled") else "plain"
    if case.startswith("linear"):
        model = make_linear(19, 27, block_size=8, k=9, dtype=dtype, parametrization=par)  # edge blocks both ways
        inp = 19
    else:
        ffn = make_ffn(11, 37, "gelu", 8, 7, dtype, random_bias=True, checkpoint=case == "ffn_checkpoint",
                       parametrization=par)
        model = Wrapped(ffn, case.endswith("reentrant")) if case.startswith("torch_checkpoint") else ffn
        inp = 11
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ds = rbe_ffn.DynamicSupport(model, opt, every=1, fraction=0.5, schedule="constant")
    assert ds.armed
    g = seeded(3)
    batches = 2 if case == "two_microbatches" else 1
    for _ in range(batches):
        x = torch.randn(2, 5, inp, generator=g, dtype=dtype).requires_grad_(case == "torch_checkpoint_reentrant")
        if case.endswith("strided"):  # a non-contiguous input, and an expanded (stride 0) output gradient
            x = torch.randn(inp, 2, 5, generator=g, dtype=dtype).permute(1, 2, 0)
            model(x).sum().backward()
            continue
        y = model(x)
        (y * torch.randn(y.shape, generator=g, dtype=dtype)).sum().backward()
    opt.step()  # G is the step's gradient: an FFN's inner activations are recomputed with the forward's weights
    for lin in rbe_layers(model):
        G = ds.dct_gradient(lin)
        assert G.shape == (lin.coeffs.shape[0], lin.block_size ** 2)
        assert rel(G.gather(1, lin.index.long()) * lin._coeff_scale, lin.coeffs.grad) < TOL[dtype], case
        assert G[~kept_mask(lin)].abs().max() > 0  # the non-kept positions are scored too


def test_gradient_matches_dense_reference():
    """G at every position = Psi (dL/dW_block) Psi^T, with dL/dW from autograd on the decoded
    dense weights (edge blocks: d_model 10, d_ff 37 at b = 8)."""
    dtype, b = torch.float64, 8
    ffn = make_ffn(10, 37, "gelu", b, 6, dtype, random_bias=True)
    ds = rbe_ffn.DynamicSupport(ffn, torch.optim.Adam(ffn.parameters()), every=1, fraction=0.3, until=10)
    g = seeded(5)
    x = torch.randn(3, 4, 10, generator=g, dtype=dtype)
    w = torch.randn(3, 4, 10, generator=g, dtype=dtype)
    (ffn(x) * w).sum().backward()

    w1 = ffn.fc1.dense_weight().requires_grad_()
    w2 = ffn.fc2.dense_weight().requires_grad_()
    y = F.gelu(x @ w1.T + ffn.fc1.bias.detach()) @ w2.T + ffn.fc2.bias.detach()
    (y * w).sum().backward()
    psi = dct_matrix(b)
    for lin, dw in ((ffn.fc1, w1.grad), (ffn.fc2, w2.grad)):
        R, C = -(-lin.out_features // b), -(-lin.in_features // b)
        pad = F.pad(dw, (0, C * b - lin.in_features, 0, R * b - lin.out_features))
        ref = (psi @ _blocks(pad, b) @ psi.T).reshape(R * C, b * b)
        assert rel(ds.dct_gradient(lin), ref) < 1e-12


def test_largest_breaks_ties_towards_the_lower_position():
    """The regrow choice: the n largest scores, ties to the lower position (the choice of a stable
    descending sort), on scores with many ties."""
    from rbe_ffn.dynamic import _largest

    assert _largest(torch.tensor([[1.0, 3, 3, 2, 3]]), 2).tolist() == [[1, 2]]
    assert _largest(torch.tensor([[1.0, 3, 3, 2, 3]]), 4).tolist() == [[1, 2, 3, 4]]
    score = torch.randint(0, 5, (50, 64), generator=seeded(2)).double()
    for n in (1, 7, 33, 64):
        want = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :n].sort(1).values
        assert torch.equal(_largest(score, n), want), n


# ------------------------------------------------------------------ one update
def train_step(model, opt, x, target):
    opt.zero_grad()
    loss = F.mse_loss(model(x), target)
    loss.backward()
    opt.step()
    return loss.item()


def make_task(seed=0, d=12, tokens=24, dtype=torch.float64):
    g = seeded(seed)
    return torch.randn(tokens, d, generator=g, dtype=dtype), torch.randn(tokens, d, generator=g, dtype=dtype)


OPTIMIZERS = {
    "adam_amsgrad": (lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2), ("exp_avg", "exp_avg_sq")),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), ("momentum_buffer",)),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_update_rule_and_optimizer_state(opt_name):
    """At an update: index valid and sorted; the n dropped are the smallest |coeffs| of their block;
    the n regrown are the not-kept positions of largest |G|; survivors keep value, gradient and
    state; regrown entries start at 0 in all three; the output equals the old model's with the
    dropped coefficients zeroed."""
    make_opt, keys = OPTIMIZERS[opt_name]
    model = nn.Sequential(make_ffn(12, 40, "gelu", 8, 10, torch.float64, random_bias=True),
                          make_linear(12, 12, block_size=8, k=9, dtype=torch.float64))
    opt = make_opt(model.parameters())
    ds = rbe_ffn.DynamicSupport(model, opt, every=3, fraction=0.4, until=30)
    x, target = make_task()
    for step in (1, 2):
        train_step(model, opt, x, target)
        assert not ds.armed or step == 2
        assert ds.step() is None
    assert ds.armed
    train_step(model, opt, x, target)
    lins = rbe_layers(model)
    assert len(lins) == 3
    before = [dict(index=lin.index.clone(), coeffs=lin.coeffs.detach().clone(), grad=lin.coeffs.grad.clone(),
                   G=ds.dct_gradient(lin), state={k: opt.state[lin.coeffs][k].clone() for k in keys},
                   step=copy.deepcopy(opt.state[lin.coeffs].get("step")))
              for lin in lins]
    old_model = copy.deepcopy(model)
    info = ds.step()
    assert info["step"] == 3 and info["skipped"] == []
    assert info["fraction"] == pytest.approx(0.4 * (1 + math.cos(math.pi * 3 / 30)) / 2)

    total = 0
    for lin, old in zip(lins, before):
        n = ds.moved_per_block(lin, 3)
        assert n == math.floor(info["fraction"] * lin.k + 0.5) > 0
        total += n * lin.coeffs.shape[0]
        assert lin.index.shape == old["index"].shape and lin.index.dtype == old["index"].dtype
        assert index_problem(lin.index, lin.block_size) is None  # sorted, unique, in range
        was = torch.zeros_like(kept_mask(lin)).scatter_(1, old["index"].long(), True)
        now = kept_mask(lin)
        dropped, grown, stayed = was & ~now, now & ~was, was & now
        assert (dropped.sum(1) == n).all() and (grown.sum(1) == n).all()
        old_c = old["coeffs"].new_zeros(was.shape).scatter_(1, old["index"].long(), old["coeffs"]).abs()
        # dropped: the smallest |value| of the block
        assert (torch.where(dropped, old_c, -1.0).amax(1) <= torch.where(stayed, old_c, math.inf).amin(1)).all()
        # regrown: the largest |G| among the positions that were not kept
        G = old["G"].abs()
        assert (torch.where(grown, G, math.inf).amin(1) >= torch.where(~was & ~grown, G, -1.0).amax(1)).all()
        # values, gradient and optimizer state moved with their positions; 0 where regrown
        for new, prev in [(lin.coeffs.detach(), old["coeffs"]), (lin.coeffs.grad, old["grad"])] + \
                [(opt.state[lin.coeffs][k], old["state"][k]) for k in keys]:
            dense_new, dense_old = scatter(lin, new), prev.new_zeros(was.shape).scatter_(1, old["index"].long(), prev)
            assert torch.equal(dense_new[stayed], dense_old[stayed])
            assert (dense_new[grown] == 0).all()
            assert not (dense_old[stayed] == 0).all()  # the check above is not vacuous
        if old["step"] is not None:  # Adam's step count is not per coefficient: untouched
            assert torch.equal(opt.state[lin.coeffs]["step"], old["step"])
    assert info["moved"] == total

    # the function changed only by the drop
    with torch.no_grad():
        for old_lin, lin in zip(rbe_layers(old_model), lins):
            old_lin.coeffs[~kept_mask(lin).gather(1, old_lin.index.long())] = 0
    xt = torch.randn(2, 3, 12, generator=seeded(8), dtype=torch.float64)
    assert rel(model(xt), old_model(xt)) < 1e-13
    assert ds.step() is None and not ds.armed  # step 4: nothing, step 5 not an update either


def test_checkpointed_ffn_and_replace_mlp_model_update():
    """A replace_mlp output (residual blocks around converted MLPs, checkpointed) updates like a
    bare block: same positions as the non-checkpointed copy."""
    torch.manual_seed(0)
    d, f = 12, 40
    dense = nn.Sequential(*[Block(nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))) for _ in range(2)])
    dense = dense.double()
    rbe_ffn.replace_mlp(dense, block_size=8, k=12)
    runs = []
    for ckpt in (False, True):
        model = copy.deepcopy(dense)
        ffns = [m for m in model.modules() if isinstance(m, rbe_ffn.RBEFeedForward)]
        assert len(ffns) == 2
        for m in ffns:
            m.checkpoint = ckpt
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ds = rbe_ffn.DynamicSupport(model, opt, every=1, fraction=0.25, schedule="constant")
        assert [u.name for u in ds.units] == ["0.mlp", "1.mlp"]
        train_step(model, opt, *make_task(d=d))
        ds.step()
        runs.append([lin.index.clone() for lin in rbe_layers(model)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], rbe_layers(dense)[0].index)


# ------------------------------------------------------------------ schedule
def test_schedule_and_until():
    ffn = make_ffn(12, 40, "gelu", 8, 10, torch.float64)
    opt = torch.optim.Adam(ffn.parameters(), lr=1e-2)
    ds = rbe_ffn.DynamicSupport(ffn, opt, every=2, fraction=0.5, until=9)
    fr = [ds.fraction_at(t) for t in range(12)]
    assert fr[0] == 0.5 and all(a > b for a, b in zip(fr[:9], fr[1:9])) and fr[9:] == [0.0] * 3
    assert fr[4] == pytest.approx(0.25 * (1 + math.cos(4 * math.pi / 9)))
    x, target = make_task()
    updates, moved = [], []
    for t in range(1, 13):
        assert ds.armed == (t in (2, 4, 6))
        idx = ffn.fc1.index.clone()
        train_step(ffn, opt, x, target)
        info = ds.step()
        if info is not None:
            updates.append(info["step"])
            moved.append(ds.moved_per_block(ffn.fc1, t))
        assert torch.equal(idx, ffn.fc1.index) == (info is None)
    # multiples of every, before until, where something moves: at step 8 f_t k = 0.15 rounds to 0
    assert updates == [2, 4, 6] and ds.moved_per_block(ffn.fc1, 8) == 0
    assert moved == [4, 3, 1]  # round(f_t k), k = 10
    assert ds.steps == 12 and ds.state_dict() == {"step": 12}

    const = rbe_ffn.DynamicSupport(ffn, opt, every=3, fraction=0.2, schedule="constant")
    assert {const.fraction_at(t) for t in (1, 10**6)} == {0.2}
    const.load_state_dict({"step": 2})
    assert const.armed and const.steps == 2
    const.remove()
    assert not const.armed
    assert const.step() is None  # step 3 would have been an update


# ------------------------------------------------------------------ training
def test_training_with_dynamic_support_lowers_the_loss():
    """A small regression (teacher: a random dense FFN): the loss falls while the support moves."""
    torch.manual_seed(0)
    d, f = 16, 48
    teacher = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)).double()
    g = seeded(1)
    x = torch.randn(256, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)
    model = make_ffn(d, f, "gelu", 8, 16, torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    ds = rbe_ffn.DynamicSupport(model, opt, every=10, fraction=0.3, until=150)
    idx0 = model.fc1.index.clone()
    losses, updates = [], 0
    for _ in range(200):
        losses.append(train_step(model, opt, x, y))
        if ds.step() is not None:
            updates += 1
            with torch.no_grad():  # the drop costs little: it removes the smallest coefficients
                assert F.mse_loss(model(x), y).item() < 1.25 * losses[-1]
    # steps 10..140 whose round(0.3 (1 + cos(pi t / 150)) / 2 * 16) > 0
    assert updates == sum(0.15 * (1 + math.cos(math.pi * t / 150)) * 16 >= 0.5 for t in range(10, 150, 10)) == 11
    assert (model.fc1.index != idx0).any(1).float().mean() > 0.9  # most blocks moved
    assert losses[-1] < 0.1 * losses[9], (losses[9], losses[-1])  # steady progress after the first update
    assert all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------------ bad input
def test_bad_arguments_raise():
    ffn = make_ffn(12, 40, "gelu", 8, 10, torch.float64)
    opt = torch.optim.Adam(ffn.parameters())
    with pytest.raises(TypeError, match="supports the optimizers Adam, AdamW, SGD.*RMSprop"):
        rbe_ffn.DynamicSupport(ffn, torch.optim.RMSprop(ffn.parameters()), until=10)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        rbe_ffn.DynamicSupport(ffn, "adam", until=10)
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be a positive int"):
            rbe_ffn.DynamicSupport(ffn, opt, every=every, until=10)
    for fraction in (0, -0.1, 1.5, math.nan, True, "0.3"):
        with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
            rbe_ffn.DynamicSupport(ffn, opt, fraction=fraction, until=10)
    for until in (0, -5, 2.5):
        with pytest.raises(ValueError, match="until must be None or a positive int"):
            rbe_ffn.DynamicSupport(ffn, opt, until=until)
    with pytest.raises(ValueError, match="schedule must be one of"):
        rbe_ffn.DynamicSupport(ffn, opt, until=10, schedule="linear")
    with pytest.raises(ValueError, match="give until"):
        rbe_ffn.DynamicSupport(ffn, opt)
    with pytest.raises(ValueError, match="contains no RBEFeedForward or RBELinear"):
        rbe_ffn.DynamicSupport(nn.Linear(3, 3), opt, until=10)
    with pytest.raises(TypeError, match=r"model_or_layers\[1\] must be an RBEFeedForward or RBELinear"):
        rbe_ffn.DynamicSupport([ffn, nn.Linear(3, 3)], opt, until=10)
    with pytest.raises(ValueError, match="more than once"):
        rbe_ffn.DynamicSupport([ffn, ffn], opt, until=10)
    with pytest.raises(TypeError, match="iterable"):
        rbe_ffn.DynamicSupport(3, opt, until=10)
    with pytest.raises(ValueError, match="does not hold the coeffs of RBEFeedForward.fc2"):
        rbe_ffn.DynamicSupport(ffn, torch.optim.Adam(ffn.fc1.parameters()), until=10)
    full = make_linear(8, 8, block_size=4, k=16)
    with pytest.raises(ValueError, match="no layer has positions to move"):
        rbe_ffn.DynamicSupport(full, torch.optim.SGD(full.parameters(), lr=0.1), until=10)
    ds = rbe_ffn.DynamicSupport(ffn, opt, every=1, until=10)
    with pytest.raises(ValueError, match="not one of the layers"):
        ds.dct_gradient(full)
    for bad in ({"step": -1}, {"step": 1.5}, {}, 3):
        with pytest.raises(ValueError, match="DynamicSupport state"):
            ds.load_state_dict(bad)
    with torch.no_grad():
        ffn(torch.randn(4, 12, dtype=torch.float64))  # no gradient: nothing recorded
    with pytest.raises(RuntimeError, match="no output gradient of any RBE layer was recorded"):
        ds.step()
    assert ds.armed and ds.steps == 1  # the next step is captured as usual
    ffn(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    assert ds.step()["moved"] > 0


def test_non_finite_gradient_leaves_the_layer_unchanged():
    ffn = make_ffn(12, 40, "gelu", 8, 10, torch.float64)
    opt = torch.optim.SGD(ffn.parameters(), lr=0.0)
    ds = rbe_ffn.DynamicSupport(ffn, opt, every=1, fraction=0.5, schedule="constant")
    idx = [ffn.fc1.index.clone(), ffn.fc2.index.clone()]
    y = ffn(torch.randn(4, 12, dtype=torch.float64))
    (y * torch.tensor(math.inf, dtype=torch.float64)).sum().backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match="not finite"):
        info = ds.step()
    assert sorted(info["skipped"]) == ["RBEFeedForward.fc1", "RBEFeedForward.fc2"] and info["moved"] == 0
    assert torch.equal(idx[0], ffn.fc1.index) and torch.equal(idx[1], ffn.fc2.index)


# ------------------------------------------------------------------ DDP (2 gloo processes)
DDP_STEPS = 4


def ddp_model():
    torch.manual_seed(4321)
    return nn.Sequential(nn.Linear(16, 24), rbe_ffn.RBEFeedForward(24, 72, block_size=8, k=12),
                         rbe_ffn.RBELinear(24, 20, block_size=8, k=10))


def ddp_batches():
    g = seeded(77)
    return [(torch.randn(12, 16, generator=g), torch.randn(12, 20, generator=g)) for _ in range(DDP_STEPS)]


def ddp_train(model, rank):
    """Adam with dynamic support every 2 steps; rank r takes its half of each batch (None: all)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    ds = rbe_ffn.DynamicSupport(inner, opt, every=2, fraction=0.5, until=100)
    for x, y in ddp_batches():
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        train_step(model, opt, x, y)
        ds.step()
    return {"index": {n: m.index.clone() for n, m in inner.named_modules() if isinstance(m, rbe_ffn.RBELinear)},
            "params": {n: p.detach().clone() for n, p in inner.named_parameters()},
            "state": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in inner.named_parameters()}}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    init_process_group(rank, port)
    ddp = nn.parallel.DistributedDataParallel(ddp_model())
    torch.save(ddp_train(ddp, rank), f"{out_dir}/dyn.{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_choose_the_same_positions(tmp_path, one_thread):
    run_world(_ddp_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"dyn.{r}.pt") for r in range(WORLD))
    ref = ddp_train(ddp_model(), None)
    start = ddp_model()
    assert len(r0["index"]) == 3
    for n, idx in r0["index"].items():
        assert torch.equal(r1["index"][n], idx), n  # identical on the ranks
        assert not torch.equal(idx, start.get_submodule(n).index), n  # the support moved
        # the same choice as one process on the whole batch: the scores were all-reduced
        assert torch.equal(idx, ref["index"][n]), n
    for n, p in r0["params"].items():
        assert torch.equal(r1["params"][n], p), n
        # to rounding: the two ranks' all-reduced half sums and one process's whole-batch sum
        # differ in the last bits, and Adam divides by the root of the second moment, which is
        # tiny on entries whose gradient nearly cancels (max 2.7e-4 here at lr 1e-2 after 4
        # steps with the scaled parametrization; the positions above are equal exactly)
        assert (p - ref["params"][n]).abs().max() < 1e-3, n
        for k, v in r0["state"][n].items():
            assert torch.equal(r1["state"][n][k], v), (n, k)
