"""Stage-2 Transformer: p(z_x | z_s) over the sequence [z_s tokens ; z_x tokens] (paper equation 2).

Semantic and image tokens have separate embedding tables (so their id ranges never collide) and share
learned 2-D grid positions plus a modality embedding. Position P + i - 1 predicts image token i, so the
input is [z_s (P) ; z_x[:-1] (N-1)] and the loss covers the N image tokens only.
Classifier-free guidance: during training the semantic embeddings of a sample are replaced by learned null
embeddings with probability cfg_dropout; at sampling the conditional and null logits are mixed.
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

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.layer, self.backend = cfg.n_head, layer, cfg.attn_backend
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, prefix_len: int, cache: KVCache | None):  # x (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
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

    def forward(self, x, prefix_len, cache):
        x = x + self.attn(self.ln1(x), prefix_len, cache)
        return x + self.mlp(self.ln2(x))


class SemanticGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.n_sem = self.n_img = cfg.grid * cfg.grid
        self.sem_emb = nn.Embedding(cfg.semantic_vocab, cfg.n_embd)
        self.img_emb = nn.Embedding(cfg.image_vocab, cfg.n_embd)
        self.null_cond = nn.Parameter(torch.zeros(self.n_sem, cfg.n_embd))  # CFG's unconditional "semantics"
        self.row_emb = nn.Embedding(cfg.grid, cfg.n_embd)
        self.col_emb = nn.Embedding(cfg.grid, cfg.n_embd)
        self.modality_emb = nn.Embedding(2, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.image_vocab, bias=False)
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

    def _positions(self, start: int, length: int, device) -> torch.Tensor:
        """Position + modality embeddings for sequence positions [start, start+length): (length, C)."""
        pos = torch.arange(start, start + length, device=device)
        modality = (pos >= self.n_sem).long()
        cell = torch.where(modality.bool(), pos - self.n_sem, pos)
        g = self.cfg.grid
        return self.row_emb(cell // g) + self.col_emb(cell % g) + self.modality_emb(modality)

    def _embed_condition(self, sem_tokens: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """sem_tokens (B, P) -> (B, P, C); rows where uncond is True get the null embeddings."""
        e = self.sem_emb(sem_tokens)
        if uncond is not None:
            e = torch.where(uncond[:, None, None], self.null_cond.to(e.dtype)[None], e)
        return e

    def _run(self, h: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        prefix = self.n_sem if self.cfg.prefix_lm else 0
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, prefix, cache)
        return self.ln_f(h)

    def forward(self, sem_tokens: torch.Tensor, img_tokens: torch.Tensor, *, uncond: torch.Tensor | None = None):
        """sem_tokens (B, P), img_tokens (B, N) -> (logits (B, N, V_img), loss on image tokens).

        In training mode, uncond defaults to a Bernoulli(cfg_dropout) draw per sample.
        """
        b = sem_tokens.shape[0]
        if uncond is None and self.training and self.cfg.cfg_dropout > 0:
            uncond = torch.rand(b, device=sem_tokens.device) < self.cfg.cfg_dropout
        h = torch.cat([self._embed_condition(sem_tokens, uncond), self.img_emb(img_tokens[:, :-1])], 1)
        h = h + self._positions(0, h.shape[1], h.device)[None]
        h = self._run(h, None)[:, self.n_sem - 1 :]  # (B, N, C): hidden states that predict image tokens
        logits = self.head(h)
        # the softmax runs in at least fp32 whatever the training precision
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(wide.reshape(-1, logits.shape[-1]), img_tokens.reshape(-1))
        return logits, loss

    # -- incremental decoding -------------------------------------------------------------------------

    def prefill(self, sem_tokens: torch.Tensor, cache: KVCache, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Run the condition through the model, filling the cache; -> logits for image token 0 (B, V)."""
        h = self._embed_condition(sem_tokens, uncond) + self._positions(0, self.n_sem, sem_tokens.device)[None]
        return self.head(self._run(h, cache)[:, -1])

    def decode_step(self, img_token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed image token (B,) at the next position; -> logits for the following token (B, V)."""
        pos = cache.length
        h = self.img_emb(img_token)[:, None] + self._positions(pos, 1, img_token.device)[None]
        return self.head(self._run(h, cache)[:, -1])

    def logits_full(
        self, sem_tokens: torch.Tensor, img_prefix: torch.Tensor, uncond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits for the next image token after img_prefix (B, n) by full recomputation: (B, V)."""
        h = self._embed_condition(sem_tokens, uncond)
        if img_prefix.shape[1]:
            h = torch.cat([h, self.img_emb(img_prefix)], 1)
        h = h + self._positions(0, h.shape[1], h.device)[None]
        return self.head(self._run(h, None)[:, -1])
