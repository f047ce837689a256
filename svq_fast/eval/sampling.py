"""Sampling image tokens from the stage-2 GPT: KV cache, temperature, top-k, top-p, classifier-free guidance.

Tokens are drawn by inverse-CDF with one uniform number per sample and step from the given generator, so
the cached and the fully recomputed paths consume identical randomness and give the same tokens.
"""

from __future__ import annotations

import torch

from svq_fast.models.gpt import KVCache, SemanticGPT


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) all but the top_k logits and outside the top_p nucleus; logits (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,) int64."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)
    return idx.clamp_max(probs.shape[-1] - 1)


def _guided(logits: torch.Tensor, b: int, scale: float) -> torch.Tensor:
    """Mix the conditional (first B rows) and unconditional (last B rows) logits."""
    if scale == 1.0:
        return logits
    cond, uncond = logits[:b], logits[b:]
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_image_tokens(
    gpt: SemanticGPT,
    sem_tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """sem_tokens (B, P) -> image tokens (B, N)."""
    b = sem_tokens.shape[0]
    cfg_on = guidance_scale != 1.0
    cond = torch.cat([sem_tokens, sem_tokens]) if cfg_on else sem_tokens
    uncond = None
    if cfg_on:
        uncond = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(sem_tokens.device)
    out = torch.empty(b, gpt.n_img, dtype=torch.long, device=sem_tokens.device)
    cache = KVCache(len(gpt.blocks)) if use_cache else None
    step_in = None  # the token fed to the cache at the next step: (B,) or (2B,) with guidance
    for i in range(gpt.n_img):
        if use_cache:
            logits = gpt.prefill(cond, cache, uncond) if i == 0 else gpt.decode_step(step_in, cache)
        else:
            prefix = out[:, :i].repeat(2 if cfg_on else 1, 1)
            logits = gpt.logits_full(cond, prefix, uncond)
        tok = draw(_guided(logits, b, guidance_scale), temperature, top_k, top_p, generator)
        out[:, i] = tok
        step_in = torch.cat([tok, tok]) if cfg_on else tok
    return out
