"""The step-speed table's variants (benchmarks/bench_train.py --table): what each one runs."""

import sys
from pathlib import Path

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
