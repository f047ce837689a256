"""Test launcher: recipes/train_svqgan.py's training, where one rank raises right after optimizer step N (a bad
shard, a bug on one node), for the collective-failure test. Usage: deepspeed tests/train/raise_at_step.py
--raise-at-step=N --raise-on-rank=R <the recipe's arguments>."""

import sys

from svq_fast import dist
from svq_fast.cli import parse
from svq_fast.config import Stage1Config
from svq_fast.train.stage1 import train_stage1

MESSAGE = "planted failure on one rank"


def main(argv: list[str]) -> None:
    flags = {a.split("=", 1)[0]: int(a.split("=", 1)[1]) for a in argv if a.startswith("--raise-")}
    cfg = parse([a for a in argv if not a.startswith("--raise-")], "svqgan_tiny", Stage1Config)

    def fail(step: int) -> None:
        if step == flags["--raise-at-step"] and dist.rank() == flags["--raise-on-rank"]:
            raise RuntimeError(MESSAGE)

    train_stage1(cfg, after_step=[fail])


if __name__ == "__main__":
    main(sys.argv[1:])
