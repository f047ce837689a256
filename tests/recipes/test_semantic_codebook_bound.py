"""The semantic codebook bound: exact with enough codes, monotone in K, refuses a factor that does not fit."""

import json
import sys
from pathlib import Path

import pytest
import torch

from svq_fast.data.make_shards import write_synthetic

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "experiments"))
import semantic_codebook_bound as scb  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bound")
    write_synthetic(str(root / "train"), split="train", size=16, num_samples=12, seed=0, samples_per_shard=6)
    return str(root / "train")


def test_enough_codes_reproduce_the_training_maps_exactly(shards, tmp_path):
    out = scb.main(["--train-shards", shards, "--val-shards", shards, "--codes", "1,4,100000", "--out", str(tmp_path)])
    by_k = {r["codes"]: r for r in out["results"]}
    assert by_k[100000]["miou"] == pytest.approx(1.0) and by_k[100000]["pixel_accuracy"] == pytest.approx(1.0)
    assert by_k[1]["miou"] < by_k[4]["miou"] < 1.0
    assert out["train_images"] == 12 and out["val_images"] == 12
    report = json.loads((tmp_path / "bound.json").read_text())
    assert [r["codes"] for r in report["results"]] == [1, 4, 100000]
    assert "| 100000 | 100.00 | 100.00 |" in (tmp_path / "bound.md").read_text()


def test_codebook_assigns_each_patch_to_its_hamming_nearest_pattern():
    patches = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1], [255, 1, 1, 1]], dtype=torch.uint8)
    book = scb.PatchCodebook(patches[:2], torch.tensor([5, 3]), num_classes=2, k=2)
    assert book.assign(patches).tolist() == [0, 1, 0, 1]
    assert book.decode(patches).tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]


def test_a_factor_that_does_not_divide_the_image_is_refused(shards, tmp_path):
    with pytest.raises(SystemExit, match="does not divide"):
        scb.main(["--train-shards", shards, "--val-shards", shards, "--factor", "5", "--out", str(tmp_path)])
