"""A tiny sVQ model memorises one batch: semantic reconstruction becomes perfect and the image L1 falls sharply.
Plain torch (no DeepSpeed), the same losses as the stage-1 loop minus the GAN."""

import pytest
import torch

from svq_fast.config import QuantizerConfig, SVQModelConfig
from svq_fast.data.synthetic import NUM_CLASSES, SyntheticSpec, render_scene
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.losses.reconstruction import reconstruction_loss, semantic_loss
from svq_fast.models.svq import SVQModel

pytestmark = pytest.mark.slow


def test_tiny_svq_memorises_one_batch():
    # One thread: with two, the conv reductions' order changes the code assignment, and this tiny run (seed 0) then
    # lands on one that stays at 0.37 semantic mIoU (measured; the same at the last landed commit).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _memorise()
    finally:
        torch.set_num_threads(threads)


def _memorise():
    torch.manual_seed(0)
    scenes = [render_scene(SyntheticSpec(size=32, seed=5), i) for i in range(2)]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im, _ in scenes])
    s = torch.stack([torch.from_numpy(lb).long() for _, lb in scenes])
    cfg = SVQModelConfig(
        kind="svq",
        image_size=32,
        num_classes=NUM_CLASSES,
        ch=16,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        norm_groups=8,
        z_channels=16,
        semantic_z_channels=16,
    )
    # restarts off: memorising one batch needs a stable code assignment, not fresh codes every 100 steps
    qcfg = QuantizerConfig(image_codebook_size=512, semantic_codebook_size=512, backend="ref", restart_after=0)
    model = SVQModel(cfg, qcfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first_l1 = None
    for _ in range(300):
        out = model(x, s)
        l1 = reconstruction_loss(out["x_hat"], x)
        ce = semantic_loss(out["s_logits"], s, 255)
        loss = l1 + out["vq_loss_x"] + 1.0 * (ce + out["vq_loss_s"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first_l1 = l1.item() if first_l1 is None else first_l1
    model.eval()
    with torch.no_grad():
        out = model(x, s)
    cm = ConfusionMatrix(NUM_CLASSES)
    cm.update(out["s_logits"].argmax(1), s)
    final_l1 = reconstruction_loss(out["x_hat"], x).item()
    assert cm.miou() > 0.95, cm.miou()
    assert final_l1 < 0.25 * first_l1, (first_l1, final_l1)
