"""ResNet backbones, mixed precision, and wrapping a model for the device (SyncBN, DDP,
channels_last, torch.compile)."""
import contextlib

import torch
import torch.nn as nn
import torchvision

from common.log import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
         "wide_resnet101_2")


def resnet_backbone(arch, cifar_stem=False, zero_init_residual=False):
    """A torchvision ResNet with `fc` replaced by the identity (it returns pooled features).
    `cifar_stem`: a 3x3 stride-1 first convolution and no max-pool, for 32 px images
    (SimCLR paper, appendix B.9)."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: not supported (choose from {', '.join(ARCHS)})")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def infer_arch(state_dict):
    """(arch, cifar_stem) of a torchvision ResNet state dict, from its shapes alone, so that a
    bare `backbone.pt` is enough for linear evaluation."""
    blocks = tuple(1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{i}.")),
                           default=-1) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state_dict
    width = state_dict["layer1.0.conv1.weight"].shape[0] if bottleneck else 64
    table = {((2, 2, 2, 2), False, 64): "resnet18", ((3, 4, 6, 3), False, 64): "resnet34",
             ((3, 4, 6, 3), True, 64): "resnet50", ((3, 4, 23, 3), True, 64): "resnet101",
             ((3, 8, 36, 3), True, 64): "resnet152", ((3, 4, 6, 3), True, 128): "wide_resnet50_2",
             ((3, 4, 23, 3), True, 128): "wide_resnet101_2"}
    arch = table.get((blocks, bottleneck, width))
    if arch is None:
        raise UserError(f"unrecognised ResNet layout (blocks {blocks}, bottleneck {bottleneck})")
    return arch, state_dict["conv1.weight"].shape[-1] == 3


def resolve_precision(precision, device):
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(precision, device):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision, device):
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def distribute(model, device, world_size, compile=False, sync_bn=True, channels_last=True):
    """Move `model` to `device`, with SyncBatchNorm (GPU) and DDP when world > 1, channels_last on
    CUDA unless turned off, and torch.compile if asked. Returns the wrapped model; `unwrap` gives
    it back."""
    if world_size > 1 and sync_bn and device.type == "cuda":
        # PyTorch's SyncBatchNorm runs on GPUs only: CPU processes (gloo, for testing)
        # normalise over their own part of the batch.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda" and channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return model


def unwrap(model):
    """The plain module inside torch.compile and DDP wrappers (no `_orig_mod.`/`module.`)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
