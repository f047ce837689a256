"""Training batches travel as uint8 (a quarter of float32's bytes through worker shared memory and the host-to-device
copy) and are normalised on the device, to the same float32 values the float path computes in numpy."""

import numpy as np
import torch

from svq_fast.config import DataConfig
from svq_fast.data.transforms import normalize_on_device, to_tensors
from svq_fast.train.data import train_loader


def test_device_normalisation_equals_the_float_path_bit_for_bit():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    label = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    x_float, s_float = to_tensors(image, label)
    x_raw, s_raw = to_tensors(image, label, raw=True)
    assert x_raw.dtype == torch.uint8 and s_raw.dtype == torch.uint8
    x, s = normalize_on_device({"image": x_raw[None], "label": s_raw[None]}, torch.device("cpu"))
    assert torch.equal(x[0], x_float) and torch.equal(s[0], s_float) and s.dtype == torch.int64
    every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    x, _ = normalize_on_device({"image": every_value, "label": torch.zeros(1, 16, 16, dtype=torch.uint8)}, "cpu")
    expected, _ = to_tensors(every_value[0].permute(1, 2, 0).numpy(), np.zeros((16, 16), np.uint8))
    assert torch.equal(x[0], expected)


def test_training_loader_yields_uint8_images_and_labels(tmp_path, fx):
    cfg = DataConfig(image_size=16, num_workers=0, shuffle_buffer=8)
    shards = fx.write_shard_dir(str(tmp_path), [8])
    batch = next(iter(train_loader(cfg, 4, 0, 1, shards, num_classes=16)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
    assert batch["label"].dtype == torch.uint8 and batch["label"].shape == (4, 16, 16)
    # the label is the column index and the red channel 16 x it (conftest.write_shard_dir), flips included
    assert torch.equal(batch["image"][:, 0].long(), 16 * batch["label"].long())
