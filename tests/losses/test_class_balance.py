"""Class balance: weights from the class histogram, the weighted semantic CE and the image terms' pixel weights."""

import json

import pytest
import torch
import torch.nn.functional as F

from svq_fast.config import ConfigError, apply_overrides
from svq_fast.data.index import class_pixel_counts
from svq_fast.data.loader import list_shards
from svq_fast.data.make_shards import write_synthetic
from svq_fast.data.run_shards import shards_or_synthetic
from svq_fast.losses.class_balance import balanced_class_weights, pixel_weights
from svq_fast.losses.reconstruction import reconstruction_loss, semantic_loss, texture_loss
from svq_fast.models.svq import SVQModel
from svq_fast.named_configs import get_config
from svq_fast.train.stage1 import Stage1, class_weights


def _write_index(shard_dir, histogram):
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / "a.tar").write_bytes(b"")
    (shard_dir / "index.json").write_text(json.dumps({"class_histogram": histogram}))
    return str(shard_dir / "a.tar")


def test_weights_follow_inverse_power_of_frequency_and_keep_the_mean_pixel_weight_one():
    counts = torch.tensor([900.0, 90.0, 10.0, 0.0])
    w = balanced_class_weights(counts, 0.5)
    freq = counts / counts.sum()
    assert w[3] == 0  # a class without pixels is never a target
    torch.testing.assert_close((freq * w).sum(), torch.tensor(1.0))
    torch.testing.assert_close(w[2] / w[0], torch.tensor(90.0).sqrt())  # (f_0 / f_2)^0.5
    assert torch.equal(balanced_class_weights(counts, 0.0), (counts > 0).float())  # power 0: plain CE
    with pytest.raises(ValueError, match=">= 0"):
        balanced_class_weights(counts, -1.0)


def test_counts_sum_the_histograms_of_every_shard_directory(tmp_path):
    a = _write_index(tmp_path / "a", {"0": 10, "2": 5, "255": 100})  # the ignore id is not a class
    b = _write_index(tmp_path / "b", {"0": 1, "1": 4})
    counts = class_pixel_counts([a, b], num_classes=3)
    assert counts.tolist() == [11.0, 4.0, 5.0]


def test_counts_name_the_directory_and_class_on_bad_indexes(tmp_path):
    no_index = tmp_path / "bare"
    no_index.mkdir()
    (no_index / "x.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"bare.*index\.json.*make_shards"):
        class_pixel_counts([str(no_index / "x.tar")], num_classes=3)
    old = _write_index(tmp_path / "old", {})
    (tmp_path / "old" / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="class_histogram"):
        class_pixel_counts([old], num_classes=3)
    wide = _write_index(tmp_path / "wide", {"7": 3})
    with pytest.raises(ValueError, match="class id 7"):
        class_pixel_counts([wide], num_classes=3)


def test_synthetic_shards_carry_a_histogram_that_counts_every_pixel(tmp_path):
    write_synthetic(str(tmp_path), split="train", size=16, num_samples=6, seed=0, samples_per_shard=3)
    counts = class_pixel_counts(list_shards(str(tmp_path)), num_classes=16)
    assert counts.sum() == 6 * 16 * 16


def test_weighted_loss_is_the_weighted_sum_over_valid_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0, 0] = 255
    w = torch.tensor([0.5, 1.0, 4.0])
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    valid = labels != 255
    expected = (per_pixel * w[labels.clamp_max(2)] * valid).sum() / valid.sum()
    torch.testing.assert_close(semantic_loss(logits, labels, 255, w), expected)
    torch.testing.assert_close(semantic_loss(logits, labels, 255, torch.ones(3)), semantic_loss(logits, labels, 255))


def test_stage1_weights_come_from_the_configured_training_shards(tmp_path):
    write_synthetic(str(tmp_path), split="train", size=16, num_samples=4, seed=0, samples_per_shard=4)
    cfg = get_config("svqgan_tiny")
    cfg.data.train_shards = str(tmp_path)
    cfg.loss.semantic_class_balance = 0.5
    model = SVQModel(cfg.model, cfg.quantizer)
    shards = shards_or_synthetic(cfg.data, "train", rank=0)
    counts = class_pixel_counts(list_shards(str(tmp_path)), 16)
    semantic, image = class_weights(cfg, model, shards, rank=0)
    torch.testing.assert_close(semantic, balanced_class_weights(counts, 0.5))
    assert image is None
    cfg.loss.semantic_class_balance, cfg.loss.image_class_balance = 0.0, 1.0
    semantic, image = class_weights(cfg, model, shards, rank=0)
    assert semantic is None
    torch.testing.assert_close(image, balanced_class_weights(counts, 1.0))
    image_only = get_config("vqgan_tiny")
    image_only.loss.semantic_class_balance = 0.5
    image_model = SVQModel(image_only.model, image_only.quantizer)
    assert class_weights(image_only, image_model, shards, rank=0) == (None, None)


def test_pixel_weights_look_up_each_pixels_class_and_give_ignore_pixels_one():
    labels = torch.tensor([[[0, 1], [2, 255]]])  # (1, 2, 2)
    w = pixel_weights(labels, torch.tensor([0.5, 2.0, 8.0]), ignore_index=255)
    assert w.shape == (1, 1, 2, 2)
    assert w.flatten().tolist() == [0.5, 2.0, 8.0, 1.0]


def test_weighted_image_terms_count_a_rare_class_error_more():
    """The same error costs more on a pixel of a heavily weighted class; uniform weights change nothing."""
    x = torch.zeros(1, 3, 8, 8)
    x_hat = torch.zeros(1, 3, 8, 8)
    x_hat[..., 0:3:2, 0:3:2] = 0.5  # a few dots: error and texture energy (3x3 high-pass) only in the top-left cell
    weight = torch.ones(1, 1, 8, 8)
    for loss in (lambda w: reconstruction_loss(x_hat, x, pixel_weight=w), lambda w: texture_loss(x_hat, x, 4, w)):
        torch.testing.assert_close(loss(weight), loss(None))
        rare = weight.clone()
        rare[..., :4, :4] = 3.0
        assert loss(rare) > 2.5 * loss(None)
        common = weight.clone()
        common[..., 4:, 4:] = 3.0  # weight where there is no error
        torch.testing.assert_close(loss(common), loss(None))


def test_stage1_weights_the_image_terms_by_the_map_only_when_asked():
    torch.manual_seed(0)
    cfg = get_config("svqgan_tiny")
    cfg.model.ch, cfg.loss.gan = 16, False
    stage = Stage1.__new__(Stage1)  # only image_terms: no engines, loader or discriminator needed
    stage.cfg, stage.model, stage.perceptual, stage.disc = cfg, SVQModel(cfg.model, cfg.quantizer), None, None
    stage.dev, stage.image_class_weight = torch.device("cpu"), None
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = {"x_hat": torch.tanh(torch.randn(2, 3, 64, 64))}
    s = torch.zeros(2, 64, 64, dtype=torch.long)
    s[:, :8] = 1  # class 1: the top eighth of every image
    _, plain, _ = stage.image_terms(out, x, s, step=0)
    stage.image_class_weight = torch.ones(16)
    _, uniform, _ = stage.image_terms(out, x, s, step=0)
    assert uniform.item() == pytest.approx(plain.item(), rel=1e-6)
    out["x_hat"] = out["x_hat"].clone()
    out["x_hat"][:, :, :8] = x[:, :, :8]  # perfect on class 1: its weight cannot move the pixel loss
    _, _, before = stage.image_terms(out, x, s, step=0)
    stage.image_class_weight[1] = 5.0
    _, _, rare_up = stage.image_terms(out, x, s, step=0)
    assert rare_up["rec"].item() == pytest.approx(before["rec"].item(), rel=1e-6)
    stage.image_class_weight[0] = 2.0  # every error is on class 0's pixels: the pixel loss doubles
    _, _, common_up = stage.image_terms(out, x, s, step=0)
    assert common_up["rec"].item() == pytest.approx(2 * before["rec"].item(), rel=1e-6)


def test_image_class_balance_needs_the_semantic_branch():
    assert apply_overrides(get_config("svqgan_tiny"), ["--loss.image_class_balance=0.5"]).loss.image_class_balance
    with pytest.raises(ConfigError, match=r"loss.image_class_balance=0.5.*model.kind='image'"):
        apply_overrides(get_config("vqgan_tiny"), ["--loss.image_class_balance=0.5"])
    with pytest.raises(ConfigError, match="loss.image_class_balance"):
        apply_overrides(get_config("svqgan_tiny"), ["--loss.image_class_balance=-1"])
