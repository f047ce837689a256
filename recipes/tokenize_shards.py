"""Turn image shards into stage-2 token shards with a frozen stage-1 model, spread over processes with
accelerate (each process encodes its share of the shards; the index is written by the main process).

    python recipes/tokenize_shards.py --stage1 runs/svqgan/export --shards /data/shards/train --out /data/tokens/train
    accelerate launch --num_processes 8 recipes/tokenize_shards.py --stage1 ... --shards ... --out ...
    # baseline VQ-T: image codes from a VQGAN, condition codes from a separate semantic VQVAE
    python recipes/tokenize_shards.py --stage1 runs/vqgan/export --stage1-semantic runs/semantic_vqvae/export ...

(Named tokenize_shards.py, not tokenize.py: a script's folder is first on sys.path, and a recipes/tokenize.py
would shadow the standard library's `tokenize`, which torch imports.)
Then train stage 2 on them: recipes/train_transformer.py --data.token_shards=/data/tokens/train
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from accelerate import Accelerator
from tqdm import tqdm

from svq_fast import dist
from svq_fast.data.index import list_shards
from svq_fast.data.tokens import tokenize_shard, write_token_index
from svq_fast.export import load_stage1
from svq_fast.models.tokenizer import Tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1", required=True, help="stage-1 export (coupled sVQ model, or image VQ model)")
    p.add_argument("--stage1-semantic", default="", help="separate semantic VQVAE export (VQ-T baseline)")
    p.add_argument("--shards", required=True, help="image shards: a folder, glob, brace pattern or URLs")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--condition",
        choices=("reference", "map"),
        default="reference",
        help="z_s from (image, map) as in the paper, or from the map alone; train the GPT with the same "
        "--condition (its config checks the index)",
    )
    args = p.parse_args(argv)

    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = dist.init_from_env()
    image_model, s1 = load_stage1(args.stage1, acc.device)
    semantic_model = load_stage1(args.stage1_semantic, acc.device)[0] if args.stage1_semantic else None
    tok = Tokenizer(image_model, semantic_model, condition=args.condition)
    grid = s1.model.image_size // s1.model.downsampling
    shards = list_shards(args.shards)
    written = []
    if (acc.num_processes, acc.process_index) == (world, rank):
        split = acc.split_between_processes(list(range(len(shards))))
    else:  # accelerate 1.15 on CPU can report one process under a multi-process launch: split by rank ourselves
        split = contextlib.nullcontext(list(range(len(shards)))[rank::world])
    with split as mine:
        for i in tqdm(mine, desc="tokenize", disable=rank != 0):
            written.append(
                tokenize_shard(
                    tok,
                    shards[i],
                    args.out,
                    semantic_vocab=tok.semantic_vocab,
                    image_vocab=tok.image_vocab,
                    image_size=s1.data.image_size,
                    batch_size=args.batch_size,
                    device=acc.device,
                )
            )
    counts = written
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, written)
        counts = [row for part in gathered for row in part]
    if rank == 0:
        index = write_token_index(
            args.out,
            counts,
            grid=grid,
            semantic_vocab=tok.semantic_vocab,
            image_vocab=tok.image_vocab,
            stage1=args.stage1,
            stage1_semantic=args.stage1_semantic,
            source=args.shards,
            condition=tok.condition,
        )
        print(
            f"wrote {index['num_samples']} token sequences ({grid}x{grid} + {grid}x{grid}) in "
            f"{len(counts)} shards to {args.out}"
        )
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
