"""Convert the MLPs of a (small, randomly initialized) Hugging Face GPT-2 to RBE form with
rbe_ffn.replace_mlp, print the report, distill briefly and print what that changed.

Nothing is downloaded: the model is built from a GPT2Config (random init), and the distillation
and evaluation inputs are random token ids. Random-init GPT-2 weights are Gaussian (std 0.02), the
hard case for the codec (see the README's accuracy table): expect weight errors near 0.8 at k=300.

Run (from the repository root, after `make test` or `make example` has set up .venv):

    .venv/bin/python examples/convert_gpt2.py                 # 4 layers, d_model 256, b=64, k=300
    .venv/bin/python examples/convert_gpt2.py --k 1000 --steps 400

Needs the `transformers` package (in the Makefile's DEPS; `pip install transformers` otherwise).
Seeded: the same numbers on every run with the same thread count (one thread by default, as in
examples/train_toy_transformer.py: on a shared 2-core machine OpenMP's barriers can make two
threads much slower at these sizes).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import rbe_ffn


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200, help="distillation steps per layer")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens captured per layer for distillation")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    transformers.logging.set_verbosity_error()

    torch.manual_seed(args.seed)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=4, vocab_size=1000, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    seq = 64
    train_ids = torch.randint(0, cfg.vocab_size, (args.tokens // seq, seq), generator=g)
    test_ids = torch.randint(0, cfg.vocab_size, (8, seq), generator=g)
    with torch.no_grad():
        ref_logits = model(test_ids).logits

    print(f"GPT-2 from config: {args.layers} layers, d_model {args.d_model}, d_ff {4 * args.d_model}, "
          f"random init, float32; b={args.block_size}, k={args.k}\n")

    plain = copy.deepcopy(model)
    t = time.perf_counter()
    report = rbe_ffn.replace_mlp(plain, block_size=args.block_size, k=args.k)
    t_convert = time.perf_counter() - t
    print(report)
    print(f"(conversion took {t_convert:.1f} s)\n")

    t = time.perf_counter()
    distilled = rbe_ffn.replace_mlp(model, block_size=args.block_size, k=args.k,
                                    distill=dict(inputs=train_ids, steps=args.steps, lr=args.lr))
    t_distill = time.perf_counter() - t
    print(f"\nwith distillation ({args.steps} Adam steps per layer, lr {args.lr}, {args.tokens} captured tokens "
          f"per layer, 20% held out; {t_distill:.1f} s):")
    print(distilled)

    with torch.no_grad():
        a, b = plain(test_ids).logits, model(test_ids).logits
    agree = lambda x: (x.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()  # noqa: E731
    print(f"\nwhole model on {test_ids.numel()} held-out tokens, vs the dense model:")
    print(f"  logits relative error   converted {rel(a, ref_logits):.4f}   converted + distilled "
          f"{rel(b, ref_logits):.4f}")
    print(f"  top-1 agreement         converted {agree(a):.3f}    converted + distilled {agree(b):.3f}")


if __name__ == "__main__":
    main()
