import pytest
import torch

from svq_fast.config import QuantizerConfig, SVQModelConfig
from svq_fast.models.svq import PatchDiscriminator, SVQModel
from svq_fast.models.svq.subpixel_decoder import SubpixelDecoder
from svq_fast.models.svq.swap_target import recoloured_swap_target


def tiny(kind="svq", **kw):
    cfg = SVQModelConfig(
        kind=kind,
        image_size=32,
        num_classes=5,
        ch=16,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
        norm_groups=4,
        z_channels=8,
        semantic_z_channels=4,
        **kw,
    )
    return SVQModel(cfg, QuantizerConfig(image_codebook_size=32, semantic_codebook_size=16, backend="ref"))


def batch(b=2):
    x = torch.rand(b, 3, 32, 32) * 2 - 1
    s = torch.randint(0, 5, (b, 32, 32))
    s[:, :2] = 255  # some ignore pixels
    return x, s


SUBPIXEL = dict(semantic_decoder="subpixel", semantic_decoder_width=8, semantic_decoder_blocks=1)
SPADE = dict(image_decoder_semantic="spade", spade_hidden=8)
SEMANTIC_DECODERS = [dict(), SUBPIXEL, dict(SUBPIXEL, semantic_patch_input=True), dict(SUBPIXEL, **SPADE)]
SEMANTIC_IDS = ["conv", "subpixel", "subpixel+patch", "subpixel+spade"]


@pytest.mark.parametrize("kind", ["svq", "image", "semantic"])
@pytest.mark.parametrize("sdec", SEMANTIC_DECODERS, ids=SEMANTIC_IDS)
def test_shapes_per_kind(kind, sdec):
    m = tiny(kind, **sdec)
    x, s = batch()
    out = m(x if kind != "semantic" else None, s if kind != "image" else None)
    if kind != "semantic":
        assert out["x_hat"].shape == (2, 3, 32, 32) and out["indices_x"].shape == (2, 16, 16)
    if kind != "image":
        assert out["s_logits"].shape == (2, 5, 32, 32) and out["indices_s"].shape == (2, 16, 16)


@pytest.mark.parametrize("sdec", SEMANTIC_DECODERS, ids=SEMANTIC_IDS)
def test_image_loss_gives_no_gradient_to_semantic_branch(sdec):
    m = tiny("svq", **sdec)
    x, s = batch()
    out = m(x, s)
    (out["x_hat"] - x).abs().mean().backward()
    branch = ["quantizer_s", "decoder_s", "post_quant_s", "quant_s"] + (["patch_s"] if m.patch_s is not None else [])
    for name in branch:
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert all(g is None or g.abs().max() == 0 for g in grads), name
    # ...while the image branch does learn from it
    assert m.decoder_x.conv_out.weight.grad.abs().max() > 0


@pytest.mark.parametrize("sdec", SEMANTIC_DECODERS, ids=SEMANTIC_IDS)
def test_semantic_loss_trains_shared_encoder_and_semantic_branch(sdec):
    m = tiny("svq", **sdec)
    x, s = batch()
    out = m(x, s)
    torch.nn.functional.cross_entropy(out["s_logits"], s, ignore_index=255).backward()
    assert m.decoder_s.conv_out.weight.grad.abs().max() > 0
    assert m.encoder.conv_out.weight.grad.abs().max() > 0
    if m.patch_s is not None:  # the semantic-only input path learns from the semantic loss
        assert m.patch_s.weight.grad.abs().max() > 0
    assert m.decoder_x.conv_out.weight.grad is None


def test_encode_semantic_without_image_and_decode_indices():
    m = tiny("svq", image_dropout=0.5).eval()
    x, s = batch()
    idx_s = m.encode_semantic(s)
    assert idx_s.shape == (2, 16, 16) and idx_s.max() < 16
    out = m(x, s)
    img = m.decode_indices(out["indices_x"], out["indices_s"])
    torch.testing.assert_close(img, out["x_hat"], atol=1e-5, rtol=1e-4)


def test_subpixel_decoder_unfolds_each_latent_into_its_own_patch():
    # conv_out channel (c, i, j) of latent (h, w) must land on pixel (h * f + i, w * f + j) of class c
    dec = SubpixelDecoder(in_channels=4, out_channels=3, width=8, num_blocks=1, factor=2, groups=4)
    z = torch.randn(1, 4, 5, 5)
    h = torch.nn.functional.silu(dec.norm_out(dec.blocks(dec.conv_in(z))))
    per_latent = dec.conv_out(h).reshape(1, 3, 2, 2, 5, 5)  # (B, class, i, j, h, w)
    logits = dec(z)
    assert logits.shape == (1, 3, 10, 10)
    for c, i, j, hh, ww in [(0, 0, 0, 0, 0), (2, 1, 0, 3, 4), (1, 1, 1, 4, 2)]:
        assert logits[0, c, hh * 2 + i, ww * 2 + j] == per_latent[0, c, i, j, hh, ww]


def test_unknown_semantic_decoder_is_refused():
    with pytest.raises(ValueError, match="semantic_decoder"):
        tiny("svq", semantic_decoder="upconv")


def test_out_of_range_class_id_is_named():
    m = tiny("svq")
    x, s = batch()
    s[0, 5, 5] = 9
    with pytest.raises(ValueError, match=r"\[9\]"):
        m(x, s)


def test_discriminator_patch_logits():
    d = PatchDiscriminator(ch=8, n_layers=2)
    assert d(torch.randn(2, 3, 64, 64)).shape[:2] == (2, 1)


def test_every_family_config_builds_and_runs():

    from svq_fast.named_configs import CONFIGS

    names = [n for n in CONFIGS if n.endswith("_tiny") and not n.startswith("gpt")]
    assert {
        "vqvae_tiny",
        "vqgan_tiny",
        "semantic_vqvae_tiny",
        "svqvae_tiny",
        "svqgan_tiny",
        "svqgan_l001_tiny",
        "svqgan_l1_tiny",
    } <= set(names)
    for name in names:
        cfg = CONFIGS[name]()
        cfg.model.ch = 8
        m = SVQModel(cfg.model, cfg.quantizer)
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        s = torch.randint(0, cfg.model.num_classes, (1, 64, 64))
        out = m(x if m.has_image else None, s if m.has_semantic else None)
        grid = out.get("indices_x", out.get("indices_s")).shape[-1]
        assert grid == 16, name  # the paper's 16x16 latents at 64x64
        assert (cfg.loss.gan and cfg.model.kind != "semantic") == (name.startswith(("vqgan", "svqgan")))
    assert CONFIGS["svqgan_l001_tiny"]().loss.semantic_weight == 0.01
    assert (
        CONFIGS["svqgan_mapdrop_tiny"]().model.image_dropout == 0.5
        and CONFIGS["svqgan_tiny"]().model.image_dropout == 0
    )
    assert CONFIGS["svqgan_l1_f16_256"]().model.image_size == 256


def test_semantic_labels_undo_the_class_weights_bias():
    """Weighted CE's minimiser is softmax ~ w_c p(c): semantic_labels reads labels off logits - log w."""
    m = tiny("semantic")
    # per-pixel posterior p = (0.5, 0.3, 0.2, 0, 0) at every pixel; the weighted-CE optimum logits are log(w p)
    p = torch.tensor([0.5, 0.3, 0.2, 1e-9, 1e-9])
    w = torch.tensor([0.5, 4.0, 1.0, 1.0, 0.0])  # class 4 absent from the training data: weight 0
    logits = (w.clamp_min(1e-9) * p).log().view(1, 5, 1, 1).expand(2, 5, 3, 3)
    assert (logits.argmax(1) == 1).all()  # the raw argmax follows the weighted optimum (0.5*0.5 < 4*0.3)
    assert (m.semantic_labels(logits) == 1).all()  # no weights recorded yet: plain argmax
    m.set_semantic_class_weight(w)
    assert (m.semantic_labels(logits) == 0).all()  # the posterior's argmax
    assert m.semantic_log_class_weight[4] == 0  # absent class: no correction (log 0 would be -inf)
    # saved with the model: a fresh model loading the state dict decodes the same way
    m2 = tiny("semantic")
    m2.load_state_dict(m.state_dict())
    assert (m2.semantic_labels(logits) == 0).all()
    m.set_semantic_class_weight(None)
    assert (m.semantic_labels(logits) == 1).all()


@pytest.mark.parametrize(
    "weight, match", [(torch.ones(4), "expected shape"), (torch.tensor([1.0, -1, 1, 1, 1]), "finite and >= 0")]
)
def test_bad_semantic_class_weights_are_refused(weight, match):
    with pytest.raises(ValueError, match=match):
        tiny("semantic").set_semantic_class_weight(weight)


def _randomize_spade(m: SVQModel) -> None:
    """SPADE's gamma/beta convs start at zero (a plain norm); give them weights so the layout path is live."""
    torch.manual_seed(1)
    for name, p in m.decoder_x.named_parameters():
        if (
            ".gamma." in name
            or ".beta." in name
            or name.startswith("norm_out.gamma")
            or name.startswith("norm_out.beta")
        ):
            p.data.normal_(0, 0.2)


def test_spade_decoder_follows_z_s_and_keeps_the_stop_gradient():
    m = tiny("svq", **SUBPIXEL, **SPADE).eval()
    _randomize_spade(m)
    x, s = batch()
    with torch.no_grad():
        out = m(x, s)
        idx_x, idx_s = out["indices_x"], out["indices_s"]
        a = m.decode_indices(idx_x, idx_s)
        b = m.decode_indices(idx_x, idx_s.roll(1, 0))  # same z_x, the other sample's z_s
    assert (a - b).abs().max() > 1e-3
    # a concat-only decoder sees z_s too, but SPADE must be a second path: with the concat channels of z_s zeroed
    # in post_quant_x, the output still depends on z_s
    m.post_quant_x.weight.data[:, m.cfg.z_channels :] = 0
    with torch.no_grad():
        assert (m.decode_indices(idx_x, idx_s) - m.decode_indices(idx_x, idx_s.roll(1, 0))).abs().max() > 1e-3
    # the SPADE input is detached: the image loss trains the SPADE convs but nothing of the semantic branch
    m.train()
    out = m(x, s)
    (out["x_hat"] - x).abs().mean().backward()
    for name in ["quantizer_s", "decoder_s", "post_quant_s", "quant_s"]:
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in getattr(m, name).parameters()), name
    assert m.decoder_x.norm_out.gamma.weight.grad.abs().max() > 0


def test_latent_swap_decodes_with_another_samples_z_x_in_training_only():
    torch.manual_seed(0)
    m = tiny("svq", latent_swap=1.0)
    x, s = batch(3)
    out = m(x, s)  # training mode, p = 1: every sample decodes the previous sample's z_x
    expected = m.decode_image(out["z_x"].roll(1, 0), out["z_s"], s_logits=out["s_logits"])
    torch.testing.assert_close(out["x_hat"], expected)
    m.eval()
    with torch.no_grad():
        out = m(x, s)
        torch.testing.assert_close(out["x_hat"], m.decode_image(out["z_x"], out["z_s"]))


def test_latent_swap_draws_use_their_own_checkpointed_generator():
    """The swaps come from a generator seeded by a state-dict buffer: the global RNG stream is left alone, and a
    model restored from a state dict draws the same swaps as the one it was saved from (exact resume)."""
    a, b = tiny("svq", latent_swap=0.5), tiny("svq", latent_swap=0.5)
    z = torch.arange(16.0).view(16, 1, 1, 1).expand(16, 8, 2, 2)  # sample i holds the value i
    first, _ = a._swap_image_latents(z)
    b.load_state_dict(a.state_dict())
    assert int(b.latent_swap_draws) == 1
    state = torch.get_rng_state()
    (second_a, mask_a), (second_b, _) = a._swap_image_latents(z), b._swap_image_latents(z)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(second_a, second_b)
    assert not torch.equal(first, second_a)  # a new draw per forward
    swapped = second_a[:, 0, 0, 0] != z[:, 0, 0, 0]
    assert torch.equal(swapped, mask_a)  # the mask it returns says which samples it swapped
    assert 0 < int(swapped.sum()) < 16 and torch.equal(second_a[swapped, 0, 0, 0], z.roll(1, 0)[swapped, 0, 0, 0])


@pytest.mark.parametrize("target", ["image", "recoloured"])
def test_latent_swap_target_is_returned_for_the_recoloured_target_only(target):
    """latent_swap_target="recoloured": the forward returns the swapped samples' targets (x_target) for the image
    terms; the default leaves the target to be x (no x_target), and so does evaluation."""
    torch.manual_seed(0)
    m = tiny("svq", latent_swap=1.0, latent_swap_target=target)
    x, s = batch(3)
    out = m(x, s)
    if target == "image":
        assert "x_target" not in out
    else:
        expected = recoloured_swap_target(x, s, torch.ones(3, dtype=torch.bool), 5, 255)
        torch.testing.assert_close(out["x_target"], expected)
        assert not torch.equal(out["x_target"], x)
    m.eval()
    with torch.no_grad():
        assert "x_target" not in m(x, s)
