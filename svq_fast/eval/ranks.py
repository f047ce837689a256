"""How an evaluation splits its held-out batches over ranks (accelerate's split, or torch.distributed's when
accelerate does not see the process group) and iterates this rank's share."""

from __future__ import annotations

import torch

from svq_fast import dist
from svq_fast.data.loader import ordered_loader


def eval_loader(shards: list[str], batch_size: int, num_workers: int, image_size: int):
    """Every held-out sample once, in shard-list order, center-cropped and unflipped, as one global sequence."""
    # one global sequence; ranks take contiguous runs of its batches (split_between_processes)
    return ordered_loader(shards, batch_size=batch_size, image_size=image_size, num_workers=num_workers)


def split_contiguous(items: list, rank: int, world: int) -> list:
    """accelerate's split_between_processes arithmetic: contiguous runs, the first len % world ranks get one more."""
    per, extra = divmod(len(items), world)
    lo = rank * per + min(rank, extra)
    return items[lo : lo + per + (1 if rank < extra else 0)]


class Ranks:
    """This process's rank and the world size, taken from torch.distributed when a process group exists.

    Work is split with accelerate's split_between_processes when the Accelerator sees the same world. It does not
    always: with accelerate 1.15 on CPU, `accelerate launch --multi_gpu --num_processes 2` sets up a 2-rank gloo
    group while Accelerator() reports DistributedType.NO, num_processes 1 and is_main_process on every rank; trusting
    it would make every rank score every sample and the metrics' all_reduce count each twice. Then the same
    contiguous split is applied to torch.distributed's rank and world."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        if dist.is_initialized():
            self.rank, self.world = dist.rank_world()
        else:
            self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.consistent = (accelerator.process_index, accelerator.num_processes) == (self.rank, self.world)
        if not self.consistent and self.rank == 0:
            print(
                f"evaluate: torch.distributed has {self.world} ranks but the Accelerator sees "
                f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}); "
                "splitting the work by torch.distributed's ranks",
                flush=True,
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, items: list) -> list:
        if self.consistent:
            with self.accelerator.split_between_processes(items) as mine:
                return list(mine)
        return split_contiguous(items, self.rank, self.world)

    def barrier(self) -> None:
        dist.barrier()


def my_batches(loader, ranks, num_samples: int, batch_size: int):
    """Yield (global batch number, batch restricted to the samples that count) for this rank's share."""
    mine = ranks.split(list(range(-(-num_samples // batch_size))))
    if not mine:
        return
    state = loader.state_dict()
    state["batches"] = mine[0]  # exact resume: skips the earlier batches without decoding them
    loader.load_state_dict(state)
    for b, batch in zip(mine, loader):
        pos = torch.arange(b * batch_size, b * batch_size + batch["pad"].shape[0])
        keep = ~batch["pad"] & (pos < num_samples)
        if keep.any():
            yield (
                b,
                {k: (v[keep] if torch.is_tensor(v) else [x for x, k_ in zip(v, keep) if k_]) for k, v in batch.items()},
            )
