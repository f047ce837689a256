"""Stage 1: train an sVQ model (or a baseline of the family) under DeepSpeed.

deepspeed --num_gpus 8 recipes/train_svqgan.py --config svqgan_f16_256 --data.train_shards=/data/shards/train
deepspeed --num_gpus 2 recipes/train_svqgan.py            # CPU: tiny model on the built-in synthetic data
"""

import sys

from svq_fast.cli import parse
from svq_fast.config import Stage1Config
from svq_fast.train.stage1 import train_stage1


def main(argv=None):
    cfg = parse(sys.argv[1:] if argv is None else argv, "svqgan_tiny", Stage1Config)
    train_stage1(cfg)


if __name__ == "__main__":
    main()
