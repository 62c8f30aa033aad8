"""RBEFeedForward against the independent test vectors (tests/data/rbe_cases.json, "ffn").

The vectors pin the conventions (DCT scaling, u/v order, block order, weight
orientation, activation definitions) that a self-consistent implementation can
still get wrong. Checked for the standard, checkpointed and chunked variants,
in float64 (1e-12) and float32 (1e-5 relative), on every device in conftest.DEVICES (the module
is built on the CPU and moved, as a user would).
"""
import pytest
import torch

import rbe_ffn
from rbe_ffn.modules import DEFAULT_CHUNK_TOKENS

import ffn_reference as R
from conftest import TOL, limit_for_chunk

CASES = R.load_cases()["ffn"]
ACTS = [c["activation"] for c in CASES]


def test_vectors_cover_every_activation():
    assert sorted(ACTS) == ["gelu", "gelu_tanh", "relu", "silu"]


def t64(v):
    return torch.tensor(v, dtype=torch.float64)  # torch.tensor(list) would default to float32


def build(case, dtype, checkpoint, chunk):
    m = rbe_ffn.RBEFeedForward(case["d_model"], case["d_ff"], case["activation"], block_size=case["block_size"],
                               k=case["k"], checkpoint=checkpoint, dtype=torch.float64,
                               parametrization="plain")  # the vectors' gradients are the format numbers' 
    with torch.no_grad():
        for lin, key in ((m.fc1, "fc1"), (m.fc2, "fc2")):
            lin.basis.copy_(t64(case[key]["basis"]))
            lin.coeffs.copy_(t64(case[key]["coeffs"]))
            lin.bias.copy_(t64(case[key]["bias"]))
            idx = torch.tensor(case[key]["index"], dtype=torch.int64)
            assert idx.min() >= 0 and idx.max() < case["block_size"] ** 2
            lin.index.copy_(idx.to(lin.index.dtype))  # int16 at b <= 128
    m = m.to(dtype)  # float32 cases: the plan must follow (rebuilt for float32, not cast)
    if chunk:
        m.memory_limit_mb = limit_for_chunk(m, chunk)
        assert m.chunk_tokens() == chunk
    else:  # all tokens at once (the default chunk is far above these 6 tokens)
        assert m.chunk_tokens() == DEFAULT_CHUNK_TOKENS
    return m


def assert_matches(got, want, tol, what):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")
    assert R.rel_err(got, want) < tol, what


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("chunk", [0, 1, 4], ids=["whole", "chunk1", "chunk4"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["standard", "checkpoint"])
@pytest.mark.parametrize("case", CASES, ids=ACTS)
def test_ffn_vectors(case, checkpoint, chunk, dtype, device):
    m = build(case, dtype, checkpoint, chunk).to(device)
    x = t64(case["x"]).to(dtype).to(device)
    dy = t64(case["dy"]).to(dtype).to(device)
    assert x.shape == (2, 3, case["d_model"])
    if chunk:
        assert chunk < x.shape[0] * x.shape[1]
    params = [m.get_parameter(n) for n in R.PARAM_NAMES]
    y, grads = R.grads_of(m, x, params, dy)
    assert y.dtype == dtype and y.shape == x.shape and y.device.type == device
    tol = TOL[dtype]
    assert_matches(y.cpu(), t64(case["y"]).to(dtype), tol, "y")
    for name, g in zip(("x",) + R.PARAM_NAMES, grads):
        assert g is not None, name
        assert_matches(g.cpu(), t64(case["grad"][name]).to(dtype), tol, f"d/d{name}")


def test_decode_operator_matches_vectors(device):
    """torch.ops.rbe_ffn.decode itself (not the module) against the "decode" vectors, in float64."""
    for case in R.load_cases()["decode"]:
        b = case["block_size"]
        idx = torch.tensor(case["index"]).to(torch.int32 if b > 128 else torch.int16)
        w = torch.ops.rbe_ffn.decode(t64(case["basis"]).to(device), t64(case["coeffs"]).to(device), idx.to(device),
                                     case["out"], case["in"], b)
        assert_matches(w.cpu(), t64(case["weight"]), 1e-12, "decode")


def test_reference_matches_vectors():
    """The test-side reference (ffn_reference.py) itself reproduces the vectors, so the
    comparisons in the other test files stand on the same conventions."""
    for case in CASES:
        fc = {}
        for key in ("fc1", "fc2"):
            fc[key] = [t64(case[key]["basis"]).requires_grad_(), t64(case[key]["coeffs"]).requires_grad_(),
                       torch.tensor(case[key]["index"]), t64(case[key]["bias"]).requires_grad_()]
        params = [fc["fc1"][0], fc["fc1"][1], fc["fc1"][3], fc["fc2"][0], fc["fc2"][1], fc["fc2"][3]]
        y, grads = R.grads_of(lambda x: R.ffn(x, fc["fc1"], fc["fc2"], case["d_model"], case["d_ff"],
                                              case["block_size"], case["activation"]),
                              t64(case["x"]), params, t64(case["dy"]))
        assert_matches(y, t64(case["y"]), 1e-12, "ref y")
        for name, g in zip(("x",) + R.PARAM_NAMES, grads):
            assert_matches(g, t64(case["grad"][name]), 1e-12, f"ref d/d{name}")


def test_reference_decode_matches_vectors():
    for case in R.load_cases()["decode"]:
        w = R.decode(t64(case["basis"]), t64(case["coeffs"]), torch.tensor(case["index"]), case["out"], case["in"],
                     case["block_size"])
        assert_matches(w, t64(case["weight"]), 1e-12, "decode")
