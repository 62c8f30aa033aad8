"""FSDP2 (torch.distributed.fsdp.fully_shard) training of RBE models: gloo backend, CPU,
2 processes on this machine, loopback only (the process handling of distributed_helpers.py, shared with test_ddp.py).

fully_shard is applied to each RBEFeedForward and each RBELinear used on its own, then to the
root. Each rank trains on its half of every global batch; with a mean loss per rank FSDP's
averaged gradients equal one process training on the whole batch, so the gathered full state
dict must equal that single-process reference, and load into a plain (unsharded) model.
"""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import rbe_ffn
from distributed_helpers import WORLD, global_batches, init_process_group, run_world, train


def build_model() -> nn.Module:
    torch.manual_seed(4321)
    return nn.Sequential(
        nn.Linear(16, 32),
        rbe_ffn.RBEFeedForward(32, 96, activation="gelu", block_size=16, k=40),
        rbe_ffn.RBEFeedForward(32, 48, activation="relu", block_size=8, k=20, checkpoint=True),
        rbe_ffn.RBELinear(32, 32, block_size=16, k=30),
    )


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, rbe_ffn.RBEFeedForward) or (isinstance(m, rbe_ffn.RBELinear) and m is model[3]):
            fully_shard(m)
    fully_shard(model)
    return model


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_process_group(rank, port)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = shard(build_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, global_batches(), rank)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # fc1/fc2 sharded on their own: RBEFeedForward never calls them, FSDP never gathers them
    from torch.distributed.fsdp import fully_shard
    wrong = build_model()
    fully_shard(wrong[1].fc1)
    try:
        wrong(torch.randn(2, 16))
        wrong_result = "ran"
    except RuntimeError as e:
        wrong_result = str(e)
    torch.save({"full": full, "warnings": [str(w.message) for w in caught], "wrong": wrong_result},
               os.path.join(out_dir, f"fsdp.{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_world(_worker, out)
    return [torch.load(out / f"fsdp.{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train(model, global_batches(), rank=None)
        return before, model
    finally:
        torch.set_num_threads(n)


def test_fsdp2_matches_single_process_and_reloads(world, reference):
    before, ref = reference
    full = world[0]["full"]  # full_state_dict with cpu_offload: on rank 0
    assert world[1]["full"] == {}
    want = ref.state_dict()
    assert list(full) == list(want)
    assert {k: v.dtype for k, v in full.items() if k.endswith("index")} == dict.fromkeys(
        ["1.fc1.index", "1.fc2.index", "2.fc1.index", "2.fc2.index", "3.index"], torch.int16)
    for k, v in want.items():
        assert not isinstance(full[k], torch.distributed.tensor.DTensor), k
        if k.endswith("index"):
            assert torch.equal(full[k], v) and torch.equal(v, before[k]), k  # identical, never trained
        else:
            assert not torch.equal(v, before[k]), (k, "reference did not train")
            diff = (full[k] - v).abs().max().item()
            assert diff <= 1e-5, f"{k}: FSDP2 result differs from the single-process reference by {diff:.3g}"
    plain = build_model()
    plain.load_state_dict(full)
    x = torch.randn(5, 16)
    torch.testing.assert_close(plain(x), ref(x), rtol=1e-5, atol=1e-5)


def test_fsdp2_sharding_fc1_alone_is_a_clear_error(world):
    for w in world:
        assert "apply fully_shard to the RBEFeedForward, not to its fc1/fc2" in w["wrong"], w["wrong"]


def test_fsdp2_no_view_warning(world):
    for w in world:
        assert not [m for m in w["warnings"] if "view" in m], w["warnings"]
