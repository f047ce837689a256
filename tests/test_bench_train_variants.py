"""The step-speed table's variants (benchmarks/bench_train.py --table): what each one runs."""

import sys
from pathlib import Path

import pytest

from svq_fast.config import apply_overrides
from svq_fast.named_configs import get_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train  # noqa: E402


def _config(recipe: str, variant: str):
    name = "svqgan_tiny" if recipe == "stage1" else "gpt_tiny"
    return apply_overrides(get_config(name), bench_train._variant_overrides(recipe, variant))


def test_stage1_variants_pin_the_memory_format_so_the_baseline_stays_the_default_layout():
    # the tiny sVQGAN defaults to channels-last; the table's ratios are against the layout it was measured in
    assert get_config("svqgan_tiny").model.channels_last
    for variant in bench_train.TABLE_VARIANTS.split(","):
        if variant.startswith("plain"):
            continue  # bench_train_eager.py: its own process, no config overrides
        cfg = _config("stage1", variant)
        assert cfg.model.channels_last == (variant in bench_train.CHANNELS_LAST_VARIANTS), variant
        assert cfg.run.compile == ("compiled" in variant), variant
        assert cfg.zero.precision == ("bf16" if "bf16" in variant else "fp32"), variant


def test_stage2_variants_parse_on_the_gpt_config():
    for variant in bench_train.TABLE_VARIANTS.split(","):
        if variant.startswith("plain") or variant in bench_train.CHANNELS_LAST_VARIANTS:
            continue  # the table skips the layout rows for the GPT
        cfg = _config("stage2", variant)
        assert cfg.run.compile == ("compiled" in variant), variant


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mid_size_is_the_tiny_architecture_wider_and_both_benchmarks_share_it(tmp_path):
    import json

    import bench_train_eager
    import pytest
    from bench_common import bench_config

    from svq_fast.models.gpt import SemanticGPT
    from svq_fast.models.svq import SVQModel

    tiny1, mid1 = bench_config("stage1"), bench_config("stage1", mid=True)
    tiny2, mid2 = bench_config("stage2"), bench_config("stage2", mid=True)
    assert (mid1.run.name, mid2.run.name) == ("svqgan_mid", "gpt_mid")
    # same architecture, only wider (stage 1) / wider and deeper (stage 2); the tiny configs are left as they are
    assert mid1.model.image_decoder_semantic == tiny1.model.image_decoder_semantic == "spade"
    assert (mid1.model.ch, tiny1.model.ch, get_config("svqgan_tiny").model.ch) == (64, 32, 32)
    assert _params(SVQModel(mid1.model, mid1.quantizer)) > 3 * _params(SVQModel(tiny1.model, tiny1.quantizer))
    assert _params(SemanticGPT(mid2.model)) > 4 * _params(SemanticGPT(tiny2.model))  # the embeddings grow 2x only
    assert bench_config("stage1", paper=True).run.name == get_config("svqgan_f16_256").run.name
    with pytest.raises(ValueError, match="one size"):
        bench_config("stage1", paper=True, mid=True)
    # the table's children (stack rows and the plain-torch baseline) are launched at the table's size
    args = bench_train.argparse.Namespace(paper=False, mid=True)
    assert bench_train._size_args(args) == ["--mid"]
    row = tmp_path / "row.json"
    argv = ["--mid", "--recipes=stage2", "--steps=1", "--warmup=0", "--micro-batch=1", "--precision=fp32"]
    assert bench_train_eager.main([*argv, f"--row-out={row}"]) == 0
    assert json.loads(row.read_text())["config"] == "gpt_mid"
    for variant in bench_train.TABLE_VARIANTS.split(","):
        if not variant.startswith("plain"):
            apply_overrides(mid1, bench_train._variant_overrides("stage1", variant))


def test_stage2_alone_needs_a_stage1_export_and_says_so(tmp_path, capsys):
    for argv, message in (
        (["--table", "--recipes", "stage2"], "pass --stage1-export DIR"),
        (["--recipes", "stage2", "--stage1-export", str(tmp_path)], f"{tmp_path}: no model.safetensors"),
    ):
        with pytest.raises(SystemExit) as e:
            bench_train.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_eager_baseline_runs_the_adaptive_weight_passes_and_names_its_peak(monkeypatch, tmp_path):
    # issue 28 item 7: the plain-torch baseline skipped the adaptive GAN weight's two extra autograd passes that the
    # stack runs every step, so "stack vs eager" compared unlike steps
    import json

    import bench_train_eager
    import torch

    from svq_fast.named_configs import get_config

    assert get_config("svqgan_tiny").loss.adaptive_weight and get_config("svqgan_f16_256").loss.adaptive_weight
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *a, **kw):
        calls.append(inputs)
        return real_grad(outputs, inputs, *a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    row = tmp_path / "row.json"
    argv = ["--recipes=stage1", "--steps=2", "--warmup=1", "--micro-batch=1", "--precision=fp32", "--seconds=0"]
    assert bench_train_eager.main([*argv, f"--row-out={row}"]) == 0
    assert len(calls) == 2 * 3  # two passes per step, warm-up included
    out = json.loads(row.read_text())
    assert out["mfu_peak"].startswith("CPU, measured fp32") and out["mfu"] > 0 and out["mfu_measured_peak"] > 0


def test_stack_is_timed_at_its_log_cadence_from_past_the_warmup(monkeypatch):
    # issue 28 items 2 and 7: the stack's rate was the mean of --log.every=1 windows (every step synchronised and
    # reduced), the first ones holding the cold compiles; now one window between log steps past the warm-up
    syncs = []
    monkeypatch.setattr(bench_train.torch.cuda, "synchronize", lambda *a: syncs.append(1))
    clock = bench_train._Clock(log_every=10, warmup=3, device="cuda")
    for step in range(1, 26):  # the loop calls after_step on every step but the last
        clock(step)
    assert [s for s, _ in clock.marks] == [10, 20] and len(syncs) == 2  # once per log window, as the loop logs
    steps, seconds = clock.steady()
    assert steps == 10 and seconds >= 0
    short = bench_train._Clock(log_every=10, warmup=3, device="cpu")
    for step in range(1, 15):
        short(step)
    assert short.steady() == (0, 0.0)  # one log step past the warm-up: no window (measure() raises, naming why)
    # the first log window's time beyond the same steps at the steady rate: the compile
    hist = [{"step": 10, "throughput/samples_per_s": 8 * 10 / 25.0}]  # 10 steps of 8 samples in 25 s
    assert bench_train._compile_seconds(hist, 8, 0.5) == pytest.approx(20.0)
