"""Named run configurations: each function returns a fresh, fully typed config.

deepspeed recipes/train_svqgan.py --config svqgan_tiny --optim.max_steps=100
"""

from __future__ import annotations

from svq_fast.config import (
    DataConfig,
    GPTConfig,
    LossConfig,
    OptimConfig,
    QuantizerConfig,
    RunConfig,
    SampleConfig,
    Stage1Config,
    Stage2Config,
    SVQModelConfig,
    ZeroConfig,
)
from svq_fast.data.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES


def _gpu_zero() -> ZeroConfig:
    """The paper-size runs' ZeRO and precision: ZeRO-2, bf16 autocast over fp32 weights, gradients reduced in
    5e7-element buckets during the backward, fp32 reductions (train/README.md "GPU defaults")."""
    return ZeroConfig(
        stage=2, precision="bf16", overlap_comm=True, reduce_bucket_size=50_000_000, allgather_bucket_size=50_000_000
    )


def svqgan_f16_256() -> Stage1Config:
    """The paper's sVQGAN: 256x256 input, 16x16 latents (f16), codebooks 16384 / 4096, lambda 0.1."""
    return Stage1Config(
        model=SVQModelConfig(
            kind="svq",
            image_size=256,
            num_classes=243,
            ch=128,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            z_channels=256,
            semantic_z_channels=256,
        ),
        quantizer=QuantizerConfig(image_codebook_size=16384, semantic_codebook_size=4096, beta=0.25),
        loss=LossConfig(semantic_weight=0.1, gan=True, disc_start=10000, disc_warmup=2000, perceptual_weight=1.0),
        data=DataConfig(image_size=256, num_workers=4),
        optim=OptimConfig(lr=4.5e-6 * 8 * 8, micro_batch=8, max_steps=200_000, warmup_steps=1000),
        zero=_gpu_zero(),
        run=RunConfig(name="svqgan_f16_256", out_dir="runs/svqgan_f16_256", save_every=5000),
    )


def svqgan_tiny() -> Stage1Config:
    """CPU-sized sVQGAN on the synthetic 64x64 scenes (the demo's stage 1, the tests', the synthetic tables'):
    downsampling 4, so latents are still 16x16; 480 steps at 2 ranks x 8.

    Beyond the paper, each default measured on this recipe: a sub-pixel semantic decoder, class-balanced semantic CE,
    a label-patch input to z_s and error-weighted code restarts (held-out semantic mIoU 90.3% at 600 steps); the
    paper's 4096 semantic codes (the codebook bound); a SPADE image decoder with latent swap 0.25, a texture term at
    weight 4, a late and weak GAN, channels-last. The measurements behind each default, and what was tried and not
    taken: benchmarks/results/tiny_configs_cpu/README.md. The paper-size configs keep the paper's architecture
    (mirrored conv decoder, concat z_s, no patch input, no swap, no texture term), uniform restarts and the default
    memory format."""
    return Stage1Config(
        model=SVQModelConfig(
            kind="svq",
            image_size=64,
            num_classes=SYNTHETIC_CLASSES,
            ch=32,
            ch_mult=(1, 2, 2),
            num_res_blocks=0,
            attn_resolutions=(),
            norm_groups=8,
            z_channels=32,
            semantic_z_channels=16,
            semantic_decoder="subpixel",
            semantic_decoder_width=128,
            semantic_decoder_blocks=2,
            semantic_patch_input=True,
            image_decoder_semantic="spade",
            spade_hidden=32,
            latent_swap=0.25,
            channels_last=True,
        ),
        quantizer=QuantizerConfig(
            image_codebook_size=1024,
            semantic_codebook_size=4096,
            beta=0.25,
            restart_after=20,
            restart_sampling="error",
        ),
        loss=LossConfig(
            semantic_weight=0.1,
            semantic_class_balance=0.5,
            texture_weight=4.0,
            gan=True,
            disc_weight=0.1,
            disc_start=240,
            disc_warmup=204,
            disc_ch=16,
            disc_layers=2,
        ),
        data=DataConfig(image_size=64, num_workers=0, shuffle_buffer=64),
        optim=OptimConfig(
            lr=3e-3,
            disc_lr=1e-3,
            betas=(0.9, 0.99),
            micro_batch=8,
            max_steps=480,
            warmup_steps=20,
            lr_schedule="cosine",
        ),
        run=RunConfig(name="svqgan_tiny", out_dir="runs/svqgan_tiny"),
    )


def gpt_f16_256() -> Stage2Config:
    """The paper-scale Transformer: 24 layers, 16 heads, width 1024, over 256 + 256 tokens."""
    return Stage2Config(
        model=GPTConfig(image_vocab=16384, semantic_vocab=4096, grid=16, n_layer=24, n_head=16, n_embd=1024),
        stage1="runs/svqgan_f16_256/export",
        data=DataConfig(image_size=256, num_workers=4),
        optim=OptimConfig(
            lr=3e-4,
            betas=(0.9, 0.95),
            weight_decay=0.01,
            micro_batch=16,
            max_steps=200_000,
            warmup_steps=2000,
            lr_schedule="cosine",
        ),
        zero=_gpu_zero(),
        run=RunConfig(name="gpt_f16_256", out_dir="runs/gpt_f16_256", save_every=5000),
    )


def gpt_tiny() -> Stage2Config:
    """CPU-sized GPT over the tiny sVQGAN's 16x16 + 16x16 tokens (the demo's stage 2): 4 layers, width 128.

    Trains and samples on z_s from the map alone (`condition="map"`: samples of one map vary the way real images of
    it do) at top-k 50 (benchmarks/results/issue29_condition_cpu/README.md); position-aligned conditioning, unguided
    sampling at temperature 1, lr 3e-3 for this global batch of 16 (2 ranks x 8; the synthetic tables, at batch 8 in
    one process, keep 1e-3). The measurements behind each default: benchmarks/results/tiny_configs_cpu/README.md."""
    return Stage2Config(
        model=GPTConfig(
            image_vocab=1024, semantic_vocab=4096, grid=16, n_layer=4, n_head=4, n_embd=128, aligned_condition=True
        ),
        stage1="runs/svqgan_tiny/export",
        data=DataConfig(image_size=64, num_workers=0, shuffle_buffer=64),
        optim=OptimConfig(
            lr=3e-3,
            betas=(0.9, 0.95),
            weight_decay=0.01,
            micro_batch=8,
            max_steps=300,
            warmup_steps=20,
            lr_schedule="cosine",
        ),
        condition="map",
        sample=SampleConfig(top_k=50),
        run=RunConfig(name="gpt_tiny", out_dir="runs/gpt_tiny"),
    )


# ----------------------------------------------------------------------------------------------------
# The model family of the paper's Tables 1-3, as variants of the two base configs above.
#   vqvae / vqgan:      image-only VQ models (the image half of the VQ-T baselines)
#   semantic_vqvae:     the separately trained semantic VQVAE that conditions the VQ-T baselines
#   svqvae / svqgan:    semantically coupled models, lambda = 0.1 (paper default); svqgan_l001 / svqgan_l1:
#                       lambda = 0.01 / 1.0 (Tables 2-3)
#   svqgan_mapdrop:     sVQGAN trained with image-modality dropout (p = 0.5) so that z_s can be encoded from the
#                       semantic map alone (beyond the paper: sampling without a reference image)


def _variant(
    base, name: str, *, kind: str, gan: bool, semantic_weight: float = 0.1, image_dropout: float = 0.0
) -> Stage1Config:
    cfg = base()
    cfg.model.kind = kind
    cfg.model.image_dropout = image_dropout
    cfg.loss.gan = gan and kind != "semantic"
    cfg.loss.semantic_weight = semantic_weight
    if not cfg.loss.gan:  # VQVAE: L2 reconstruction + codebook, no perceptual, texture or adversarial term
        cfg.loss.l1_weight, cfg.loss.l2_weight, cfg.loss.perceptual_weight = 0.0, 1.0, 0.0
        cfg.loss.texture_weight = 0.0
    cfg.run.name = name
    cfg.run.out_dir = f"runs/{name}"
    return cfg


_FAMILY = {
    "vqvae": dict(kind="image", gan=False),
    "vqgan": dict(kind="image", gan=True),
    "semantic_vqvae": dict(kind="semantic", gan=False),
    "svqvae": dict(kind="svq", gan=False),
    "svqgan_l001": dict(kind="svq", gan=True, semantic_weight=0.01),
    "svqgan_l1": dict(kind="svq", gan=True, semantic_weight=1.0),
    "svqgan_mapdrop": dict(kind="svq", gan=True, image_dropout=0.5),
}


def _make(base, name, spec):
    def config() -> Stage1Config:
        return _variant(base, name, **spec)

    config.__name__ = name
    config.__doc__ = f"{name}: {spec}"
    return config


_VARIANTS = {
    f"{fam}_{size}": _make(base, f"{fam}_{size}", spec)
    for fam, spec in _FAMILY.items()
    for size, base in (("tiny", svqgan_tiny), ("f16_256", svqgan_f16_256))
}


def gpt_baseline_tiny() -> Stage2Config:
    """VQ-T baseline Transformer: image tokens from vqgan_tiny, condition tokens from semantic_vqvae_tiny."""
    cfg = gpt_tiny()
    cfg.stage1, cfg.stage1_semantic = "runs/vqgan_tiny/export", "runs/semantic_vqvae_tiny/export"
    cfg.run.name, cfg.run.out_dir = "gpt_baseline_tiny", "runs/gpt_baseline_tiny"
    return cfg


CONFIGS = {f.__name__: f for f in (svqgan_f16_256, svqgan_tiny, gpt_f16_256, gpt_tiny, gpt_baseline_tiny)}
CONFIGS.update(_VARIANTS)


def get_config(name: str):
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name]()
