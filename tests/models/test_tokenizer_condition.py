"""The appearance-free condition (issue 29): with condition "map" the GPT's z_s tokens depend on the map alone."""

import pytest
import torch

from svq_fast.config import QuantizerConfig, Stage2Config, SVQModelConfig
from svq_fast.models.svq import SVQModel
from svq_fast.models.tokenizer import Tokenizer


def _stage1_model(kind: str = "svq") -> SVQModel:
    """A tiny stage-1 model: coupled by default, or the image-only / semantic member of a separate pair."""
    torch.manual_seed(0)
    cfg = SVQModelConfig(
        kind=kind, image_size=16, num_classes=5, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
        norm_groups=4, z_channels=8, semantic_z_channels=4,
    )  # fmt: skip
    return SVQModel(cfg, QuantizerConfig(image_codebook_size=32, semantic_codebook_size=32, backend="ref")).eval()


def test_map_condition_ignores_the_image_and_reference_reads_it():
    model = _stage1_model()
    s = torch.randint(0, 5, (3, 16, 16))
    x1, x2 = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1  # two appearances of one map
    ref, mapped = Tokenizer(model), Tokenizer(model, condition="map")
    sem1, img1 = mapped(x1, s)
    sem2, img2 = mapped(x2, s)
    assert torch.equal(sem1, sem2)  # map-only z_s: unchanged when only the image changes
    assert torch.equal(sem1, model.encode_semantic(s).flatten(1))
    assert not torch.equal(img1, img2)  # z_x still reads the image
    r1, r_img1 = ref(x1, s)
    r2, _ = ref(x2, s)
    assert not torch.equal(r1, r2)  # the paper's z_s reads (image, map)
    assert torch.equal(r_img1, img1)  # the condition changes z_s only
    assert torch.equal(mapped.semantic_tokens(x1, s, "reference"), r1)
    assert torch.equal(ref.semantic_tokens(x2, s, "map"), sem1)


def test_condition_is_checked_and_defaults_to_the_paper():
    assert Stage2Config().condition == "reference"
    with pytest.raises(ValueError, match="condition"):
        Tokenizer(_stage1_model(), condition="image")


def test_a_separate_semantic_model_is_a_map_condition():
    image = _stage1_model()
    semantic = _stage1_model()
    assert Tokenizer(image, semantic, condition="reference").condition == "map"


@pytest.mark.parametrize("trained_on", ["reference", "map"])
@pytest.mark.parametrize("sampled_on", ["reference", "map"])
def test_tokens_of_a_condition_read_the_encoder_once_when_it_is_the_trained_one(trained_on, sampled_on):
    model = _stage1_model()
    tok = Tokenizer(model, condition=trained_on)
    x, s = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randint(0, 5, (2, 16, 16))
    calls = []
    encode = model.encode
    model.encode = lambda *a: calls.append(1) or encode(*a)
    sem, img = tok.tokens(x, s, sampled_on)
    assert len(calls) == (1 if trained_on == sampled_on else 2)
    model.encode = encode
    assert torch.equal(sem, tok.semantic_tokens(x, s, sampled_on))
    assert torch.equal(img, tok(x, s)[1])


@pytest.mark.parametrize("condition", ["reference", "map"])
def test_image_tokens_are_the_tokenizers_own_without_a_z_s_reading(condition):
    model = _stage1_model()
    tok = Tokenizer(model, condition=condition)
    x, s = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randint(0, 5, (2, 16, 16))
    assert torch.equal(tok.image_tokens(x, s), tok(x, s)[1])
    separate = Tokenizer(_stage1_model("image"), _stage1_model("semantic"))
    assert torch.equal(separate.image_tokens(x, s), separate(x, s)[1])
