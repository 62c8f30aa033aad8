"""Memory behaviour of the feed-forward operator: what it saves for backward, that the
memory limit bounds every allocation of a training step, and that no dense copy of
W1 or W2 is ever made.

Allocations are measured independently of the extension with torch.profiler
(profile_memory=True): every individual CPU allocation appears in the profiler's
event tree as an Allocation event with its size; `test_allocation_probe_sees_sizes`
checks that the probe reports what it should.
"""
import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import rbe_ffn
from rbe_ffn._profiling import peak_live_bytes
from rbe_ffn.functional import SCHED_BYTES_PER_COEFF, intermediate_bytes_per_token
from rbe_ffn.modules import DEFAULT_CHUNK_TOKENS

from conftest import make_ffn

MiB = 2**20


def allocations(fn):
    """Sizes (bytes) of every allocation made while fn() runs, largest first, with the op that made it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    found, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.alloc_size > 0:
            names, p = [], e.parent
            while p is not None:
                names.append(p.name)
                p = p.parent
            found.append((e.extra_fields.alloc_size, "/".join(reversed(names))))
        stack.extend(e.children)
    return sorted(found, reverse=True)


def largest_allocation(fn) -> int:
    a = allocations(fn)
    return a[0][0] if a else 0


def test_allocation_probe_sees_sizes():
    def f():
        a = torch.empty(1000, 1000)  # 4 MB
        del a
        torch.ones(300, 1000)

    sizes = [s for s, _ in allocations(f)]
    assert sizes[0] == 4_000_000 and 1_200_000 in sizes
    # allocations made inside a C++ operator are seen too: decode builds a dense matrix
    lin = rbe_ffn.RBELinear(300, 200, block_size=16, k=10)
    assert largest_allocation(lambda: lin.dense_weight()) == 200 * 300 * 4


# ----------------------------------------------------------------- saved tensors
def saved_bytes(m, x):
    """Bytes of the tensors autograd saves in m(x), excluding m's own parameters, buffers and plans."""
    plans = [lin.plan for lin in m.modules() if isinstance(lin, rbe_ffn.RBELinear)]
    own = {t.data_ptr() for t in list(m.parameters()) + list(m.buffers()) + plans}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    extra = [t for t in saved if t.numel() > 0 and t.data_ptr() not in own]
    return y, extra, sum(t.numel() * t.element_size() for t in extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory_limit_mb", [None, 0.05])
def test_saved_tensors(dtype, memory_limit_mb):
    m = make_ffn(40, 150, "gelu", 16, 20, memory_limit_mb=memory_limit_mb).to(dtype)
    x = torch.randn(3, 70, 40, dtype=dtype, requires_grad=True)
    tokens, itemsize = 3 * 70, x.element_size()

    m.checkpoint = True
    y, extra, nbytes = saved_bytes(m, x)
    assert nbytes == x.numel() * itemsize, [tuple(t.shape) for t in extra]
    assert len(extra) == 1 and extra[0].data_ptr() == x.data_ptr()  # the input itself, not a copy
    y.sum().backward()

    m.checkpoint = False
    y, extra, nbytes = saved_bytes(m, x)
    # standard: the [T, d_ff] pre-activation, or act' of it and fc2's analysed input (whole tiles of
    # 64 tokens, ceil(d_ff / b) segments of b + nf rows) where the operator saves that instead; act'
    # in tiles (ceil(d_ff / b) segments of b rows) where ffn_pre_in_tiles says so
    hidden, pre = 0, tokens * 150 * itemsize
    if rbe_ffn._C.ffn_saves_hidden(tokens, m.chunk_tokens(), "gelu"):
        hidden = -(-tokens // 64) * -(-150 // 16) * m.fc1.plan.shape[1] * 64 * itemsize
        if rbe_ffn._C.ffn_pre_in_tiles(dtype == torch.float32, False):
            pre = -(-tokens // 64) * -(-150 // 16) * 16 * 64 * itemsize
    assert (memory_limit_mb is None) == (hidden > 0)  # chunks of 128 tokens; of fewer than a tile
    assert nbytes == x.numel() * itemsize + pre + hidden, [tuple(t.shape) for t in extra]
    y.sum().backward()


def test_checkpointed_saves_no_token_by_d_ff_tensor(device):
    m = make_ffn(64, 256, "gelu", 16, 30, checkpoint=True, random_bias=True).to(device)
    x = torch.randn(128, 64, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x).sum().backward()
    big = [tuple(t.shape) for t in saved if t.numel() >= 128 * 256]
    assert big == [], f"a [T, d_ff] tensor was saved: {big}"


def test_saved_tensors_without_input_grad():
    # parameter gradients still need x; nothing else is kept
    m = make_ffn(40, 150, "gelu", 16, 20, checkpoint=True)
    x = torch.randn(5, 40)
    _, extra, nbytes = saved_bytes(m, x)
    assert nbytes == x.numel() * 4


# ----------------------------------------------------------------- the memory limit
def test_memory_limit_bounds_training_step():
    """32 x 512 tokens at 1024 -> 4096 (b=64, k=300, float32), checkpointed, memory_limit_mb=64:
    no single allocation of forward + backward exceeds 64 MiB (the output and the input
    gradient are exactly x's size, 64 MiB, and are the largest); without a limit the
    forward alone allocates far more."""
    limit = 64
    m = make_ffn(1024, 4096, "gelu", 64, 300, checkpoint=True, memory_limit_mb=limit)
    chunk = m.chunk_tokens()
    assert 0 < chunk < 32 * 512
    x = torch.randn(32, 512, 1024, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        m(x).backward(dy)

    allocs = allocations(step)
    print("largest allocations with the limit (MiB):", [(round(s / MiB, 2), n.split("/")[-2:]) for s, n in allocs[:6]])
    assert allocs[0][0] <= limit * MiB
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())

    m.memory_limit_mb, m.checkpoint = None, False  # (checkpointed blocks chunk by default)
    # forward with grad: the standard block keeps the [T, d_ff] pre-activation for backward (with
    # grad disabled it does not write it)
    big = largest_allocation(lambda: m(x))
    print(f"largest allocation without a limit (standard mode, forward only): {big / MiB:.1f} MiB")
    assert big > limit * MiB


def step_transients(m, x, dy) -> int:
    """Peak live bytes of a training step of m on x (after a warm-up step) beyond what lies outside
    any chunk budget: the input and its gradient, the parameter gradients, and the operator's
    private validated copies of the two index tensors (weight-sized, not token-sized)."""

    def step():
        x.grad = None
        for p in m.parameters():
            p.grad = None
        m(x).backward(dy)

    step()
    peak = peak_live_bytes(step)
    outside = (2 * x.numel() * x.element_size() + sum(p.numel() * p.element_size() for p in m.parameters())
               + sum(lin.index.numel() * lin.index.element_size() for lin in (m.fc1, m.fc2)))
    print(f"peak live {peak / MiB:.1f} MiB, of which transients {(peak - outside) / MiB:.1f} MiB")
    return peak - outside


def test_memory_limit_bounds_live_transients_of_a_step():
    """Checkpointed and chunked, the transient buffers alive together in a training step (beyond
    the output, the input gradient and the parameter gradients) stay under memory_limit_mb,
    not just each allocation on its own."""
    limit = 16
    m = make_ffn(1024, 4096, "gelu", 64, 300, checkpoint=True, memory_limit_mb=limit)
    assert 0 < m.chunk_tokens() < 4096
    assert step_transients(m, torch.randn(4096, 1024, requires_grad=True), torch.randn(4096, 1024)) <= limit * MiB


def test_checkpointed_default_chunks_bound_live_transients_of_a_step():
    """Without memory_limit_mb a block processes DEFAULT_CHUNK_TOKENS tokens at a time; checkpointed,
    the transients alive together in a step are those of one chunk plus the schedules kept for the
    call, not the [T, d_ff] activations of all tokens (which the standard mode holds)."""
    m = make_ffn(768, 3072, "gelu", 64, 300, checkpoint=True)
    assert m.chunk_tokens() == DEFAULT_CHUNK_TOKENS
    nf = m.fc1.plan.shape[1] - 64
    kept = m.fc1.coeffs.numel() + m.fc2.coeffs.numel()
    bound = DEFAULT_CHUNK_TOKENS * intermediate_bytes_per_token(768, 3072, 64, nf, 4) + SCHED_BYTES_PER_COEFF * kept
    assert bound < 2048 * 3072 * 4  # below the [T, d_ff] activations of all 2048 tokens (24 MiB)
    assert step_transients(m, torch.randn(2048, 768, requires_grad=True), torch.randn(2048, 768)) <= bound


def test_memory_limit_standard_mode_backward():
    """Standard mode saves the [T, d_ff] pre-activation in forward (by design); the backward
    must not allocate anything of that size again (chunked buffers only)."""
    m = make_ffn(64, 512, "gelu", 16, 20)
    nf = m.fc1.plan.shape[1] - 16
    per = intermediate_bytes_per_token(64, 512, 16, nf, 4)
    sched = SCHED_BYTES_PER_COEFF * (m.fc1.coeffs.numel() + m.fc2.coeffs.numel())  # kept for the whole call
    m.memory_limit_mb = (128.5 * per + sched) / MiB
    assert m.chunk_tokens() == 128
    x = torch.randn(4, 256, 64, requires_grad=True)
    pre_bytes = 1024 * 512 * 4
    y = m(x)
    allocs = allocations(lambda: y.backward(torch.ones_like(y)))
    big = [(s, n) for s, n in allocs if s >= pre_bytes // 2]
    assert not big, big
    assert allocs[0][0] <= m.memory_limit_mb * MiB


# ----------------------------------------------------------------- no dense weights
@pytest.mark.parametrize("checkpoint", [False, True])
def test_no_dense_weight_in_forward_or_backward(checkpoint):
    m = make_ffn(768, 3072, "gelu", 64, 300, checkpoint=checkpoint)
    x = torch.randn(8, 768, requires_grad=True)
    dense = 768 * 3072 * 4

    def step():
        m(x).sum().backward()

    big = largest_allocation(step)
    assert big < dense, f"largest allocation {big} bytes >= one dense weight ({dense})"
    assert big < dense / 4


def test_no_dense_weight_linear():
    lin = rbe_ffn.RBELinear(768, 3072, block_size=64, k=300)
    x = torch.randn(8, 768, requires_grad=True)
    big = largest_allocation(lambda: lin(x).sum().backward())
    assert big < 768 * 3072 * 4 / 4
