"""svq_fast/eval/diversity.py: re-renders of held-out synthetic scenes, the pairwise spread and the z_x probe."""

import numpy as np
import pytest
import torch

from svq_fast.data.loader import list_shards, make_loader
from svq_fast.data.make_shards import write_synthetic
from svq_fast.data.synthetic import SyntheticSpec, render_scene
from svq_fast.eval.diversity import Rerenders, ZxProbe, class_mean_colours, pairwise_mean


def test_pairwise_mean_averages_every_pair_of_draws():
    v = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])  # (maps 2, draws 3)
    got = pairwise_mean(v, lambda a, b: (a - b).abs())
    assert torch.allclose(got, torch.tensor([(1 + 3 + 2) / 3, 0.0]))


def test_class_mean_colours_ignore_unlabelled_pixels():
    img = torch.full((1, 3, 2, 2), -1.0)
    img[0, :, 0, 0] = 1.0  # one white pixel of class 1, the rest black
    lab = torch.tensor([[[1, 0], [255, 0]]])
    means, counts = class_mean_colours(img, lab, 3)
    assert counts.tolist() == [[2, 1, 0]]
    assert torch.allclose(means[0, 1], torch.ones(3, dtype=torch.float64)) and means[0, 0].abs().max() == 0


def test_zx_probe_tells_which_source_the_appearance_follows():
    torch.manual_seed(0)
    s_a = torch.zeros(2, 8, 8, dtype=torch.long)
    s_b = s_a.clone()
    s_b[:, :2] = 1  # A and B agree on class 0 in 48 pixels
    x_a, x_b = torch.full((2, 3, 8, 8), -0.8), torch.full((2, 3, 8, 8), 0.6)
    follows_b, follows_a = ZxProbe(), ZxProbe()
    follows_b.update(x_b + 0.05, x_a, x_b, s_a, s_b, 2)
    follows_a.update(x_a - 0.05, x_a, x_b, s_a, s_b, 2)
    assert follows_b.results()["cases"] == 2 and follows_b.results()["share_following_zx"] == 1.0
    assert follows_b.results()["met"] is True
    assert follows_a.results()["share_following_zx"] == 0.0 and follows_a.results()["met"] is False
    alike = ZxProbe()  # A and B look the same: no case can tell the sources apart
    alike.update(x_a, x_a, x_a + 0.01, s_a, s_b, 2)
    assert alike.results()["cases"] == 0 and alike.results()["met"] == "n/a (no cases)"


def test_rerenders_of_held_out_shards(tmp_path):
    write_synthetic(str(tmp_path), split="val", size=32, num_samples=3, seed=4, progress=False, processes=1)
    shards = list_shards(str(tmp_path))
    batch = next(iter(make_loader(shards, batch_size=3, image_size=32, resampled=False, flip=False, shuffle=False)))
    rr = Rerenders(shards)
    assert rr.available
    out = rr.render(batch["key"], 2, batch["label"])  # (3 maps x 2 draws, 3, 32, 32), map-major
    assert out.shape == (6, 3, 32, 32)
    index = 10_000_001  # the val split's second scene
    want = render_scene(SyntheticSpec(size=32, seed=4), index, texture_seed=1)[0]
    got = ((out[3].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
    assert np.array_equal(got, want)
    assert not torch.equal(out[2], batch["image"][1])  # a fresh appearance, not the stored image
    wrong = batch["label"].clone()
    wrong[0, 0, 0] = (wrong[0, 0, 0] + 1) % 16
    with pytest.raises(ValueError, match="does not have the loaded map"):
        rr.render(batch["key"], 2, wrong)
    with pytest.raises(ValueError, match="not a synthetic scene"):
        rr.render(["ade-0001"], 2, batch["label"][:1])


def test_copy_ratio_is_zero_for_copies_and_near_one_for_independent_draws():
    from svq_fast.eval.diversity import Diversity, Row

    div = Diversity.__new__(Diversity)  # _score needs only the draw count and the (absent) metric networks
    div.draws, div.segmenter, div.lpips = 2, None, None
    torch.manual_seed(0)
    s = torch.randint(0, 3, (2, 8, 8))
    x = torch.rand(2, 3, 8, 8) * 2 - 1  # the references
    real = torch.rand(4, 3, 8, 8) * 2 - 1  # two re-renders per map
    copies, independent = Row(0), Row(0)
    div._score(copies, x.repeat_interleave(2, 0), x, s, 3, real)
    div._score(independent, torch.rand(4, 3, 8, 8) * 2 - 1, x, s, 3, real)
    assert copies.colour.mean() == 0 and copies.colour_rr.mean() > 0.05
    ratio = independent.colour.mean() / independent.colour_rr.mean()
    assert 0.7 < ratio < 1.4
