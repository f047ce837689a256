"""Sampling image tokens on a latent grid larger than the GPT's training grid, or not square, by a sliding window.

The GPT was trained on g x g grids (cfg.grid): a sequence [g*g semantic tokens ; g*g image tokens] with learned
row/column positions 0..g-1. A map of h x w latents (h, w >= g) is sampled as taming-transformers samples megapixel
images: each image token (i, j), in raster order over the whole grid, is drawn by the GPT looking at one g x g
window that contains (i, j): the window's semantic tokens are the prefix (and, with position-aligned conditioning,
the aligned condition), the window's image tokens before (i, j) in the window's raster order are the context, and
positions are the window's own 0..g-1. Every such token is already drawn (rows above, columns to the left), so
the context is always complete, and what the GPT sees is a sequence of the kind it was trained on.

Window placement (window_starts): along each axis the windows start at 0, stride, 2*stride, ... and at n - g, and a
token is drawn in the window whose centre is nearest (ties: the earlier window, which gives more context above /
to the left). stride 1 is taming's placement (a window centred on every token); the default stride g // 2 keeps
each token 3/8..3/4 of a window from the window's top/left edge (local index 5..12 of 16) away from the grid's
borders. Seams are where consecutive tokens change window; benchmarks/results/sampling_any_size_cpu/ measures them.

Reuse: a window's KV cache stays valid for as long as the window does not move, because causal attention never
changes the keys/values of earlier positions. Each window keeps one cache; when a token is drawn in it, the cache
is caught up with the image tokens that its neighbours drew since its last use (gpt.decode_chunk). So every window
runs each of its 2*g*g positions through the GPT at most once (window_cost counts them): for 32 x 32 latents and
g = 16, 9 windows and 4293 positions, against 401k for taming's per-token recomputation (use_cache=False here,
the reference path; 115k for cached windows at stride 1). Caches live from a window's first to its last token: at
most one row of windows at a time (window_cost's live_windows). The caches are dynamic (concatenation); the static
cache and CUDA graphs of sample_image_tokens are for the g x g path only.

Randomness: one uniform number per token and sample, in raster order, as in sample_image_tokens, so the cached
and the recomputing paths give the same tokens, and an h = w = g grid gives exactly sample_image_tokens' tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from svq_fast.eval.sampling import _guided, draw
from svq_fast.models.gpt import KVCache, SemanticGPT


def window_starts(n: int, g: int, stride: int) -> list[int]:
    """Start of the g-long window that each of n latents along one axis is drawn in: (n,) ints in [0, n - g]."""
    if n < g:
        raise ValueError(f"a grid of {n} latents is smaller than the GPT's window of {g}: maps must be at least g")
    if stride < 1:
        raise ValueError(f"window stride must be >= 1, got {stride}")
    starts = sorted(set(range(0, n - g + 1, stride)) | {n - g})
    centre = g // 2
    # among the windows that hold the token, the nearest centre; a tie goes to the earlier window (the token sits
    # further in: more context before it)
    return [min((a for a in starts if a <= i < a + g), key=lambda a: (abs(i - a - centre), a)) for i in range(n)]


def default_stride(g: int) -> int:
    return max(1, g // 2)


def window_cost(h: int, w: int, g: int, stride: int | None = None) -> dict:
    """What the cached sliding window runs through the GPT for an h x w grid: windows used, positions fed (prefixes
    + image tokens, each window up to its last drawn token), the most caches alive at once, and the positions
    taming's per-token recomputation feeds (for every token: the g*g prefix + its window context)."""
    stride = stride or default_stride(g)
    rows, cols = window_starts(h, g, stride), window_starts(w, g, stride)
    last: dict[tuple[int, int], int] = {}  # window -> local raster index of its last drawn token
    first: dict[tuple[int, int], int] = {}  # window -> global raster index of its first token
    end: dict[tuple[int, int], int] = {}  # window -> global raster index of its last token
    recompute = 0
    for i in range(h):
        for j in range(w):
            win, t = (rows[i], cols[j]), (i - rows[i]) * g + (j - cols[j])
            last[win] = max(last.get(win, 0), t)
            first.setdefault(win, i * w + j)
            end[win] = i * w + j
            recompute += g * g + t
    live = max(sum(1 for win in first if first[win] <= k <= end[win]) for k in range(h * w))
    return {
        "windows": len(last),
        "positions": sum(g * g + t for t in last.values()),  # prefix + image tokens 0..t-1 (+ the prefill's last)
        "live_windows": live,
        "recompute_positions": recompute,
        "stride": stride,
    }


class _Window:
    """One window's cache and condition: cond (B', g*g), uncond (B',) or None, aligned (B', g*g, C) or None."""

    def __init__(self, gpt: SemanticGPT, cond: torch.Tensor, uncond: torch.Tensor | None):
        self.cache = KVCache(len(gpt.blocks))
        self.aligned = gpt.aligned_condition(cond, uncond)
        self.logits = gpt.prefill(cond, self.cache, uncond)  # (B', V): predicts the window's image token 0
        self.fed = 0  # image tokens of the window in the cache (local raster indices 0..fed-1)


@torch.no_grad()
def sample_image_tokens_window(
    gpt: SemanticGPT,
    sem_tokens: torch.Tensor,
    shape: tuple[int, int],
    *,
    stride: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    num_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """sem_tokens (B, h*w) of an h x w latent grid (shape = (h, w), h, w >= cfg.grid) -> image tokens (B, h*w),
    row-major. use_cache=False recomputes every token's window sequence (taming's way; the reference path).
    num_tokens < h*w stops early (benchmarks, tests; the rest stays 0). progress(done, total) after every token."""
    h, w = shape
    g = gpt.cfg.grid
    b = sem_tokens.shape[0]
    if sem_tokens.shape[1] != h * w:
        raise ValueError(f"sample_image_tokens_window: {sem_tokens.shape[1]} semantic tokens for a {h}x{w} grid")
    total = h * w if num_tokens is None else int(num_tokens)
    if not 0 < total <= h * w:
        raise ValueError(f"sample_image_tokens_window: num_tokens must be in [1, {h * w}], got {num_tokens}")
    stride = stride or default_stride(g)
    rows, cols = window_starts(h, g, stride), window_starts(w, g, stride)
    last_use = {(rows[i], cols[j]): i * w + j for i in range(h) for j in range(w)}  # to free a window's cache
    cfg_on = guidance_scale != 1.0
    uncond = None
    if cfg_on:
        uncond = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(sem_tokens.device)
    double = (lambda t: torch.cat([t, t])) if cfg_on else (lambda t: t)
    sem = sem_tokens.view(b, h, w)
    out = torch.zeros(b, h, w, dtype=torch.long, device=sem_tokens.device)
    windows: dict[tuple[int, int], _Window] = {}
    for k in range(total):
        i, j = divmod(k, w)
        a, c = rows[i], cols[j]
        t = (i - a) * g + (j - c)  # the token's raster index inside its window
        if not use_cache:
            cond = double(sem[:, a : a + g, c : c + g].reshape(b, g * g))
            context = double(out[:, a : a + g, c : c + g].reshape(b, g * g)[:, :t])
            logits = gpt.logits_full(cond, context, uncond)
        else:
            win = windows.get((a, c))
            if win is None:
                win = windows[(a, c)] = _Window(gpt, double(sem[:, a : a + g, c : c + g].reshape(b, g * g)), uncond)
            logits = win.logits
            if t > win.fed:  # catch up with the window's tokens drawn since its last use (here or by neighbours)
                new = double(out[:, a : a + g, c : c + g].reshape(b, g * g)[:, win.fed : t])  # (B', t - fed)
                aligned = None if win.aligned is None else win.aligned[:, win.fed + 1 : t + 1]  # rows they predict
                logits = gpt.decode_chunk(new, win.cache, aligned)
                win.fed = t
            if last_use[(a, c)] == k:
                del windows[(a, c)]
        out[:, i, j] = draw(_guided(logits, b, guidance_scale), temperature, top_k, top_p, generator)
        if progress is not None:
            progress(k + 1, total)
    return out.view(b, h * w)
