"""rbe_ffn.distill_model: whole-model distillation of a converted model against the original (tiny GPT-2 and
BERT built from configs, nothing downloaded; a plain nn.Sequential): it lowers the held-out objective, never
returns a student worse than it started, stops early, leaves the teacher alone, and refuses bad arguments."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: models are built from configs

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rbe_ffn

transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
transformers.logging.set_verbosity_error()
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny sizes: one thread is faster on a shared machine (OpenMP barriers); results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=VOCAB, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=32)
    return BertModel(cfg).eval()


def seq_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16),
                         nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16)), nn.Linear(16, 4))


def ids(n, batch=4, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def floats(n, batch=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 8, generator=g) for _ in range(n)]


def converted(teacher, k, block_size=8, **kw):
    student = copy.deepcopy(teacher)
    rbe_ffn.replace_mlp(student, block_size=block_size, k=k, **kw)
    return student


def kl_on(student, teacher, batches):
    with torch.no_grad():
        return sum(F.kl_div(F.log_softmax(student(b).logits, -1).flatten(0, 1),
                            F.log_softmax(teacher(b).logits, -1).flatten(0, 1),
                            reduction="batchmean", log_target=True).item() for b in batches) / len(batches)


def state(m):
    return {n: t.detach().clone() for n, t in m.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


# ----------------------------------------------------------------- it distills
def test_kl_lowers_heldout_objective_gpt2():
    teacher = gpt2()
    student = converted(teacher, k=6)
    plain = copy.deepcopy(student)
    rep = rbe_ffn.distill_model(student, teacher, ids(10), objective="kl", steps=60, lr=3e-3, eval_every=10,
                                progress=False)
    assert rep.after < 0.6 * rep.before and rep.best_step > 0
    assert rep.after == pytest.approx(rep.best, rel=1e-5) and rep.after <= rep.last + 1e-9
    assert (rep.steps, rep.stopped, rep.train_batches, rep.holdout_batches) == (60, "steps", 8, 2)
    assert (rep.samples, rep.tokens) == (60 * 4, 60 * 64)
    assert [s for s, _ in rep.history] == [0, 10, 20, 30, 40, 50, 60]
    # train="rbe": only the compressed parameters moved
    rbe_names = {n for n, _ in student.named_parameters() if ".mlp.ffn." in n}
    assert rep.trained_parameters == sum(p.numel() for n, p in student.named_parameters() if n in rbe_names)
    for (n, p), (_, q) in zip(student.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q) != (n in rbe_names), n
    # better on batches never seen, too
    fresh = ids(4, seed=7)
    assert kl_on(student, teacher, fresh) < 0.8 * kl_on(plain, teacher, fresh)
    # the student is left as it was given: eval mode, checkpoint off, requires_grad on, no grads
    ffns = [m for m in student.modules() if isinstance(m, rbe_ffn.RBEFeedForward)]
    assert ffns and not any(m.checkpoint for m in ffns) and not student.training
    assert all(p.requires_grad and p.grad is None for p in student.parameters())
    assert "distill_model (kl)" in str(rep) and "best step" in str(rep)


def test_cosine_on_pooled_embeddings_bert_with_separate_holdout():
    teacher = bert()
    student = converted(teacher, k=6)

    def embed(model, batch):
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    def batch(seed):
        x = ids(1, batch=8, seed=seed)[0]
        mask = torch.ones_like(x)
        mask[:, 12:] = 0  # padding: not counted as tokens
        return {"input_ids": x, "attention_mask": mask}

    train, held = [batch(s) for s in range(6)], [batch(100), batch(101)]
    rep = rbe_ffn.distill_model(student, teacher, train, holdout=held, objective="cosine", outputs=embed,
                                steps=40, lr=3e-3, progress=False)
    assert rep.after < 0.7 * rep.before
    assert (rep.train_batches, rep.holdout_batches, rep.samples, rep.tokens) == (6, 2, 40 * 8, 40 * 8 * 12)


@pytest.mark.parametrize("train", ["rbe", "all"])
def test_mse_sequential_train_rbe_or_all(train):
    teacher = seq_model()
    student = converted(teacher, k=10)
    start = state(student)
    rep = rbe_ffn.distill_model(student, teacher, floats(8), objective="mse", steps=40, lr=3e-3, train=train,
                                progress=False)
    assert rep.after < 0.7 * rep.before
    rbe = isinstance(student[2], rbe_ffn.RBEFeedForward)
    assert rbe
    moved = {n for n in start if not torch.equal(start[n], student.state_dict()[n])}
    if train == "rbe":
        assert moved and all(n.startswith("2.") for n in moved)
    else:
        assert {"0.weight", "1.weight", "3.weight"} <= moved
    assert rep.tokens is None  # float inputs: no token count


def test_callable_objective():
    teacher = seq_model()
    student = converted(teacher, k=10)
    calls = []

    def l1(s, t):
        calls.append(s.shape)
        return (s - t).abs().mean()

    rep = rbe_ffn.distill_model(student, teacher, floats(6), objective=l1, steps=10, lr=3e-3, progress=False)
    assert rep.objective == "l1" and rep.after < rep.before and calls[0] == (32, 4)


# ----------------------------------------------------------------- never worse, early stopping
def test_diverging_training_returns_the_start():
    """lr = 1e3 blows the student up; the start was the best held-out point, so it comes back bitwise."""
    teacher = gpt2()
    student = converted(teacher, k=6)
    start = state(student)
    rep = rbe_ffn.distill_model(student, teacher, ids(6), objective="kl", steps=12, lr=1e3, eval_every=2,
                                progress=False)
    assert rep.best_step == 0 and rep.after == pytest.approx(rep.before, rel=1e-6)
    assert rep.stopped == "diverged" or rep.last > rep.before
    assert_same_state(start, state(student))


def test_lossless_start_is_kept_and_patience_stops():
    """k = b*b: the conversion is exact, every step can only make it worse: patience=2 stops after 2
    evaluations without a new best, and the exact start is what the student keeps."""
    teacher = seq_model()
    student = converted(teacher, k=64)
    start = state(student)
    rep = rbe_ffn.distill_model(student, teacher, floats(6), objective="mse", steps=100, lr=1e-2, eval_every=3,
                                patience=2, progress=False)
    assert (rep.stopped, rep.steps, rep.best_step) == ("patience", 6, 0)
    assert rep.before < 1e-10 and rep.last > rep.before
    assert_same_state(start, state(student))


def test_max_seconds_stops():
    teacher = seq_model()
    student = converted(teacher, k=10)
    rep = rbe_ffn.distill_model(student, teacher, floats(6), objective="mse", steps=100, max_seconds=1e-9,
                                progress=False)
    assert (rep.stopped, rep.steps) == ("max_seconds", 1)
    assert rep.after <= rep.before


# ----------------------------------------------------------------- learning-rate schedule, parametrization
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_sets_each_steps_lr(schedule, monkeypatch):
    """The lr Adam steps with: 2 warm-up steps (lr/2, lr), then 8 steps constant, or decaying from lr
    towards 0 (linear: 1 - j/8, cosine: (1 + cos(pi j/8))/2, j = 0..7), never 0."""
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    teacher = seq_model()
    rep = rbe_ffn.distill_model(converted(teacher, k=10), teacher, floats(6), objective="mse", steps=10, lr=0.02,
                                schedule=schedule, warmup=2, progress=False)
    tail = {"constant": [1.0] * 8, "linear": [1 - j / 8 for j in range(8)],
            "cosine": [(1 + torch.cos(torch.tensor(torch.pi * j / 8)).item()) / 2 for j in range(8)]}[schedule]
    assert rep.steps == 10
    assert seen == pytest.approx([0.01, 0.02] + [0.02 * f for f in tail], rel=1e-6)
    assert min(seen) > 0


def test_parametrization_switched_for_the_run_and_back():
    """parametrization="scaled" trains a converted ("plain") student in the scaled units and gives it back
    "plain"; the format numbers are unchanged by the switch itself (steps=0: bitwise), and the units change
    what Adam does (a different result from the same steps)."""
    teacher = seq_model()
    student = converted(teacher, k=10)
    layers = [m for m in student.modules() if isinstance(m, rbe_ffn.RBELinear)]
    assert layers and {m.parametrization for m in layers} == {"plain"}
    start = state(student)
    rbe_ffn.distill_model(student, teacher, floats(6), objective="mse", steps=0, parametrization="scaled",
                          progress=False)
    assert_same_state(start, state(student))
    seen = []

    def mse(s, t):
        seen.append({m.parametrization for m in layers})
        return F.mse_loss(s, t)

    plain = copy.deepcopy(student)
    rep = rbe_ffn.distill_model(student, teacher, floats(6), objective=mse, steps=20, lr=3e-3,
                                parametrization="scaled", progress=False)
    ref = rbe_ffn.distill_model(plain, teacher, floats(6), objective="mse", steps=20, lr=3e-3, progress=False)
    assert seen and all(s == {"scaled"} for s in seen)
    assert {m.parametrization for m in layers} == {"plain"}
    assert rep.after < rep.before and rep.after != pytest.approx(ref.after, rel=1e-3)


# ----------------------------------------------------------------- the teacher, the student's settings
def test_teacher_untouched_inference_mode_and_checkpoint_during():
    teacher = gpt2()
    student = converted(teacher, k=6)
    teacher.train()  # its mode is put back; during distillation it runs in eval mode
    teacher.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    before = state(teacher)
    seen = {"teacher": [], "student": []}
    teacher.register_forward_hook(lambda m, a, o: seen["teacher"].append(
        (torch.is_inference_mode_enabled(), m.training)))
    ffn = student.transformer.h[0].mlp.ffn
    ffn.register_forward_hook(lambda m, a, o: seen["student"].append((m.checkpoint, m.training)))
    rbe_ffn.distill_model(student, teacher, ids(4), steps=5, lr=1e-2, progress=False)
    assert seen["teacher"] and all(s == (True, False) for s in seen["teacher"])
    assert seen["student"] and all(s == (True, False) for s in seen["student"])
    assert_same_state(before, state(teacher))
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training and all(m.training for m in teacher.modules())
    assert not teacher.transformer.h[0].attn.c_attn.weight.requires_grad
    assert teacher.transformer.h[1].attn.c_attn.weight.requires_grad
    assert ffn.checkpoint is False


# ----------------------------------------------------------------- bad arguments
def _bad_cases():
    t = seq_model()
    s = converted(t, k=10)
    b = floats(4)
    return [
        (dict(student="x"), TypeError, "student must be a torch.nn.Module"),
        (dict(teacher=3), TypeError, "teacher must be a torch.nn.Module"),
        (dict(student=t), ValueError, "same module"),
        (dict(objective="l2"), ValueError, "objective must be one of"),
        (dict(objective=3), TypeError, "objective must be a name"),
        (dict(outputs="logits"), TypeError, "outputs must be None or a callable"),
        (dict(steps=-1), ValueError, "steps must be a non-negative int"),
        (dict(steps=2.5), ValueError, "steps must be"),
        (dict(lr=0), ValueError, "lr must be a positive number"),
        (dict(lr=float("nan")), ValueError, "lr must be a positive number"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(eval_every=0), ValueError, "eval_every must be a positive int"),
        (dict(patience=0), ValueError, "patience must be a positive int"),
        (dict(max_seconds=0), ValueError, "max_seconds"),
        (dict(train="some"), ValueError, "train must be 'rbe'"),
        (dict(schedule="step"), ValueError, "schedule must be one of"),
        (dict(warmup=-1), ValueError, "warmup must be a non-negative int"),
        (dict(warmup=3), ValueError, r"warmup \(3 steps\) is longer than steps \(2\)"),
        (dict(parametrization="wide"), ValueError, "parametrization must be None or one of"),
        (dict(holdout=1.5), ValueError, "holdout must be a fraction"),
        (dict(holdout=None), TypeError, "holdout must be a fraction"),
        (dict(holdout=[]), ValueError, "held-out iterable is empty"),
        (dict(batches=b[:1]), ValueError, "at least 2"),
        (dict(batches=b[0]), TypeError, "wrap a single batch in a list"),
        (dict(batches=5), TypeError, "iterable of batches"),
        (dict(batches=["text", "more"]), TypeError, r"batches\[0\] must be a tensor"),
        (dict(student=copy.deepcopy(t)), ValueError, "no RBEFeedForward"),
        (dict(outputs=lambda m, x: m(x) if m is t else m(x)[:, :2]), ValueError, "differ in shape"),
        (dict(outputs=lambda m, x: "no"), TypeError, "not a tensor"),
        (dict(objective=lambda a, b: (a - b) ** 2), TypeError, "scalar tensor"),
        (dict(progress=1), TypeError, "progress must be a bool"),
    ], s, t, b


CASES, _S, _T, _B = _bad_cases()


@pytest.mark.parametrize("kw,exc,msg", CASES, ids=[c[2][:30] for c in CASES])
def test_bad_arguments_raise(kw, exc, msg):
    args = dict(student=_S, teacher=_T, batches=_B, objective="mse", steps=2, progress=False)
    args.update(kw)
    start = state(_S)
    with pytest.raises(exc, match=msg):
        rbe_ffn.distill_model(args.pop("student"), args.pop("teacher"), args.pop("batches"), **args)
    assert_same_state(start, state(_S))  # refused before (or without) touching the student
    assert not any(m.checkpoint for m in _S.modules() if isinstance(m, rbe_ffn.RBEFeedForward))


def test_shared_parameter_refused():
    teacher = seq_model()
    student = converted(teacher, k=10)
    student[0] = teacher[0]  # the same Linear in both: training the student would change the teacher
    with pytest.raises(ValueError, match="share 2 parameter"):
        rbe_ffn.distill_model(student, teacher, floats(4), objective="mse", train="all", progress=False)
