"""Counting device-to-host reads: the calls that make the CPU wait for the GPU (`.item()`, `float(t)`, `bool(t)`,
`.tolist()`, `nonzero`, `equal`, data-dependent shapes).

On a GPU every such read drains the launch queue: the host stops queueing kernels until the device has caught up, so
a step with dozens of them runs at the speed of its slowest round trip. They can be counted without a GPU: every
one of them reaches the dispatcher as one of the ops in `HOST_READ_OPS`, also on CPU tensors. Counting over two
runs of different length and dividing the difference by the extra steps gives the reads per step (start-up, the
first step's one-off checks and the final checkpoint cancel out). Tests hold the training step to a budget with it
(tests/train/test_host_reads.py); `HostReadCounter(traces=True)` records where each read came from.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from svq_fast.kernels._library import IMPLS

# ops whose result the host must see: the scalar read behind .item() / float() / bool() / int() / .tolist(), and the
# ops whose output shape depends on the data
HOST_READ_OPS = {
    "aten::_local_scalar_dense",
    "aten::item",  # seen as itself (not its _local_scalar_dense) inside a custom op's body
    "aten::nonzero",
    "aten::equal",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::masked_select",
    "aten::bincount",
}


class HostReadCounter(TorchDispatchMode):
    """Counts HOST_READ_OPS dispatched in this thread while active (`count`); with traces=True also where from
    (`sites`: Counter of the innermost svq_fast / recipes frame)."""

    def __init__(self, traces: bool = False):
        super().__init__()
        self.count = 0
        self.traces = traces
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_READ_OPS:
            self.count += 1
            if self.traces:
                self.sites[f"{name} at {_site()}"] += 1
        impl = IMPLS.get(name)
        if impl is not None:  # a svq_fast custom op: run its Python body with this mode on again, to count inside it
            include = torch._C._dispatch_tls_local_include_set()
            exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.Python)
            with torch._C._ForceDispatchKeyGuard(include, exclude), self:
                return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _site() -> str:
    """The innermost frame of this project (or DeepSpeed) that led to the read: 'path:line (function)'."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if any(part in frame.filename for part in ("svq_fast/", "recipes/", "deepspeed/")) and (
            "host_reads.py" not in frame.filename
        ):
            return f"{frame.filename.split('/site-packages/')[-1]}:{frame.lineno} ({frame.name})"
    return "outside the project"
