"""Stage-2 Transformer: p(z_x | z_s) over the sequence [z_s tokens ; z_x tokens] (paper equation 2).

Semantic and image tokens have separate embedding tables (so their id ranges never collide) and share
learned 2-D grid positions plus a modality embedding. Position P + i - 1 predicts image token i, so the
input is [z_s (P) ; z_x[:-1] (N-1)] and the loss covers the N image tokens only.
Classifier-free guidance: during training the semantic embeddings of a sample are replaced by learned null
embeddings with probability cfg_dropout; at sampling the conditional and null logits are mixed.

Position-aligned conditioning (cfg.aligned_condition, off in the paper's configs): besides the prefix, the input
that predicts image token i (sequence position P + i - 1) also gets an embedding of semantic token i, the token of
the same grid cell (ControlAR's "conditional decoding"). The condition is known in full before sampling starts, so
this never shows a position any image token it must not see; null-condition rows get zeros there.

Incremental decoding has two caches with one interface (`update`, `advance`, `length`):
- KVCache: per-layer tensors grown by concatenation (simple; one (B, H, T, d) copy per layer and step).
- StaticKVCache: per-layer (B, H, T_max, d) buffers allocated once and written in place at a position
  counter; attention reads a length slice through the attention dispatch. Its buffers also serve
  `decode_step_at`, the fixed-shape single-token step (position as a tensor, masked attention over the whole
  buffer) that a CUDA graph can capture (see svq_fast.eval.sampling).

Loss: the default path materialises the (B, N, V) logits; `chunked_ce=True` computes the same loss (and
gradients) from the final hidden states and the head weight in row chunks (svq_fast.kernels.cross_entropy)
and `forward` returns logits=None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from svq_fast.config import GPTConfig
from svq_fast.nn.attention import attention


class KVCache:
    """Per-layer key/value tensors (B, H, T, d) grown by concatenation during incremental decoding."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, t: int) -> None:
        """Called after each forward pass over t new positions; the length is read off the tensors."""

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class StaticKVCache:
    """Preallocated per-layer key/value buffers (B, H, max_len, d), written in place.

    `length` counts the filled positions; a forward pass writes its t new keys/values at [length, length + t)
    of every layer and then `advance(t)` moves the counter. A layer's buffers are allocated at its first
    write with that write's batch, heads, head dim, dtype and device (so autocast / bf16 models get bf16
    buffers); later writes must match them. `reset()` rewinds the counter and keeps the buffers.
    """

    def __init__(self, n_layer: int, max_len: int):
        if max_len <= 0:
            raise ValueError(f"StaticKVCache: max_len must be positive, got {max_len}")
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, H, max_len, d)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0

    def _buffers(self, layer: int, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, _, d = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(b, h, self.max_len, d)
            self.v[layer] = k.new_zeros(b, h, self.max_len, d)
        buf = self.k[layer]
        if (buf.shape[0], buf.shape[1], buf.shape[3]) != (b, h, d) or buf.dtype != k.dtype or buf.device != k.device:
            raise ValueError(
                f"StaticKVCache: layer {layer} buffers are {tuple(buf.shape)} {buf.dtype} on {buf.device}, "
                f"got keys {tuple(k.shape)} {k.dtype} on {k.device}; make a new cache for a new batch/dtype/device"
            )
        return buf, self.v[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, t, d) at [length, length + t); -> views of the filled part (B, H, length + t, d)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"StaticKVCache: writing {k.shape[2]} positions at {self.pos} overflows max_len={self.max_len}"
            )
        kb, vb = self._buffers(layer, k)
        kb[:, :, self.pos : end] = k
        vb[:, :, self.pos : end] = v
        return kb[:, :, :end], vb[:, :, :end]

    def write_at(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Write one position (k, v (B, H, 1, d)) at the index held in pos ((1,) int64 tensor, no host sync);
        -> the whole buffers (B, H, max_len, d). Does not move the counter."""
        kb, vb = self._buffers(layer, k)
        kb.index_copy_(2, pos, k)
        vb.index_copy_(2, pos, v)
        return kb, vb

    def advance(self, t: int) -> None:
        self.pos += t

    def reset(self) -> None:
        self.pos = 0

    @property
    def length(self) -> int:
        return self.pos


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.layer, self.backend = cfg.n_head, layer, cfg.attn_backend
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, prefix_len: int, cache, step=None):  # x (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        if step is not None:  # fixed-shape decode (decode_step_at): whole static buffer, masked
            pos, visible = step  # (1,) int64, (1, 1, 1, T_max) bool
            k, v = cache.write_at(self.layer, k, v, pos)  # (B, H, T_max, d)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, H, 1, d)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v)
            y = attention(q, k, v, causal=True, prefix_len=prefix_len, backend=self.backend)  # (B, H, T, d)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x, prefix_len, cache, step=None):
        x = x + self.attn(self.ln1(x), prefix_len, cache, step)
        return x + self.mlp(self.ln2(x))


class ImageHead(nn.Linear):
    """Output projection to the image vocabulary: head(h) -> logits (..., V); head(h, target) -> the mean
    cross-entropy () fp32 from svq_fast.kernels.cross_entropy.chunked_cross_entropy, without the logits.

    The loss is computed inside this module's forward so that hooks that gather a module's parameters around
    its forward (DeepSpeed ZeRO-3) also cover the weight the chunked loss reads.
    """

    def forward(self, h: torch.Tensor, target: torch.Tensor | None = None, chunk_rows: int | None = None):
        if target is None:
            return super().forward(h)
        from svq_fast.kernels.cross_entropy import chunked_cross_entropy  # imports triton: only when asked

        # The chunked op runs its matmuls in h's dtype; under autocast use the dtype the plain head would.
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        return chunked_cross_entropy(h, self.weight, target, self.bias, chunk_rows=chunk_rows)  # (B*N, C) -> ()


class SemanticGPT(nn.Module):
    """chunked_ce: compute the image-token loss with svq_fast.kernels.cross_entropy.chunked_cross_entropy
    (row chunks of ce_chunk_rows, default 2^24 / V) instead of materialising the (B, N, V) logits; forward
    then returns (None, loss). Same loss and gradients as the default path (fp32 softmax either way)."""

    def __init__(self, cfg: GPTConfig, *, chunked_ce: bool = False, ce_chunk_rows: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.chunked_ce, self.ce_chunk_rows = bool(chunked_ce), ce_chunk_rows
        self.n_sem = self.n_img = cfg.grid * cfg.grid
        self.sem_emb = nn.Embedding(cfg.semantic_vocab, cfg.n_embd)
        self.img_emb = nn.Embedding(cfg.image_vocab, cfg.n_embd)
        self.null_cond = nn.Parameter(torch.zeros(self.n_sem, cfg.n_embd))  # CFG's unconditional "semantics"
        self.aligned_emb = nn.Embedding(cfg.semantic_vocab, cfg.n_embd) if cfg.aligned_condition else None
        self.row_emb = nn.Embedding(cfg.grid, cfg.n_embd)
        self.col_emb = nn.Embedding(cfg.grid, cfg.n_embd)
        self.modality_emb = nn.Embedding(2, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = ImageHead(cfg.n_embd, cfg.image_vocab, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / (2 * cfg.n_layer) ** 0.5)
        nn.init.normal_(self.null_cond, 0.0, 0.02)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    @property
    def max_len(self) -> int:
        """Positions a sampling cache must hold: the condition and the image tokens."""
        return self.n_sem + self.n_img

    def _pos_emb(self, pos: torch.Tensor) -> torch.Tensor:
        """Position + modality embeddings for sequence positions pos (L,) int64 -> (L, C)."""
        modality = (pos >= self.n_sem).long()
        cell = pos - modality * self.n_sem
        g = self.cfg.grid
        return self.row_emb(cell // g) + self.col_emb(cell % g) + self.modality_emb(modality)

    def _positions(self, start: int, length: int, device) -> torch.Tensor:
        """Position + modality embeddings for sequence positions [start, start+length): (length, C)."""
        return self._pos_emb(torch.arange(start, start + length, device=device))

    def _embed_condition(self, sem_tokens: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """sem_tokens (B, P) -> (B, P, C); rows where uncond is True get the null embeddings."""
        e = self.sem_emb(sem_tokens)
        if uncond is not None:
            e = torch.where(uncond[:, None, None], self.null_cond.to(e.dtype)[None], e)
        return e

    def aligned_condition(self, sem_tokens: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor | None:
        """sem_tokens (B, N) -> (B, N, C): row i is added to the input that predicts image token i (zeros for
        null-condition rows); None without position-aligned conditioning."""
        if self.aligned_emb is None:
            return None
        e = self.aligned_emb(sem_tokens)
        if uncond is not None:
            e = e.masked_fill(uncond[:, None, None], 0.0)
        return e

    def _run(self, h: torch.Tensor, cache, step=None) -> torch.Tensor:
        prefix = self.n_sem if self.cfg.prefix_lm else 0
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, prefix, cache, step)
        if cache is not None and step is None:
            cache.advance(h.shape[1])
        return self.ln_f(h)

    def forward(self, sem_tokens: torch.Tensor, img_tokens: torch.Tensor, *, uncond: torch.Tensor | None = None):
        """sem_tokens (B, P), img_tokens (B, N) -> (logits (B, N, V_img), loss on image tokens).

        In training mode, uncond defaults to a Bernoulli(cfg_dropout) draw per sample.
        With chunked_ce the logits are never materialised and None is returned in their place.
        """
        b = sem_tokens.shape[0]
        if uncond is None and self.training and self.cfg.cfg_dropout > 0:
            uncond = torch.rand(b, device=sem_tokens.device) < self.cfg.cfg_dropout
        h = torch.cat([self._embed_condition(sem_tokens, uncond), self.img_emb(img_tokens[:, :-1])], 1)
        h = h + self._positions(0, h.shape[1], h.device)[None]
        aligned = self.aligned_condition(sem_tokens, uncond)
        if aligned is not None:  # positions P-1 .. P+N-2 predict image tokens 0 .. N-1
            h = torch.cat([h[:, : self.n_sem - 1], h[:, self.n_sem - 1 :] + aligned], 1)
        h = self._run(h, None)[:, self.n_sem - 1 :]  # (B, N, C): hidden states that predict image tokens
        if self.chunked_ce:
            return None, self.head(h, img_tokens, self.ce_chunk_rows)
        logits = self.head(h)
        # the softmax runs in at least fp32 whatever the training precision
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(wide.reshape(-1, logits.shape[-1]), img_tokens.reshape(-1))
        return logits, loss

    # -- incremental decoding -------------------------------------------------------------------------

    def prefill(self, sem_tokens: torch.Tensor, cache, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Run the condition through the model, filling the cache (KVCache or StaticKVCache);
        -> logits for image token 0 (B, V)."""
        h = self._embed_condition(sem_tokens, uncond) + self._positions(0, self.n_sem, sem_tokens.device)[None]
        aligned = self.aligned_condition(sem_tokens, uncond)
        if aligned is not None:  # the last condition position predicts image token 0
            h = torch.cat([h[:, :-1], h[:, -1:] + aligned[:, :1]], 1)
        return self.head(self._run(h, cache)[:, -1])

    def decode_step(self, img_token: torch.Tensor, cache, aligned: torch.Tensor | None = None) -> torch.Tensor:
        """Feed image token (B,) at the next position; -> logits for the following token (B, V).
        aligned (B, C): with position-aligned conditioning, aligned_condition(...)[:, i] when this step predicts
        image token i."""
        pos = cache.length
        h = self.img_emb(img_token)[:, None] + self._positions(pos, 1, img_token.device)[None]
        if aligned is not None:
            h = h + aligned[:, None]
        return self.head(self._run(h, cache)[:, -1])

    def decode_chunk(self, img_tokens: torch.Tensor, cache, aligned: torch.Tensor | None = None) -> torch.Tensor:
        """decode_step over t tokens at once: feed image tokens (B, t) at the next t positions (causal among
        themselves); -> logits for the token after the last (B, V). aligned (B, t, C): row k is the aligned
        condition of the token that input k predicts. The sliding-window sampler (svq_fast/eval/sliding_window.py)
        catches a window's cache up with tokens its neighbours drew."""
        pos = cache.length
        h = self.img_emb(img_tokens) + self._positions(pos, img_tokens.shape[1], img_tokens.device)[None]
        if aligned is not None:
            h = h + aligned
        return self.head(self._run(h, cache)[:, -1])

    def decode_step_at(
        self, img_token: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache, aligned: torch.Tensor | None = None
    ) -> torch.Tensor:
        """decode_step with fixed shapes and no host sync, for CUDA-graph capture.

        img_token (B,) goes to sequence position pos ((1,) int64 tensor, on the model's device); its keys and
        values are written into the static buffers at pos, and attention runs over the whole buffer with the
        positions > pos masked out (SDPA with a boolean mask, whatever cfg.attn_backend says: the dispatch
        takes only prefix/causal masks over a sliced length). cache.length is NOT moved: the caller counts.
        -> logits for the following token (B, V).
        """
        if not isinstance(cache, StaticKVCache):
            raise TypeError(f"decode_step_at needs a StaticKVCache, got {type(cache).__name__}")
        h = self.img_emb(img_token)[:, None] + self._pos_emb(pos)[None]  # (B, 1, C)
        if aligned is not None:
            h = h + aligned[:, None]
        visible = (torch.arange(cache.max_len, device=pos.device) <= pos).view(1, 1, 1, -1)  # (1, 1, 1, T_max)
        return self.head(self._run(h, cache, (pos, visible))[:, -1])

    def logits_full(
        self, sem_tokens: torch.Tensor, img_prefix: torch.Tensor, uncond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits for the next image token after img_prefix (B, n) by full recomputation: (B, V)."""
        h = self._embed_condition(sem_tokens, uncond)
        n = img_prefix.shape[1]
        if n:
            h = torch.cat([h, self.img_emb(img_prefix)], 1)
        h = h + self._positions(0, h.shape[1], h.device)[None]
        aligned = self.aligned_condition(sem_tokens, uncond)
        if aligned is not None:  # positions P-1 .. P-1+n predict image tokens 0 .. n
            h = torch.cat([h[:, : self.n_sem - 1], h[:, self.n_sem - 1 :] + aligned[:, : n + 1]], 1)
        return self.head(self._run(h, None)[:, -1])

    @torch.no_grad()
    def image_nll(
        self, sem_tokens: torch.Tensor, img_tokens: torch.Tensor, *, uncond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample mean negative log-likelihood of the image tokens, in nats: (B,). uncond (B,) bool scores
        against the null condition (the information the condition carries is the difference)."""
        logits = self.forward(sem_tokens, img_tokens, uncond=uncond)[0] if not self.chunked_ce else None
        if logits is None:
            raise ValueError("image_nll needs the logits: build the model without chunked_ce")
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll = F.cross_entropy(wide.transpose(1, 2), img_tokens, reduction="none")  # (B, N)
        return nll.mean(1)
