"""semantic_input="map" (issue 29): the coupled model's z_s reads the map alone, in training as at sampling."""

import torch

from svq_fast.config import QuantizerConfig, SVQModelConfig
from svq_fast.models.svq import SVQModel


def _model(semantic_input: str) -> SVQModel:
    torch.manual_seed(0)
    cfg = SVQModelConfig(
        image_size=16, num_classes=5, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), norm_groups=4,
        z_channels=8, semantic_z_channels=4, semantic_input=semantic_input,
    )  # fmt: skip
    q = QuantizerConfig(image_codebook_size=32, semantic_codebook_size=32, backend="ref", init_from_data=False)
    return SVQModel(cfg, q)


def test_map_input_makes_z_s_independent_of_the_image_in_training():
    s = torch.randint(0, 5, (2, 16, 16))
    x1, x2 = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    m = _model("map").train()
    a, b = m(x1, s), m(x2, s)
    assert torch.equal(a["z_s"], b["z_s"]) and torch.equal(a["indices_s"], b["indices_s"])
    assert not torch.equal(a["z_x"], b["z_x"])
    assert torch.equal(m.eval().encode_semantic(s), m.encode(x1, s)["indices_s"])  # sampling = training
    a["x_hat"].square().mean().backward()  # the decoder's loss reaches the encoder through z_x only
    assert m.stem_x.weight.grad is not None and m.stem_x.weight.grad.abs().sum() > 0
    shared = _model("shared").train()  # the paper's z_s reads the image
    assert not torch.equal(shared(x1, s)["z_s"], shared(x2, s)["z_s"])
