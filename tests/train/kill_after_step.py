"""Test launcher: recipes/train_svqgan.py's training, SIGKILLed right after optimizer step N (a crash with no
chance to clean up), for the resume tests. Usage: deepspeed tests/train/kill_after_step.py --kill-after-step=N
<the recipe's arguments>."""

import os
import signal
import sys

from svq_fast.cli import parse
from svq_fast.config import Stage1Config
from svq_fast.train.stage1 import train_stage1


def main(argv: list[str]) -> None:
    flag = next(a for a in argv if a.startswith("--kill-after-step="))
    kill_at = int(flag.split("=", 1)[1])
    cfg = parse([a for a in argv if a != flag], "svqgan_tiny", Stage1Config)

    def kill(step: int) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train_stage1(cfg, after_step=[kill])


if __name__ == "__main__":
    main(sys.argv[1:])
