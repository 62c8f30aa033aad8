"""Measuring transient memory on the CPU (benchmarks, tests and examples share this)."""
from __future__ import annotations


def peak_live_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator while fn() runs, above the
    level at its start: the profiler's memory events, replayed in time order. It relies on
    torch.profiler's event tree (kineto results), a torch-internal interface."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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
