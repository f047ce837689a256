"""Token shards: recipes/tokenize_shards.py writes what the frozen stage-1 model computes, and the token loader
streams it back (exact epochs, resume)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svq_fast.config import GPTConfig, QuantizerConfig, Stage1Config, Stage2Config, SVQModelConfig
from svq_fast.data.loader import make_loader
from svq_fast.data.make_shards import write_synthetic
from svq_fast.data.tokens import make_token_loader, read_token_index
from svq_fast.export import export_model, load_stage1
from svq_fast.models.svq import SVQModel
from svq_fast.models.tokenizer import Tokenizer
from svq_fast.train.stage2 import token_train_loader

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    cfg = Stage1Config(
        model=SVQModelConfig(
            image_size=32,
            num_classes=16,
            ch=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(),
            norm_groups=4,
            z_channels=8,
            semantic_z_channels=4,
        ),
        quantizer=QuantizerConfig(image_codebook_size=64, semantic_codebook_size=32, backend="ref"),
    )
    cfg.data.image_size = 32
    export_model(SVQModel(cfg.model, cfg.quantizer).state_dict(), cfg, str(tmp / "export"))
    write_synthetic(
        str(tmp / "img"), split="val", size=32, num_samples=10, samples_per_shard=4, processes=1, progress=False
    )
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes/tokenize_shards.py"),
            "--stage1",
            str(tmp / "export"),
            "--shards",
            str(tmp / "img"),
            "--out",
            str(tmp / "tok"),
            "--batch-size",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_tokens_equal_the_encoder_output(tokens):
    index = read_token_index(str(tokens / "tok"))
    assert (index["num_samples"], index["grid"], index["image_vocab"], index["semantic_vocab"]) == (10, 16, 64, 32)
    model, cfg = load_stage1(str(tokens / "export"))
    tok = Tokenizer(model)
    images = make_loader(
        [str(p) for p in sorted((tokens / "img").glob("*.tar"))],
        batch_size=10,
        image_size=32,
        rank=0,
        world_size=1,
        resampled=False,
        flip=False,
        crop="center",
        shuffle=False,
    )
    batch = next(iter(images))
    sem, img = tok(batch["image"], batch["label"])
    by_key = {k: (sem[i], img[i]) for i, k in enumerate(batch["key"])}
    loader = make_token_loader(
        str(tokens / "tok"), batch_size=4, rank=0, world_size=1, resampled=False, shuffle_buffer=4
    )
    seen = 0
    for tb in loader:
        for i, key in enumerate(tb["key"]):
            if tb["pad"][i]:
                continue
            assert torch.equal(tb["sem"][i], by_key[key][0]) and torch.equal(tb["img"][i], by_key[key][1])
            seen += 1
    assert seen == 10


def test_token_loader_resumes_exactly(tokens):
    def fresh():
        return make_token_loader(str(tokens / "tok"), batch_size=2, rank=0, world_size=1, seed=3)

    a = fresh()
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    expected = [next(it)["key"] for _ in range(3)]
    b = fresh()
    b.load_state_dict(state)
    it2 = iter(b)
    assert [next(it2)["key"] for _ in range(3)] == expected


def test_stage2_refuses_tokens_of_another_model(tokens):
    cfg = Stage2Config(model=GPTConfig(image_vocab=1024, semantic_vocab=32, grid=16))
    cfg.data.token_shards = str(tokens / "tok")
    with pytest.raises(ValueError, match="image vocab"):
        token_train_loader(cfg, 0, 1)


def test_token_shards_stream_over_http_like_local_ones(tokens, fx):
    names = sorted(p.name for p in (tokens / "tok").glob("*.tar"))
    kw = dict(batch_size=4, rank=0, world_size=1, resampled=False, shuffle_buffer=4)
    local = list(make_token_loader(str(tokens / "tok"), **kw))
    with fx.serve_dir(str(tokens / "tok")) as server:
        spec = ",".join(f"{server.url}/{n}" for n in names)
        assert read_token_index(spec)["grid"] == 16  # read beside the shards, through the same opener
        remote = list(make_token_loader(spec, **kw))
    assert len(remote) == len(local) == 3
    for a, b in zip(local, remote):
        assert a["key"] == b["key"] and torch.equal(a["sem"], b["sem"]) and torch.equal(a["img"], b["img"])
    blank = make_token_loader(str(tokens / "tok"), **kw).dataset.blank_sample()
    assert blank["sem"].shape == blank["img"].shape == (256,)  # tokens per grid, not an image size


def test_stage2_refuses_tokens_of_another_condition(tokens):
    assert read_token_index(str(tokens / "tok"))["condition"] == "reference"  # the script's default, recorded
    cfg = Stage2Config(model=GPTConfig(image_vocab=64, semantic_vocab=32, grid=16), condition="map")
    cfg.data.token_shards = str(tokens / "tok")
    with pytest.raises(ValueError, match="condition 'reference'.*condition='map'"):
        token_train_loader(cfg, 0, 1)
    cfg.condition = "reference"
    assert token_train_loader(cfg, 0, 1) is not None
