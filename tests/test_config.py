import json
import subprocess
import sys
from pathlib import Path

import pytest

from svq_fast.config import (
    ConfigError,
    Stage1Config,
    Stage2Config,
    apply_overrides,
    from_json,
    to_deepspeed,
    to_json,
)
from svq_fast.named_configs import CONFIGS, get_config

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_parse_each_type():
    cfg = apply_overrides(
        Stage1Config(),
        [
            "--model.ch=64",
            "--loss.semantic_weight",
            "0.01",
            "--loss.gan=false",
            "--model.ch_mult=1,2,4",
            "--zero.stage=3",
            "--run.name=x",
            "--optim.betas=0.9,0.99",
            "--zero.precision=bf16",
        ],
    )
    assert cfg.model.ch == 64 and cfg.loss.semantic_weight == 0.01 and cfg.loss.gan is False
    assert cfg.model.ch_mult == (1, 2, 4) and cfg.zero.stage == 3 and cfg.run.name == "x"
    assert cfg.optim.betas == (0.9, 0.99) and cfg.zero.precision == "bf16"


@pytest.mark.parametrize(
    "arg, fragment",
    [
        ("--model.chh=3", "model.chh"),
        ("--modle.ch=3", "modle.ch"),
        ("--model.ch=abc", "model.ch"),
        ("--zero.stage=4", "zero.stage"),
        ("--loss.gan=maybe", "loss.gan"),
        ("--optim.betas=0.9", "optim.betas"),
        ("--model=3", "whole section"),
    ],
)
def test_bad_override_names_the_key(arg, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        apply_overrides(Stage1Config(), [arg])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="norm_groups"):
        apply_overrides(Stage1Config(), ["--model.norm_groups=7"])
    with pytest.raises(ConfigError, match="n_head"):
        apply_overrides(Stage2Config(), ["--model.n_head=7"])
    with pytest.raises(ConfigError, match="latent_swap"):
        apply_overrides(Stage1Config(), ["--model.latent_swap=1.5"])
    with pytest.raises(ConfigError, match="spade_hidden"):
        apply_overrides(Stage1Config(), ["--model.image_decoder_semantic=spade", "--model.spade_hidden=0"])
    with pytest.raises(ConfigError, match="lecam"):
        apply_overrides(Stage1Config(), ["--loss.lecam_decay=1.0"])


@pytest.mark.parametrize("micro, accum, world", [(8, 1, 1), (4, 3, 2), (2, 2, 8)])
def test_deepspeed_batch_identity(micro, accum, world):
    cfg = apply_overrides(Stage1Config(), [f"--optim.micro_batch={micro}", f"--optim.grad_accum={accum}"])
    ds = to_deepspeed(cfg, world)
    assert ds["train_batch_size"] == micro * accum * world
    assert ds["train_micro_batch_size_per_gpu"] == micro and ds["gradient_accumulation_steps"] == accum


def test_deepspeed_precision_and_stage():
    cfg = apply_overrides(Stage2Config(), ["--zero.stage=3", "--zero.precision=bf16"])
    ds = to_deepspeed(cfg, 2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and "fp16" not in ds
    assert "bf16" not in to_deepspeed(Stage2Config(), 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_named_configs_roundtrip_json(name):
    cfg = get_config(name)
    again = from_json(to_json(cfg))
    assert again == cfg
    json.loads(to_json(cfg))


def test_paper_sizes():
    s1, s2 = get_config("svqgan_f16_256"), get_config("gpt_f16_256")
    assert s1.model.image_size // 2 ** (len(s1.model.ch_mult) - 1) == 16
    assert (s1.quantizer.image_codebook_size, s1.quantizer.semantic_codebook_size) == (16384, 4096)
    assert s1.loss.semantic_weight == 0.1
    assert (s2.model.n_layer, s2.model.n_head, s2.model.n_embd) == (24, 16, 1024)
    # the paper's architecture by default: every change for the tiny configs is an option they choose
    assert (s1.model.image_decoder_semantic, s1.model.latent_swap, s2.model.aligned_condition) == ("concat", 0.0, False)
    tiny = get_config("svqgan_tiny")
    assert tiny.model.image_size // 2 ** (len(tiny.model.ch_mult) - 1) == 16  # paper's 16x16 latents at 64x64


def test_from_json_rejects_unknown_keys():
    blob = json.loads(to_json(Stage1Config()))
    blob["config"]["model"]["typo"] = 1
    with pytest.raises(ConfigError, match="model.typo"):
        from_json(json.dumps(blob))


def test_recipe_exits_nonzero_on_bad_key():
    r = subprocess.run(
        [sys.executable, str(ROOT / "recipes/train_svqgan.py"), "--model.not_a_key=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "model.not_a_key" in r.stderr
