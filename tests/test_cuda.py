"""The GPU paths (skipped without a CUDA device): each script's first step on the GPU computes
the loss its CPU run computes, with and without channels_last, with --gpu-aug, and in bf16.

The first logged loss is that of the initial network on the first batch: the same seed gives
the same network and the same views on both devices (the views are made by the loader workers on
the CPU; --gpu-aug draws its colour parameters on the CPU too), so any difference comes from the
device's arithmetic. TF32 is turned off (NVIDIA_TF32_OVERRIDE=0) so that fp32 means fp32."""
import pytest
import torch

from common.augment import ViewPipeline, ssl_view
from common.model import distribute
from tests.helpers import TINY, ok, read_log, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CPU = {"CUDA_VISIBLE_DEVICES": ""}
GPU = {"NVIDIA_TF32_OVERRIDE": "0"}
METHOD_FLAGS = {"simclr": [], "moco": ["--bn-splits", "1"], "byol": [], "simsiam": [],
                "swav": [], "barlow": [], "vicreg": [], "mocov3": []}  # one BN group: no shuffle-dependent BN


def first_loss(tmp_path, name, method, flags, env):
    run_dir = tmp_path / name
    ok(run([f"{method}.py", "--data", "synthetic", *TINY, "--knn-every", "0",
            "--run-dir", run_dir, *METHOD_FLAGS[method], *flags], env=env))
    return read_log(run_dir)[0]["loss"]


@pytest.mark.parametrize("method", METHOD_FLAGS)
def test_first_step_on_the_gpu_equals_the_cpu(tmp_path, method):
    cpu = first_loss(tmp_path, "cpu", method, ["--precision", "fp32"], CPU)
    gpu = first_loss(tmp_path, "gpu", method, ["--precision", "fp32"], GPU)
    nchw = first_loss(tmp_path, "nchw", method, ["--precision", "fp32", "--no-channels-last"], GPU)
    bf16 = first_loss(tmp_path, "bf16", method, ["--precision", "bf16"], GPU)
    assert gpu == pytest.approx(cpu, rel=1e-4, abs=1e-5)
    assert nchw == pytest.approx(cpu, rel=1e-4, abs=1e-5)
    assert bf16 == pytest.approx(cpu, rel=3e-2, abs=1e-3)  # bf16 keeps 8 bits of mantissa


def test_gpu_aug_on_the_gpu_equals_the_cpu(tmp_path):
    flags = ["--precision", "fp32", "--gpu-aug"]
    cpu = first_loss(tmp_path, "cpu", "byol", flags, CPU)
    gpu = first_loss(tmp_path, "gpu", "byol", flags, GPU)
    fast = first_loss(tmp_path, "fast", "byol", ["--precision", "fp32"], GPU)
    assert gpu == pytest.approx(cpu, rel=1e-4, abs=1e-5)
    assert gpu != pytest.approx(fast, rel=1e-3)  # other colour draws: the comparison can fail


def test_data_on_device_on_the_gpu_equals_the_cpu(tmp_path):
    """--data-on-device: the same crops and colours drawn on the CPU, made on either device."""
    flags = ["--precision", "fp32", "--data-on-device"]
    cpu = first_loss(tmp_path, "cpu", "byol", flags, CPU)
    gpu = first_loss(tmp_path, "gpu", "byol", flags, GPU)
    assert gpu == pytest.approx(cpu, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_switch(channels_last):
    device = torch.device("cuda")
    model = distribute(torch.nn.Conv2d(3, 8, 3), device, 1, channels_last=channels_last)
    assert model.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    pipeline = ViewPipeline([ssl_view(16)] * 2, "fast", channels_last=channels_last)
    views = pipeline.to_device([torch.zeros(4, 3, 16, 16, dtype=torch.uint8)] * 2, device)
    for x in views:
        assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert model(x).is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("protocol", [[], ["--cached-features"], ["--finetune"]])
def test_linear_eval_on_the_gpu_equals_the_cpu(tmp_path, protocol):
    """linear_eval.py's first step (frozen backbone, cached features, fine-tuning): the same
    head on the same crops, so the same loss on both devices."""
    from common.checkpoint import export_backbone
    from common.model import resnet_backbone
    torch.manual_seed(0)
    export_backbone(resnet_backbone("resnet18", cifar_stem=True), tmp_path / "backbone.pt")
    flags = ["--ckpt", tmp_path / "backbone.pt", "--data", "synthetic", "--synthetic-size", "64",
             "--img-size", "16", "--workers", "0", "--batch-size", "16", "--epochs", "1",
             "--log-every", "1", *protocol]

    def loss(name, precision, env):
        ok(run(["linear_eval.py", *flags, "--precision", precision, "--run-dir", tmp_path / name],
               env=env))
        return read_log(tmp_path / name)[0]["loss"]

    cpu = loss("cpu", "fp32", CPU)
    assert loss("gpu", "fp32", GPU) == pytest.approx(cpu, rel=1e-4, abs=1e-5)
    assert loss("bf16", "bf16", GPU) == pytest.approx(cpu, rel=3e-2, abs=1e-3)
