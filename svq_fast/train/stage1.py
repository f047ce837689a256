"""Stage 1: the sVQ model (generator engine) and the PatchGAN (discriminator engine) under the shared loop.

Per micro-batch (Stage1.micro_step):
  1. generator forward -> generator_loss: L = L_rec + L_vq,x + lambda (CE_s + L_vq,s)
     [+ d_weight * disc_weight * L_adv once past disc_start] -> generator step;
  2. discriminator_step: GAN loss on (x, sg[x_hat]) [+ LeCam], trained from disc_start - disc_warmup on.
The generator's adversarial term must not leave reduction state in the discriminator engine (DESIGN.md 6):
under ZeRO 0-2 it runs the discriminator functionally on detached weights; under ZeRO-3 (where weights are
partitioned and gathered by module hooks) it runs the module with requires_grad switched off.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch.func import functional_call

from svq_fast.config import Stage1Config
from svq_fast.data.index import class_pixel_counts
from svq_fast.data.loader import list_shards, ordered_loader
from svq_fast.data.run_shards import shards_or_synthetic
from svq_fast.data.transforms import normalize_on_device
from svq_fast.dist import all_reduce_mean_, fail_together, init_deepspeed
from svq_fast.eval.visualize import colorize, grid, to_unit
from svq_fast.losses.class_balance import balanced_class_weights, pixel_weights
from svq_fast.losses.gan import adaptive_weight, discriminator_loss, generator_adv_loss, lecam_penalty
from svq_fast.losses.perceptual import build_perceptual
from svq_fast.losses.reconstruction import reconstruction_loss, semantic_loss, texture_loss
from svq_fast.models.svq import PatchDiscriminator, SVQModel
from svq_fast.train import loop
from svq_fast.train.data import tensorboard_dir, train_loader
from svq_fast.train.engine import autocast_dtype, build_engine, configure_backends, device
from svq_fast.train.loop import Stage
from svq_fast.train.perf import PhaseTimer, count_flops
from svq_fast.train.run_dir import prepare_run


@contextmanager
def _frozen(module: torch.nn.Module):
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def generator_adv_logits(disc_engine, x_hat: torch.Tensor) -> torch.Tensor:
    """Discriminator logits on x_hat with gradient to x_hat only, never to the discriminator's weights. The module is
    called around the engine (whose forward would start DeepSpeed's hooks), so the engine's bf16 autocast is entered
    here: the generator's adversarial pass runs in the same precision as the discriminator's own steps."""
    module = disc_engine.module
    with torch.autocast(
        x_hat.device.type, dtype=disc_engine.torch_autocast_dtype(), enabled=disc_engine.torch_autocast_enabled()
    ):
        if disc_engine.zero_optimization_stage() == 3:
            with _frozen(module):
                return module(x_hat)
        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = dict(module.named_buffers())
        return functional_call(module, {**params, **buffers}, (x_hat,))


def _weight_shape(param: torch.Tensor):
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape


class Stage1(Stage):
    """One micro-batch: generator forward -> generator loss (named terms) -> generator step -> discriminator step.
    micro_step returns detached 0-dim device tensors for logging ({} when a non-finite loss made every rank skip
    it): nothing in a step reads a device value to the host except the collective skip / stop decisions."""

    name = "stage1"
    progress_keys = ("rec", "adv_term", "sem_ce", "d_loss")
    throughput_unit = ("images", 1)

    def __init__(
        self,
        cfg: Stage1Config,
        engines: dict,
        loader,
        dev: torch.device,
        *,
        perceptual=None,
        class_weight: torch.Tensor | None = None,
        image_class_weight: torch.Tensor | None = None,
        heldout: dict | None = None,
    ):
        super().__init__(engines, loader, PhaseTimer(dev))
        self.cfg, self.dev = cfg, dev
        self.gen, self.disc = engines["generator"], engines.get("discriminator")
        self.model: SVQModel = self.gen.module
        self.dtype = autocast_dtype(cfg)
        self.perceptual = perceptual  # LPIPS module or None
        self.class_weight = None if class_weight is None else class_weight.to(dev)  # (C,) semantic CE weights
        # (C,) per-class weights of the image terms' pixels (loss.image_class_balance), or None
        self.image_class_weight = None if image_class_weight is None else image_class_weight.to(dev)
        # a fixed held-out batch (same on every rank) for the discriminator's health: real vs reconstruction logits
        self.heldout = heldout
        self.last: dict = {}  # the latest micro-batch's inputs and outputs, for the TensorBoard image grid

    def lr(self) -> float:
        return self.gen.lr_scheduler.get_last_lr()[0]

    def micro_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        m = self.model
        x, s = normalize_on_device(batch, self.dev, self.dtype)
        x, s = (x if m.has_image else None), (s if m.has_semantic else None)
        with self.timer("forward"):
            out = self.gen(x, s)
        cfg = self.cfg.loss
        if not (self.disc is not None and cfg.adaptive_weight and step >= cfg.disc_start):
            out.pop("x_hat_hidden", None)  # unused this step: do not keep a full-resolution activation alive for it
        loss, reported, logs = self.generator_loss(out, x, s, step)
        if not self.generator_step(loss, reported):
            return {}  # every rank skips this micro-batch (the loop counts it and may stop the run)
        logs["loss"] = reported
        self.last = {"x": x, "s": s, "x_hat": out.get("x_hat"), "s_labels": out.get("s_labels")}
        if self.disc is not None and step >= self.cfg.loss.disc_start - self.cfg.loss.disc_warmup:
            d_logs = self.discriminator_step(x, out["x_hat"].detach())
            if not d_logs:
                return {}
            logs.update(d_logs)
            if self.heldout is not None and (step + 1) % self.cfg.log.every == 0:
                logs.update(self.discriminator_health())
        return logs

    def log_images(self, step: int, log) -> None:
        if self.cfg.log.image_every and step % self.cfg.log.image_every == 0 and self.last:
            log.image(step, "reconstructions", _image_grid(self.last, self.cfg))

    # -- generator ------------------------------------------------------------------------------------

    def generator_loss(self, out: dict, x, s, step: int):
        """-> (what backward sees, the value of equation (3) + GAN term for logging, named scalar terms)."""
        m = self.model
        loss = torch.zeros((), device=self.dev)
        reported = torch.zeros((), device=self.dev)
        logs: dict[str, torch.Tensor] = {}
        if m.has_image:
            surrogate, image_loss, logs_x = self.image_terms(out, x, s, step)
            loss = loss + surrogate + out["vq_loss_x"]
            reported = reported + image_loss.detach() + out["vq_loss_x"].detach()
            logs.update(logs_x, vq_x=out["vq_loss_x"].detach(), perplexity_x=out["perplexity_x"].detach())
            logs["codes_used_x"] = m.quantizer_x.usage_fraction()
        if m.has_semantic:
            sem_total, logs_s = self.semantic_terms(out, s)
            loss = loss + sem_total
            reported = reported + sem_total.detach()
            logs.update(logs_s)
        return loss, reported, logs

    def image_terms(self, out: dict, x: torch.Tensor, s: torch.Tensor | None, step: int):
        """-> (surrogate carrying d(image loss)/d x_hat into the graph, image loss, named scalars).

        The image terms are evaluated on a detached leaf copy of x_hat and their gradient is injected into the
        graph through a surrogate <x_hat, g>. DeepSpeed (0.19) fires its gradient-reduction epilogue on any
        autograd pass that reaches an engine output, so the adaptive GAN weight's autograd.grad calls must never
        touch x_hat itself."""
        cfg = self.cfg.loss
        x_hat = out["x_hat"]
        target = out.get("x_target", x)  # what x_hat should be: x, or a swapped decode's latent_swap_target
        leaf = x_hat.detach().requires_grad_(True)
        weight = None  # (B, 1, H, W): each pixel by its class in the map, or unweighted
        if self.image_class_weight is not None:
            weight = pixel_weights(s, self.image_class_weight, self.cfg.model.ignore_index)
        rec = reconstruction_loss(leaf, target, l1_weight=cfg.l1_weight, l2_weight=cfg.l2_weight, pixel_weight=weight)
        logs = {"rec": rec.detach()}
        nll = rec
        if self.perceptual is not None:
            p_loss = self.perceptual(leaf, target)
            nll = nll + cfg.perceptual_weight * p_loss
            logs["lpips"] = p_loss.detach()
        if cfg.texture_weight:
            t_loss = texture_loss(leaf, target, cfg.texture_window, pixel_weight=weight)
            nll = nll + cfg.texture_weight * t_loss
            logs["texture"] = t_loss.detach()
        image_loss = nll
        if self.disc is not None and step >= cfg.disc_start:
            g_loss = generator_adv_loss(generator_adv_logits(self.disc, leaf), cfg.gan_loss)
            d_weight = torch.ones((), device=self.dev)
            if cfg.adaptive_weight:
                conv = self.model.image_last_layer()
                hidden = out["x_hat_hidden"]
                d_weight = adaptive_weight(
                    nll, g_loss, leaf, hidden, _weight_shape(conv.weight), max_weight=cfg.adaptive_weight_max
                )
            adv_term = cfg.disc_weight * d_weight * g_loss
            image_loss = nll + adv_term
            logs.update(g_adv=g_loss.detach(), d_weight=d_weight.detach(), adv_term=adv_term.detach())
        (grad_x_hat,) = torch.autograd.grad(image_loss, leaf)
        surrogate = (x_hat * grad_x_hat.to(x_hat.dtype)).sum()  # d surrogate / d x_hat == grad_x_hat
        return surrogate, image_loss, logs

    def semantic_terms(self, out: dict, s: torch.Tensor):
        """-> (lambda * (CE + L_vq,s), named scalars); keeps the read-off labels in out["s_labels"]."""
        cfg, m = self.cfg, self.model
        ce = semantic_loss(out["s_logits"], s, cfg.model.ignore_index, self.class_weight)
        weight = cfg.loss.semantic_weight if m.has_image else 1.0  # lambda only couples two modalities
        with torch.no_grad():
            valid = s != cfg.model.ignore_index
            out["s_labels"] = m.semantic_labels(out["s_logits"])  # (B, H, W); also kept for the image grid
            acc = ((out["s_labels"] == s) & valid).sum() / valid.sum().clamp_min(1)
        logs = {
            "codes_used_s": m.quantizer_s.usage_fraction(),
            "sem_ce": ce.detach(),
            "vq_s": out["vq_loss_s"].detach(),
            "sem_acc": acc,
            "perplexity_s": out["perplexity_s"].detach(),
        }
        return weight * (ce + out["vq_loss_s"]), logs

    def generator_step(self, loss: torch.Tensor, reported: torch.Tensor) -> bool:
        """Backward and optimizer step of the generator; False (no step on any rank) when the loss is
        non-finite on some rank."""
        (nonfinite,) = self.agree(~torch.isfinite(reported))  # one host read (the run's stop request rides along)
        if nonfinite:
            return False
        with self.timer("backward"):
            self.gen.backward(loss)
        with self.timer("optimizer"):
            self.gen.step()
        return True

    # -- discriminator --------------------------------------------------------------------------------

    def discriminator_step(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """GAN loss on (x, sg[x_hat]) [+ LeCam]; -> named scalars, {} when the loss was non-finite on any rank."""
        cfg, b = self.cfg.loss, x.shape[0]
        with self.timer("discriminator"):
            logits = self.disc(torch.cat([x, x_hat]))  # one pass: real then fake
        real, fake = logits[:b], logits[b:]
        d_loss = discriminator_loss(real, fake, cfg.gan_loss)
        logs = {"logits_real": real.detach().float().mean(), "logits_fake": fake.detach().float().mean()}
        if cfg.lecam_weight > 0:
            ema = self.disc.module.lecam_ema  # (2,): running means of the real and fake logits
            penalty = lecam_penalty(real, fake, ema[0], ema[1])
            d_loss = d_loss + cfg.lecam_weight * penalty
            logs["lecam"] = penalty.detach()
        (nonfinite,) = self.agree(~torch.isfinite(d_loss.detach()))
        if nonfinite:
            return {}
        with self.timer("discriminator"):
            self.disc.backward(d_loss)
            self.disc.step()
        if cfg.lecam_weight > 0:  # the rank-averaged batch means, so every rank keeps the same running means
            new = all_reduce_mean_(torch.stack([logs["logits_real"], logs["logits_fake"]]).double())
            ema.mul_(cfg.lecam_decay).add_((1 - cfg.lecam_decay) * new.to(ema.dtype))
        logs["d_loss"] = d_loss.detach()
        return logs

    @torch.no_grad()
    def discriminator_health(self) -> dict[str, torch.Tensor]:
        """Mean discriminator logit on the fixed held-out batch's real images and on their reconstructions (the
        model in eval mode): a discriminator that has learned something scores the real ones higher. Under ZeRO-3
        the module's own hooks gather its partitions, also outside the engine (tests/train/test_zero3_gan.py)."""
        m, disc = self.model, self.disc.module
        x, s = self.heldout["image"].to(self.dev, self.dtype), self.heldout["label"].to(self.dev)
        was_training = m.training
        m.eval()
        try:
            x_hat = m(x, s if m.has_semantic else None)["x_hat"]
        finally:
            m.train(was_training)
        real, fake = disc(x).float().mean(), disc(x_hat).float().mean()
        return {"disc_heldout_real": real, "disc_heldout_recon": fake, "disc_heldout_gap": real - fake}


def class_weights(cfg: Stage1Config, model: SVQModel, shards: list[str], rank: int):
    """-> ((C,) weights of the semantic cross-entropy or None, (C,) weights of the image terms' pixels or None),
    both from the training shards' class histogram (read once, only when some balance is on)."""
    wanted = {
        "semantic cross-entropy": model.has_semantic and cfg.loss.semantic_class_balance,
        "image reconstruction": model.has_semantic and model.has_image and cfg.loss.image_class_balance,
    }
    if not any(wanted.values()):
        return None, None
    counts = class_pixel_counts(shards, cfg.model.num_classes, cfg.model.ignore_index)
    weights = {}
    for what, power in wanted.items():
        if not power:
            weights[what] = None
            continue
        weights[what] = w = balanced_class_weights(counts, power)
        if rank == 0:
            used = w[w > 0]
            print(
                f"{what} class weights (balance {power}): {used.min():.3f}..{used.max():.3f} over {len(used)} "
                "classes with pixels",
                flush=True,
            )
    return weights["semantic cross-entropy"], weights["image reconstruction"]


def train_stage1(cfg: Stage1Config, after_step=()) -> dict:
    """Build the engines, the loader and the stage, then run the shared loop (after_step: test callbacks)."""
    rank, world = init_deepspeed()
    with fail_together():  # an error on this rank stops every rank, with this rank's message
        run_dir = prepare_run(cfg, rank)
        dev = device()
        configure_backends(cfg, dev)
        perceptual = build_perceptual(
            cfg.loss.perceptual_weight, cfg.loss.lpips_vgg_path
        )  # fails early if asked and absent
        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        model = SVQModel(cfg.model, cfg.quantizer)
        shards = shards_or_synthetic(cfg.data, "train", rank)  # once: class weights and the loader read the same list
        class_weight, image_class_weight = class_weights(cfg, model, shards, rank)
        if model.has_semantic:
            model.set_semantic_class_weight(class_weight)  # saved with the model: semantic_labels undoes the weights
        engines = {"generator": build_engine(model, cfg, world_size=world)[0]}
        if cfg.loss.gan and model.has_image:
            lecam = cfg.loss.lecam_weight > 0
            d_model = PatchDiscriminator(ch=cfg.loss.disc_ch, n_layers=cfg.loss.disc_layers, lecam=lecam)
            disc_lr = cfg.optim.disc_lr or cfg.optim.lr
            engines["discriminator"] = build_engine(d_model, cfg, lr=disc_lr, world_size=world)[0]
        heldout = heldout_batch(cfg) if "discriminator" in engines else None
        loader = train_loader(cfg.data, cfg.optim.micro_batch, rank, world, shards, log_dir=tensorboard_dir(cfg),
                              num_classes=cfg.model.num_classes, ignore_index=cfg.model.ignore_index,
                              window=cfg.log.every * cfg.optim.grad_accum)  # fmt: skip
        stage = Stage1(cfg, engines, loader, dev, perceptual=None if perceptual is None else perceptual.to(dev),
                       class_weight=class_weight, image_class_weight=image_class_weight, heldout=heldout)  # fmt: skip
        stage.flops_per_sample = stage1_flops_per_sample(cfg, dev)
        return loop.run(cfg, stage, rank=rank, world=world, dev=dev, run_dir=run_dir, after_step=after_step)


def heldout_batch(cfg: Stage1Config) -> dict | None:
    """The first micro-batch of the validation shards (center crops, unflipped; the same on every rank), for the
    discriminator's health; None without data.val_shards."""
    if not cfg.data.val_shards:
        return None
    loader = ordered_loader(
        list_shards(cfg.data.val_shards), batch_size=cfg.optim.micro_batch, image_size=cfg.model.image_size
    )
    return next(iter(loader))


def stage1_flops_per_sample(cfg: Stage1Config, dev: torch.device) -> float:
    """FLOPs of one sample through the generator (fwd + bwd) and, with the GAN, the discriminator on real, fake
    and the generator's adversarial pass (fwd + bwd each); counted on fresh reference-backend copies."""
    qcfg = dataclasses.replace(cfg.quantizer, backend="ref")
    model = SVQModel(cfg.model, qcfg).to(dev)
    size = cfg.model.image_size
    x = torch.zeros(1, 3, size, size, device=dev)
    s = torch.zeros(1, size, size, dtype=torch.long, device=dev)

    def generator():
        out = model(x if model.has_image else None, s if model.has_semantic else None)
        total = sum(v.float().sum() for k, v in out.items() if k in ("x_hat", "s_logits", "vq_loss_x", "vq_loss_s"))
        total.backward()

    flops = count_flops(generator)
    if cfg.loss.gan and model.has_image:
        disc = PatchDiscriminator(ch=cfg.loss.disc_ch, n_layers=cfg.loss.disc_layers).to(dev)
        three = torch.zeros(3, 3, size, size, device=dev, requires_grad=True)
        flops += count_flops(lambda: disc(three).sum().backward())
    return float(flops)


@torch.no_grad()
def _image_grid(last: dict, cfg: Stage1Config, n: int = 4) -> torch.Tensor:
    """Rows of: input | reconstruction | semantic map | semantic reconstruction (whichever exist)."""
    rows = []
    for i in range(min(n, (last["x"] if last["x"] is not None else last["s"]).shape[0])):
        row = []
        if last["x"] is not None:
            row += [to_unit(last["x"][i]), to_unit(last["x_hat"][i])]
        if last["s"] is not None:
            k, ig = cfg.model.num_classes, cfg.model.ignore_index
            row += [colorize(last["s"][i : i + 1], k, ig)[0], colorize(last["s_labels"][i : i + 1], k, ig)[0]]
        rows.append(row)
    return grid(rows)
