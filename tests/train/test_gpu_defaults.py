"""The GPU-facing defaults: the paper-size configs train in bf16 with overlapped, bucketed ZeRO reductions;
DeepSpeed's synchronising throughput timer is off; a CUDA run gets TF32 and cuDNN autotuning while the VQ search keeps
near-fp32 dots; a CPU run is left exactly as it was."""

import pytest
import torch

from svq_fast.config import to_deepspeed
from svq_fast.kernels import vq as vq_kernels
from svq_fast.named_configs import get_config
from svq_fast.train.engine import configure_backends, deepspeed_config, fused_adam


@pytest.mark.parametrize("name", ["svqgan_f16_256", "gpt_f16_256"])
def test_paper_configs_train_in_bf16_with_overlapped_bucketed_reductions(name):
    cfg = get_config(name)
    ds = deepspeed_config(cfg, world_size=8)
    assert cfg.zero.precision == "bf16" and ds["torch_autocast"]["enabled"] and "bf16" not in ds
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000
    assert "communication_data_type" not in ds  # fp32 reductions


@pytest.mark.parametrize("name", ["svqgan_tiny", "gpt_tiny", "svqgan_f16_256"])
def test_deepspeeds_synchronising_throughput_timer_is_off(name):
    assert to_deepspeed(get_config(name), 2)["timers"] == {"throughput": {"enabled": False}}


def test_tiny_configs_keep_deepspeeds_defaults_on_cpu():
    zero = to_deepspeed(get_config("svqgan_tiny"), 2)["zero_optimization"]
    assert "reduce_bucket_size" not in zero and zero["overlap_comm"] is False


def test_fused_adam_is_the_cuda_default_only():
    opt = get_config("gpt_tiny").optim
    assert fused_adam(opt, torch.device("cuda", 0)) is True and fused_adam(opt, torch.device("cpu")) is None
    opt.fused_adam = "on"
    assert fused_adam(opt, torch.device("cpu")) is True


@pytest.fixture
def restore_backends():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]
    vq_kernels.pin_fp32_precision(None)


def test_cuda_runs_get_tf32_and_cudnn_autotuning_with_the_vq_search_kept_near_fp32(restore_backends):
    cfg = get_config("svqgan_f16_256")
    configure_backends(cfg, torch.device("cpu"))  # CPU: untouched
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark
    configure_backends(cfg, torch.device("cuda", 0))
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    assert vq_kernels._input_precision() == "tf32x3"  # the model's matmuls may run TF32, the code search does not
    cfg.run.tf32 = False
    configure_backends(cfg, torch.device("cuda", 0))
    assert torch.get_float32_matmul_precision() == "highest" and vq_kernels._input_precision() == "tf32x3"


def test_bf16_outputs_leave_autocast_in_fp32_except_activations_kept_for_a_later_gradient():
    from svq_fast.train.engine import _outputs_to_fp32

    bf16 = torch.ones(2, dtype=torch.bfloat16)
    out = _outputs_to_fp32(None, (), {"x_hat": bf16, "vq_loss_x": bf16, "x_hat_hidden": bf16})
    assert out["x_hat"].dtype == out["vq_loss_x"].dtype == torch.float32
    assert out["x_hat_hidden"] is bf16  # no fp32 copy of a full-resolution activation every step


def test_zero3_gan_without_a_discriminator_warmup_is_refused_with_the_reason(capsys):
    from svq_fast.cli import parse
    from svq_fast.config import Stage1Config

    with pytest.raises(SystemExit):
        parse(["--zero.stage=3", "--loss.disc_start=0", "--loss.disc_warmup=0"], "svqgan_tiny", Stage1Config)
    assert "zero.stage=3 with the GAN needs loss.disc_warmup >= 1 (got 0)" in capsys.readouterr().err
    parse(["--zero.stage=3", "--loss.disc_start=2", "--loss.disc_warmup=1"], "svqgan_tiny", Stage1Config)
