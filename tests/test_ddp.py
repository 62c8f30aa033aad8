"""Multi-process training: RBE models under torch.nn.parallel.DistributedDataParallel
(gloo backend, CPU, 2 processes on this machine, loopback only).

Each rank trains on its half of every global batch; DDP averages the gradients, so with a
mean-reduced loss per rank and equal halves the result must equal one process training on the
whole batch with the loss averaged over it. Every parameter of both ranks is compared with that
single-process reference, and the fixed ``index`` buffers must be identical and unchanged.

Known limitation (see test_ddp_default_buffer_sync): gloo cannot broadcast int16 tensors
("Invalid scalar type") and ``index`` is int16 for block_size <= 128, so DDP's default
init-time buffer broadcast fails. ``index`` never changes during training, so the models here
tell DDP to leave it alone (or turn buffer broadcasting off); every rank must then build the
same ``index`` itself (same seed, or load the same state_dict), which the test checks.
"""
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rbe_ffn

WORLD = 2
STEPS = 4
LR = 0.1
GLOBAL_BATCH = 12  # even: equal halves, so DDP's gradient average equals the full-batch mean
JOIN_TIMEOUT_S = 120  # the whole file normally takes ~10-25 s
PG_TIMEOUT = timedelta(seconds=60)

# name -> (checkpoint, how DDP is told about the int16 index buffers)
CASES = {
    "checkpoint": (True, "ignore_index"),
    "standard": (False, "ignore_index"),
    "standard_no_buffer_broadcast": (False, "broadcast_buffers_false"),
}


def build_model(checkpoint: bool) -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Linear(16, 32),
        rbe_ffn.RBEFeedForward(32, 96, activation="gelu", block_size=16, k=40, checkpoint=checkpoint),
    )


def global_batches():
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 32, generator=g))
            for _ in range(STEPS)]


def index_buffer_names(model: nn.Module):
    return [n for n, _ in model.named_buffers() if n.split(".")[-1] == "index"]


def wrap_ddp(model: nn.Module, how: str) -> nn.Module:
    DDP = nn.parallel.DistributedDataParallel
    if how == "ignore_index":
        ignored = rbe_ffn.ddp_ignore_index(model)
        assert set(index_buffer_names(model)) <= set(ignored)
        return DDP(model)
    if how == "broadcast_buffers_false":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in torch 2.13, still honoured
            return DDP(model, broadcast_buffers=False)
    assert how == "default"
    return DDP(model)


def train(model: nn.Module, batches, rank: int | None):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches:
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)  # mean over this rank's (or the global) batch
        loss.backward()
        opt.step()


def snapshot(model: nn.Module):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}}


# ------------------------------------------------------------------ workers (spawned)
def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        _init(rank, port)
        batches = global_batches()
        for name, (checkpoint, how) in CASES.items():
            model = build_model(checkpoint)
            before = snapshot(model)
            ddp = wrap_ddp(model, how)
            train(ddp, batches, rank)
            dist.barrier()
            torch.save({"before": before, "after": snapshot(model)}, os.path.join(out_dir, f"{name}.{rank}.pt"))
        # last, as it may fail: DDP with its default (init-time) buffer broadcast
        try:
            wrap_ddp(build_model(True), "default")
            result = "ok"
        except RuntimeError as e:
            result = f"RuntimeError: {e}"
        with open(os.path.join(out_dir, f"default.{rank}.txt"), "w") as f:
            f.write(result)
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error.{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(target, out_dir) -> None:
    """Start WORLD spawned processes; always join them, killing any left after the timeout."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(rank, port, str(out_dir)), daemon=True) for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        for p in procs:
            p.join(timeout=10)
    errors = {f.name: f.read_text() for f in sorted(out_dir.glob("error.*.txt"))}
    assert not hung, f"{len(hung)} worker(s) still running after {JOIN_TIMEOUT_S} s were killed; {errors}"
    codes = [p.exitcode for p in procs]
    if codes != [0] * WORLD or errors:
        pytest.fail(f"worker exit codes {codes}\n" + "\n".join(f"{k}:\n{v}" for k, v in errors.items()))


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    """One 2-process run serves every test here (starting the processes dominates the time)."""
    out = tmp_path_factory.mktemp("ddp")
    run_world(_worker, out)
    return out


@pytest.fixture
def one_thread():
    """The reference runs single-threaded, like the workers (and fast on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ddp_matches_single_process(world_dir, one_thread):
    tmp_path = world_dir
    batches = global_batches()
    for name, (checkpoint, _) in CASES.items():
        ref_model = build_model(checkpoint)
        ref_before = snapshot(ref_model)
        train(ref_model, batches, rank=None)
        ref = snapshot(ref_model)
        ranks = [torch.load(tmp_path / f"{name}.{r}.pt") for r in range(WORLD)]

        names = set(ref["params"])
        assert {f"1.fc{i}.{p}" for i in (1, 2) for p in ("basis", "coeffs", "bias")} <= names
        for r, got in enumerate(ranks):
            assert set(got["after"]["params"]) == names
            for n in names:
                # same seed, same initial state on every rank and in the reference
                assert torch.equal(got["before"]["params"][n], ref_before["params"][n]), (name, r, n)
                a, b = got["after"]["params"][n], ref["params"][n]
                assert not torch.equal(b, ref_before["params"][n]), (name, n, "reference did not train")
                diff = (a - b).abs().max().item()
                assert diff <= 1e-5, f"{name}: rank {r} {n} differs from the single-process reference by {diff:.3g}"
        for n in names:  # DDP keeps the replicas bitwise identical
            assert torch.equal(ranks[0]["after"]["params"][n], ranks[1]["after"]["params"][n]), (name, n)

        idx = index_buffer_names(ref_model)
        assert len(idx) == 2
        for r, got in enumerate(ranks):
            assert set(got["after"]["buffers"]) == set(ref["buffers"])
            for n in idx:
                b = got["after"]["buffers"][n]
                assert b.dtype == ref_before["buffers"][n].dtype
                assert torch.equal(b, got["before"]["buffers"][n]), (name, r, n, "index changed in training")
                assert torch.equal(b, ref_before["buffers"][n]), (name, r, n)
            for n, b in got["after"]["buffers"].items():  # plan buffers too
                assert torch.equal(b, ranks[0]["after"]["buffers"][n]), (name, r, n)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="gloo cannot broadcast the int16 `index` buffer (block_size <= 128): DDP's default "
                          "init-time buffer sync raises 'Invalid scalar type'")
def test_ddp_default_buffer_sync(world_dir):
    results = [(world_dir / f"default.{r}.txt").read_text() for r in range(WORLD)]
    assert results == ["ok"] * WORLD, results
