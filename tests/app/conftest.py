"""Tiny exports for the app tests: an untrained 32x32 sVQ model (16 synthetic classes, 8x8 latents) and a one-layer
GPT over it, plus a few held-out synthetic shards. Nothing here needs runs/demo."""

import pytest
import torch

from svq_fast.config import DataConfig, GPTConfig, QuantizerConfig, Stage1Config, Stage2Config, SVQModelConfig
from svq_fast.data.make_shards import write_synthetic
from svq_fast.export import export_model
from svq_fast.models.gpt import SemanticGPT
from svq_fast.models.svq import SVQModel

SIZE = 32


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app_exports")
    torch.manual_seed(0)
    s1 = Stage1Config(
        model=SVQModelConfig(
            image_size=SIZE,
            num_classes=16,
            ch=8,
            ch_mult=(1, 2, 2),
            num_res_blocks=0,
            attn_resolutions=(),
            norm_groups=4,
            z_channels=8,
            semantic_z_channels=4,
            semantic_patch_input=True,
            image_decoder_semantic="spade",
            spade_hidden=8,
        ),
        quantizer=QuantizerConfig(image_codebook_size=64, semantic_codebook_size=32),
    )
    s1.data.image_size = SIZE
    stage1 = str(tmp / "stage1")
    export_model(SVQModel(s1.model, s1.quantizer).state_dict(), s1, stage1)
    shards = str(tmp / "val")
    write_synthetic(shards, split="val", size=SIZE, num_samples=6, samples_per_shard=3, processes=1, progress=False)
    s2 = Stage2Config(
        model=GPTConfig(
            image_vocab=64, semantic_vocab=32, grid=SIZE // 4, n_layer=1, n_head=2, n_embd=32, aligned_condition=True
        ),
        stage1=stage1,
        data=DataConfig(image_size=SIZE, val_shards=shards),
    )
    s2.sample.top_k = 20
    gpt = str(tmp / "gpt")
    export_model(SemanticGPT(s2.model).state_dict(), s2, gpt)
    return {"tmp": tmp, "stage1": stage1, "gpt": gpt, "shards": shards, "size": SIZE}
