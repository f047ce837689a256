"""Stage-2 training loop: the GPT learns p(z_x | z_s) on tokens from the frozen stage-1 model(s).

Tokens are computed on the fly from image shards by the frozen encoder (every rank tokenizes its own
micro-batch); the loss is cross-entropy on image tokens only.
"""

from __future__ import annotations

import dataclasses

import torch

from svq_fast.config import Stage2Config
from svq_fast.data.tokens import make_token_loader, read_token_index
from svq_fast.dist import init_deepspeed, nonfinite_anywhere
from svq_fast.export import load_tokenizer
from svq_fast.models.gpt import SemanticGPT
from svq_fast.train import loop
from svq_fast.train.data import train_loader
from svq_fast.train.engine import build_engine, device
from svq_fast.train.loop import Stage
from svq_fast.train.perf import PhaseTimer, count_flops
from svq_fast.train.run_dir import prepare_run


def train_stage2(cfg: Stage2Config) -> dict:
    rank, world = init_deepspeed()
    run_dir = prepare_run(cfg, rank)
    dev = device()
    tokenizer = None if cfg.data.token_shards else load_tokenizer(cfg, dev)
    torch.manual_seed(cfg.run.seed)
    gpt, _, sched = build_engine(SemanticGPT(cfg.model, chunked_ce=cfg.model.chunked_ce), cfg, world_size=world)
    tokens_per_sample = 2 * cfg.model.grid**2  # semantic + image tokens per sequence
    timer = PhaseTimer(dev)

    def micro_step(batch: dict, step: int) -> dict[str, float]:
        if tokenizer is None:  # token shards
            sem, img = batch["sem"].to(dev), batch["img"].to(dev)
        else:
            sem, img = tokenizer(batch["image"].to(dev), batch["label"].to(dev))
        with timer("forward"):
            _, loss = gpt(sem, img)
        if nonfinite_anywhere(loss):
            return {}
        with timer("backward"):
            gpt.backward(loss)
        with timer("optimizer"):
            gpt.step()
        return {"loss": loss.item()}

    def throughput(samples: int, seconds: float) -> dict[str, float]:
        return {
            "throughput/samples_per_s": samples * world / seconds,
            "throughput/tokens_per_s_per_rank": samples * tokens_per_sample / seconds,
        }

    loader = (
        token_train_loader(cfg, rank, world)
        if cfg.data.token_shards
        else train_loader(cfg.data, cfg.optim.micro_batch, rank, world)
    )
    stage = Stage(
        "stage2",
        {"gpt": gpt},
        micro_step,
        loader,
        throughput,
        lr=lambda: sched.get_last_lr()[0],
        flops_per_sample=gpt_flops_per_sample(cfg, dev),
        timer=timer,
    )
    return loop.run(cfg, stage, rank=rank, world=world, dev=dev, run_dir=run_dir)


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
    return make_token_loader(
        cfg.data.token_shards,
        batch_size=cfg.optim.micro_batch,
        rank=rank,
        world_size=world,
        seed=cfg.data.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
