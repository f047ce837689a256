"""Stage 2: train the GPT on tokens of a frozen stage-1 model under DeepSpeed ZeRO.

    deepspeed --num_gpus 8 recipes/train_transformer.py --config gpt_f16_256 --stage1=runs/svqgan_f16_256/export \
        --data.train_shards=/data/shards/train
    deepspeed --num_gpus 2 recipes/train_transformer.py   # CPU: tiny GPT on runs/svqgan_tiny/export
"""

import sys

from svq_fast.cli import parse
from svq_fast.config import Stage2Config
from svq_fast.train.stage2 import train_stage2


def main(argv=None):
    cfg = parse(sys.argv[1:] if argv is None else argv, "gpt_tiny", Stage2Config)
    train_stage2(cfg)


if __name__ == "__main__":
    main()
