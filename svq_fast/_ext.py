"""The one place that imports the native extension svq_fast._C.

The extension registers its ops with TORCH_LIBRARY under the `svq_fast` namespace, so callers use
`native_ops().vq_forward(...)` (i.e. torch.ops.svq_fast.*). When the import fails (built with
SVQ_FAST_NO_EXT=1, no compiler, ABI mismatch), the reason is recorded and a warning is issued once;
dispatchers then fall back to Triton or the torch reference.
"""

from __future__ import annotations

import warnings

_loaded: bool | None = None
_error: str | None = None
_warned = False


def _try_load() -> bool:
    global _loaded, _error
    if _loaded is None:
        try:
            import torch  # noqa: F401  (the extension links against libtorch; import it first)

            from svq_fast import _C  # noqa: F401

            _loaded = True
        except Exception as e:  # ImportError, OSError (undefined symbol), ...
            _loaded = False
            _error = f"{type(e).__name__}: {e}"
    return _loaded


def native_available() -> bool:
    """True when svq_fast._C imported; warns once (with the reason) when it did not."""
    global _warned
    ok = _try_load()
    if not ok and not _warned:
        _warned = True
        warnings.warn(
            f"svq_fast native extension unavailable ({_error}); CPU ops use the torch reference (slower). "
            "Rebuild with `pip install --no-build-isolation -e .` and a C++ compiler to enable it.",
            RuntimeWarning,
            stacklevel=2,
        )
    return ok


def native_error() -> str | None:
    """Why the extension failed to import, or None when it loaded (or was not tried yet)."""
    _try_load()
    return _error


def native_ops():
    """The op namespace torch.ops.svq_fast; raises with the import error when the extension is absent."""
    if not _try_load():
        raise RuntimeError(f"svq_fast native extension is not available: {_error}")
    import torch

    return torch.ops.svq_fast
