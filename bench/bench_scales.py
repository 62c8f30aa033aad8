"""What the "scaled" parametrization (the default of fresh layers) costs a forward without grad:
the same RBEFeedForward as "scaled" and as "plain" (same weights, the same output bits), one call
each per round, the first rotating, medians (docs/benchmarks.md, "Scaled against plain").

    .venv/bin/python bench/bench_scales.py [--threads 1] [--tokens 1,8,64]
"""
import argparse
import statistics
import time

import torch

import rbe_ffn


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"isa {rbe_ffn.cpu_isa()}, {args.threads} thread(s), torch {torch.__version__}")
    print("| d_model/d_ff | tokens | scaled us | plain us | scaled / plain |")
    print("|---|---|---|---|---|")
    for d, f in ((768, 3072), (1024, 4096)):
        torch.manual_seed(0)
        scaled = rbe_ffn.RBEFeedForward(d, f, block_size=64, k=300)
        plain = rbe_ffn.RBEFeedForward(d, f, block_size=64, k=300, parametrization="plain")
        plain.load_state_dict(scaled.state_dict())  # state_dicts hold the format's numbers
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, d)
            arms = [("scaled", scaled), ("plain", plain)]
            times = {name: [] for name, _ in arms}
            with torch.no_grad():
                assert torch.equal(scaled(x), plain(x))
                for r in range(args.rounds):
                    for name, m in arms[r % 2:] + arms[:r % 2]:
                        t0 = time.perf_counter()
                        m(x)
                        times[name].append(time.perf_counter() - t0)
            s, p = (statistics.median(times[n]) for n in ("scaled", "plain"))
            print(f"| {d}/{f} | {T} | {s * 1e6:.0f} | {p * 1e6:.0f} | {s / p:.3f} |", flush=True)


if __name__ == "__main__":
    main()
