"""The 2-process harness itself: a worker that fails or dies is reported, with its cause."""
import os

import pytest

from distributed_helpers import run_world


def _raising(rank: int, port: int, out_dir: str) -> None:
    if rank == 1:
        raise ValueError("rank 1 was told to fail")


def _aborting(rank: int, port: int, out_dir: str) -> None:
    if rank == 0:
        os.abort()


def _touching(rank: int, port: int, out_dir: str) -> None:
    open(os.path.join(out_dir, f"done.{rank}"), "w").close()


def test_a_failing_worker_is_reported_with_its_traceback(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)\[0, 1\].*ValueError: rank 1 was told to fail"):
        run_world(_raising, tmp_path)


def test_an_aborted_worker_is_reported_with_its_python_stack(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)\[-6, 0\].*fault\.0\.txt.*Fatal Python error: Aborted.*_aborting"):
        run_world(_aborting, tmp_path)


def test_workers_that_return_pass(tmp_path):
    run_world(_touching, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("done.*")) == ["done.0", "done.1"]
