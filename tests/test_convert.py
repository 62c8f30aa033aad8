"""rbe_ffn.replace_mlp: converting the MLP blocks of existing models (Hugging Face GPT-2 and BERT built
from small configs, nothing downloaded; plain nn.Sequential), the report, skip=, checkpoint=,
dtype, training, state_dict, and layer-wise distillation."""
import copy
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: models are built from configs

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rbe_ffn
from rbe_ffn.convert import (ConvertedLayer, LeftAlone, RBEBertIntermediate, RBEBertOutput, RBEGPT2MLP,
                             _capture_inputs, _scan)

from conftest import Block

transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
transformers.logging.set_verbosity_error()
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """At these tiny sizes one step of the kernels is a few ms; on this project's shared 2-core machines
    OpenMP's barriers made 2 threads up to 30x slower per call while other processes ran (measured:
    140 ms vs 4.4 ms for a 24/40 block's forward + backward). Results do not depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def boost_mlps(model, seed=0):
    """Random-init HF MLP weights are N(0, 0.02) with zero biases: too small for the pre-activations to
    reach the range where gelu and gelu_tanh differ, and zero biases would hide a dropped bias. Give
    every feed-forward matrix a 1/sqrt(fan_in) scale and every bias a non-zero value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in ("mlp.c_fc", "mlp.c_proj", "intermediate.dense", "output.dense")):
                continue
            if p.dim() == 2:
                fan_in = p.shape[0] if ".c_" in name else p.shape[1]  # Conv1D weight is [in, out]
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 1.5 / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def gpt2(d=40, f=72, layers=2, act="gelu_new", dtype=torch.float64, seed=0, boost=True):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=4, n_inner=f, vocab_size=VOCAB, n_positions=32,
                     activation_function=act, bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cfg).to(dtype).eval()
    return boost_mlps(m, seed) if boost else m


def bert(d=40, f=72, layers=2, act="gelu", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=f,
                     vocab_size=VOCAB, max_position_embeddings=32, hidden_act=act)
    return boost_mlps(BertModel(cfg).to(dtype).eval(), seed)



def seq_model(d=13, f=37, act=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(Block(nn.Sequential(nn.Linear(d, f), act or nn.GELU(), nn.Linear(f, d))),
                      Block(nn.Sequential(nn.Linear(d, f), copy.deepcopy(act) or nn.GELU(), nn.Linear(f, d))))
    return m.to(dtype)


def ids(batch=2, seq=9, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- lossless conversion
@pytest.mark.parametrize("d,f", [(40, 72), (40, 40)])  # non-square, and square (a missing transpose would still run)
def test_gpt2_lossless(d, f):
    m = gpt2(d, f)
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=64)
    assert [l.path for l in rep] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert not rep.left_alone and not rep.skipped
    for i in range(2):
        new, old = m.transformer.h[i].mlp, ref.transformer.h[i].mlp
        assert isinstance(new, RBEGPT2MLP) and isinstance(new.ffn, rbe_ffn.RBEFeedForward)
        assert (new.ffn.d_model, new.ffn.d_ff, new.ffn.activation) == (d, f, "gelu_tanh")
        x = torch.randn(3, 5, d, dtype=torch.float64) * 2
        assert rel(new(x), old(x)) < 1e-12
        # the stored matrices are the Conv1D weights transposed (dense [out, in])
        torch.testing.assert_close(new.ffn.fc1.dense_weight(), old.c_fc.weight.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(new.ffn.fc2.dense_weight(), old.c_proj.weight.T, rtol=0, atol=1e-12)
    x = ids()
    assert rel(m(x).logits, ref(x).logits) < 1e-10


def test_gpt2_dropout_kept_in_train_mode():
    """The replacement applies GPT2MLP's own dropout: in train mode, same seed, same output."""
    m = gpt2(act="gelu_new")
    m.config.resid_pdrop = 0.3
    for blk in m.transformer.h:
        blk.mlp.dropout.p = 0.3
    ref = copy.deepcopy(m)
    rbe_ffn.replace_mlp(m, block_size=8, k=64)
    assert m.transformer.h[0].mlp.dropout.p == 0.3
    m.train(), ref.train()
    x = ids()
    torch.manual_seed(5)
    a = m(x).logits
    torch.manual_seed(5)
    b = ref(x).logits
    torch.manual_seed(6)
    c = ref(x).logits
    assert rel(b, c) > 1e-3  # dropout is active
    assert rel(a, b) < 1e-10


@pytest.mark.parametrize("hf_name,ours", [
    ("gelu_new", "gelu_tanh"), ("gelu", "gelu"), ("gelu_python", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"),
    ("gelu_python_tanh", "gelu_tanh"), ("gelu_fast", "gelu_tanh"), ("gelu_accurate", "gelu_tanh"),
    ("relu", "relu"), ("silu", "silu"), ("swish", "silu")])
def test_gpt2_activation_names(hf_name, ours):
    """Each transformers activation name maps to the function that computes the same values: the
    converted block equals the original to 1e-9 in float64 (gelu and gelu_tanh differ by ~1e-3)."""
    m = gpt2(layers=1, act=hf_name)
    old = copy.deepcopy(m.transformer.h[0].mlp)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=64)
    assert rep[0].activation == ours
    x = torch.randn(4, 7, 40, dtype=torch.float64) * 2
    assert rel(m.transformer.h[0].mlp(x), old(x)) < 1e-9


def test_wrong_activation_would_be_seen():
    """The data above separates the GELU forms: forcing the other one gives a visible difference."""
    m = gpt2(layers=1, act="gelu_new")
    old = copy.deepcopy(m.transformer.h[0].mlp)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=64, activation="gelu")  # override: erf form
    assert rep[0].activation == "gelu" and rep[0].activation_source == "activation="
    x = torch.randn(4, 7, 40, dtype=torch.float64) * 2
    assert rel(m.transformer.h[0].mlp(x), old(x)) > 1e-5


def test_untransposed_weight_would_be_seen():
    """On the square model a transposition mistake would run; the data makes it obvious."""
    m = gpt2(40, 40, layers=1)
    old = m.transformer.h[0].mlp
    x = torch.randn(4, 40, dtype=torch.float64)
    wrong = old.c_proj(old.act(x @ old.c_fc.weight.T + old.c_fc.bias))
    assert rel(wrong, old(x)) > 0.1


def test_bert_lossless():
    m = bert()
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=16, k=256)
    assert [l.path for l in rep] == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    assert rep[0].layout == "BertIntermediate+BertOutput" and rep[0].activation == "gelu"
    for i in range(2):
        lay, old = m.encoder.layer[i], ref.encoder.layer[i]
        assert isinstance(lay.intermediate, RBEBertIntermediate) and isinstance(lay.output, RBEBertOutput)
        torch.testing.assert_close(lay.intermediate.ffn.fc1.dense_weight(), old.intermediate.dense.weight,
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(lay.intermediate.ffn.fc2.dense_weight(), old.output.dense.weight,
                                   rtol=0, atol=1e-12)
        x = torch.randn(2, 5, 40, dtype=torch.float64)
        h = torch.randn(2, 5, 40, dtype=torch.float64)
        assert rel(lay.output(lay.intermediate(x), h), old.output(old.intermediate(x), h)) < 1e-12
    # LayerNorm and dropout are the original modules, under their original names
    sd = m.state_dict()
    assert "encoder.layer.0.output.LayerNorm.weight" in sd and "encoder.layer.0.output.dense.weight" not in sd
    assert "encoder.layer.0.intermediate.ffn.fc1.coeffs" in sd
    x = ids()
    assert rel(m(x).last_hidden_state, ref(x).last_hidden_state) < 1e-10
    # train mode: BertOutput's dropout still applies, drawing the same random numbers
    m.train(), ref.train()
    torch.manual_seed(3)
    a = m(x).last_hidden_state
    torch.manual_seed(3)
    b = ref(x).last_hidden_state
    assert rel(a, b) < 1e-10


def test_roberta_lossless_and_unknown_pair_left_alone():
    from transformers import ElectraConfig, ElectraModel, RobertaConfig, RobertaModel
    small = dict(hidden_size=40, num_hidden_layers=1, num_attention_heads=4, intermediate_size=72,
                 vocab_size=VOCAB, max_position_embeddings=40)
    torch.manual_seed(0)
    m = boost_mlps(RobertaModel(RobertaConfig(**small, pad_token_id=1)).double().eval())
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=64)
    assert [l.layout for l in rep] == ["RobertaIntermediate+RobertaOutput"]
    x = ids() % (VOCAB - 2) + 2  # clear of the padding id
    assert rel(m(x).last_hidden_state, ref(x).last_hidden_state) < 1e-10
    # the same layout under a class pair not in the known list: reported, not guessed
    e = ElectraModel(ElectraConfig(**small, embedding_size=40)).double().eval()
    inter = e.encoder.layer[0].intermediate
    rep = rbe_ffn.replace_mlp(e, block_size=8, k=64)
    assert len(rep) == 0 and e.encoder.layer[0].intermediate is inter
    [a] = rep.left_alone
    assert a.path == "encoder.layer.0.intermediate" and a.type_name == "ElectraIntermediate+ElectraOutput"
    assert "not a class pair known" in a.reason


@pytest.mark.parametrize("act,ours", [("relu", "relu"), ("gelu_new", "gelu_tanh"), ("silu", "silu")])
def test_bert_activations(act, ours):
    m = bert(layers=1, act=act)
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=16, k=256)
    assert rep[0].activation == ours
    x = ids()
    assert rel(m(x).last_hidden_state, ref(x).last_hidden_state) < 1e-10


def test_bert_function_activation():
    """BertIntermediate applies config.hidden_act itself when it is not a name (transformers 4 accepted a
    function; 5 validates a str): torch's gelu/relu/silu functions are recognized."""
    m = bert(layers=1)
    del m.encoder.layer[0].intermediate.intermediate_act_fn  # a registered submodule; a function goes in its place
    m.encoder.layer[0].intermediate.intermediate_act_fn = F.relu
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=16, k=256)
    assert rep[0].activation == "relu"
    assert rel(m(ids()).last_hidden_state, ref(ids()).last_hidden_state) < 1e-10


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()],
                         ids=["gelu", "gelu_tanh", "relu", "silu"])
def test_sequential_lossless(act):
    m = seq_model(act=act)
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=64)
    assert [l.path for l in rep] == ["0.mlp", "1.mlp"]
    assert rep[0].activation == rbe_ffn.canonical_activation(act) and rep[0].layout == "Sequential"
    assert isinstance(m[0].mlp, rbe_ffn.RBEFeedForward)
    x = torch.randn(3, 4, 13, dtype=torch.float64) * 2
    assert rel(m(x), ref(x)) < 1e-12
    assert rel(m[0].mlp(x), ref[0].mlp(x)) < 1e-12


def test_sequential_lossless_float32():
    """float32: the transform-domain kernels round differently from a dense matmul; errors are a few
    float32 ulps (eps 6e-8) times the O(b) terms summed per output, so 1e-5 relative is a safe bound."""
    m = seq_model(dtype=torch.float32, act=nn.GELU(approximate="tanh"))
    ref = copy.deepcopy(m)
    rbe_ffn.replace_mlp(m, block_size=8, k=64)
    x = torch.randn(64, 13) * 2
    assert m[0].mlp.fc1.coeffs.dtype == torch.float32
    assert rel(m[0].mlp(x), ref[0].mlp(x)) < 1e-5
    assert rel(m(x), ref(x)) < 1e-5


# ----------------------------------------------------------------- lossy: the report's numbers
def test_report_errors_and_bytes_gpt2():
    m = gpt2(40, 72)
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=16, k=30)  # 40 and 72 are not multiples of 16: edge blocks
    assert len(rep) == 2
    for i, layer in enumerate(rep):
        ffn, old = m.transformer.h[i].mlp.ffn, ref.transformer.h[i].mlp
        w1, w2 = old.c_fc.weight.T, old.c_proj.weight.T
        e1 = rel(ffn.fc1.dense_weight(), w1)
        e2 = rel(ffn.fc2.dense_weight(), w2)
        assert 0.05 < e1 < 1 and 0.05 < e2 < 1
        assert layer.error_fc1 == pytest.approx(e1, rel=1e-9)
        assert layer.error_fc2 == pytest.approx(e2, rel=1e-9)
        assert (layer.d_model, layer.d_ff, layer.k, layer.block_size) == (40, 72, 30, 16)
        assert layer.dense_bytes == 2 * 40 * 72 * 8
        nblk = 3 * 5  # ceil(40/16) * ceil(72/16) blocks in each matrix
        assert layer.rbe_bytes == 2 * (nblk * 8 * 8 + nblk * 30 * 8 + nblk * 30 * 2)
        assert layer.compression_ratio == layer.dense_bytes / layer.rbe_bytes


def test_report_errors_bert_and_sequential():
    m = bert()
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=16, k=40)
    for i, layer in enumerate(rep):
        ffn, old = m.encoder.layer[i].intermediate.ffn, ref.encoder.layer[i]
        assert layer.error_fc1 == pytest.approx(rel(ffn.fc1.dense_weight(), old.intermediate.dense.weight), rel=1e-9)
        assert layer.error_fc2 == pytest.approx(rel(ffn.fc2.dense_weight(), old.output.dense.weight), rel=1e-9)
    s = seq_model()
    sref = copy.deepcopy(s)
    rep = rbe_ffn.replace_mlp(s, block_size=8, k=10)
    assert rep["1.mlp"].error_fc2 == pytest.approx(rel(s[1].mlp.fc2.dense_weight(), sref[1].mlp[2].weight), rel=1e-9)


def test_report_access_and_str():
    m = gpt2()
    m.transformer.h[1].mlp.act = nn.Tanh()
    rep = rbe_ffn.replace_mlp(m, block_size=16, k=30)
    assert isinstance(rep, rbe_ffn.ConversionReport) and len(rep) == 1
    assert rep[0] is rep["transformer.h.0.mlp"] and list(rep) == [rep[0]] and isinstance(rep[0], ConvertedLayer)
    with pytest.raises(KeyError, match="transformer.h.1.mlp"):
        rep["transformer.h.1.mlp"]
    assert rep.dense_bytes == rep[0].dense_bytes and rep.rbe_bytes == rep[0].rbe_bytes
    s = str(rep)
    assert "transformer.h.0.mlp" in s and "GPT2MLP" in s and f"{rep[0].error_fc1:.4f}" in s
    assert "left alone" in s and "Tanh" in s and "transformer.h.1.mlp" in s
    assert "1 converted, 1 left alone, 0 skipped" in s


# ----------------------------------------------------------------- left alone
class GatedMLP(nn.Module):
    """LLaMA-style: down(silu(gate(x)) * up(x))."""

    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_unknown_layouts_left_alone():
    gated = GatedMLP(12, 20)
    tanh = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 12))
    with_dropout = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Dropout(0.1), nn.Linear(20, 12))
    widths = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 7))
    half_bias = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12, bias=False))
    good = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12))
    model = nn.ModuleDict(dict(gated=gated, tanh=tanh, with_dropout=with_dropout, widths=widths,
                               half_bias=half_bias, good=good, other=nn.Sequential(nn.Linear(12, 12), nn.ReLU())))
    model = model.double()
    before = {n: m for n, m in model.items()}
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("good.")}
    rep = rbe_ffn.replace_mlp(model, block_size=8, k=5)
    assert [l.path for l in rep] == ["good"]
    assert all(isinstance(a, LeftAlone) for a in rep.left_alone)
    reasons = {a.path: (a.type_name, a.reason) for a in rep.left_alone}
    assert set(reasons) == {"gated", "tanh", "with_dropout", "widths", "half_bias"}
    assert reasons["gated"][0] == "GatedMLP" and "gated MLP" in reasons["gated"][1]
    assert "Tanh" in reasons["tanh"][1] and "not supported" in reasons["tanh"][1]
    assert "Dropout" in reasons["with_dropout"][1]
    assert "d_model -> d_ff -> d_model" in reasons["widths"][1]
    assert "bias" in reasons["half_bias"][1]
    for n in ("gated", "tanh", "with_dropout", "widths", "half_bias", "other"):
        assert model[n] is before[n]  # untouched: the same objects, the same values
    for k_, v in sd.items():
        assert torch.equal(model.state_dict()[k_], v)
    assert isinstance(model["good"], rbe_ffn.RBEFeedForward)


@pytest.mark.parametrize("act", ["quick_gelu", "relu2", "tanh", "gelu_10"])
def test_gpt2_unsupported_activation_left_alone(act):
    m = gpt2(layers=1, act=act)
    mlp = m.transformer.h[0].mlp
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10)
    assert len(rep) == 0 and m.transformer.h[0].mlp is mlp
    [a] = rep.left_alone
    assert a.path == "transformer.h.0.mlp" and a.type_name == "GPT2MLP"
    assert type(mlp.act).__name__ in a.reason and "not supported" in a.reason
    # activation= overrides: the user says which function to use
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10, activation="relu")
    assert len(rep) == 1 and rep[0].activation == "relu"


@pytest.mark.parametrize("middle", ["linear", "layernorm", "dropout", "identity"])
def test_activation_override_never_drops_a_middle_layer(middle):
    """activation= names the function of an unrecognized activation; it must not turn
    Sequential(Linear, <not an activation>, Linear) into an FFN that silently drops the middle."""
    mid = {"linear": nn.Linear(32, 32), "layernorm": nn.LayerNorm(32), "dropout": nn.Dropout(0.1),
           "identity": nn.Identity()}[middle]
    model = nn.Sequential(nn.Sequential(nn.Linear(16, 32), mid, nn.Linear(32, 16)))
    block = model[0]
    rep = rbe_ffn.replace_mlp(model, block_size=8, k=64, activation="gelu")
    assert len(rep) == 0 and model[0] is block
    [a] = rep.left_alone
    assert type(mid).__name__ in a.reason and "not an activation" in a.reason


def test_activation_override_of_an_unrecognized_activation():
    class Act(nn.Module):  # a user's own parameter-free activation
        def forward(self, x):
            return torch.nn.functional.silu(x)

    model = nn.Sequential(nn.Sequential(nn.Linear(16, 32), Act(), nn.Linear(32, 16))).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    want = model(x)
    assert len(rbe_ffn.replace_mlp(model, block_size=8, k=64)) == 0  # not recognized: left alone
    rep = rbe_ffn.replace_mlp(model, block_size=8, k=64, activation="silu")
    assert len(rep) == 1 and isinstance(model[0], rbe_ffn.RBEFeedForward)
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)


def test_llama_mlp_left_alone():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=32))
    mlp = m.model.layers[0].mlp
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10)
    assert len(rep) == 0 and m.model.layers[0].mlp is mlp
    [a] = rep.left_alone
    assert a.path == "model.layers.0.mlp" and a.type_name == "LlamaMLP" and "gated" in a.reason


def test_half_precision_left_alone():
    for dtype in (torch.float16, torch.bfloat16):
        m = seq_model(dtype=dtype)
        rep = rbe_ffn.replace_mlp(m, block_size=8, k=10)
        assert len(rep) == 0 and {a.path for a in rep.left_alone} == {"0.mlp", "1.mlp"}
        assert all(str(dtype) in a.reason for a in rep.left_alone)
        assert isinstance(m[0].mlp, nn.Sequential)


def test_root_mlp_and_bad_arguments():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match="the model itself is an MLP block"):
        rbe_ffn.replace_mlp(mlp, block_size=8, k=5)
    m = seq_model()
    with pytest.raises(ValueError, match="k must be an int in"):
        rbe_ffn.replace_mlp(m, block_size=8, k=65)
    with pytest.raises(ValueError, match="k must be an int in"):
        rbe_ffn.replace_mlp(m, block_size=8, k=-1)
    with pytest.raises(ValueError, match="k must be an int in"):
        rbe_ffn.replace_mlp(m, block_size=8, k=2.5)
    with pytest.raises(ValueError, match="k must be an int in"):
        rbe_ffn.replace_mlp(m, block_size=16)  # the default k=300 does not fit a 16x16 block
    with pytest.raises(ValueError, match="block_size"):
        rbe_ffn.replace_mlp(m, block_size=3, k=5)
    with pytest.raises(ValueError, match="unknown activation"):
        rbe_ffn.replace_mlp(m, block_size=8, k=5, activation="tanh")
    with pytest.raises(TypeError, match="nn.Module"):
        rbe_ffn.replace_mlp("model")
    with pytest.raises(TypeError, match="skip"):
        rbe_ffn.replace_mlp(m, block_size=8, k=5, skip=3)
    with pytest.raises(TypeError, match="checkpoint"):
        rbe_ffn.replace_mlp(m, block_size=8, k=5, checkpoint="yes")
    with pytest.raises(ValueError, match="unknown keys"):
        rbe_ffn.replace_mlp(m, block_size=8, k=5, distill=dict(inputs=torch.zeros(2, 13), step=3))
    with pytest.raises(ValueError, match="lr"):
        rbe_ffn.replace_mlp(m, block_size=8, k=5, distill=dict(inputs=torch.zeros(2, 13), lr=-1))
    with pytest.raises(ValueError, match="needs inputs"):
        rbe_ffn.replace_mlp(m, block_size=8, k=5, distill=dict(inputs=None))
    with pytest.raises(ValueError, match="mixes block paths"):
        rbe_ffn.replace_mlp(m, block_size=8, k=5, distill=dict(inputs={"0.mlp": torch.zeros(4, 13), "x": 1}))
    for bad in (dict(inputs=torch.zeros(2, 13), steps=-1), dict(inputs=torch.zeros(2, 13), holdout=1.0),
                dict(inputs=torch.zeros(2, 13), batch_size=0)):
        with pytest.raises(ValueError):
            rbe_ffn.replace_mlp(m, block_size=8, k=5, distill=bad)
    assert isinstance(m[0].mlp, nn.Sequential)  # nothing was replaced by the failed calls


# ----------------------------------------------------------------- options
def test_skip():
    m = gpt2(layers=3)
    keep0, keep2 = m.transformer.h[0].mlp, m.transformer.h[2].mlp
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10, skip=["transformer.h.0", "transformer.h.2.mlp", "no.such"])
    assert [l.path for l in rep] == ["transformer.h.1.mlp"]
    assert rep.skipped == ["transformer.h.0.mlp", "transformer.h.2.mlp"]
    assert m.transformer.h[0].mlp is keep0 and m.transformer.h[2].mlp is keep2
    assert isinstance(m.transformer.h[1].mlp, RBEGPT2MLP)
    # a prefix matches whole path components only; a single string is one path
    m = gpt2(layers=2)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10, skip="transformer.h.1")
    assert [l.path for l in rep] == ["transformer.h.0.mlp"] and rep.skipped == ["transformer.h.1.mlp"]
    m = gpt2(layers=2)
    assert len(rbe_ffn.replace_mlp(m, block_size=8, k=10, skip=["transformer.h.0.ml"])) == 2
    # BERT: naming the output half skips the pair
    m = bert()
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10, skip={"encoder.layer.1.output"})
    assert [l.path for l in rep] == ["encoder.layer.0.intermediate"]
    assert type(m.encoder.layer[1].intermediate).__name__ == "BertIntermediate"


def test_checkpoint_option():
    m = gpt2(40, 72)
    plain, ckpt = copy.deepcopy(m), copy.deepcopy(m)
    rbe_ffn.replace_mlp(plain, block_size=16, k=40)
    rbe_ffn.replace_mlp(ckpt, block_size=16, k=40, checkpoint=True)
    assert all(blk.mlp.ffn.checkpoint for blk in ckpt.transformer.h)
    assert not any(blk.mlp.ffn.checkpoint for blk in plain.transformer.h)
    x = ids()
    a, b = plain(x, labels=x), ckpt(x, labels=x)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward(), b.loss.backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_dtype_and_device_kept():
    for dtype in (torch.float32, torch.float64):
        m = gpt2(dtype=dtype)
        rbe_ffn.replace_mlp(m, block_size=16, k=30)
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if name.endswith(".index_bytes"):
                assert t.dtype == torch.uint8, name
            elif t.is_floating_point():
                assert t.dtype == dtype, name
            assert t.device == torch.device("cpu"), name
        assert all(mod.index.dtype == torch.int16 for mod in m.modules() if isinstance(mod, rbe_ffn.RBELinear))
        assert m(ids()).logits.dtype == dtype


def test_training_mode_kept():
    m = gpt2()
    m.transformer.h[0].train()
    rbe_ffn.replace_mlp(m, block_size=16, k=30)
    assert m.transformer.h[0].mlp.training and m.transformer.h[0].mlp.ffn.training
    assert not m.transformer.h[1].mlp.training and not m.transformer.h[1].mlp.ffn.training


def test_converted_model_trains_and_round_trips(tmp_path):
    m = gpt2(40, 72)
    rbe_ffn.replace_mlp(m, block_size=16, k=30)
    x = ids()
    out = m(x, labels=x)
    out.loss.backward()
    for blk in m.transformer.h:
        for lin in (blk.mlp.ffn.fc1, blk.mlp.ffn.fc2):
            assert lin.coeffs.grad is not None and lin.coeffs.grad.abs().sum() > 0
            assert lin.basis.grad is not None and lin.bias.grad is not None
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    opt.step()
    out2 = m(x, labels=x)
    assert out2.loss.item() < out.loss.item()
    # state_dict into another converted model of the same config (different weights, so different index)
    other = gpt2(40, 72, seed=7)
    rbe_ffn.replace_mlp(other, block_size=16, k=30)
    assert not torch.equal(other.transformer.h[0].mlp.ffn.fc1.index, m.transformer.h[0].mlp.ffn.fc1.index)
    other.load_state_dict(m.state_dict())
    assert torch.equal(other(x).logits, m(x).logits)
    # and through the project's safetensors checkpoint (BERT: no tied weights)
    b = bert()
    rbe_ffn.replace_mlp(b, block_size=16, k=30)
    path = str(tmp_path / "bert.safetensors")
    rbe_ffn.save_safetensors(b, path)
    b2 = bert(seed=3)
    rbe_ffn.replace_mlp(b2, block_size=16, k=30)
    rbe_ffn.load_safetensors(b2, path)
    assert torch.equal(b2(x).last_hidden_state, b(x).last_hidden_state)


# ----------------------------------------------------------------- filter_fn, structure-only reload
def test_filter_fn():
    m = gpt2(layers=3)
    asked = []

    def only_odd(module, path):
        asked.append((type(module).__name__, path))
        return path != "transformer.h.1.mlp"

    keep1 = m.transformer.h[1].mlp
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10, filter_fn=only_odd, skip=["transformer.h.2"])
    assert asked == [("GPT2MLP", "transformer.h.0.mlp"), ("GPT2MLP", "transformer.h.1.mlp")]  # not the skipped
    assert [l.path for l in rep] == ["transformer.h.0.mlp"] and rep.skipped == ["transformer.h.2.mlp"]
    assert [(a.path, a.reason) for a in rep.left_alone] == [
        ("transformer.h.1.mlp", "filter_fn returned False for transformer.h.1.mlp")]
    assert m.transformer.h[1].mlp is keep1 and isinstance(m.transformer.h[0].mlp, RBEGPT2MLP)
    # BERT: asked about the intermediate half, under the report's path
    b = bert()
    asked.clear()
    rep = rbe_ffn.replace_mlp(b, block_size=8, k=10, filter_fn=lambda mod, p: asked.append((type(mod).__name__, p))
                              or p.startswith("encoder.layer.1"))
    assert asked == [("BertIntermediate", f"encoder.layer.{i}.intermediate") for i in range(2)]
    assert [l.path for l in rep] == ["encoder.layer.1.intermediate"]
    with pytest.raises(TypeError, match="filter_fn"):
        rbe_ffn.replace_mlp(gpt2(), block_size=8, k=10, filter_fn="transformer.h.0")


@pytest.mark.parametrize("model_fn", [gpt2, bert])
def test_structure_only_reload(tmp_path, model_fn, monkeypatch):
    """Convert, save (state_dict and rbe_ffn.save_safetensors), build the original model again, swap in RBE
    blocks of the right shapes without encoding, load: the same outputs."""
    m = model_fn()
    rbe_ffn.replace_mlp(m, block_size=16, k=30)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    rbe_ffn.save_safetensors(m, str(tmp_path / "m.safetensors"))
    x = ids()
    want = m(x)[0]

    def no_encoder(*a, **kw):
        raise AssertionError("encode=False ran the encoder")

    monkeypatch.setattr(rbe_ffn.modules, "compress", no_encoder)
    for load in ("pt", "safetensors"):
        fresh = model_fn(seed=5)
        rng = torch.get_rng_state()
        rep = rbe_ffn.replace_mlp(fresh, block_size=16, k=30, encode=False)
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
        assert len(rep) == 2 and all(l.error_fc1 is None and l.error_fc2 is None for l in rep)
        assert " - " in str(rep)
        assert not torch.equal(fresh(x)[0], want)
        if load == "pt":
            fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
        else:
            rbe_ffn.load_safetensors(fresh, str(tmp_path / "m.safetensors"))
        assert torch.equal(fresh(x)[0], want), load
    with pytest.raises(ValueError, match="encode=True"):
        rbe_ffn.replace_mlp(model_fn(), block_size=16, k=30, encode=False, distill=dict(inputs=x))
    with pytest.raises(TypeError, match="encode"):
        rbe_ffn.replace_mlp(model_fn(), block_size=16, k=30, encode="no")


def test_structure_only_keeps_shapes_dtype_and_options():
    m = seq_model(d=13, f=37, act=nn.SiLU(), dtype=torch.float32)
    m[1].mlp = nn.Sequential(nn.Linear(13, 37, bias=False), nn.ReLU(), nn.Linear(37, 13, bias=False))
    rbe_ffn.replace_mlp(m, block_size=8, k=5, encode=False, checkpoint=True)
    a, b = m[0].mlp, m[1].mlp
    assert (a.d_model, a.d_ff, a.activation, a.checkpoint, a.fc1.k, a.block_size) == (13, 37, "silu", True, 5, 8)
    assert a.fc1.bias is not None and b.fc1.bias is None and b.activation == "relu"
    assert a.fc1.coeffs.dtype == torch.float32
    assert not torch.equal(a.fc1.index, b.fc1.index)  # each block its own random init


# ----------------------------------------------------------------- meaning kept, or left alone
class TwoNames(nn.Module):
    """One MLP registered under two attribute names, used twice."""

    def __init__(self, mlp):
        super().__init__()
        self.a = mlp
        self.b = mlp

    def forward(self, x):
        return self.a(x) + 2 * self.b(x)


def test_mlp_under_two_names_is_one_block_at_both():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12)).double()
    m = nn.Sequential(TwoNames(mlp))
    ref = copy.deepcopy(m)
    rep = rbe_ffn.replace_mlp(m, block_size=4, k=16)  # lossless
    assert len(rep) == 1 and not rep.left_alone
    assert rep[0].path == "0.a" and rep[0].aliases == ("0.b",)
    assert isinstance(m[0].a, rbe_ffn.RBEFeedForward) and m[0].b is m[0].a
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x))
    assert "shared: 0.a is also at 0.b" in str(rep)
    # skipping either name skips the block (it is one module)
    m = nn.Sequential(TwoNames(copy.deepcopy(mlp)))
    rep = rbe_ffn.replace_mlp(m, block_size=4, k=16, skip=["0.b"])
    assert len(rep) == 0 and rep.skipped == ["0.a"] and m[0].a is m[0].b and isinstance(m[0].a, nn.Sequential)


def test_mlp_shared_by_two_layers_stays_shared():
    m = gpt2(layers=3)
    m.transformer.h[2].mlp = m.transformer.h[0].mlp
    ref = copy.deepcopy(m)
    x = ids()
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=64)  # lossless
    assert [(l.path, l.aliases) for l in rep] == [("transformer.h.0.mlp", ("transformer.h.2.mlp",)),
                                                  ("transformer.h.1.mlp", ())]
    h = m.transformer.h
    assert isinstance(h[0].mlp, RBEGPT2MLP) and h[2].mlp is h[0].mlp and h[1].mlp is not h[0].mlp
    torch.testing.assert_close(m(x).logits, ref(x).logits)
    # one set of parameters, trained by both uses
    m(x, labels=x).loss.backward()
    assert h[0].mlp.ffn.fc1.coeffs.grad is not None
    sd = m.state_dict()  # saved under both paths, as the dense model was
    assert torch.equal(sd["transformer.h.2.mlp.ffn.fc1.coeffs"], sd["transformer.h.0.mlp.ffn.fc1.coeffs"])
    # a shared parent (ALBERT-like) is one block too, reported with its other path
    b = bert(layers=2)
    b.encoder.layer[1] = b.encoder.layer[0]
    rep = rbe_ffn.replace_mlp(b, block_size=8, k=10)
    assert [(l.path, l.aliases) for l in rep] == [("encoder.layer.0.intermediate", ("encoder.layer.1.intermediate",))]
    assert isinstance(b.encoder.layer[1].intermediate, RBEBertIntermediate)


def test_tied_weights_left_alone():
    # a weight of the MLP also used by another module (same Parameter)
    m = seq_model()
    m.extra = nn.Linear(13, 37).double()
    m.extra.weight = m[0].mlp[0].weight
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10)
    assert [l.path for l in rep] == ["1.mlp"]
    (a,) = rep.left_alone
    assert a.path == "0.mlp" and "tied to extra.weight" in a.reason and "untie" in a.reason
    assert isinstance(m[0].mlp, nn.Sequential) and m.extra.weight is m[0].mlp[0].weight
    # the same storage under another Parameter object
    m = seq_model()
    m.extra = nn.Linear(37, 13, bias=False).double()
    m.extra.weight = nn.Parameter(m[1].mlp[2].weight.detach())
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10)
    assert [l.path for l in rep] == ["0.mlp"] and "tied to extra.weight" in rep.left_alone[0].reason
    # the two layers of the block tied to each other (square block)
    m = seq_model(d=16, f=16)
    m[0].mlp[2].weight = m[0].mlp[0].weight
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10)
    assert [l.path for l in rep] == ["1.mlp"] and "share a parameter" in rep.left_alone[0].reason


class OwnGELU(nn.GELU):
    """A GELU subclass that computes something else (quick_gelu)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RenamedGELU(nn.GELU):
    pass


def test_activation_subclass_with_own_forward_left_alone():
    m = seq_model(act=OwnGELU())
    m[1].mlp[1] = RenamedGELU()
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=64)
    assert [l.path for l in rep] == ["1.mlp"]  # a subclass that keeps nn.GELU's forward is nn.GELU
    (a,) = rep.left_alone
    assert a.path == "0.mlp" and "OwnGELU (a subclass of nn.GELU with its own forward)" in a.reason
    assert isinstance(m[0].mlp, nn.Sequential)
    for bad in (OwnGELU(), type("OwnReLU", (nn.ReLU,), {"forward": lambda self, x: x})()):
        with pytest.raises(ValueError, match="its own forward"):
            rbe_ffn.RBEFeedForward(8, 16, activation=bad, block_size=4, k=4)
    assert rbe_ffn.RBEFeedForward(8, 16, activation=RenamedGELU(), block_size=4, k=4).activation == "gelu"


def test_requires_grad_kept():
    m = gpt2(layers=2)
    m.transformer.h[0].mlp.requires_grad_(False)
    m.transformer.h[1].mlp.c_proj.bias.requires_grad_(False)
    rbe_ffn.replace_mlp(m, block_size=8, k=10)
    f0, f1 = m.transformer.h[0].mlp.ffn, m.transformer.h[1].mlp.ffn
    assert not any(p.requires_grad for p in f0.parameters())
    assert {n for n, p in f1.named_parameters() if not p.requires_grad} == {"fc2.bias"}
    # distillation still trains the frozen block (it is part of the conversion), then freezes it again
    m = seq_model(d=24, f=40)
    m[0].mlp.requires_grad_(False)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=12, distill=dict(inputs={"0.mlp": anisotropic(256, 24, 1)},
                                                                  steps=20, lr=3e-3, progress=False))
    assert rep["0.mlp"].best_step > 0
    assert not any(p.requires_grad for p in m[0].mlp.parameters())
    assert all(p.requires_grad for p in m[1].mlp.parameters())


def test_modules_with_hooks_left_alone():
    m = seq_model()
    calls = []
    m[0].mlp.register_forward_hook(lambda *a: calls.append("fwd"))
    m[1].mlp[0].register_forward_pre_hook(lambda *a: calls.append("pre"))
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10)
    assert len(rep) == 0
    reasons = {a.path: a.reason for a in rep.left_alone}
    assert "0.mlp has forward hook(s)" in reasons["0.mlp"]
    assert "1.mlp.0 has forward_pre hook(s)" in reasons["1.mlp"]
    m(torch.randn(2, 13, dtype=torch.float64))
    assert calls == ["fwd", "pre"]
    # hooks on a module the replacement keeps (GPT-2's dropout, BERT's LayerNorm) stay and are called
    g = gpt2(layers=1)
    g.transformer.h[0].mlp.dropout.register_forward_hook(lambda *a: calls.append("dropout"))
    assert len(rbe_ffn.replace_mlp(g, block_size=8, k=10)) == 1
    g(ids())
    assert calls[-1] == "dropout"
    b = bert(layers=1)
    b.encoder.layer[0].output.LayerNorm.register_forward_hook(lambda *a: calls.append("ln"))
    b.encoder.layer[0].output.dense.register_forward_hook(lambda *a: calls.append("dense"))
    rep = rbe_ffn.replace_mlp(b, block_size=8, k=10)
    assert len(rep) == 0 and "output.dense has forward hook(s)" in rep.left_alone[0].reason
    b2 = bert(layers=1)
    b2.encoder.layer[0].output.LayerNorm.register_forward_hook(lambda *a: calls.append("ln"))
    assert len(rbe_ffn.replace_mlp(b2, block_size=8, k=10)) == 1
    b2(ids())
    assert calls[-1] == "ln"


# ----------------------------------------------------------------- distillation
def test_capture_inputs_are_the_mlp_inputs():
    m = gpt2()
    seen = []
    hooks = [blk.ln_2.register_forward_hook(lambda mod, a, out: seen.append(out.reshape(-1, 40)))
             for blk in m.transformer.h]
    blocks, _ = _scan(m)
    x = ids(3, 7)
    got = _capture_inputs(m, blocks, x)
    for h in hooks:
        h.remove()
    assert set(got) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}
    assert torch.equal(got["transformer.h.0.mlp"], seen[0]) and torch.equal(got["transformer.h.1.mlp"], seen[1])
    # the same through a callable and through keyword arguments; training flags restored
    m.transformer.h[1].train()
    got2 = _capture_inputs(m, blocks, lambda model: model(input_ids=x))
    got3 = _capture_inputs(m, blocks, {"input_ids": x})
    assert torch.equal(got2["transformer.h.1.mlp"], seen[1]) and torch.equal(got3["transformer.h.0.mlp"], seen[0])
    assert m.transformer.h[1].training and not m.transformer.h[0].training


def anisotropic(n, d, seed):
    """Activations with very unequal variance per direction, as real hidden states have."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(99), dtype=torch.float64))
    scale = torch.logspace(0.5, -2, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale) @ q.T


def test_distill_activations_reduce_heldout_error():
    m = seq_model(d=24, f=40, act=nn.GELU())
    plain = copy.deepcopy(m)
    ref = copy.deepcopy(m)
    train = {"0.mlp": anisotropic(512, 24, 1), "1.mlp": anisotropic(512, 24, 2)}
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=12, distill=dict(inputs=train, steps=150, lr=3e-3, progress=False))
    rbe_ffn.replace_mlp(plain, block_size=8, k=12)
    for i, layer in enumerate(rep):
        assert layer.output_error_after < 0.8 * layer.output_error_before
        assert layer.distill_samples == round(512 * 0.8)
        x = anisotropic(256, 24, 10 + i)  # held out: never seen by the distillation
        y = ref[i].mlp(x)
        before, after = rel(plain[i].mlp(x), y), rel(m[i].mlp(x), y)
        assert before == pytest.approx(layer.output_error_before, rel=0.3)  # same distribution
        assert after < 0.8 * before
    s = str(rep)
    assert "out err before" in s and f"{rep[0].output_error_after:.4f}" in s
    # only the blocks given samples are distilled
    m = seq_model(d=24, f=40)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=12,
                              distill=dict(inputs={"1.mlp": train["1.mlp"]}, steps=5, progress=False))
    assert rep["0.mlp"].output_error_before is None and rep["1.mlp"].output_error_after is not None
    # samples of a skipped block are not used (and do not make the dict look like model arguments)
    m = seq_model(d=24, f=40)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=12, skip=["0.mlp"],
                              distill=dict(inputs={"0.mlp": train["0.mlp"]}, steps=5, progress=False))
    assert [l.path for l in rep] == ["1.mlp"] and rep[0].output_error_before is None


def test_distill_never_returns_a_worse_block():
    """At k = b*b the conversion is lossless; Adam steps can only move it away. The block keeps the
    converted parameters (bitwise) and the report says so: best step 0, the last step's error higher."""
    m = seq_model(d=24, f=40, act=nn.GELU())
    plain = copy.deepcopy(m)
    train = {"0.mlp": anisotropic(256, 24, 1), "1.mlp": anisotropic(256, 24, 2)}
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=64, distill=dict(inputs=train, steps=20, lr=1e-2, eval_every=5,
                                                                   progress=False))
    rbe_ffn.replace_mlp(plain, block_size=8, k=64)
    x = anisotropic(64, 24, 7)
    for i, layer in enumerate(rep):
        assert layer.output_error_after <= layer.output_error_before < 1e-12
        assert layer.best_step == 0 and layer.output_error_last > 1e-6
        assert torch.equal(m[i].mlp(x), plain[i].mlp(x))
        for (n, p), (_, q) in zip(m[i].mlp.named_parameters(), plain[i].mlp.named_parameters()):
            assert torch.equal(p, q), n
    assert "best step" in str(rep)
    with pytest.raises(ValueError, match="eval_every"):
        rbe_ffn.replace_mlp(seq_model(), block_size=8, k=5, distill=dict(inputs=train, eval_every=0))


def test_distill_keeps_the_best_step():
    """Lossy k: the kept parameters are those of the evaluated step with the lowest held-out error."""
    m = seq_model(d=24, f=40, act=nn.GELU())
    train = {"0.mlp": anisotropic(256, 24, 1)}
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=12, skip=["1.mlp"],
                              distill=dict(inputs=train, steps=40, lr=3e-2, eval_every=4, progress=False))
    layer = rep["0.mlp"]
    assert layer.best_step % 4 == 0 and layer.best_step > 0
    assert layer.output_error_after < layer.output_error_before
    assert layer.output_error_after <= layer.output_error_last


def test_distill_gpt2_from_model_inputs():
    m = gpt2(40, 72)
    ref = copy.deepcopy(m)
    x = ids(8, 16, seed=2)
    rep = rbe_ffn.replace_mlp(m, block_size=8, k=10, distill=dict(inputs=x, steps=100, lr=3e-3, progress=False))
    for layer in rep:
        assert layer.output_error_after < layer.output_error_before
        assert layer.distill_samples == 8 * 16 - round(0.2 * 8 * 16)
    # no gradient left behind on the converted parameters; the original model is what was captured
    assert all(p.grad is None for p in m.parameters())
    held = ids(4, 16, seed=3)
    plain = copy.deepcopy(ref)
    rbe_ffn.replace_mlp(plain, block_size=8, k=10)
    assert rel(m(held).logits, ref(held).logits) < rel(plain(held).logits, ref(held).logits)


# ----------------------------------------------------------------- packaging
def test_import_does_not_import_transformers():
    code = "import sys, rbe_ffn; assert 'transformers' not in sys.modules; print(rbe_ffn.replace_mlp.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "replace_mlp"
