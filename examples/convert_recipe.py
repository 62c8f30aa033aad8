"""The whole-model distillation recipe and the stored-width evaluation shared by the conversion studies
(examples/convert_char_lm.py, examples/convert_minilm.py): one definition of the options, of how a
converted model is evaluated as loaded back from its checkpoint, and of its bytes per weight.
"""
from __future__ import annotations

import copy
import io

import torch

import rbe_ffn


def add_recipe_args(ap, patience: int) -> None:
    """The distill_model options of the recipe (their defaults: the first round's constant-lr, RBE-only run),
    and the stored width of the coefficients. `patience`: the script's default (its existing tables)."""
    ap.add_argument("--patience", type=int, default=patience, help="distill_model's patience in evaluations (0: none)")
    ap.add_argument("--train", choices=("rbe", "all"), default="rbe",
                    help="distill_model trains the RBE parameters only, or every parameter (attention, "
                         "embeddings, norms too; their size unchanged)")
    ap.add_argument("--parametrization", choices=("plain", "scaled"), default="plain",
                    help="the converted layers' parametrization during whole-model distillation")
    ap.add_argument("--schedule", choices=rbe_ffn.distill.SCHEDULES, default="constant",
                    help="distill_model's lr over --distill-steps (linear/cosine decay towards 0)")
    ap.add_argument("--warmup", type=int, default=0, help="distill_model's linear warm-up steps")
    ap.add_argument("--values-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="coefficients stored at this width (rbe_ffn.storage_state_dict); every RBE model is "
                         "evaluated as loaded back from that storage, and its bytes/weight are storage_report's")


def check_recipe_args(ap, args) -> None:
    if args.patience < 0 or args.warmup < 0:
        ap.error("need --patience >= 0 and --warmup >= 0")


def recipe_labels(args) -> tuple:
    """(suffix for the stored width, suffix for the non-default whole-model choices) of a table's method
    column: "" where the option is at its default, so the first round's rows keep their names."""
    stored_as = "" if args.values_dtype == "float32" else f", coeffs {args.values_dtype}"
    how = [x for x, default in ((args.parametrization, "plain"), (f"train={args.train}", "train=rbe"),
                                (args.schedule, "constant")) if x != default]
    return stored_as, (f" ({', '.join(how)})" if how else "")


def stored(model, values_dtype):
    """`model` as loaded back from the checkpoint rbe_ffn.storage_state_dict(values_dtype) writes (the
    coefficients rounded to their stored width), through torch.save / torch.load."""
    buf = io.BytesIO()
    torch.save(rbe_ffn.storage_state_dict(model, values_dtype), buf)
    buf.seek(0)
    back = copy.deepcopy(model)
    back.load_state_dict(torch.load(buf))
    return back


def rbe_bytes_per_weight(model, values_dtype) -> float:
    """Checkpoint bytes of the RBE weights (storage_report: pattern numbers, coefficients at their
    stored width, int16 positions) per weight they stand for."""
    weights = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, rbe_ffn.RBELinear))
    return rbe_ffn.storage_report(model, values_dtype=values_dtype)["bytes"] / weights
