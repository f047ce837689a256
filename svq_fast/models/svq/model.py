"""The semantically coupled VQ model (paper Figure 2) and its single-modality baselines.

kind="svq":      shared encoder f_sEnc(x, s) -> (z_x, z_s); semantic decoder f_sDec(z_s) -> s_hat;
                 image decoder f_xDec(z_x, sg[z_s]) -> x_hat. With semantic_input="map", z_s comes from the same
                 encoder reading (fill, s) (what encode_semantic computes; batched with (x, s) in one pass), so
                 z_s carries no appearance in training either and the decoder must take it from z_x.
kind="image":    encoder(x) -> z_x -> decoder -> x_hat (VQVAE / VQGAN).
kind="semantic": encoder(s) -> z_s -> semantic decoder -> s_hat (the conditioning VQVAE of the baseline).
"""

from __future__ import annotations

import torch
from torch import nn

from svq_fast import dist
from svq_fast.config import QuantizerConfig, SVQModelConfig
from svq_fast.kernels._library import define_op
from svq_fast.nn import host_counter
from svq_fast.nn.quantizer import VectorQuantizer
from svq_fast.nn.semantic_input import SemanticConv
from svq_fast.nn.semantic_patch import SemanticPatchEmbed

from .decoder import Decoder
from .encoder import Encoder
from .subpixel_decoder import SubpixelDecoder
from .swap_target import recoloured_swap_target


class SVQModel(nn.Module):
    def __init__(self, cfg: SVQModelConfig, qcfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.has_image = cfg.kind in ("svq", "image")
        self.has_semantic = cfg.kind in ("svq", "semantic")
        shape = dict(
            ch=cfg.ch,
            ch_mult=cfg.ch_mult,
            num_res_blocks=cfg.num_res_blocks,
            attn_resolutions=cfg.attn_resolutions,
            resolution=cfg.image_size,
            groups=cfg.norm_groups,
            dropout=cfg.dropout,
        )
        zx = cfg.z_channels if self.has_image else 0
        zs = cfg.semantic_z_channels if self.has_semantic else 0
        # Encoder stem: conv over concat(x, onehot(s)) written as conv_x(x) + conv_s(onehot(s)).
        self.stem_x = nn.Conv2d(3, cfg.ch, 3, padding=1) if self.has_image else None
        self.stem_s = (
            SemanticConv(cfg.num_classes, cfg.ch, ignore_index=cfg.ignore_index, bias=not self.has_image)
            if self.has_semantic
            else None
        )
        self.encoder = Encoder(out_channels=zx + zs, **shape)
        q = dict(
            beta=qcfg.beta,
            cosine=qcfg.cosine,
            backend=qcfg.backend,
            grad=qcfg.grad,
            code_dim=qcfg.code_dim or None,
            ema=qcfg.ema,
            ema_decay=qcfg.ema_decay,
            restart_after=qcfg.restart_after,
            restart_sampling=qcfg.restart_sampling,
            restart_every=qcfg.restart_every,
            usage_window=qcfg.usage_window,
            deterministic=qcfg.deterministic,
            init_from_data=qcfg.init_from_data,
        )
        if self.has_image:
            self.quant_x = nn.Conv2d(zx, zx, 1)
            self.quantizer_x = VectorQuantizer(qcfg.image_codebook_size, zx, **q)
            self.post_quant_x = nn.Conv2d(zx + zs, zx + zs, 1)
            # SPADE: the decoder's norms also take a per-pixel scale and shift from sg[z_s]'s class probabilities
            self.spade = self.has_semantic and cfg.image_decoder_semantic == "spade"
            cond = dict(cond_channels=cfg.num_classes, spade_hidden=cfg.spade_hidden) if self.spade else {}
            self.decoder_x = Decoder(in_channels=zx + zs, out_channels=3, **shape, **cond)
        if self.has_semantic:
            self.quant_s = nn.Conv2d(zs, zs, 1)
            # optional semantic-only path: each latent's f x f label patch, embedded linearly, added to z_s
            self.patch_s = (
                SemanticPatchEmbed(cfg.num_classes, zs, cfg.downsampling, ignore_index=cfg.ignore_index)
                if cfg.semantic_patch_input
                else None
            )
            self.quantizer_s = VectorQuantizer(qcfg.semantic_codebook_size, zs, **q)
            self.post_quant_s = nn.Conv2d(zs, zs, 1)
            self.decoder_s = self._semantic_decoder(cfg, zs, shape)
            # (C,) log of the semantic cross-entropy's class weights, set by the trainer (zeros: plain CE).
            # A weighted CE is minimised by softmax(logits) ~ w_c p(c | z): labels are read off logits - log w.
            self.register_buffer("semantic_log_class_weight", torch.zeros(cfg.num_classes))
        if self.has_semantic and cfg.latent_swap > 0:
            # forwards that drew z_x swaps: seeds the swaps' own generator, and as a buffer it is checkpointed, so the
            # draws neither depend on nor disturb the global RNG stream and a resumed run repeats them exactly
            self.register_buffer("latent_swap_draws", torch.zeros((), dtype=torch.int64))
            self.register_load_state_dict_post_hook(lambda m, keys: host_counter.forget(m.latent_swap_draws))
        # Learned fill for the hidden image when training for reference-free semantic encoding.
        self.image_fill = nn.Parameter(torch.zeros(1, 3, 1, 1)) if cfg.image_dropout > 0 else None

    @staticmethod
    def _semantic_decoder(cfg: SVQModelConfig, zs: int, shape: dict) -> nn.Module:
        if cfg.semantic_decoder == "conv":
            return Decoder(in_channels=zs, out_channels=cfg.num_classes, **shape)
        if cfg.semantic_decoder == "subpixel":
            return SubpixelDecoder(
                in_channels=zs,
                out_channels=cfg.num_classes,
                width=cfg.semantic_decoder_width,
                num_blocks=cfg.semantic_decoder_blocks,
                factor=cfg.downsampling,
                groups=cfg.norm_groups,
            )
        raise ValueError(f"model.semantic_decoder must be 'conv' or 'subpixel', got {cfg.semantic_decoder!r}")

    # -- encoding -------------------------------------------------------------------------------------

    def _stem(self, x: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
        h = 0
        if self.has_image:
            h = h + self.stem_x(x)
        if self.has_semantic:
            h = h + self.stem_s(s)
        return h

    def _hide_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image-modality dropout: per sample, replace x by the learned fill with probability p."""
        if not (self.training and self.image_fill is not None and self.cfg.kind == "svq"):
            return x
        drop = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.cfg.image_dropout
        return torch.where(drop, self.image_fill.to(x.dtype).expand_as(x), x)

    def fill_image(self, s: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image input of a map-only encoding: the learned fill (image dropout), else zeros."""
        b, h, w = s.shape
        fill = self.image_fill if self.image_fill is not None else torch.zeros(1, 3, 1, 1, device=s.device)
        return fill.expand(b, 3, h, w)

    def encode(self, x: torch.Tensor | None, s: torch.Tensor | None):
        """-> dict with quantized latents z_x / z_s (B, D, h, w), their indices (B, h, w) and VQ losses."""
        if self.has_image and x is None:
            raise ValueError("this model encodes images: pass x (B, 3, H, W)")
        if self.has_semantic and s is None:
            raise ValueError("this model encodes semantic maps: pass s (B, H, W)")
        x_in = self._hide_image(x) if x is not None else None
        zx = self.cfg.z_channels if self.has_image else 0
        if self.has_image and self.has_semantic and self.cfg.semantic_input == "map":
            # z_s from the map alone, in training too: one encoder pass over the 2B batch [(x, s); (fill, s)]
            # (GroupNorm is per sample, so batching the two readings changes nothing but the speed)
            b = s.shape[0]
            h2 = self.encoder(self._stem(torch.cat([x_in, self.fill_image(s)]), torch.cat([s, s])))
            h_x, h_s = h2[:b, :zx], h2[b:, zx:]
        else:
            h = self.encoder(self._stem(x_in, s))
            h_x, h_s = h[:, :zx], h[:, zx:]
        out: dict = {}
        if self.has_image:
            z_x, loss_x, info_x = self.quantizer_x(self.quant_x(h_x))
            out.update(z_x=z_x, vq_loss_x=loss_x, indices_x=info_x["indices"], perplexity_x=info_x["perplexity"])
        if self.has_semantic:
            z_s, loss_s, info_s = self._quantize_semantic(h_s, s)
            out.update(z_s=z_s, vq_loss_s=loss_s, indices_s=info_s["indices"], perplexity_s=info_s["perplexity"])
        return out

    def _quantize_semantic(self, h_s: torch.Tensor, s: torch.Tensor):
        """Encoder output's semantic channels (B, zs, h, w) -> the semantic quantizer's (z_s, loss, info)."""
        pre_s = self.quant_s(h_s)
        if self.patch_s is not None:
            pre_s = pre_s + self.patch_s(s)
        return self.quantizer_s(pre_s)

    @torch.no_grad()
    def encode_semantic(self, s: torch.Tensor) -> torch.Tensor:
        """Semantic token ids (B, h, w) from s alone: the image input is the learned fill (or zeros)."""
        if self.has_image and self.cfg.semantic_input == "map":
            h_s = self.encoder(self._stem(self.fill_image(s), s))[:, self.cfg.z_channels :]  # one pass, no z_x
            return self._quantize_semantic(h_s, s)[2]["indices"]
        return self.encode(self.fill_image(s) if self.has_image else None, s)["indices_s"]

    # -- decoding -------------------------------------------------------------------------------------

    def decode_image(
        self,
        z_x: torch.Tensor,
        z_s: torch.Tensor | None,
        *,
        s_logits: torch.Tensor | None = None,
        with_hidden: bool = False,
    ):
        """x_hat (B, 3, H, W) from z_x and sg[z_s] (the stop-gradient makes z_s the semantic branch's alone).

        With the SPADE decoder the layout also enters as the semantic decoder's class probabilities of sg[z_s]
        (detached: no gradient reaches the semantic branch); s_logits, when the caller already has
        decode_semantic(z_s), saves computing them again. with_hidden=True: (x_hat, input of the last conv)."""
        z = torch.cat([z_x, z_s.detach()], 1) if self.has_semantic else z_x
        cond = None
        if self.spade:
            if s_logits is None:
                s_logits = self.decode_semantic(z_s.detach())
            cond = self.semantic_probs(s_logits.detach())
        return self.decoder_x(self.post_quant_x(z), cond, with_hidden=with_hidden)

    def semantic_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) semantic logits -> class probabilities of the unweighted posterior (see semantic_labels)."""
        bias = self.semantic_log_class_weight.to(logits.device, logits.dtype)
        return (logits - bias.view(1, -1, 1, 1)).softmax(1)

    def _swap_image_latents(self, z_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training only, with probability cfg.latent_swap per sample: decode with the previous sample's z_x
        (B, D, h, w), so that the decoder must take the layout from sg[z_s] rather than from z_x.
        -> (the z_x to decode, (B,) bool on z_x's device: which samples were swapped, or None when none can be)."""
        p = self.cfg.latent_swap
        if not (self.training and p > 0 and self.has_semantic and z_x.shape[0] > 1):
            return z_x, None
        swap = latent_swap_mask_op(self.latent_swap_draws, z_x.shape[0], float(p)).to(z_x.device)  # (B,) bool
        return torch.where(swap.view(-1, 1, 1, 1), z_x.roll(1, 0), z_x), swap

    def decode_semantic(self, z_s: torch.Tensor) -> torch.Tensor:
        return self.decoder_s(self.post_quant_s(z_s))  # (B, num_classes, H, W) logits

    def set_semantic_class_weight(self, weight: torch.Tensor | None) -> None:
        """Record the (C,) class weights the semantic CE trains with (None: plain CE), so that semantic_labels
        undoes their bias. Classes with weight 0 (absent from the training data) get no correction."""
        if weight is None:
            self.semantic_log_class_weight.zero_()
            return
        if weight.shape != self.semantic_log_class_weight.shape:
            raise ValueError(
                f"semantic class weights: expected shape {tuple(self.semantic_log_class_weight.shape)} "
                f"(one per class), got {tuple(weight.shape)}"
            )
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError(f"semantic class weights must be finite and >= 0, got {weight.tolist()}")
        w = weight.detach().double().cpu()
        log_w = torch.where(w > 0, w.clamp_min(1e-300).log(), 0.0)
        self.semantic_log_class_weight.copy_(log_w)

    def semantic_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) semantic logits -> (B, H, W) class ids, the argmax of the unweighted posterior.

        Class-balanced CE speeds up learning rare classes, but its minimiser inflates them by w_c (thin classes
        come out too thick: false positives along their edges). Subtracting log w_c removes exactly that factor
        (on the tiny sVQGAN, +2.2 points of semantic mIoU at 600 and at 1500 steps)."""
        bias = self.semantic_log_class_weight.to(logits.device, logits.dtype)
        return (logits - bias.view(1, -1, 1, 1)).argmax(1)

    def decode_indices(self, indices_x: torch.Tensor | None, indices_s: torch.Tensor | None) -> torch.Tensor:
        """Image from token ids (B, h, w): the sampling path."""
        z_x = self.quantizer_x.lookup(indices_x)
        z_s = self.quantizer_s.lookup(indices_s) if self.has_semantic else None
        return self.decode_image(z_x, z_s)

    def forward(self, x: torch.Tensor | None, s: torch.Tensor | None) -> dict:
        """-> encode's dict plus x_hat (B, 3, H, W), x_hat_hidden (the image decoder's last-conv input, for the
        adaptive GAN weight) and s_logits (B, C, H, W), whichever the model has."""
        out = self.encode(x, s)
        if self.has_semantic:
            out["s_logits"] = self.decode_semantic(out["z_s"])
        if self.has_image:
            z_x, swapped = self._swap_image_latents(out["z_x"])
            out["x_hat"], out["x_hat_hidden"] = self.decode_image(
                z_x, out.get("z_s"), s_logits=out.get("s_logits"), with_hidden=True
            )
            if swapped is not None and self.cfg.latent_swap_target == "recoloured":
                # what the image terms compare x_hat with (the trainer's default is x)
                out["x_target"] = recoloured_swap_target(x, s, swapped, self.cfg.num_classes, self.cfg.ignore_index)
        return out

    def image_last_layer(self) -> nn.Conv2d:
        return self.decoder_x.conv_out


def _latent_swap_mask(draws: torch.Tensor, batch: int, p: float) -> torch.Tensor:
    """(B,) bool on the CPU: which samples decode with the previous sample's z_x. Drawn from a generator of its own,
    seeded by the checkpointed counter `draws` (incremented here) and the rank; a registered op so that the host read
    of the counter and the generator stay out of a compiled graph's trace."""
    gen = torch.Generator().manual_seed((host_counter.advance(draws) - 1) * 1_000_003 + dist.rank())
    return torch.rand(batch, generator=gen) < p


def _latent_swap_mask_fake(draws: torch.Tensor, batch: int, p: float) -> torch.Tensor:
    return torch.empty(batch, dtype=torch.bool, device="cpu")


latent_swap_mask_op = define_op("latent_swap_mask", _latent_swap_mask, _latent_swap_mask_fake, mutates_args=("draws",))
