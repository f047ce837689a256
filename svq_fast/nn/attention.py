"""Attention dispatch for the GPT. q, k, v: (B, H, T, d).

Masks: causal, or prefix-causal (the first `prefix_len` tokens attend to each other bidirectionally,
the rest causally).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefix_causal_mask(t_q: int, t_k: int, prefix_len: int, device=None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True = may attend. Queries are the last t_q of t_k positions."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return (k_pos <= q_pos) | (k_pos < prefix_len)


def attention(q, k, v, *, causal: bool = True, prefix_len: int = 0, backend: str = "auto") -> torch.Tensor:
    if backend not in ("auto", "sdpa", "ref", "triton", "xformers"):
        raise ValueError(f"attention: unknown backend {backend!r}")
    t_q, t_k = q.shape[-2], k.shape[-2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if prefix_len > 0 or t_q != t_k:
        mask = prefix_causal_mask(t_q, t_k, prefix_len if causal else t_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
