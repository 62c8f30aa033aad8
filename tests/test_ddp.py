"""Multi-process training: RBE models under torch.nn.parallel.DistributedDataParallel
(gloo backend, CPU, 2 processes on this machine, loopback only).

Each rank trains on its half of every global batch; DDP averages the gradients, so with a
mean-reduced loss per rank and equal halves the result must equal one process training on the
whole batch with the loss averaged over it. Every parameter of both ranks is compared with that
single-process reference, and the fixed ``index`` must be identical on both ranks and unchanged.

The main case is plain ``DDP(model)``: the index (int16, which gloo and NCCL cannot broadcast) is
kept as a uint8 buffer ``index_bytes``, which DDP broadcasts from rank 0 like any buffer, at
construction (so a rank that built another index gets rank 0's) and before every forward.
"""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import rbe_ffn

from distributed_helpers import WORLD, global_batches, init_process_group, run_world, train

# name -> (checkpoint, how the model is wrapped)
CASES = {
    "default": (False, "default"),                          # DDP(model), nothing else
    "default_checkpoint": (True, "default"),
    "no_forward_sync": (False, "forward_sync_buffers_false"),  # buffers broadcast at construction only
    "ignore_index_deprecated": (True, "ignore_index"),       # the old workaround still works (and warns)
}


def build_model(checkpoint: bool) -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Linear(16, 32),
        rbe_ffn.RBEFeedForward(32, 96, activation="gelu", block_size=16, k=40, checkpoint=checkpoint),
    )


def index_names(model: nn.Module):
    return [f"{n}.index" for n, m in model.named_modules() if isinstance(m, rbe_ffn.RBELinear)]


def indexes(model: nn.Module):
    return {f"{n}.index": m.index.clone() for n, m in model.named_modules() if isinstance(m, rbe_ffn.RBELinear)}


def wrap_ddp(model: nn.Module, how: str) -> nn.Module:
    DDP = nn.parallel.DistributedDataParallel
    if how == "ignore_index":
        with pytest.warns(DeprecationWarning, match="ddp_ignore_index is no longer needed"):
            ignored = rbe_ffn.ddp_ignore_index(model)
        assert {n + "_bytes" for n in index_names(model)} <= set(ignored)
        return DDP(model)
    if how == "forward_sync_buffers_false":
        return DDP(model, forward_sync_buffers=False)
    assert how == "default"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain DDP(model) warns about nothing either
        return DDP(model)


def snapshot(model: nn.Module):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
            "index": indexes(model)}


# ------------------------------------------------------------------ workers (spawned)
def _worker(rank: int, port: int, out_dir: str) -> None:
    init_process_group(rank, port)
    batches = global_batches()
    for name, (checkpoint, how) in CASES.items():
        model = build_model(checkpoint)
        before = snapshot(model)
        ddp = wrap_ddp(model, how)
        train(ddp, batches, rank)
        dist.barrier()
        torch.save({"before": before, "after": snapshot(model)}, os.path.join(out_dir, f"{name}.{rank}.pt"))
    # a rank that built another index gets rank 0's when DDP(model) is built, as for parameters
    model = build_model(True)
    if rank == 1:
        other = build_model(True)
        torch.manual_seed(rank)
        other[1].fc1.reset_parameters()
        model[1].fc1.index = other[1].fc1.index
    before = indexes(model)
    nn.parallel.DistributedDataParallel(model)
    torch.save({"before": before, "after": indexes(model)}, os.path.join(out_dir, f"index_sync.{rank}.pt"))
    dist.destroy_process_group()


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    """One 2-process run serves every test here (starting the processes dominates the time)."""
    out = tmp_path_factory.mktemp("ddp")
    run_world(_worker, out)
    return out


def test_ddp_matches_single_process(world_dir, one_thread):
    # one_thread (conftest.py): the reference runs single-threaded like the workers (fast on a busy machine)
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

        idx = index_names(ref_model)
        assert len(idx) == 2
        for r, got in enumerate(ranks):
            assert set(got["after"]["buffers"]) == set(ref["buffers"])
            for n in idx:
                b = got["after"]["index"][n]
                assert b.dtype == torch.int16
                assert torch.equal(b, got["before"]["index"][n]), (name, r, n, "index changed in training")
                assert torch.equal(b, ref_before["index"][n]), (name, r, n)
            for n, b in got["after"]["buffers"].items():  # index_bytes and plan buffers
                assert torch.equal(b, ranks[0]["after"]["buffers"][n]), (name, r, n)


def test_ddp_gives_every_rank_rank0s_index(world_dir):
    r0, r1 = (torch.load(world_dir / f"index_sync.{r}.pt") for r in range(WORLD))
    assert not torch.equal(r1["before"]["1.fc1.index"], r0["before"]["1.fc1.index"])  # rank 1 built another
    for n in r0["before"]:
        assert torch.equal(r0["after"][n], r0["before"][n]), n
        assert torch.equal(r1["after"][n], r0["before"][n]), n
        assert r1["after"][n].dtype == torch.int16
