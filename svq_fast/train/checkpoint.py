"""Checkpoints: DeepSpeed engine state plus per-rank RNG and loader state, resumable exactly (the export a
finished run writes is svq_fast.export's).

Layout of a run directory:
    checkpoints/step00001000/<engine>/...   DeepSpeed state of each engine (generator, discriminator, gpt)
    checkpoints/step00001000/rng_rank{r}.pt per-rank RNG states
    checkpoints/step00001000/COMPLETE       written last, after every rank finished: marks a usable checkpoint
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from svq_fast import dist

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step(\d{8})$")


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (legacy global state others use)
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, step: int, engines: dict, client_state: dict, keep_last: int = 3) -> str:
    """Collective: every rank calls it. Returns the tag directory."""
    root = os.path.join(run_dir, "checkpoints")
    tag_dir = os.path.join(root, f"step{step:08d}")
    for name, engine in engines.items():
        engine.save_checkpoint(tag_dir, tag=name, client_state=client_state if name == next(iter(engines)) else {})
    torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{dist.rank()}.pt"))
    dist.barrier()
    if dist.rank() == 0:
        tmp = os.path.join(tag_dir, COMPLETE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step, "engines": list(engines)}, f)
        os.replace(tmp, os.path.join(tag_dir, COMPLETE))
        for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return tag_dir


def complete_checkpoints(run_dir: str) -> list[str]:
    """Tag directories that hold a COMPLETE marker, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    tags = sorted(d for d in os.listdir(root) if _TAG.match(d) and os.path.exists(os.path.join(root, d, COMPLETE)))
    return [os.path.join(root, t) for t in tags]


def resolve_resume(run_dir: str, resume: str) -> str | None:
    """'' -> None; 'auto' -> newest complete checkpoint or None; a path -> that path (must be complete)."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    if not os.path.exists(os.path.join(resume, COMPLETE)):
        raise FileNotFoundError(f"checkpoint {resume} has no {COMPLETE} marker: it is missing or was cut off mid-write")
    return resume


def load_checkpoint(tag_dir: str, engines: dict) -> dict:
    """Collective. Loads every engine and this rank's RNG state; returns the client state."""
    client = {}
    for name, engine in engines.items():
        _, state = engine.load_checkpoint(tag_dir, tag=name)
        if name == next(iter(engines)):
            client = state or {}
    rng_file = os.path.join(tag_dir, f"rng_rank{dist.rank()}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered under ZeRO-3); None on other ranks under ZeRO-3."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        return sd if dist.rank() == 0 else None
    return engine.module.state_dict()
