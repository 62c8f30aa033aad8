"""The 2-process gloo harness shared by test_ddp.py and test_fsdp.py (CPU, loopback only).

A plain helper module, not a test module and not conftest.py: the spawned worker processes
import the test module that defines their target, which imports this file.
"""
import faulthandler
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 4
LR = 0.1
GLOBAL_BATCH = 12  # even: equal halves, so DDP's gradient average equals the full-batch mean
JOIN_TIMEOUT_S = 120  # test_ddp.py normally takes ~10-25 s
PG_TIMEOUT = timedelta(seconds=60)


def global_batches():
    """STEPS (input [GLOBAL_BATCH, 16], target [GLOBAL_BATCH, 32]) pairs, the same in every process."""
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 32, generator=g))
            for _ in range(STEPS)]


def train(model: nn.Module, batches, rank: int | None):
    """SGD on every batch: rank r takes its half of each; rank None (the reference) the whole batch."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches:
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)  # mean over this rank's (or the global) batch
        loss.backward()
        opt.step()


def init_process_group(rank: int, port: int) -> None:
    """In a worker: one thread, and the gloo process group of WORLD ranks on 127.0.0.1:port."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recording(target, rank: int, port: int, out_dir: str) -> None:
    """Run one worker; if it fails, leave its traceback in out_dir/error.<rank>.txt for the parent.

    The worker then leaves with os._exit, without the interpreter's finalization. There, gloo's
    worker threads can still be dropping the last reference to a finished collective's tensors
    (while DDP holds the process group, destroy_process_group does not stop them); a tensor with a
    Python object needs the GIL to die, a thread asking for it during finalization is ended, and
    that end aborts the process ("terminate called without an active exception", SIGABRT in
    ProcessGroupGloo::runLoop). Measured: 3 of 40 two-rank runs that keep the group alive at exit
    aborted so, 0 of 40 that left with os._exit; once a CI run of this suite. Everything a worker
    reports is in files it has closed before this point. A fatal signal before it leaves its
    Python stacks in out_dir/fault.<rank>.txt."""
    fault = open(os.path.join(out_dir, f"fault.{rank}.txt"), "w")
    faulthandler.enable(file=fault, all_threads=True)
    code = 0
    try:
        target(rank, port, out_dir)
    except BaseException:
        with open(os.path.join(out_dir, f"error.{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_world(target, out_dir) -> None:
    """Start WORLD spawned processes target(rank, port, out_dir); always join them, killing any
    left after the timeout. A worker that fails writes its traceback to out_dir/error.<rank>.txt."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_recording, args=(target, rank, port, str(out_dir)), daemon=True)
             for rank in range(WORLD)]
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
    errors |= {f.name: f.read_text() for f in sorted(out_dir.glob("fault.*.txt")) if f.stat().st_size}
    assert not hung, f"{len(hung)} worker(s) still running after {JOIN_TIMEOUT_S} s were killed; {errors}"
    codes = [p.exitcode for p in procs]
    if codes != [0] * WORLD or errors:
        pytest.fail(f"worker exit codes {codes}\n" + "\n".join(f"{k}:\n{v}" for k, v in errors.items()))
