"""Peak-memory measurement shared by the CPU benchmarks."""

from __future__ import annotations

import json
import os
import tempfile


def cpu_alloc_peak_mib(fn) -> float:
    """Peak bytes held by torch's CPU allocator that were allocated (and not yet freed) while fn() ran, from the
    profiler's memory events. Inputs allocated before the call and MKL-internal buffers are not counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    cur = peak = 0
    mem = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    for ev in sorted(mem, key=lambda e: e["ts"]):
        cur += ev["args"]["Bytes"]
        peak = max(peak, cur)
    return peak / 2**20
