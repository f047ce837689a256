"""Per-run set-up shared by both stages: the run directory, its config.json, and CPU thread counts."""

from __future__ import annotations

import os

import torch

from svq_fast import dist
from svq_fast.config import to_json


def prepare_run(cfg, rank: int) -> str:
    """Create run.out_dir, write config.json (rank 0), and split CPU cores between local ranks."""
    run_dir = cfg.run.out_dir
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(to_json(cfg))
    if not torch.cuda.is_available():
        # Several CPU ranks on one machine would otherwise each start one thread per core.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    dist.barrier()
    return run_dir
