"""Attention dispatch for the GPT. q (B, H, T_q, d), k and v (B, H, T_k, d) -> (B, H, T_q, d).

Masks: causal, or prefix-causal (the first `prefix_len` tokens attend to each other bidirectionally,
the rest causally), or none (causal=False). Queries are the LAST t_q of the t_k key positions, so the same
call serves training (t_q == t_k) and KV-cache decoding (t_q < t_k).

Backends (an explicit `backend=` wins; a backend that cannot serve the inputs raises and says why):
    triton    svq_fast.kernels.attention.flash_attention: CUDA fp16/bf16, head dim 16/32/64/128; on CPU only
              under TRITON_INTERPRET=1 (tests, fp32/fp16).
    xformers  xformers.ops.memory_efficient_attention (CUDA only, when installed): LowerTriangularMask for
              causal, an explicit additive bias tensor for prefix-causal.
    sdpa      torch.nn.functional.scaled_dot_product_attention (any device; explicit boolean mask for
              prefix-causal and for causal with t_q != t_k).
    ref       svq_fast.kernels.attention.attention_ref (materialises the matrix, fp32 math).
    auto      triton on CUDA when it can serve the inputs (fp16/bf16, supported head dim, t_q >= 16),
              sdpa otherwise (CPU, fp32, decode-sized queries).

Triton is imported lazily: the sdpa path (CPU default) works without it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "xformers", "sdpa", "ref")
_TRITON_HEAD_DIMS = (16, 32, 64, 128)  # == svq_fast.kernels.attention.HEAD_DIMS (checked in tests)
_TRITON_MIN_TQ_AUTO = 16  # below this (decoding) auto prefers SDPA: one query block per head underuses the GPU


class BackendUnavailableError(RuntimeError, ValueError):
    """A requested backend cannot serve these inputs (device, dtype, head dim, missing package). Catchable
    as RuntimeError or ValueError."""


def prefix_causal_mask(t_q: int, t_k: int, prefix_len: int, device=None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True = may attend. Queries are the last t_q of t_k positions."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return (k_pos <= q_pos) | (k_pos < prefix_len)


def _effective_prefix(t_q: int, t_k: int, prefix_len: int, causal: bool) -> int:
    """0 = plain causal, t_k = no mask, otherwise a real prefix. Same rule as
    svq_fast.kernels.attention.effective_prefix_len (kept here so this module never needs triton)."""
    if not causal:
        return t_k
    if prefix_len <= t_k - t_q + 1:
        return 0
    return min(prefix_len, t_k)


def _check_inputs(q, k, v, causal: bool, prefix_len: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be 4-D (B, H, T, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need q (B, H, T_q, d) and k, v (B, H, T_k, d))"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if prefix_len < 0:
        raise ValueError(f"attention: prefix_len must be >= 0, got {prefix_len}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"attention: causal/prefix-causal attention needs t_q <= t_k (queries are the last t_q of the "
            f"t_k positions), got t_q={q.shape[2]}, t_k={k.shape[2]}"
        )


def _triton_interpreting() -> bool:
    """True when the Triton kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        from svq_fast.kernels import attention as kattn
    except ImportError:  # no triton: nothing to interpret
        return False
    return kattn._INTERPRET


def _triton_unfit(q) -> str | None:
    """Why the triton backend cannot serve q (None if it can). Does not import triton unless needed."""
    d = q.shape[3]
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"on CUDA it supports fp16/bf16 only, got {q.dtype} (cast, or use backend='sdpa' for fp32)"
    elif q.device.type == "cpu" and _triton_interpreting():
        if q.dtype not in (torch.float32, torch.float16):
            return f"the Triton interpreter gives wrong results for {q.dtype} tl.dot; use fp32/fp16 on CPU"
    else:
        return (
            f"it needs CUDA tensors, got device {q.device} (on CPU it runs only under TRITON_INTERPRET=1, "
            "set before svq_fast.kernels is imported; use backend='sdpa' on CPU)"
        )
    if d not in _TRITON_HEAD_DIMS:
        return f"head dim {d} is not supported (supported: {_TRITON_HEAD_DIMS}; use backend='sdpa')"
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch's CUDA wheels ship triton
        return f"triton is not importable ({e})"
    return None


def _xformers_unfit(q) -> str | None:
    if q.device.type != "cuda":
        return f"xformers has no CPU operator; it needs CUDA tensors, got device {q.device}"
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        return f"xformers is not installed ({e}); pip install xformers, or use backend='sdpa'/'triton'"
    return None


def _sdpa(q, k, v, prefix: int, scale):
    t_q, t_k = q.shape[2], k.shape[2]
    if prefix == t_k:  # no mask
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if prefix == 0 and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if prefix == 0 and t_q == 1:  # the last query sees every key
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    # SDPA's is_causal aligns top-left when t_q != t_k, so the bottom-right / prefix mask is explicit.
    mask = prefix_causal_mask(t_q, t_k, prefix, q.device)  # (T_q, T_k) bool
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _xformers(q, k, v, prefix: int, scale):
    import xformers.ops as xops
    from xformers.ops import fmha

    b, h, t_q, _ = q.shape
    t_k = k.shape[2]
    if prefix == t_k:
        bias = None
    elif prefix == 0:
        bias = (
            fmha.attn_bias.LowerTriangularMask() if t_q == t_k else fmha.attn_bias.LowerTriangularFromBottomRightMask()
        )
    else:
        # Additive bias; xformers needs the row stride aligned to 8 elements: slice a padded tensor.
        t_k_pad = (t_k + 7) // 8 * 8
        allowed = prefix_causal_mask(t_q, t_k, prefix, q.device)  # (T_q, T_k) bool
        bias = torch.zeros(t_q, t_k_pad, device=q.device, dtype=q.dtype)
        bias[:, :t_k].masked_fill_(~allowed, float("-inf"))
        bias = bias[:, :t_k].expand(b, h, t_q, t_k)  # (B, H, T_q, T_k), stride 0 over B, H
    # xformers layout is (B, T, H, d).
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    prefix_len: int = 0,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v; scale defaults to 1/sqrt(d). See the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r} (choose from {BACKENDS})")
    _check_inputs(q, k, v, causal, prefix_len)
    t_q, t_k = q.shape[2], k.shape[2]
    prefix = _effective_prefix(t_q, t_k, prefix_len, causal)
    masked = prefix < t_k  # as a kernel argument the normalised mask is (causal=masked, prefix_len=prefix)

    if backend == "auto":
        use_triton = q.device.type == "cuda" and t_q >= _TRITON_MIN_TQ_AUTO and _triton_unfit(q) is None
        backend = "triton" if use_triton else "sdpa"

    if backend == "triton":
        why = _triton_unfit(q)
        if why is not None:
            raise BackendUnavailableError(f"attention: backend='triton' cannot serve these inputs: {why}")
        from svq_fast.kernels.attention import flash_attention

        return flash_attention(q, k, v, causal=masked, prefix_len=prefix, sm_scale=scale)
    if backend == "xformers":
        why = _xformers_unfit(q)
        if why is not None:
            raise BackendUnavailableError(f"attention: backend='xformers' cannot serve these inputs: {why}")
        return _xformers(q, k, v, prefix, scale)
    if backend == "ref":
        from svq_fast.kernels.attention import attention_ref

        return attention_ref(q, k, v, causal=masked, prefix_len=prefix, sm_scale=scale)
    return _sdpa(q, k, v, prefix, scale)
