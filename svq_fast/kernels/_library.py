"""torch.library registration shared by the fused ops: every fused op is a real torch op (`svq_fast::<name>`).

Why: an `autograd.Function` that calls a native or Triton kernel is opaque to `torch.compile` (no fake/meta kernel,
so dynamo graph-breaks around it, and inductor cannot fuse the torch code on either side). Registered ops have a
schema, a fake kernel (shapes and dtypes only, used for tracing), an autograd formula (`register_autograd`, whose
backward is itself a registered op), and pass `torch.library.opcheck` (tests/kernels/test_library.py).

Two kinds:
- `custom_op`: the native CPU ops and the torch-only paths. Opaque to inductor (it calls them as extern kernels)
  but traceable with no graph break.
- `triton_op` (`define_triton_op`): the Triton paths on a GPU build. Compile traces *into* the launcher, so inductor
  sees each `wrap_triton` kernel launch and the torch ops around it (norms, sorts, allocations) and can fuse them.
  Its fake kernel is the launcher itself. Under `TRITON_INTERPRET=1` (the CPU tests) the kernels are interpreted
  Python functions that cannot run on fake tensors, so the same launcher is registered as a `custom_op` with an
  explicit fake kernel instead: eager results are the same either way, only what inductor can see differs.

Launchers call `launch(kernel)[grid](...)`: the kernel itself when nothing traces (eager: bit-for-bit the launch
before registration), `wrap_triton(kernel)` while a compile / fake-tensor trace runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

NAMESPACE = "svq_fast"

try:
    from torch.library import triton_op as _triton_op
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - torch < 2.6
    _triton_op = _wrap_triton = None

HAS_TRITON_OP = _triton_op is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def tracing() -> bool:
    """True while torch.compile / make_fx / a fake-tensor trace runs (the tensors are not real)."""
    from torch._guards import detect_fake_mode

    return torch.compiler.is_compiling() or detect_fake_mode() is not None


def launch(kernel):
    """The Triton kernel to index with a grid: wrap_triton(kernel) while tracing (so the launch enters the graph),
    the kernel itself otherwise (eager launches are exactly the unregistered ones)."""
    if _wrap_triton is not None and tracing() and not _interpreting():
        return _wrap_triton(kernel)
    return kernel


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


IMPLS: dict[str, Callable] = {}  # qualified name -> the Python implementation of each define_op op


def define_op(name: str, fn: Callable, fake: Callable, *, mutates_args: Iterable[str] = ()):
    """custom_op `svq_fast::name` with implementation fn (annotated: the schema is inferred) and fake kernel."""
    IMPLS[qualname(name)] = fn
    op = torch.library.custom_op(qualname(name), fn, mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    return op


def define_triton_op(name: str, fn: Callable, fake: Callable):
    """Triton-backed op: triton_op on a GPU build (fn is the fake kernel too), custom_op + fake under the
    interpreter or on a torch without triton_op. fn must not mutate its inputs."""
    if HAS_TRITON_OP and not _interpreting() and _has_triton():
        return _triton_op(qualname(name), fn, mutates_args=())
    return define_op(name, fn, fake)
