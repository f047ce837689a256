"""Stage 2: the GPT learns p(z_x | z_s) on tokens from the frozen stage-1 model(s), under the shared loop.

Tokens are computed on the fly from image shards by the frozen encoder (every rank tokenizes its own
micro-batch); the loss is cross-entropy on image tokens only.
"""

from __future__ import annotations

import dataclasses

import torch

from svq_fast.config import Stage2Config
from svq_fast.data.tokens import make_token_loader, read_token_index
from svq_fast.data.transforms import normalize_on_device
from svq_fast.dist import fail_together, init_deepspeed
from svq_fast.export import load_tokenizer
from svq_fast.models.gpt import SemanticGPT
from svq_fast.models.tokenizer import Tokenizer
from svq_fast.train import loop
from svq_fast.train.data import tensorboard_dir, train_loader
from svq_fast.train.engine import build_engine, configure_backends, device
from svq_fast.train.loop import Stage
from svq_fast.train.perf import PhaseTimer, count_flops
from svq_fast.train.run_dir import prepare_run


class Stage2(Stage):
    """One micro-batch: tokens (from token shards, or the frozen stage-1 tokenizer) -> GPT forward (cross-entropy
    on the image tokens) -> backward -> optimizer step."""

    name = "stage2"

    def __init__(self, cfg: Stage2Config, gpt, loader, dev: torch.device, tokenizer: Tokenizer | None):
        super().__init__({"gpt": gpt}, loader, PhaseTimer(dev))
        self.gpt, self.dev, self.tokenizer = gpt, dev, tokenizer  # tokenizer None: batches hold tokens already
        # the frozen encoder runs in the GPT's precision (bf16 autocast; the code lookup itself stays fp32)
        self.autocast_tokenizer = cfg.zero.precision == "bf16"
        self.throughput_unit = ("tokens", 2 * cfg.model.grid**2)  # semantic + image tokens per sequence

    def lr(self) -> float:
        return self.gpt.lr_scheduler.get_last_lr()[0]

    def micro_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        dev = self.dev
        if self.tokenizer is None:
            sem, img = batch["sem"].to(dev, non_blocking=True), batch["img"].to(dev, non_blocking=True)
        else:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast_tokenizer):
                sem, img = self.tokenizer(*normalize_on_device(batch, dev))
        with self.timer("forward"):
            _, loss = self.gpt(sem, img)
        (nonfinite,) = self.agree(~torch.isfinite(loss.detach()))  # the step's one host read (stop request included)
        if nonfinite:
            return {}
        with self.timer("backward"):
            self.gpt.backward(loss)
        with self.timer("optimizer"):
            self.gpt.step()
        return {"loss": loss.detach()}


def train_stage2(cfg: Stage2Config, after_step=()) -> dict:
    """Build the tokenizer, the GPT engine, the loader and the stage, then run the shared loop."""
    rank, world = init_deepspeed()
    with fail_together():  # an error on this rank stops every rank, with this rank's message
        run_dir = prepare_run(cfg, rank)
        dev = device()
        configure_backends(cfg, dev)
        tokenizer = None if cfg.data.token_shards else load_tokenizer(cfg, dev)
        torch.manual_seed(cfg.run.seed)
        gpt = build_engine(SemanticGPT(cfg.model, chunked_ce=cfg.model.chunked_ce), cfg, world_size=world)[0]
        if cfg.data.token_shards:
            loader = token_train_loader(cfg, rank, world)
        else:
            labels = (tokenizer.semantic_model or tokenizer.image_model).cfg  # the model that reads the labels
            loader = train_loader(cfg.data, cfg.optim.micro_batch, rank, world, log_dir=tensorboard_dir(cfg),
                                  num_classes=labels.num_classes, ignore_index=labels.ignore_index,
                                  window=cfg.log.every * cfg.optim.grad_accum)  # fmt: skip
        stage = Stage2(cfg, gpt, loader, dev, tokenizer)
        stage.flops_per_sample = gpt_flops_per_sample(cfg, dev)
        return loop.run(cfg, stage, rank=rank, world=world, dev=dev, run_dir=run_dir, after_step=after_step)


def gpt_flops_per_sample(cfg: Stage2Config, dev: torch.device) -> float:
    """FLOPs of one sequence's forward + backward, counted on a fresh copy with reference attention
    (T x T scores counted in full)."""
    model = SemanticGPT(dataclasses.replace(cfg.model, attn_backend="ref")).to(dev)
    n = cfg.model.grid**2
    sem = torch.zeros(1, n, dtype=torch.long, device=dev)
    img = torch.zeros(1, n, dtype=torch.long, device=dev)
    return float(count_flops(lambda: model(sem, img)[1].backward()))


def token_train_loader(cfg: Stage2Config, rank: int, world: int):
    index = read_token_index(cfg.data.token_shards)
    g = cfg.model
    found = (index["image_vocab"], index["semantic_vocab"], index["grid"])
    if found != (g.image_vocab, g.semantic_vocab, g.grid):
        raise ValueError(
            f"token shards {cfg.data.token_shards} hold (image vocab, semantic vocab, grid) = {found}, "
            f"the GPT config has {(g.image_vocab, g.semantic_vocab, g.grid)}"
        )
    if not cfg.stage1_semantic and index.get("condition", "reference") != cfg.condition:  # separate: map either way
        raise ValueError(
            f"token shards {cfg.data.token_shards} hold z_s tokens of condition {index.get('condition', 'reference')!r}"
            f", the GPT config has condition={cfg.condition!r}: tokenize with --condition {cfg.condition} or set "
            f"--condition={index.get('condition', 'reference')}"
        )
    return make_token_loader(
        cfg.data.token_shards,
        batch_size=cfg.optim.micro_batch,
        rank=rank,
        world_size=world,
        seed=cfg.data.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
