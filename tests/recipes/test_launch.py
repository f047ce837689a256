"""End to end through the real launcher: 2 CPU ranks under `deepspeed`, tiny configs, a few steps each."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svq_fast.data.index import class_pixel_counts
from svq_fast.data.run_shards import shards_or_synthetic
from svq_fast.dist import deepspeed_command
from svq_fast.export import load_gpt, load_stage1
from svq_fast.losses.class_balance import balanced_class_weights

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def launch(script, *args):
    cmd = deepspeed_command(ROOT / "recipes" / script, *args)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def history(run_dir):
    return json.loads((Path(run_dir) / "history.json").read_text())


def _decreasing(hist, key):
    first, last = hist[0][key], hist[-1][key]
    assert all(math.isfinite(h[key]) for h in hist), key
    assert last < first, f"{key} did not decrease: {first} -> {last}"


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    data = tmp / "data"
    run = tmp / "stage1"
    launch(
        "train_svqgan.py",
        "--config",
        "svqgan_tiny",
        f"--data.synthetic_default={data}",
        "--data.synthetic_train_samples=400",
        "--optim.max_steps=16",
        "--log.every=4",
        "--optim.micro_batch=4",
        "--loss.disc_start=12",
        "--loss.disc_warmup=4",
        "--log.image_every=8",
        "--profile",
        "--log.progress=false",
        f"--run.out_dir={run}",
    )
    return tmp, data, run


def test_stage1_two_ranks_trains_and_exports(stage1_run):
    _, _, run = stage1_run
    hist = history(run)  # windows end at steps 4, 8, 12, 16; the adversarial term enters after step 12
    _decreasing(hist, "sem_ce")
    _decreasing(hist[:3], "rec")
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert "g_adv" in hist[-1] and "d_loss" in hist[-1]  # the GAN terms were active at the end
    model, cfg = load_stage1(str(run / "export"))
    assert cfg.model.kind == "svq" and model.quantizer_x.codebook_size == cfg.quantizer.image_codebook_size
    # the export records the class weights the semantic CE trained with, so labels are read off logits - log w
    counts = class_pixel_counts(shards_or_synthetic(cfg.data, "train", 0), cfg.model.num_classes)
    weight = balanced_class_weights(counts, cfg.loss.semantic_class_balance)
    assert cfg.loss.semantic_class_balance > 0 and bool((weight > 0).all())
    torch.testing.assert_close(model.semantic_log_class_weight, weight.log())
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1  # rank 0 only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0])).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "loss/rec",
        "loss/sem_ce",
        "loss/d_loss",
        "throughput/samples_per_s",
        "throughput/images_per_s_per_rank",
        "throughput/mfu",
        "throughput/data_wait_fraction",
        "time/forward_fraction",
        "time/backward_fraction",
        "time/tensorboard_fraction",
        "memory/peak_mib",
        "grad_norm",
        "lr",
        "loss/perplexity_x",
    ):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("throughput/mfu")] == [4, 8, 12, 16]
    assert all(0 < e.value < 1 for e in acc.Scalars("throughput/mfu"))
    tb_share = [e.value for e in acc.Scalars("time/tensorboard_fraction")]
    assert tb_share[0] == 0 and all(0 < v < 1 for v in tb_share[1:])  # each window reports the writes before it
    assert "reconstructions" in acc.Tags()["images"]
    assert list((run / "profile").glob("*.pt.trace.json"))
    assert (run / "checkpoints" / "step00000016" / "COMPLETE").exists()


def test_stage2_two_ranks_then_sample(stage1_run):
    tmp, data, run1 = stage1_run
    run2 = tmp / "stage2"
    launch(
        "train_transformer.py",
        "--config",
        "gpt_tiny",
        f"--data.synthetic_default={data}",
        f"--stage1={run1 / 'export'}",
        "--optim.max_steps=12",
        "--log.every=4",
        "--optim.micro_batch=4",
        "--log.progress=false",
        f"--run.out_dir={run2}",
    )
    _decreasing(history(run2), "loss")
    load_gpt(str(run2 / "export"))
    out = tmp / "samples"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes/sample.py"),
            "--gpt",
            str(run2 / "export"),
            "--out",
            str(out),
            "--num-maps",
            "2",
            "--samples-per-map",
            "2",
            "--top-k",
            "50",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "grid.png").exists() and len(list(out.glob("*_sample*.png"))) == 4
