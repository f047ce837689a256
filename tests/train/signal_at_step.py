"""Test launcher: recipes/train_svqgan.py's training that, from optimizer step N on, touches <marker> and then
slows to one step per --pause seconds, so a test can send a signal while training is certainly under way.
Usage: deepspeed tests/train/signal_at_step.py --marker-at-step=N --marker=PATH [--pause=S] <the recipe's arguments>.
Every rank writes PATH.rank<r> with its pid."""

import os
import sys
import time

from svq_fast.cli import parse
from svq_fast.config import Stage1Config
from svq_fast.train.stage1 import train_stage1


def main(argv: list[str]) -> None:
    ours = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith(("--marker", "--pause"))}
    at, marker, pause = int(ours["--marker-at-step"]), ours["--marker"], float(ours.get("--pause", "0.5"))
    cfg = parse([a for a in argv if not a.startswith(("--marker", "--pause"))], "svqgan_tiny", Stage1Config)
    rank = os.environ.get("RANK", "0")

    def mark(step: int) -> None:
        if step >= at:
            with open(f"{marker}.rank{rank}", "w") as f:
                f.write(f"{os.getpid()} {step}\n")
            time.sleep(pause)

    train_stage1(cfg, after_step=[mark])


if __name__ == "__main__":
    main(sys.argv[1:])
