"""Training step of RBE and dense FFNs (float32 and under bf16 autocast) when another process keeps one core busy (the machine
shared, a data loader, ...): each block at 1 and 2 threads, with and without a competing process
that spins on one core, interleaved, medians (docs/benchmarks.md, "A busy core").

    .venv/bin/python bench/bench_busy_core.py [--reps 5]
"""
import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

import rbe_ffn


def spin(stop):
    while not stop.is_set():
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    print(f"isa {rbe_ffn.cpu_isa()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 768/3072, "
          f"{args.tokens} tokens, training step (forward + backward)")
    torch.manual_seed(0)
    arms = {"rbe": rbe_ffn.RBEFeedForward(768, 3072, block_size=64, k=300),
            "rbe_ckpt": rbe_ffn.RBEFeedForward(768, 3072, block_size=64, k=300, checkpoint=True),
            "dense": torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768))}
    x = torch.randn(args.tokens, 768, requires_grad=True)

    arms["dense_bf16"] = arms["dense"]  # the same module under torch.autocast("cpu", dtype=torch.bfloat16)

    def step(m, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = m(x)
        y.float().sum().backward()

    print("| competing spinner | threads | " + " | ".join(f"{a} ms" for a in arms) + " |")
    print("|---|---|" + "---|" * len(arms))
    for busy in (False, True):
        stop = mp.Event()
        proc = mp.Process(target=spin, args=(stop,)) if busy else None
        if proc:
            proc.start()
            time.sleep(0.5)
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                times = {a: [] for a in arms}
                for a, m in arms.items():
                    step(m, a == "dense_bf16")
                for r in range(args.reps):
                    for a, m in arms.items():
                        t0 = time.perf_counter()
                        step(m, a == "dense_bf16")
                        times[a].append(time.perf_counter() - t0)
                med = " | ".join(f"{statistics.median(times[a]) * 1e3:.1f}" for a in arms)
                print(f"| {'yes' if busy else 'no'} | {threads} | {med} |", flush=True)
        finally:
            if proc:
                stop.set()
                proc.join()


if __name__ == "__main__":
    main()
