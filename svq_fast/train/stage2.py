"""Stage-2 training loop: the GPT learns p(z_x | z_s) on tokens from the frozen stage-1 model(s).

Tokens are computed on the fly from image shards by the frozen encoder (every rank tokenizes its own
micro-batch); the loss is cross-entropy on image tokens only.
"""

from __future__ import annotations

import json
import os
import time

import torch

from svq_fast.config import Stage2Config
from svq_fast.models.gpt import SemanticGPT
from svq_fast.train.checkpoint import (
    export_safetensors,
    full_state_dict,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from svq_fast.train.data import forever, train_loader
from svq_fast.train.engine import all_reduce_mean, build_engine, device, init_distributed
from svq_fast.train.logger import RunLogger
from svq_fast.train.pretrained import load_stage1
from svq_fast.train.run_dir import prepare_run
from svq_fast.train.tokens import Tokenizer


def build_tokenizer(cfg: Stage2Config, dev) -> Tokenizer:
    image_model, s1 = load_stage1(cfg.stage1, dev)
    semantic_model = load_stage1(cfg.stage1_semantic, dev)[0] if cfg.stage1_semantic else None
    tok = Tokenizer(image_model, semantic_model)
    g = cfg.model
    if (g.image_vocab, g.semantic_vocab) != (tok.image_vocab, tok.semantic_vocab):
        raise ValueError(
            f"GPT vocabularies (image {g.image_vocab}, semantic {g.semantic_vocab}) differ from the "
            f"stage-1 codebooks (image {tok.image_vocab}, semantic {tok.semantic_vocab}); "
            "set --model.image_vocab / --model.semantic_vocab"
        )
    latent = s1.model.image_size // 2 ** (len(s1.model.ch_mult) - 1)
    if latent != g.grid:
        raise ValueError(f"stage-1 latents are {latent}x{latent} but model.grid={g.grid}")
    if cfg.data.image_size != s1.model.image_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} but the stage-1 model expects {s1.model.image_size}")
    return tok


def train_stage2(cfg: Stage2Config) -> dict:
    rank, world = init_distributed()
    run_dir = prepare_run(cfg, rank)
    dev = device()
    tokenizer = build_tokenizer(cfg, dev)
    torch.manual_seed(cfg.run.seed)
    gpt, _, sched = build_engine(SemanticGPT(cfg.model), cfg, world_size=world)
    engines = {"gpt": gpt}
    start = 0
    resume_dir = resolve_resume(run_dir, cfg.run.resume)
    if resume_dir:
        start = int(load_checkpoint(resume_dir, engines).get("step", 0))
    torch.manual_seed(cfg.run.seed * 1000 + rank + 7919 * start)
    batches = forever(train_loader(cfg.data, cfg.optim.micro_batch, rank, world, seed_offset=start))
    log = RunLogger(
        run_dir,
        rank=rank,
        total_steps=cfg.optim.max_steps,
        initial_step=start,
        tensorboard=cfg.log.tensorboard,
        progress=cfg.log.progress,
        desc="stage2",
    )
    history, window, n_window, t_window, data_time = [], 0.0, 0, time.perf_counter(), 0.0
    tokens_per_sample = 2 * cfg.model.grid**2  # semantic + image tokens per sequence
    for step in range(start, cfg.optim.max_steps):
        for _ in range(cfg.optim.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            sem, img = tokenizer(batch["image"].to(dev), batch["label"].to(dev))
            data_time += time.perf_counter() - t0
            _, loss = gpt(sem, img)
            gpt.backward(loss)
            gpt.step()
            window += loss.item() / cfg.optim.grad_accum
        n_window += 1
        log.advance({"loss": window / n_window})
        last = step + 1 == cfg.optim.max_steps
        if (step + 1) % cfg.log.every == 0 or last:
            elapsed = time.perf_counter() - t_window
            means = all_reduce_mean({"loss": window / n_window}, dev)
            samples = n_window * cfg.optim.micro_batch * cfg.optim.grad_accum
            log.scalars(
                step + 1,
                {
                    "loss/image_token_ce": means["loss"],
                    "throughput/tokens_per_s_per_rank": samples * tokens_per_sample / elapsed,
                    "throughput/samples_per_s": samples * world / elapsed,
                    "throughput/data_and_tokenize_fraction": data_time / elapsed,
                    "lr": sched.get_last_lr()[0],
                },
            )
            history.append({"step": step + 1, **means})
            window, n_window, t_window, data_time = 0.0, 0, time.perf_counter(), 0.0
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and not last:
            save_checkpoint(run_dir, step + 1, engines, {"step": step + 1}, cfg.run.keep_last)
    log.close()
    save_checkpoint(run_dir, cfg.optim.max_steps, engines, {"step": cfg.optim.max_steps}, cfg.run.keep_last)
    state = full_state_dict(gpt)
    if rank == 0:
        export_safetensors(state, cfg, os.path.join(run_dir, "export"))
        with open(os.path.join(run_dir, "history.json"), "w") as f:
            json.dump(history, f, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return {"run_dir": run_dir, "history": history}
