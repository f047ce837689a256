"""The MFU denominator (svq_fast.train.perf): a datasheet peak by GPU model and by the precision the run's math really
uses (TF32 for fp32 runs with TF32 on), named in its label."""

import math

import pytest
import torch

from svq_fast.train import perf

H100_SXM, H100_PCIE, H100_NVL = "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"


@pytest.mark.parametrize(
    "name, precision, tf32, tflops, named",
    [
        (H100_SXM, "bf16", True, 989.5, "H100 datasheet BF16"),
        (H100_PCIE, "bf16", True, 756.5, "H100 PCIe datasheet BF16"),
        (H100_NVL, "bf16", False, 835.5, "H100 NVL datasheet BF16"),
        ("NVIDIA H200", "bf16", True, 989.5, "H200 datasheet BF16"),
        ("NVIDIA H200 NVL", "bf16", True, 835.5, "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "fp16", True, 312.0, "A100 datasheet FP16"),
        (H100_SXM, "fp32", True, 494.7, "TF32 dense 494.7 TFLOP/s (fp32 run, TF32 on)"),
        (H100_PCIE, "fp32", True, 378.0, "H100 PCIe datasheet TF32"),
        (H100_SXM, "fp32", False, 67.0, "FP32 dense 67 TFLOP/s (fp32 run, TF32 off)"),
        ("NVIDIA A100 80GB PCIe", "fp32", True, 156.0, "A100 datasheet TF32"),
    ],
)
def test_gpu_peak_by_model_and_precision(name, precision, tf32, tflops, named):
    peak, label = perf.gpu_peak(name, precision, tf32)
    assert peak == pytest.approx(tflops * 1e12) and named in label, label


def test_unknown_gpu_and_precision_say_so():
    peak, label = perf.gpu_peak("NVIDIA L4", "bf16", True)
    assert math.isnan(peak) and "GPU_PEAKS_TFLOPS" in label and "NVIDIA L4" in label
    with pytest.raises(ValueError, match="fp8"):
        perf.gpu_peak(H100_SXM, "fp8", True)


def test_tf32_follows_torch_switches(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # also turns torch.backends.cuda.matmul.allow_tf32 off
        assert not perf.tf32_enabled()
        torch.set_float32_matmul_precision("high")
        assert perf.tf32_enabled()
        torch.set_float32_matmul_precision("highest")
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default: convolutions run TF32
        assert perf.tf32_enabled()
    finally:
        torch.set_float32_matmul_precision(old)


def test_device_peak_of_an_fp32_run_on_an_h100_pcie_is_its_tf32_peak(monkeypatch):
    # issue 28 item 7: an fp32 run (cuDNN convolutions on TF32 by default) was divided by the SXM's fp32 peak, so MFU
    # could exceed 1, and a PCIe or NVL card got the SXM's peaks
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: H100_PCIE)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    peak, label = perf.device_peak(torch.device("cuda", 0), "fp32")
    assert peak == pytest.approx(378.0e12) and "H100 PCIe" in label and "TF32" in label
