"""Backbones (ResNet, ResNeXt, Vision Transformer, all torchvision classes), mixed precision,
and wrapping a model for the device (SyncBN, DDP, channels_last, torch.compile)."""
import contextlib
import itertools

import torch
import torch.nn as nn
import torchvision

from common.errors import UserError

# ResNet-50 with every layer w times wider, as SimCLR and SwAV (common/widened_resnet.py)
WIDENED_RESNET50 = {"resnet50w2": 2, "resnet50w4": 4, "resnet50w5": 5}
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
           "wide_resnet101_2", *WIDENED_RESNET50, "resnext50_32x4d", "resnext101_32x8d",
           "resnext101_64x4d")
# Vision Transformers: (width, heads); 12 blocks, MLP 4x width, as DeiT's and DINO's ViT-Ti/S/B
# (facebookresearch/dino vision_transformer.py:236-254). MoCo v3's ViT-S has 12 heads instead of
# 6 (moco-v3 vits.py:115-118): same weights' shapes, another attention; see common/weights.py.
VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}
VIT_DEPTH, VIT_MLP_RATIO = 12, 4
# small_images -> (patch size, image size the position embeddings are laid out for). ImageNet:
# patch 16 at 224 px. Images <= 64 px: patch 4 at 32 px (an 8x8 grid), solo-learn's CIFAR ViT
# (vturrisi/solo-learn scripts/pretrain/cifar/mae.yaml:17-20: vit_small, patch_size 4,
# img_size 32) at the same widths and depth; other sizes interpolate the embeddings.
VIT_PATCH = {False: (16, 224), True: (4, 32)}
ARCHS = RESNETS + tuple(VITS)


def is_vit(arch):
    """Whether `arch` names a Vision Transformer (no BN, features = the class token)."""
    return arch in VITS


def build_backbone(arch, small_images=False, zero_init_residual=False, vit_init=None,
                   heads=None):
    """The backbone `arch` (one of ARCHS), returning pooled features [N, feature_dim]. A ViT
    (common/vit.py, imported only then) ignores `zero_init_residual` (no BN); `vit_init="mocov3"`
    gives it MoCo v3's initialisation instead of torchvision's; `heads`: its attention heads if
    not VITS's (MoCo v3's ViT-S: 12)."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: not supported (choose from {', '.join(ARCHS)})")
    if not is_vit(arch):
        return resnet_backbone(arch, small_images, zero_init_residual)
    from common.vit import VisionTransformerBackbone, mocov3_vit_init
    width, heads = VITS[arch][0], heads or VITS[arch][1]
    patch_size, image_size = VIT_PATCH[small_images]
    vit = VisionTransformerBackbone(image_size, patch_size, VIT_DEPTH, heads, width,
                                    VIT_MLP_RATIO * width)
    return mocov3_vit_init(vit) if vit_init == "mocov3" else vit


def resnet_backbone(arch, cifar_stem=False, zero_init_residual=False):
    """A torchvision ResNet or ResNeXt whose `fc` is the identity (it returns pooled features).
    `cifar_stem`: a 3x3 stride-1 first convolution and no max-pool, for 32 px images (SimCLR
    paper, appendix B.9)."""
    if arch in WIDENED_RESNET50:
        from common.widened_resnet import widened_resnet50  # only for them
        net = widened_resnet50(WIDENED_RESNET50[arch], zero_init_residual)
    else:
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1,
                              bias=False)
        net.maxpool = nn.Identity()
    return net


def features_by_resolution(backbone, crops):
    """Backbone features [C*n, F] of C crops [n, 3, h, w], crop-major: consecutive crops of the
    same size go through the backbone in ONE pass (multi-crop, SwAV's official code), so BN
    takes its statistics per resolution group; two views of one size are one pass of 2n."""
    runs = itertools.groupby(crops, key=lambda crop: crop.shape[-2:])  # consecutive, same size
    return torch.cat([backbone(torch.cat(list(same))) for _, same in runs])


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


def distribute(model, device, world_size, compile=False, sync_bn="global",
               channels_last=True):
    """`model` on `device`, with SyncBatchNorm over the processes `sync_bn` names (see
    --sync-bn), DDP when world > 1, channels_last on CUDA unless turned off, and torch.compile if
    asked. Returns the wrapped model; `unwrap` gives it back."""
    cuda = device.type == "cuda"
    if world_size > 1 and sync_bn != "off" and cuda:
        # PyTorch's SyncBatchNorm runs on GPUs only: CPU processes (gloo, for testing)
        # normalise over their own part of the batch.
        from common.sync_bn import sync_bn_group  # only for SyncBN over several GPUs
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, sync_bn_group(sync_bn))
    model = model.to(device)
    if cuda and channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    return torch.compile(model) if compile else model


def unwrap(model):
    """The plain module inside torch.compile and DDP wrappers (no `_orig_mod.`/`module.`)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
