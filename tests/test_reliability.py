"""Issue #14 (reliability): every call either computes the right answer or raises an error
that says what is unsupported and what to do; never uninitialized memory, a silent zero
derivative, a state leaking between modules, an unverified checkpoint or an inf result."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import rbe_ffn

from conftest import join_safetensors, make_linear, make_small_ffn, split_safetensors

ops = torch.ops.rbe_ffn


# ----------------------------------------------------------------- 2. meta tensors
@pytest.mark.parametrize("kind", ["ffn", "linear"])
def test_meta_init_then_load_state_dict_assign(kind):
    ref = make_small_ffn() if kind == "ffn" else make_linear()
    with torch.device("meta"):
        m = rbe_ffn.RBEFeedForward(10, 37, "gelu", block_size=8, k=5) if kind == "ffn" else \
            rbe_ffn.RBELinear(10, 12, block_size=8, k=5)
    m.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(4, 10, requires_grad=True)
    y = m(x)
    assert torch.equal(y, ref(x)) and torch.equal(m(x), y)  # not uninitialized memory
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("k", [5, 0])  # k = 0: the init's pattern scale used to call .item() on meta
def test_meta_device_context_to_empty_then_load(k):
    ref = rbe_ffn.RBEFeedForward(10, 37, "gelu", block_size=8, k=k)
    with torch.device("meta"):
        m = rbe_ffn.RBEFeedForward(10, 37, "gelu", block_size=8, k=k)
    m.to_empty(device="cpu")
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 10)
    assert torch.equal(m(x), ref(x))


@pytest.mark.parametrize("left", ["bias", "index"])
def test_tensor_left_on_meta_raises(left):
    ref = make_small_ffn()
    sd = {k: v for k, v in ref.state_dict().items() if k != f"fc1.{left}"}
    with torch.device("meta"):
        m = rbe_ffn.RBEFeedForward(10, 37, "gelu", block_size=8, k=5)
    m.load_state_dict(sd, assign=True, strict=False)  # fc1.<left> stays on meta
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=rf"{left}1? is on meta but x is on cpu.*meta device holds no values"):
        m(x)
    with pytest.raises(ValueError, match=rf"{left} is on meta but x is on cpu"):
        m.fc1(x)


def test_operators_refuse_a_meta_tensor_among_real_ones():
    lin = make_linear()
    x = torch.randn(3, 10)
    args = [x, lin.plan, lin.basis, lin.coeffs, lin.index, lin.bias, 10, 12]
    for i, name in ((1, "plan"), (2, "basis"), (5, "bias")):
        bad = list(args)
        bad[i] = bad[i].to("meta")
        with pytest.raises(ValueError, match=f"rbe_ffn.linear: {name} is on meta but x is on cpu"):
            ops.linear(*bad)
    with pytest.raises(ValueError, match="rbe_ffn.decode: coeffs is on meta"):
        ops.decode(lin.basis, lin.coeffs.to("meta"), lin.index, 12, 10, 8)
    # all on meta is shape inference, as before
    assert ops.linear(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]).shape == (3, 12)


# ----------------------------------------------------------------- 3. derivatives beyond first-order reverse mode
def _fn(kind):
    if kind == "ffn":
        return make_small_ffn(), 10
    if kind == "linear":
        return make_linear(), 10
    return (lambda z: ops.activation(z, "gelu")), 10


KINDS = ["ffn", "linear", "activation"]
FORWARD_MODE = "forward-mode automatic differentiation .* is not supported"
DOUBLE = "double backward .* is not supported"
FUNC = "torch.func gradient transforms .* are not supported"


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_raises(kind):
    f, d = _fn(kind)
    x, v = torch.randn(3, d), torch.randn(3, d)
    with pytest.raises(NotImplementedError, match=FORWARD_MODE):
        torch.func.jvp(f, (x,), (v,))
    with pytest.raises(NotImplementedError, match=FORWARD_MODE):
        torch.func.jacfwd(f)(x[0])
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=FORWARD_MODE):
        f(fwAD.make_dual(x, v))


@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_raises(kind):
    f, d = _fn(kind)
    x, v = torch.randn(3, d), torch.randn(3, d)
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.functional.hvp(lambda z: f(z).pow(2).sum(), x, v)
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.functional.hessian(lambda z: f(z).pow(2).sum(), x[:1])
    z = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(z).pow(2).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.grad(g.sum(), z, allow_unused=True)
    # first order is unaffected, also with create_graph=True
    z2 = x.clone().requires_grad_()
    (g2,) = torch.autograd.grad(f(z2).pow(2).sum(), z2)
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("kind", KINDS)
def test_func_transforms_say_what_is_unsupported(kind):
    f, d = _fn(kind)
    x = torch.randn(3, d)
    with pytest.raises(NotImplementedError, match=FUNC):
        torch.func.grad(lambda z: f(z).sum())(x)
    with pytest.raises(NotImplementedError, match=FUNC):
        torch.func.jacrev(f)(x[0])
    if kind != "activation":  # per-sample gradients of the parameters
        params = {k: p.detach() for k, p in f.named_parameters()}
        loss = lambda p, z: torch.func.functional_call(f, p, (z,)).sum()  # noqa: E731
        with pytest.raises(NotImplementedError, match=FUNC):
            torch.func.vmap(torch.func.grad(loss), (None, 0))(params, x)


@pytest.mark.parametrize("kind", ["ffn", "linear"])
def test_vmap_forward_works(kind):
    f, d = _fn(kind)
    x = torch.randn(3, d)
    torch.testing.assert_close(torch.func.vmap(f)(x), torch.stack([f(r) for r in x]))


# ----------------------------------------------------------------- 4. no process-wide shared plan
def test_module_built_in_inference_mode_does_not_break_later_training():
    with torch.inference_mode():
        a = make_linear(block_size=11)  # first use of block size 11 in the process
        a(torch.randn(2, 10))
    b = make_linear(block_size=11)
    x = torch.randn(2, 10, requires_grad=True)
    b(x).sum().backward()  # used to fail: "Inference tensors cannot be saved for backward"
    assert b.coeffs.grad is not None and not b.plan.is_inference()


def test_module_built_under_fake_tensor_mode_does_not_leak():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    with FakeTensorMode():
        fake = rbe_ffn.RBELinear(10, 12, block_size=13, k=5)  # first use of block size 13
        assert isinstance(fake.plan, FakeTensor)
    real = make_linear(block_size=13)
    assert not isinstance(real.plan, FakeTensor)
    x = torch.randn(3, 10)
    torch.testing.assert_close(real(x), x @ real.dense_weight().T + real.bias, rtol=1e-5, atol=1e-5)


def test_inplace_edit_of_one_plan_changes_no_other_module():
    a, b = make_linear(), make_linear()
    x = torch.randn(3, 10)
    yb = b(x)
    with torch.no_grad():
        a.plan.mul_(2.0)
    assert a.plan.data_ptr() != b.plan.data_ptr()
    assert torch.equal(b(x), yb)
    assert torch.equal(make_linear()(x), yb)
    p = rbe_ffn.get_plan(8, torch.float32, "cpu")
    p.zero_()  # a caller's copy
    assert rbe_ffn.get_plan(8, torch.float32, "cpu").abs().sum() > 0


def test_plan_is_not_a_buffer_and_follows_the_parameters():
    m = make_small_ffn()
    assert not any("plan" in n for n, _ in m.named_buffers())  # DDP would broadcast it every step
    m.double()
    assert m.fc1.plan.dtype == torch.float64
    assert torch.equal(m.fc1.plan, rbe_ffn.get_plan(8, torch.float64, "cpu"))


# ----------------------------------------------------------------- 6. checkpoints
@pytest.mark.parametrize("drop", ["all", "one"])
def test_missing_checksums_are_an_error_unless_opted_out(saved, tmp_path, drop):
    m, path = saved
    header, body = split_safetensors(path.read_bytes())
    rec = json.loads(header["__metadata__"]["rbe_ffn"])
    if drop == "all":
        rec["sha256"] = {}
    else:
        del rec["sha256"]["fc1.coeffs"]
    header["__metadata__"]["rbe_ffn"] = json.dumps(rec)
    off = header["fc1.coeffs"]["data_offsets"][0]
    body = bytearray(body)
    body[off] ^= 1  # a flipped bit in a coefficient: still a valid finite float
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(join_safetensors(header, bytes(body)))
    target = make_small_ffn(seed=1)
    with pytest.raises(ValueError, match=r"no SHA-256 sum for tensor\(s\) \[.*'fc1.coeffs'.*require_checksums=False"):
        rbe_ffn.load_safetensors(target, bad)
    assert torch.equal(target.fc1.coeffs, make_small_ffn(seed=1).fc1.coeffs)  # untouched
    rbe_ffn.load_safetensors(target, bad, require_checksums=False)  # explicit opt-out
    assert not torch.equal(target.fc1.coeffs, m.fc1.coeffs)


_FIFO_SCRIPT = """
import sys, rbe_ffn
m = rbe_ffn.RBEFeedForward(10, 37, block_size=8, k=5)
for f in (rbe_ffn.load_safetensors, rbe_ffn.save_safetensors):
    try:
        f(m, sys.argv[1])
        print("no error")
    except Exception as e:
        print(type(e).__name__, e)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_path_is_refused_not_waited_on(tmp_path):
    # in a subprocess: opening a FIFO blocks (holding the GIL) until a writer/reader comes
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    try:
        out = subprocess.run([sys.executable, "-c", _FIFO_SCRIPT, str(fifo)], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()
    except subprocess.TimeoutExpired:
        pytest.fail("load_safetensors/save_safetensors blocked on a FIFO")
    assert len(out) == 2, out
    for line in out:
        assert line.startswith("ValueError") and "is a FIFO (named pipe), not a regular file" in line, line


def test_directory_path_is_a_clear_error(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        rbe_ffn.load_safetensors(make_small_ffn(), tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        rbe_ffn.save_safetensors(make_small_ffn(), tmp_path)


# ----------------------------------------------------------------- 7. no inf coefficients from finite weights
def test_compress_near_dtype_max_raises():
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(16, 16, generator=g) * 2 - 1) * 3e38  # finite float32
    with pytest.raises(ValueError, match="overflow torch.float32.*weight.double"):
        rbe_ffn.compress(w, 8, 5)
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.copy_(w)
    with pytest.raises(ValueError, match="overflow"):
        rbe_ffn.RBELinear.from_linear(lin, 8, 5)
    big64 = torch.randn(16, 16, generator=g, dtype=torch.float64) * 1e200  # squared error overflows float64
    with pytest.raises(ValueError, match="squared error of the encoding overflows float64"):
        rbe_ffn.compress(big64, 8, 5)
    cw = rbe_ffn.compress(w.double(), 8, 5)  # float64 holds these coefficients
    assert torch.isfinite(cw.coeffs).all() and math.isfinite(cw.relative_error)


# ----------------------------------------------------------------- 8. arguments
@pytest.mark.parametrize("value, err", [(float("inf"), ValueError), (float("nan"), ValueError), (0, ValueError),
                                        (-1.0, ValueError), (True, TypeError), ("64", TypeError),
                                        (torch.tensor(64.0), TypeError)])
def test_memory_limit_validated_everywhere(value, err):
    with pytest.raises(err, match="memory_limit_mb must be a positive"):
        rbe_ffn.RBEFeedForward(10, 37, block_size=8, k=5, memory_limit_mb=value)
    with pytest.raises(err, match="memory_limit_mb must be a positive"):
        rbe_ffn.RBEFeedForward.from_linears(nn.Linear(10, 37), nn.Linear(37, 10), block_size=8, k=5,
                                            memory_limit_mb=value)
    m = make_small_ffn()
    with pytest.raises(err, match="memory_limit_mb must be a positive"):
        m.memory_limit_mb = value
    assert m.memory_limit_mb is None


def test_huge_memory_limit_means_no_chunking():
    m = make_small_ffn(memory_limit_mb=1e300)
    x = torch.randn(5, 10)
    assert torch.equal(m(x), make_small_ffn()(x))
