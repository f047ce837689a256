"""Typed run configuration: keyword-only dataclasses, strict `--section.field=value` overrides, and the
DeepSpeed config generated from them.

A run config is a `Stage1Config` (autoencoder) or `Stage2Config` (Transformer). Named runs live in
`svq_fast/named_configs.py` as functions returning one of these. Overrides name a section and a field; an
unknown section or field, or a value that does not parse as the field's type, raises `ConfigError`
naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


# ----------------------------------------------------------------------------------------------------
# sections


@dataclass(kw_only=True)
class QuantizerConfig:
    """Nearest-codebook quantizer (one per latent: image and semantic)."""

    image_codebook_size: int = 16384
    semantic_codebook_size: int = 4096
    beta: float = 0.25  # weight of the commitment term beta * ||z - sg[e]||^2 (textbook placement)
    backend: Literal["auto", "triton", "native", "ref"] = "auto"
    cosine: bool = False  # l2-normalise latents and codes before the lookup
    grad: Literal["ste", "rotation"] = "ste"  # straight-through, or the rotation trick (Fifty et al. 2024)
    code_dim: int = 0  # > 0: look codes up in this small dimension (LlamaGen-style 8-dim codes); 0 = latent dim
    ema: bool = False  # EMA codebook updates instead of the codebook loss (not under ZeRO-3)
    ema_decay: float = 0.99
    restart_after: int = 100  # re-seed codes unused for this many training steps (0 = off); keeps usage high
    # where restarted codes go: latents drawn uniformly, or with probability ~ their squared quantization error
    # ("error", k-means++-style: rare patterns the codebook misses get the freed codes)
    restart_sampling: Literal["uniform", "error"] = "uniform"
    # look for dead codes every N training steps: finding them is a host read, which a step that does not look avoids
    restart_every: int = 10
    init_from_data: bool = True  # seed the codebook from the first training batch's latents (no early collapse)
    usage_window: int = 100  # steps over which codebook usage is reported
    deterministic: bool = True  # deterministic codebook-gradient scatter on GPU


@dataclass(kw_only=True)
class SVQModelConfig:
    """Stage-1 autoencoder. `kind` selects the member of the model family:
    svq: shared encoder over (x, s), semantic + image decoders (the paper's sVQVAE / sVQGAN);
    image: image-only VQ model (VQVAE / VQGAN); semantic: semantic-only VQVAE (the baseline's conditioner).
    """

    kind: Literal["svq", "image", "semantic"] = "svq"
    image_size: int = 256
    num_classes: int = 243  # unified label space; label value `ignore_index` marks unlabeled pixels
    ignore_index: int = 255
    ch: int = 128  # base width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per resolution; len-1 downsamplings
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get a self-attention block
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups; must divide every width
    z_channels: int = 256  # image latent / code dimension
    semantic_z_channels: int = 256  # semantic latent / code dimension
    image_dropout: float = 0.0  # probability of hiding x from the encoder (reference-free z_s)
    semantic_input: Literal["shared", "map"] = "shared"  # z_s from f_sEnc(x, s) (paper) or f_sEnc(fill, s) (map only)
    # Semantic decoder: "conv" mirrors the image decoder (the paper); "subpixel" stays at latent resolution with
    # `semantic_decoder_blocks` ResBlocks of `semantic_decoder_width` channels and unfolds every latent into its
    # f x f label patch with one sub-pixel conv (models/svq/subpixel_decoder.py): much faster to train on label maps.
    # Its last conv has num_classes * f^2 outputs, so it suits small downsampling factors f (the tiny configs' 4).
    semantic_decoder: Literal["conv", "subpixel"] = "conv"
    semantic_decoder_width: int = 256
    semantic_decoder_blocks: int = 2
    # Add a linear embedding of each latent's f x f label patch to z_s before quantization (nn/semantic_patch.py):
    # a path that only the semantic loss trains, beside the shared encoder, which still feeds z_s.
    semantic_patch_input: bool = False
    # How the image decoder sees sg[z_s]: "concat" to z_x at its input (the paper), or "spade": also as per-pixel
    # scale and shift of every decoder norm, predicted from the semantic decoder's class probabilities of sg[z_s]
    # (models/svq/spade.py), `spade_hidden` channels wide.
    image_decoder_semantic: Literal["concat", "spade"] = "concat"
    spade_hidden: int = 64
    # Training only: probability per sample that the image decoder gets another sample's z_x, so the layout has to
    # come from sg[z_s] (coupled models; 0 = off, the paper).
    latent_swap: float = 0.0
    # What a swapped decode is trained towards: "image", the sample's own image (its appearance then has to come from
    # z_s), or "recoloured", that image with each class's mean colour moved to the z_x donor's (models/svq/
    # swap_target.py; measured in benchmarks/results/issue29_condition_cpu/README.md).
    latent_swap_target: Literal["image", "recoloured"] = "image"
    # Run the conv nets (generator and discriminator) in the channels-last memory format: every Conv2d input is
    # made NHWC (train/engine.py); parameters and checkpoints keep the default layout.
    channels_last: bool = False

    @property
    def downsampling(self) -> int:
        """Image side / latent side: one halving per ch_mult entry after the first."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(kw_only=True)
class LossConfig:
    """Stage-1 loss, equation (3): L_VQ(x, x_hat) + lambda * L_VQVAE(s, s_hat)."""

    semantic_weight: float = 0.1  # lambda
    # Exponent a of per-class semantic CE weights ~ (pixel frequency)^-a from the training shards' class histogram
    # (losses/class_balance.py); 0 = plain cross-entropy as in the paper, 0.5 = inverse-sqrt frequency.
    semantic_class_balance: float = 0.0
    # The same exponent for per-pixel weights of the image terms (L1/L2 and texture; not the GAN term), by each
    # pixel's class in the semantic map: mIoU counts a pole as much as the sky. Needs a model with the semantic
    # branch (the map is its input). 0 = unweighted, as in the paper. On the tiny sVQGAN's demo recipe it hurt:
    # reconstructions' seg. mIoU 33.9% at 0.5 and 36.5% at 1.0 against 41.7% unweighted (benchmarks/results/
    # issue15_probes_cpu/), so the tiny configs keep it off.
    image_class_balance: float = 0.0
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0  # LPIPS; needs lpips_vgg_path
    # Local texture energy (losses/reconstruction.py:texture_loss): L1 between the mean |high-pass| of x_hat and of x
    # in texture_window x texture_window cells. Phase-free, so blur costs and a pattern off by half a period does
    # not; no pretrained network needed (LPIPS's role where its weights are absent). 0 = off (the paper).
    texture_weight: float = 0.0
    texture_window: int = 4
    lpips_vgg_path: str = ""
    gan: bool = True  # VQGAN (PatchGAN) vs VQVAE
    gan_loss: Literal["hinge", "non_saturating"] = "hinge"  # hinge: VQGAN's
    lecam_weight: float = 0.0  # LeCam regulariser on the discriminator's logits (losses/gan.py); 0 = off
    lecam_decay: float = 0.99  # of the running logit means it pulls towards
    disc_weight: float = 0.8
    disc_start: int = 0  # generator step at which the adversarial term enters the generator loss
    disc_warmup: int = 0  # discriminator-only steps before disc_start (the discriminator is trained throughout)
    adaptive_weight: bool = True  # taming's gradient-norm ratio at the decoder's last layer
    adaptive_weight_max: float = 1e4
    disc_ch: int = 64
    disc_layers: int = 3


@dataclass(kw_only=True)
class GPTConfig:
    """Stage-2 Transformer over [z_s tokens ; z_x tokens]; loss on z_x tokens only."""

    image_vocab: int = 16384
    semantic_vocab: int = 4096
    grid: int = 16  # latent grid side; 256 image + 256 semantic tokens at 16
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    dropout: float = 0.0
    bias: bool = False
    attn_backend: Literal["auto", "triton", "xformers", "sdpa", "ref"] = "auto"
    prefix_lm: bool = False  # semantic tokens attend bidirectionally among themselves
    cfg_dropout: float = 0.1  # probability of replacing the condition by learned null tokens
    # The input that predicts image token i also gets an embedding of semantic token i (same grid cell), beside the
    # [z_s ; z_x] prefix (ControlAR's conditional decoding; models/gpt.py). Off: the paper's prefix alone.
    aligned_condition: bool = False
    chunked_ce: bool = False  # image-token loss without materialising (B, N, V) logits (kernels/cross_entropy.py)


@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how they are streamed."""

    # a directory of .tar shards, a glob, a brace pattern, http(s):// or pipe: URLs, a *.txt list (data/index.py)
    train_shards: str = ""
    val_shards: str = ""
    token_shards: str = ""  # stage 2 only: token shards from recipes/tokenize_shards.py (skips the encoder)
    synthetic_default: str = "data/synthetic"  # used when train_shards is empty; generated on first use
    synthetic_train_samples: int = 4000  # size of the generated synthetic train split (val: 256)
    image_size: int = 256
    num_workers: int = 2
    shuffle_buffer: int = 256
    random_flip: bool = True
    # Every rank reads the same global stream and keeps its own slice of each global batch: wasteful, but the
    # samples of a step are then independent of the number of ranks (for exact 1-vs-N-rank parity checks).
    global_stream: bool = False
    seed: int = 0
    # streamed shards (http(s)://, pipe:): failed attempts in a row before a shard is skipped (and counted), seconds
    # before the first retry (doubling, at most 30), seconds without data before an attempt fails (data/reader.py)
    stream_retries: int = 3
    stream_backoff: float = 1.0
    stream_timeout: float = 60.0
    # bad samples (undecodable, sha256 mismatch, label ids outside the model's classes) and samples of unreadable
    # or short shards are replaced; more than this fraction replaced in a logging window stops the run (1 = never)
    max_bad_fraction: float = 0.05


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 4.5e-6 * 8  # taming's base lr x batch 8
    disc_lr: float = 0.0  # 0 = same as lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    # AdamW's fused kernel: "auto" = on CUDA only (no per-step host read of its step counts; train/engine.py)
    fused_adam: Literal["auto", "on", "off"] = "auto"
    micro_batch: int = 8  # per rank
    grad_accum: int = 1
    max_steps: int = 1000


@dataclass(kw_only=True)
class ZeroConfig:
    """DeepSpeed ZeRO and precision. The paper-size configs choose bf16 autocast, overlapped gradient reduction and
    5e7-element buckets (train/README.md "GPU defaults" says why and what the first multi-GPU run should measure)."""

    stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False
    overlap_comm: bool = False  # reduce gradient buckets during the backward (ZeRO 1-3)
    # elements per gradient-reduction / parameter-allgather bucket; 0 = DeepSpeed's default (5e8: larger than a
    # 350M-parameter model, so nothing overlaps, and a 2 GB fp32 buffer per engine)
    reduce_bucket_size: int = 0
    allgather_bucket_size: int = 0
    communication_dtype: Literal["fp32", "bf16"] = "fp32"  # dtype of the gradient all-reduce / reduce-scatter


@dataclass(kw_only=True)
class LogConfig:
    every: int = 10  # scalars every N steps
    image_every: int = 0  # image grids every N steps (0 = never)
    tensorboard: bool = True
    progress: bool = True  # tqdm on rank 0
    profile: bool = False  # capture a torch.profiler trace (wait 1, warmup 1, active 3 steps) into <run>/profile


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 0
    save_every: int = 0  # DeepSpeed checkpoint every N steps (0 = only at the end)
    keep_last: int = 3
    resume: str = ""  # "" | "auto" | a checkpoint tag directory
    max_seconds: float = 0.0  # stop (with a checkpoint and an export) after this much training time; 0 = off
    max_nonfinite_skips: int = 20  # consecutive non-finite losses tolerated before the run stops
    # torch.compile every trained module (fullgraph: a graph break is an error). A compile failure prints one
    # warning naming the cause and that module runs eagerly (train/engine.py). Not with zero.stage=3.
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # aot_eager: trace only (tests)
    # a fresh start (resume "") in a directory holding checkpoints refuses; true: delete the previous run's outputs
    overwrite: bool = False
    # CUDA only (CPU runs are untouched): fp32 matmuls and convolutions in TF32 (torch "high"; the VQ search keeps
    # ~fp32 "tf32x3" dots), cuDNN autotuning for training's fixed shapes (train/engine.py configure_backends)
    tf32: bool = True
    cudnn_benchmark: bool = True


@dataclass(kw_only=True)
class Stage1Config:
    model: SVQModelConfig = field(default_factory=SVQModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass(kw_only=True)
class SampleConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    guidance_scale: float = 1.0  # 1.0 = no classifier-free guidance


@dataclass(kw_only=True)
class Stage2Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    stage1: str = ""  # directory of the stage-1 safetensors export (model.safetensors + config.json)
    stage1_semantic: str = ""  # separate semantic VQVAE export for the VQ-T baseline ("" = coupled model)
    # sha256 of those exports' model.safetensors; "" = recorded at the training start (train/run_dir.py), then
    # checked wherever the GPT is loaded with its stage-1 model (svq_fast/export.py: load_tokenizer)
    stage1_sha256: str = ""
    stage1_semantic_sha256: str = ""
    condition: Literal["reference", "map"] = "reference"  # z_s the GPT trains/samples on: (image, map) or map alone
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ----------------------------------------------------------------------------------------------------
# overrides


def _parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse `text` as type `tp` (the resolved annotation); raise ConfigError naming `key` if it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse_value(key, text, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot parse {text!r} as {tp}")
    if origin is Literal:
        for a in args:
            try:
                v = _parse_value(key, text, type(a))
            except ConfigError:
                continue
            if v == a:
                return a
        raise ConfigError(f"{key}: {text!r} is not one of {list(args)}")
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip() != ""]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(key, p.strip(), args[0]) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_value(key, p.strip(), a) for p, a in zip(parts, args))
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if tp is str:
        return text
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def set_value(cfg: Any, dotted: str, text: str) -> None:
    """Set `section.field` (any depth) on a config from its string form, strictly."""
    parts = dotted.split(".")
    target = cfg
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"{'.'.join(parts[:i])} is a value, not a section (in --{dotted})")
        hints = _field_types(target)
        if name not in hints:
            where = ".".join(parts[:i]) or type(cfg).__name__
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key --{dotted}: {where!r} has no field {name!r} (known: {known})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(target, name)):
                raise ConfigError(f"--{dotted} names a whole section; set one of its fields")
            setattr(target, name, _parse_value(dotted, text, hints[name]))
        else:
            target = getattr(target, name)


def apply_overrides(cfg: Any, args: list[str]) -> Any:
    """Apply `--section.field=value` (or `--section.field value`) arguments in order; returns cfg."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{body} needs a value")
            key, value = body, args[i + 1]
            i += 1
        set_value(cfg, key, value)
        i += 1
    validate(cfg)
    return cfg


# Ranges of single fields, by dotted key (a section missing from a config is skipped): >= 1, >= 0, probability.
_AT_LEAST_1 = (
    "model.image_size model.num_classes model.ch model.norm_groups model.z_channels model.semantic_z_channels "
    "model.semantic_decoder_width model.image_vocab model.semantic_vocab model.grid model.n_layer model.n_head "
    "model.n_embd quantizer.image_codebook_size quantizer.semantic_codebook_size quantizer.usage_window "
    "loss.disc_ch loss.disc_layers loss.texture_window data.image_size data.synthetic_train_samples optim.max_steps "
    "optim.micro_batch optim.grad_accum log.every run.max_nonfinite_skips"
).split()
_AT_LEAST_0 = (
    "model.num_res_blocks model.semantic_decoder_blocks quantizer.code_dim quantizer.restart_after data.num_workers "
    "data.shuffle_buffer optim.warmup_steps optim.weight_decay optim.grad_clip optim.disc_lr log.image_every "
    "run.save_every run.keep_last run.max_seconds quantizer.beta loss.semantic_weight loss.semantic_class_balance "
    "loss.image_class_balance loss.l1_weight loss.l2_weight loss.perceptual_weight loss.texture_weight "
    "loss.disc_weight loss.disc_start loss.disc_warmup sample.top_k"
).split()
_PROBABILITY = (
    "model.dropout model.image_dropout model.latent_swap model.cfg_dropout quantizer.ema_decay data.max_bad_fraction"
).split()


def _fields(obj: Any, prefix: str = ""):
    """(dotted key, value) of every leaf field of a (nested) config."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _fields(value, key + ".")
        else:
            yield key, value


def _check_ranges(cfg: Any) -> None:
    values = dict(_fields(cfg))
    for key, v in values.items():
        floats = v if isinstance(v, tuple) else (v,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in floats):
            raise ConfigError(f"{key}={v} is not a finite number")
    for keys, ok, what in (
        (_AT_LEAST_1, lambda v: v >= 1, "must be >= 1"),
        (_AT_LEAST_0, lambda v: v >= 0, "must be >= 0"),
        (_PROBABILITY, lambda v: 0.0 <= v <= 1.0, "is a probability: use a value in [0, 1]"),
    ):
        for key in keys:
            if key in values and not ok(values[key]):
                raise ConfigError(f"{key}={values[key]} {what}")
    if "model.ch_mult" in values:
        ch_mult = values["model.ch_mult"]
        if not ch_mult or any(k < 1 for k in ch_mult):
            raise ConfigError(f"model.ch_mult={ch_mult} must list at least one width multiplier, each >= 1")
    if "optim.lr" in values and not values["optim.lr"] > 0:
        raise ConfigError(f"optim.lr={values['optim.lr']} must be > 0")
    if "optim.betas" in values and not all(0.0 <= b < 1.0 for b in values["optim.betas"]):
        raise ConfigError(f"optim.betas={values['optim.betas']} must each be in [0, 1)")
    if "sample.temperature" in values and not values["sample.temperature"] > 0:
        raise ConfigError(f"sample.temperature={values['sample.temperature']} must be > 0")
    if "sample.top_p" in values and not 0.0 < values["sample.top_p"] <= 1.0:
        raise ConfigError(f"sample.top_p={values['sample.top_p']} must be in (0, 1]")


def validate(cfg: Any) -> None:
    """Single-field ranges (each error names its key), then cross-field checks that a type cannot express."""
    _check_ranges(cfg)
    if isinstance(cfg, Stage1Config):
        m = cfg.model
        for w in [m.ch * k for k in m.ch_mult]:
            if w % m.norm_groups:
                raise ConfigError(f"model.norm_groups={m.norm_groups} does not divide width {w} (ch * ch_mult)")
        if m.image_size % m.downsampling:
            raise ConfigError(f"model.image_size={m.image_size} is not divisible by the downsampling {m.downsampling}")
        if cfg.data.image_size != m.image_size:
            raise ConfigError(f"data.image_size={cfg.data.image_size} differs from model.image_size={m.image_size}")
        if not 0.0 <= m.latent_swap <= 1.0:
            raise ConfigError(f"model.latent_swap={m.latent_swap} is a probability: use a value in [0, 1]")
        if m.image_decoder_semantic == "spade" and m.spade_hidden < 1:
            raise ConfigError(f"model.spade_hidden={m.spade_hidden} must be >= 1 with the SPADE decoder")
        if cfg.loss.texture_weight and m.image_size % cfg.loss.texture_window:
            raise ConfigError(
                f"loss.texture_window={cfg.loss.texture_window} does not divide model.image_size={m.image_size}"
            )
        if cfg.loss.image_class_balance and m.kind != "svq":
            raise ConfigError(
                f"loss.image_class_balance={cfg.loss.image_class_balance} weights pixels by their class in the "
                f"semantic map, which model.kind={m.kind!r} does not take; use a model with the semantic branch or 0"
            )
        if cfg.zero.stage == 3 and cfg.loss.gan and m.kind != "semantic" and cfg.loss.disc_warmup < 1:
            raise ConfigError(
                f"zero.stage=3 with the GAN needs loss.disc_warmup >= 1 (got {cfg.loss.disc_warmup}): under ZeRO-3 the "
                "generator's adversarial pass calls the discriminator outside its engine, which fails until the "
                "discriminator engine has taken a step of its own ('weight should have at least three dimensions')"
            )
        if cfg.loss.lecam_weight < 0 or not 0.0 <= cfg.loss.lecam_decay < 1.0:
            raise ConfigError("loss.lecam_weight must be >= 0 and loss.lecam_decay in [0, 1)")
    if isinstance(cfg, Stage2Config):
        g = cfg.model
        if g.n_embd % g.n_head:
            raise ConfigError(f"model.n_embd={g.n_embd} is not divisible by model.n_head={g.n_head}")
    if cfg.run.compile and cfg.zero.stage == 3:
        raise ConfigError(
            "run.compile=true with zero.stage=3: ZeRO-3 gathers and releases parameters in module hooks around every "
            "forward, which this compile path does not trace; use zero.stage <= 2 or run.compile=false"
        )
    d = cfg.data
    if d.stream_retries < 0 or d.stream_backoff < 0 or d.stream_timeout <= 0:
        raise ConfigError(
            "data.stream_retries and data.stream_backoff must be >= 0 and data.stream_timeout > 0 (got "
            f"{d.stream_retries}, {d.stream_backoff}, {d.stream_timeout})"
        )
    opt = cfg.optim
    if opt.micro_batch < 1 or opt.grad_accum < 1:
        raise ConfigError("optim.micro_batch and optim.grad_accum must be >= 1")


# ----------------------------------------------------------------------------------------------------
# serialisation and DeepSpeed


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, *, where: str = "") -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output; unknown keys raise."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise ConfigError(f"unknown config key {path!r} for {cls.__name__}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, where=path)
        elif typing.get_origin(tp) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def to_json(cfg: Any) -> str:
    return json.dumps({"type": type(cfg).__name__, "config": to_dict(cfg)}, indent=2)


def from_json(text: str) -> Any:
    blob = json.loads(text)
    cls = {"Stage1Config": Stage1Config, "Stage2Config": Stage2Config}.get(blob.get("type"))
    if cls is None:
        raise ConfigError(f"config JSON has unknown type {blob.get('type')!r}")
    return from_dict(cls, blob["config"])


def to_deepspeed(cfg: Stage1Config | Stage2Config, world_size: int) -> dict:
    """The DeepSpeed config dict for this run. Batch identity: train_batch = micro * accum * world."""
    opt, zero = cfg.optim, cfg.zero
    ds: dict[str, Any] = {
        "train_batch_size": opt.micro_batch * opt.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": opt.micro_batch,
        "gradient_accumulation_steps": opt.grad_accum,
        "gradient_clipping": opt.grad_clip,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on and synchronised by default: a device sync at every engine forward and
        # step. We measure throughput ourselves, once per logging window.
        "timers": {"throughput": {"enabled": False}},
        # The optimizer is a torch one passed to deepspeed.initialize (no JIT-built fused Adam).
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": zero.stage},
    }
    if zero.stage > 0:
        ds["zero_optimization"].update({"overlap_comm": zero.overlap_comm, "contiguous_gradients": True})
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(zero, key):
                ds["zero_optimization"][key] = int(getattr(zero, key))
        if zero.offload_optimizer:
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if zero.communication_dtype != "fp32":
        ds["communication_data_type"] = zero.communication_dtype
    if zero.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif zero.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    return ds
