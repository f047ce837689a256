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
    """CPU-sized sVQGAN on the synthetic 64x64 scenes: downsampling 4, so latents are still 16x16.

    Tuned for a few hundred CPU steps (single-process probes, batch 16, held-out semantic mIoU; the real-recipe runs
    are under benchmarks/results/svqgan_tiny_*_cpu/): no ResBlocks outside the mid blocks (0.37 vs 0.28 with one per
    level after 150 steps, no quantizer), Adam lr 3e-3 with betas (0.9, 0.99) (0.28 vs 0.14 at lr 1e-3, betas (0.5,
    0.9) after 100 steps), dead codes restarted after 20 steps, inverse-sqrt class-balanced semantic cross-entropy
    with a cosine lr decay (0.53 vs 0.38 at 300 steps: the small object classes are what mIoU waits for), and the
    paper's 4096 semantic codes: coding each 4x4 label patch with 256 patterns caps mIoU at 0.79 on this data, 1024
    at 0.88, 4096 at 0.94 (recipes/experiments/semantic_codebook_bound.py). The semantic decoder is the sub-pixel
    one (two 128-wide ResBlocks at 16x16, then one conv to 16 x 16 logits per latent): 0.73 after 300 steps against
    0.44 with the conv decoder mirroring the image decoder, at about 30% less time per step. A linear embedding of
    each latent's 4x4 label patch is added to z_s (`semantic_patch_input`, nn/semantic_patch.py), beside the shared
    encoder: 0.73 / 0.82 / 0.85 after 100 / 200 / 300 steps against 0.30 / 0.63 / 0.76 without it, and 89.75%
    against 83.35% semantic mIoU from the real 600-step recipe (2 ranks, GAN). Dead codes restart at latents drawn
    by their quantization error (k-means++-style), which gives the freed codes to the thin objects' label patches:
    90.28% against 89.75% with uniform restarts (real recipe); semantic-only probe 0.870 / 0.880 against 0.852 /
    0.872 (two seeds).

    Image side (the demo recipe, 2 ranks x 8; benchmarks/results/demo_cpu/, README "Do the samples follow their
    maps?"): the image decoder is the SPADE one (`image_decoder_semantic="spade"`, 32 hidden channels, 1x1
    gamma/beta: 5.20 against 4.62 GFLOP per sample) and decodes another sample's z_x with probability 0.25
    (`latent_swap`), so the layout comes from sg[z_s]. Same instrument, 600 steps: a decode with another scene's z_x
    keeps 74% of the reconstructions' seg. mIoU (20.5% / 27.8%) against 56% (6.0% / 10.8%) with the paper's concat
    decoder. The GAN enters late: with the old disc_start 150 / disc_weight 0.8 the generator (lr 3e-3) beat the
    discriminator within 10 steps of disc_start (held-out logit gap real - reconstruction +3.5 -> -1.8, L1 0.23 ->
    0.29-0.33, and ~0 to the end); with disc_start 300 after 250 discriminator-only steps and disc_weight 0.1 the
    gap stays at +6 to +7.8 to the end of 600 steps while L1 keeps falling (0.23 at step 300, 0.17-0.21 at 600). 400
    steps (the demo's budget: a SPADE step costs ~0.8 s on 2 ranks), disc_start 200 after 170 discriminator-only
    steps: disc_weight 0.1 gives reconstructions FSD 9.33 / seg. mIoU 18.2% / PSNR 19.8 dB and an end gap of +6.9;
    disc_weight 0.5 gives 5.52 / 18.9% / 17.4 dB and +1.2 but draws horizontal streaks over sand, sky and water (the
    artifact the old settings showed), so 0.1. Steps matter most: 600 steps at disc_weight 0.1 reach 7.89 / 27.8% /
    20.1 dB (STAGE1_STEPS=600 with --optim.max_steps=600 --loss.disc_start=300 --loss.disc_warmup=250).

    Channels-last (`channels_last`: 1.05x per stage-1 step on 2 CPU ranks alone on the machine, 1.18-1.24x in
    shared-machine runs, benchmarks/results/issue20_step_table_cpu/) and 480 steps instead of 400 (the demo's stage 1:
    404 s against 360 s), with the GAN's schedule scaled to disc_start 240
    after 204 discriminator-only steps: reconstructions' seg. mIoU 25.8% against 21.9%, FSD 8.17 against 8.58, PSNR
    20.3 dB either way (same 67%-mIoU instrument, 128 held-out scenes). The texture term (`texture_weight`,
    losses/reconstruction.py: L1 on the local energy of a 3x3 high-pass, phase-free, no pretrained network) gives
    the decoder the cue that blur is wrong: on the same 480-step recipe weight 0 / 2 / 4 / 8 reach reconstruction
    seg. mIoU 25.8 / 37.5 / 41.1 / 39.4%, FSD 8.17 / 2.86 / 1.68 / 1.78, PSNR 20.3 / 19.4 / 19.2 / 18.8 dB and SSIM
    0.51 / 0.46 / 0.44 / 0.40 (sand, road and grass, told by their dots, stripes and noise, go from 2 / 11 / 32% IoU
    to 65 / 50 / 67% at weight 2), with the discriminator's held-out gap at +7.4 / +5.9 / +5.9 / +5.5, so 4
    (benchmarks/results/issue15_texture_cpu/). Measured on this recipe and not taken (reconstructions' seg.
    mIoU by the 82% instrument, benchmarks/results/issue15_probes_cpu/; two seeds of the default: 41.7 / 42.9%):
    image_class_balance 0.5 / 1.0 33.9 / 36.5%, a 4096-code image codebook 34.9%, latent_swap 0.1 40.1%, micro-batch
    4 at 960 steps 43.1% (1.28x the time); 960 steps reach 48.9%. The paper-size configs keep the paper's architecture
    (mirrored conv decoder, concat z_s, no patch input, no swap, no texture term), uniform restarts and
    the default memory format."""
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
    """CPU-sized GPT over the tiny sVQGAN's 16x16 + 16x16 tokens. Position-aligned conditioning (`aligned_condition`)
    measured on one stage-1 export, 300 steps each, 128 held-out scenes: image-token NLL 5.469 against 5.617 bits per
    token, the condition worth 0.259 against 0.043 bits (NLL with the null condition minus with the true one), GPT
    samples' seg. mIoU 23.9% against 22.2% and FSD 8.85 against 9.00. Guidance 3 moved seg. mIoU by +0.2 points and
    FSD from 8.85 to 9.60, so sampling stays unguided by default. Sampling takes the 20 most likely image tokens
    (`sample.top_k`, the default of recipes/sample.py, evaluate.py and the synthesis page): on the demo's exports,
    128 held-out scenes, GPT samples score 38.3% seg. mIoU / FSD 3.74 against 35.4% / 4.15 at top-k 100 and 37.8% /
    4.06 at 10 (chosen on the maps it is scored on); at top-k 20, temperature 0.8 / 0.6 give 37.8% / 3.84 and
    38.1% / 4.02, so the temperature stays 1 (these at lr 1e-3). Learning rate, on the demo's stage-1 export at 2
    ranks x 8, 300 steps: lr 1e-3 / 2e-3 / 3e-3 / 4e-3 give an image-token NLL of 5.175 / 4.757 / 4.687 / 4.719 bits
    per token, the condition worth 0.287 / 0.408 / 0.460 / 0.474 bits, samples at 38.3 / 39.0 / 38.8 / 38.7% seg.
    mIoU and FSD 3.74 / 3.57 / 3.45 / 3.42; 450 steps at 1e-3 reach 4.714 bits, 39.2% and 3.35 for 1.5x the time.
    The tiny GPT takes 3e-3, for this global batch of 16; at batch 8 in one process it raised three of the synthetic
    tables' four GPTs' NLL, so that experiment keeps 1e-3 (its STAGE2_LR).
    Map-only z_s (`condition`), top-k 50 (20 above: the reference condition's): results/issue29_condition_cpu/."""
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
