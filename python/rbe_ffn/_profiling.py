"""Measuring transient memory on the CPU (benchmarks, tests and examples share this)."""
from __future__ import annotations

import os

# Kineto (torch.profiler's backend) logs at levels VERBOSE=0 .. ERROR=4 and USDT=5 with a
# threshold read from KINETO_LOG_LEVEL once, when the profiler first starts; its default prints
# "USDT: ... profiler_start" / "profiler_stop" lines on every profile. 6 keeps all of them quiet.
_QUIET_KINETO = "6"


def peak_live_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator while fn() runs, above the
    level at its start: the profiler's memory events, replayed in time order. It relies on
    torch.profiler's event tree (kineto results), a torch-internal interface.

    The profiler's own log lines are silenced (KINETO_LOG_LEVEL, unless the caller set it, for the
    first profile of the process, when kineto reads it; the environment is restored afterwards)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    unset = "KINETO_LOG_LEVEL" not in os.environ
    if unset:
        os.environ["KINETO_LOG_LEVEL"] = _QUIET_KINETO
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        if unset:
            os.environ.pop("KINETO_LOG_LEVEL", None)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def peak_call_bytes(fn, params=()) -> int:
    """peak_live_bytes of one fn() after one unmeasured call, the gradients of `params` freed in
    between (so a training step allocates them again, as a step after zero_grad(set_to_none=True)
    does; freeing them inside the profile would also make it warn of blocks it did not see
    allocated)."""
    fn()
    for p in params:
        p.grad = None
    return peak_live_bytes(fn)
