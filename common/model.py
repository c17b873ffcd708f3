"""Backbones (ResNet, ResNeXt, Vision Transformer, all torchvision classes), mixed precision,
and wrapping a model for the device (SyncBN, DDP, channels_last, torch.compile)."""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from common.dist import sync_bn_group
from common.log import UserError

# ResNet-50 with EVERY layer w times wider, as SimCLR and SwAV use it. google-research/simclr
# tf2/resnet.py (`width_multiplier`): stem conv 64*w filters (7x7 stride 2, or 3x3 stride 1 with
# cifar_stem); block groups of 64/128/256/512*w filters: each bottleneck's 1x1 and 3x3 at that
# width, its last 1x1 and projection shortcut at 4x. facebookresearch/swav src/resnet50.py
# (`widen`): the same (stem 64*w, planes 64..512*w, inner width = planes since the commit "fix
# bug with wider models"; the first commit widened it by w twice). Features: 2048*w-d.
# torchvision's wide_resnet50_2 doubles only the inner 1x1/3x3 width and stays 2048-d.
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


def widened_resnet50(w, zero_init_residual=False):
    """torchvision's ResNet-50 (same module names) with every width times `w`."""
    block = type(f"Bottleneck{w}x", (Bottleneck,), {"expansion": 4 * w})  # outputs 256w..2048w
    net = ResNet(block, [3, 4, 6, 3], width_per_group=64 * w,  # inner widths 64w..512w
                 zero_init_residual=zero_init_residual)
    # torchvision's stem has 64 channels at any width: widen it and what reads it
    net.conv1 = nn.Conv2d(3, 64 * w, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(64 * w)
    first = net.layer1[0]
    first.conv1 = nn.Conv2d(64 * w, 64 * w, kernel_size=1, bias=False)
    first.downsample[0] = nn.Conv2d(64 * w, 256 * w, kernel_size=1, bias=False)
    for conv in (net.conv1, first.conv1, first.downsample[0]):  # torchvision's initialisation
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return net


def build_backbone(arch, small_images=False, zero_init_residual=False):
    """The backbone `arch` (one of ARCHS), returning pooled features [N, feature_dim]. ResNets
    and ResNeXts: `resnet_backbone`. ViTs: `VisionTransformerBackbone` with patch 16 for 224 px,
    or patch 4 for images <= 64 px (`small_images`); `zero_init_residual` has no meaning there
    (no BN) and is ignored. Weights keep torchvision's initialisation (`mocov3_vit_init` for
    MoCo v3's)."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: not supported (choose from {', '.join(ARCHS)})")
    if is_vit(arch):
        width, heads = VITS[arch]
        patch_size, image_size = VIT_PATCH[small_images]
        return VisionTransformerBackbone(image_size, patch_size, VIT_DEPTH, heads, width)
    return resnet_backbone(arch, cifar_stem=small_images, zero_init_residual=zero_init_residual)


def resnet_backbone(arch, cifar_stem=False, zero_init_residual=False):
    """A torchvision ResNet or ResNeXt with `fc` replaced by the identity (it returns pooled
    features). `cifar_stem`: a 3x3 stride-1 first convolution and no max-pool, for 32 px images
    (SimCLR paper, appendix B.9)."""
    if arch not in RESNETS:
        raise UserError(f"--arch {arch}: not supported (choose from {', '.join(RESNETS)})")
    if arch in WIDENED_RESNET50:
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


class VisionTransformerBackbone(VisionTransformer):
    """torchvision's VisionTransformer, unchanged but for its classifier (`heads` = identity, so
    the state dict has no `heads.*`) and its forward, which returns the class token after the
    final LayerNorm (`encoder.ln`) for images of any size divisible by the patch size.

    That token is the representation MoCo v3 and DINO evaluate: MoCo v3's linear probe puts its
    classifier in place of timm's `head` (main_lincls.py:156-189), which reads the class token
    after the final norm (timm 0.4.9 vision_transformer.py:291-302), and DINO's kNN uses its
    forward, the same token (dino vision_transformer.py:209-214). DINO's linear probe reads more
    (`read_dino_linear_features` below).

    Position embeddings are laid out for `image_size`; another size (multi-crop: 96 px crops of a
    224 px model) interpolates them bicubically as DINO does (vision_transformer.py:174-194)."""

    def __init__(self, image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim=None):
        super().__init__(image_size, patch_size, num_layers, num_heads, hidden_dim,
                         mlp_dim or VIT_MLP_RATIO * hidden_dim)
        self.heads = nn.Identity()
        self.feature_dim = hidden_dim
        self.last_blocks, self.mean_patch = 1, False  # the final class token; see below

    def position_embedding(self, rows, cols):
        """[1, 1 + rows*cols, D]: the class token's embedding and the patch grid's, resized."""
        native = self.image_size // self.patch_size
        embedding = self.encoder.pos_embedding  # [1, 1 + native*native, D]
        if (rows, cols) == (native, native):
            return embedding
        grid = embedding[:, 1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
        # DINO's exact call: a scale factor, not a size, nudged by 0.1 so that the output size
        # does not round down (dino issue #8). The factor also sets where each output samples
        # its input, so results differ slightly from size=(rows, cols).
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / native, (cols + 0.1) / native),
                             mode="bicubic")  # [1, D, rows, cols]
        return torch.cat([embedding[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, images):
        n, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise UserError(f"{h}x{w} px images do not divide into the ViT's {p}x{p} patches")
        tokens = self.conv_proj(images).flatten(2).transpose(1, 2)  # [N, h/p * w/p, D]
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h // p, w // p)
        if (self.last_blocks, self.mean_patch) == (1, False):
            tokens = self.encoder.ln(self.encoder.layers(self.encoder.dropout(tokens)))
            return tokens[:, 0]  # [N, D]
        tokens, outputs, blocks = self.encoder.dropout(tokens), [], self.encoder.layers
        for i, block in enumerate(blocks):
            tokens = block(tokens)
            if len(blocks) - i <= self.last_blocks:
                outputs.append(self.encoder.ln(tokens))
        features = torch.cat([t[:, 0] for t in outputs], dim=1)  # [N, D x last_blocks]
        if self.mean_patch:  # [N, D, 2] -> [N, 2D]
            features = torch.stack([features, outputs[-1][:, 1:].mean(1)], dim=2).flatten(1)
        return features


def read_dino_linear_features(vit):
    """Make a ViT's forward return what DINO's linear evaluation reads (eval_linear.py:160-170;
    its --n_last_blocks and --avgpool_patchtokens, :256-260): below ViT-B's width, the class
    tokens of the last 4 blocks, concatenated; from ViT-B on, the last block's class token and
    the mean of its patch tokens, interleaved as DINO's reshape leaves them (c_0, m_0, c_1, m_1,
    ...). Each block's tokens pass through the final LayerNorm (get_intermediate_layers)."""
    if not isinstance(vit, VisionTransformerBackbone):
        raise UserError("--vit-features dino reads a ViT's tokens: this backbone is not a ViT")
    vit.last_blocks, vit.mean_patch = (4, False) if vit.hidden_dim < 768 else (1, True)
    vit.feature_dim = vit.hidden_dim * (vit.last_blocks + vit.mean_patch)
    return vit


def sincos_position_embedding(grid_size, width, temperature=10000.0):
    """MoCo v3's fixed 2D sin-cos position embedding [1, 1 + grid_size**2, width] (moco-v3
    vits.py:53-69): zeros for the class token; for the patch in row r, column c (tokens in
    row-major order), [sin(r w), cos(r w), sin(c w), cos(c w)] with w_k = temperature**(-k/q),
    k < q = width/4. MoCo v3 calls the row part `w`: meshgrid's default 'ij' indexing makes its
    first grid vary along the rows of the flattened token order."""
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [q]
    index = torch.arange(grid_size, dtype=torch.float32)
    rows = index.repeat_interleave(grid_size)[:, None] * omega  # [G*G, q]: token m, row m // G
    cols = index.repeat(grid_size)[:, None] * omega  # column m % G
    patches = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), patches])[None]


def mocov3_vit_init(vit, freeze_patch_projection=True):
    """MoCo v3's initialisation of a torchvision-keyed ViT (moco-v3 vits.py:25-51): the fixed
    sin-cos position embedding, frozen (:29, :68-69); every linear xavier-uniform with zero bias,
    q, k and v each as its own matrix (:32-40); class token N(0, 1e-6) (:41); patch projection
    uniform with the xavier bound of a 3*p*p -> width linear map, zero bias (:43-47), frozen with
    `freeze_patch_projection` (`--stop-grad-conv1`, :49-51; the random patch projection that
    the MoCo v3 paper, section 4.2, finds to make ViT training stable). LayerNorms keep weight 1,
    bias 0, as in timm. Returns vit."""
    if vit.hidden_dim % 4:
        raise UserError(f"MoCo v3's sin-cos position embedding needs a width divisible by 4, "
                        f"not {vit.hidden_dim}")
    with torch.no_grad():
        vit.encoder.pos_embedding.copy_(
            sincos_position_embedding(vit.image_size // vit.patch_size, vit.hidden_dim))
    vit.encoder.pos_embedding.requires_grad_(False)
    for module in vit.modules():
        if isinstance(module, nn.MultiheadAttention):  # timm's `qkv`: [3D, D] in one matrix
            bound = math.sqrt(6.0 / (module.embed_dim + module.embed_dim))
            nn.init.uniform_(module.in_proj_weight, -bound, bound)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.Linear):  # attention output and MLP layers
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(vit.class_token, std=1e-6)
    projection = vit.conv_proj
    bound = math.sqrt(6.0 / (3 * vit.patch_size * vit.patch_size + vit.hidden_dim))
    nn.init.uniform_(projection.weight, -bound, bound)
    nn.init.zeros_(projection.bias)
    projection.requires_grad_(not freeze_patch_projection)
    return vit


def features_by_resolution(backbone, crops):
    """Backbone features [C*n, F] of C crops [n, 3, h, w], crop-major: consecutive crops of the
    same size go through the backbone in ONE pass (multi-crop, SwAV's official code), so BN
    takes its statistics per resolution group; two views of one size are one pass of 2n."""
    features, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        features.append(backbone(torch.cat(crops[start:end])))  # [(end - start) * n, F]
        start = end
    return torch.cat(features)


def infer_arch(state_dict):
    """(arch, small_images) of a bare backbone state dict with torchvision's keys (ResNet,
    ResNeXt or ViT), from its shapes alone, so that a `backbone.pt` is enough for linear
    evaluation. small_images: the 3x3 stem of a ResNet, patch 4 at 32 px of a ViT."""
    if "class_token" in state_dict:
        return _infer_vit(state_dict)
    if "conv1.weight" not in state_dict:
        raise UserError("neither a ResNet (no conv1.weight) nor a ViT (no class_token)")
    blocks = tuple(1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{i}.")),
                           default=-1) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state_dict
    width = state_dict["layer1.0.conv1.weight"].shape[0] if bottleneck else 64
    stem = state_dict["conv1.weight"].shape[0]  # 64, or 64*w in a widened ResNet-50
    conv2 = state_dict["layer1.0.conv2.weight"].shape  # [out, in / groups, 3, 3]
    groups = conv2[0] // conv2[1]  # ResNeXt's cardinality, 1 elsewhere
    # (blocks, bottleneck, first block's width, stem channels, groups)
    table = {((2, 2, 2, 2), False, 64, 64, 1): "resnet18",
             ((3, 4, 6, 3), False, 64, 64, 1): "resnet34",
             ((3, 4, 6, 3), True, 64, 64, 1): "resnet50",
             ((3, 4, 23, 3), True, 64, 64, 1): "resnet101",
             ((3, 8, 36, 3), True, 64, 64, 1): "resnet152",
             ((3, 4, 6, 3), True, 128, 64, 1): "wide_resnet50_2",
             ((3, 4, 23, 3), True, 128, 64, 1): "wide_resnet101_2",
             ((3, 4, 6, 3), True, 128, 64, 32): "resnext50_32x4d",  # 32 groups of 4 channels
             ((3, 4, 23, 3), True, 256, 64, 32): "resnext101_32x8d",
             ((3, 4, 23, 3), True, 256, 64, 64): "resnext101_64x4d"} | {
        ((3, 4, 6, 3), True, 64 * w, 64 * w, 1): arch for arch, w in WIDENED_RESNET50.items()}
    arch = table.get((blocks, bottleneck, width, stem, groups))
    if arch is None:
        raise UserError(f"unrecognised ResNet layout (blocks {blocks}, bottleneck {bottleneck}, "
                        f"stem {stem} and first block {width} channels, {groups} groups)")
    return arch, state_dict["conv1.weight"].shape[-1] == 3


def vit_layout(state_dict):
    """The sizes of a torchvision-keyed ViT state dict: hidden_dim, num_layers, mlp_dim,
    patch_size and image_size (the square its position embeddings are laid out for)."""
    try:
        tokens = state_dict["encoder.pos_embedding"].shape[1] - 1
        layout = dict(hidden_dim=state_dict["class_token"].shape[-1],
                      num_layers=len({k.split(".")[2] for k in state_dict
                                      if k.startswith("encoder.layers.")}),
                      mlp_dim=state_dict["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0],
                      patch_size=state_dict["conv_proj.weight"].shape[-1])
    except KeyError as e:
        raise UserError(f"incomplete ViT state dict (no {e.args[0]})") from None
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UserError(f"ViT position embeddings for {tokens} patches: not a square grid")
    return layout | {"image_size": grid * layout["patch_size"]}


def _infer_vit(state_dict):
    layout = vit_layout(state_dict)
    for arch, (width, _) in VITS.items():
        for small, (patch_size, image_size) in VIT_PATCH.items():
            if layout == dict(hidden_dim=width, num_layers=VIT_DEPTH, mlp_dim=VIT_MLP_RATIO * width,
                              patch_size=patch_size, image_size=image_size):
                return arch, small
    raise UserError("unrecognised ViT layout ({hidden_dim} wide, {num_layers} blocks, MLP "
                    "{mlp_dim}, patch {patch_size} at {image_size} px)".format(**layout))


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
    """Move `model` to `device`, with SyncBatchNorm over the processes `sync_bn` names (GPU; see
    --sync-bn) and DDP when world > 1, channels_last on CUDA unless turned off, and
    torch.compile if asked. Returns the wrapped model; `unwrap` gives it back."""
    if world_size > 1 and sync_bn != "off" and device.type == "cuda":
        # PyTorch's SyncBatchNorm runs on GPUs only: CPU processes (gloo, for testing)
        # normalise over their own part of the batch.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, sync_bn_group(sync_bn))
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
