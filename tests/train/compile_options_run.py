"""Helper for tests/train/test_compile.py, run under `deepspeed --num_gpus 2`: several short trainings in one launch
(one DeepSpeed start-up for all of them), each rank writing nothing, rank 0 writing a JSON summary of the histories.

    stage1/eager      fp32, eager (today's default), 5 steps, checkpoint + export at the end
    stage1/compiled   the same with run.compile=true
    stage1/resumed    a copy of stage1/eager resumed to step 7 with bf16 autocast + channels-last + compile
    stage2/eager, stage2/compiled   the GPT on stage1/eager's export, 5 steps each

usage: compile_options_run.py WORKDIR BACKEND
"""

import json
import os
import shutil
import sys

from svq_fast import dist
from svq_fast.config import apply_overrides
from svq_fast.named_configs import get_config
from svq_fast.train.stage1 import train_stage1
from svq_fast.train.stage2 import train_stage2


def stage1(work: str, name: str, *extra: str):
    cfg = get_config("svqgan_tiny")
    return apply_overrides(
        cfg,
        [
            f"--data.synthetic_default={os.path.join(work, 'data')}",
            "--data.synthetic_train_samples=64",
            "--model.ch=16",
            "--model.semantic_decoder_width=32",
            "--optim.max_steps=5",
            "--optim.micro_batch=2",
            "--loss.disc_start=2",
            "--loss.disc_warmup=1",
            "--log.every=1",
            "--log.progress=false",
            "--log.tensorboard=false",
            f"--run.out_dir={os.path.join(work, name)}",
            *extra,
        ],
    )


def stage2(work: str, name: str, *extra: str):
    cfg = get_config("gpt_tiny")
    return apply_overrides(
        cfg,
        [
            f"--data.synthetic_default={os.path.join(work, 'data')}",
            "--data.synthetic_train_samples=64",
            f"--stage1={os.path.join(work, 'stage1_eager', 'export')}",
            "--model.n_layer=2",
            "--optim.max_steps=5",
            "--optim.micro_batch=2",
            "--log.every=1",
            "--log.progress=false",
            "--log.tensorboard=false",
            f"--run.out_dir={os.path.join(work, name)}",
            *extra,
        ],
    )


def main(work: str, backend: str) -> None:
    compiled = ["--run.compile=true", f"--run.compile_backend={backend}"]
    out = {}
    out["stage1_eager"] = train_stage1(stage1(work, "stage1_eager"))["history"]
    out["stage1_compiled"] = train_stage1(stage1(work, "stage1_compiled", *compiled))["history"]
    out["stage2_eager"] = train_stage2(stage2(work, "stage2_eager"))["history"]
    out["stage2_compiled"] = train_stage2(stage2(work, "stage2_compiled", *compiled))["history"]
    # resume a fp32 eager checkpoint with every option on (bf16 last: DeepSpeed's autocast set-up is process-global)
    if dist.rank() == 0:
        shutil.copytree(os.path.join(work, "stage1_eager"), os.path.join(work, "stage1_resumed"))
        shutil.rmtree(os.path.join(work, "stage1_resumed", "export"), ignore_errors=True)
    dist.barrier()
    options = ["--zero.precision=bf16", "--model.channels_last=true", *compiled]
    resumed = train_stage1(stage1(work, "stage1_resumed", "--optim.max_steps=7", "--run.resume=auto", *options))
    out["stage1_resumed"] = resumed["history"]
    if dist.rank() == 0:
        with open(os.path.join(work, "summary.json"), "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    main(*args)
