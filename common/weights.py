"""The backbone inside a checkpoint, ours or an official release of another codebase
(docs/evaluation.md, "Checkpoints it reads": each layout, what is evaluated in it, where its
training script writes it (file:line); `KNOWN_PREFIXES`): read without arbitrary unpickling,
found by its prefix, the rest (projection heads, predictors, prototypes, the momentum encoder, a
queue) dropped, its architecture and stem or patch size inferred from the weights.

timm-style keys, as DINO's and MoCo v3's ViTs write them, map one to one onto torchvision's
VisionTransformer: `qkv` is the [3D, D] stack of the q, k and v projections in that order (timm
reshapes its output to 3 x heads x D/heads, dino vision_transformer.py:82), as
`nn.MultiheadAttention.in_proj_weight` is; both scale by (D/heads)**-0.5, use LayerNorm eps 1e-6
(dino vision_transformer.py:239-253, moco-v3 vits.py:118-125; torchvision's default,
vision_transformer.py:175) and the exact (erf) GELU, nn.GELU (dino Block, :96-105; timm 0.4.9
vision_transformer.py:222; torchvision MLPBlock, :46).
"""
import math
import os

import torch

from common.checkpoint import FORMAT, safe_load
from common.errors import UserError
from common.model import VIT_DEPTH, VIT_MLP_RATIO, VIT_PATCH, VITS, WIDENED_RESNET50, resnet_backbone
from common.vit import VisionTransformerBackbone, sincos_position_embedding

# Per kind of backbone, a key that marks it and a second one that must sit under the same
# prefix. "vit": torchvision's keys (ours); "timm_vit": DINO's, MoCo v3's, DeiT's.
MARKERS = {"resnet": ("conv1.weight", "layer1.0.conv1.weight"),
           "vit": ("class_token", "conv_proj.weight"),
           "timm_vit": ("cls_token", "patch_embed.proj.weight")}

# (layout, kind, prefix of the evaluated backbone), tried in this order: a MoCo checkpoint also
# holds the key / momentum encoder, which the generic search would find as well.
KNOWN_PREFIXES = [("MoCo v1/v2", "resnet", "module.encoder_q."),
                  ("MoCo v3", "resnet", "module.base_encoder."),
                  ("MoCo v3", "timm_vit", "module.base_encoder."),
                  ("SimSiam", "resnet", "module.encoder."),
                  ("Barlow Twins / VICReg full checkpoint", "resnet", "module.backbone."),
                  ("DINO student", "timm_vit", "module.backbone."),
                  ("DINO full checkpoint (teacher)", "timm_vit", "backbone."),
                  ("SwAV", "resnet", "module."),
                  ("torchvision ResNet", "resnet", ""),
                  ("torchvision ViT", "vit", ""),
                  ("DINO / timm ViT", "timm_vit", "")]
KNOWN_LAYOUTS = ("a cleanssl checkpoint.pt or backbone.pt, a torchvision ResNet or ViT state "
                 "dict (Barlow Twins' and VICReg's resnet50.pth), MoCo v1/v2's and SimSiam's "
                 "checkpoint_*.pth.tar (module.encoder_q. / module.encoder.), MoCo v3's "
                 "(module.base_encoder.; its linear checkpoints module., its DeiT conversions "
                 "model:), SwAV's (module.), Barlow Twins' and VICReg's full "
                 "checkpoints (model: module.backbone.), DINO's ViT releases (timm keys: "
                 "cls_token, blocks.N.attn.qkv, ...) and full checkpoints (teacher: backbone.), "
                 "or one ResNet or ViT under any single prefix")

# MoCo v3 builds every ViT with 12 heads (vits.py:115-127); the others follow DeiT / DINO.
# No weight's shape shows the heads: a MoCo v3 ViT is recognised by its layout or, in a
# timm-keyed file (its DeiT conversion, its linear checkpoint), by its position embedding, MoCo
# v3's fixed 2-D sin-cos one, frozen (vits.py:28-29, 53-69), where DINO's and DeiT's are learned.
MOCOV3_VIT_HEADS = 12
HEADS_BY_WIDTH = dict(VITS.values())
# MoCo v3's ConvStem ViTs (vits.py:72-112, 129-143), refused in find_backbone: timm keys patch_embed.proj.N.*
CONV_STEM_MARKER = "patch_embed.proj.0.weight"

# timm / DINO / MoCo v3 ViT keys -> torchvision's; within block N, BLOCK_KEYS.
TIMM_TO_TORCHVISION = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
                       "patch_embed.proj.weight": "conv_proj.weight",
                       "patch_embed.proj.bias": "conv_proj.bias",
                       "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias"}
BLOCK_KEYS = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
              "attn.qkv.bias": "self_attention.in_proj_bias",
              "attn.proj": "self_attention.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.0",
              "mlp.fc2": "mlp.3"}


def infer_arch(state_dict):
    """(arch, small_images) of a torchvision-keyed ResNet, ResNeXt or ViT state dict (a
    `backbone.pt`), from its shapes alone; small_images: a ResNet's 3x3 stem, a ViT's patch 4 at 32 px."""
    if "class_token" in state_dict:
        layout = vit_layout(state_dict)
        for arch, (width, _) in VITS.items():
            for small, (patch_size, image_size) in VIT_PATCH.items():
                if layout == dict(hidden_dim=width, num_layers=VIT_DEPTH, mlp_dim=VIT_MLP_RATIO * width,
                                  patch_size=patch_size, image_size=image_size):
                    return arch, small
        raise UserError("unrecognised ViT layout ({hidden_dim} wide, {num_layers} blocks, MLP "
                        "{mlp_dim}, patch {patch_size} at {image_size} px)".format(**layout))
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


def torchvision_vit_key(timm_key):
    """torchvision's name of a timm-style ViT weight (`blocks.3.mlp.fc1.weight` ->
    `encoder.layers.encoder_layer_3.mlp.0.weight`), None where it has none (`head.*`, ...)."""
    if timm_key in TIMM_TO_TORCHVISION:
        return TIMM_TO_TORCHVISION[timm_key]
    if not timm_key.startswith("blocks."):
        return None
    _, block, rest = timm_key.split(".", 2)
    for timm_name, name in BLOCK_KEYS.items():
        if rest == timm_name or rest.startswith(timm_name + "."):
            return f"encoder.layers.encoder_layer_{block}.{name}{rest[len(timm_name):]}"
    return None


def _prefixes(state, key, other):
    """Every prefix p under which `state` holds both p + key and p + other."""
    return sorted(k[:-len(key)] for k in state if k.endswith(key) and k[:-len(key)] + other in state)


def find_backbone(state):
    """(layout name, kind, prefix) of the backbone in a flat state dict."""
    found = {kind: _prefixes(state, *markers) for kind, markers in MARKERS.items()}
    for layout, kind, prefix in KNOWN_PREFIXES:
        if prefix in found[kind]:
            return layout, kind, prefix
    candidates = [(kind, prefix) for kind, prefixes in found.items() for prefix in prefixes]
    stems = _prefixes(state, CONV_STEM_MARKER, "cls_token")
    if stems and not candidates:
        raise UserError(f"a ViT with a convolutional stem under '{stems[0]}' (MoCo v3's "
                        f"vit_conv_small / vit_conv_base: 4 conv-BN-ReLU layers and a 1x1 conv "
                        f"in place of the patch projection, 11 blocks; moco-v3 vits.py:72-143): "
                        f"not supported, torchvision's ViT has a one-convolution patch "
                        f"projection; evaluate it with MoCo v3's main_lincls.py")
    names = sorted({"ResNet" if kind == "resnet" else "ViT" for kind, _ in candidates})
    if len(candidates) == 1:
        kind, prefix = candidates[0]
        return f"a {names[0]} under '{prefix}'", kind, prefix
    if candidates:
        prefixes = ", ".join(sorted(repr(prefix) for _, prefix in candidates))
        raise UserError(f"several {names[0] if len(names) == 1 else 'backbone'}s in it (prefixes "
                        f"{prefixes}): save the one to evaluate as a plain state dict")
    raise UserError(f"no ResNet or ViT found in it; known layouts: {KNOWN_LAYOUTS}")


def load_backbone(path, vit_heads=None):
    """(backbone, info) from any checkpoint described above; info holds `arch`, `small_images`,
    `vit`, `layout`, `prefix`, `dropped` (names of what was not the backbone), a one-line
    `description` and, for our checkpoints, the training arguments `train_args`. `vit_heads`
    (--vit-heads): a ViT's number of heads, over what the checkpoint says (`vit_heads_of`).
    `path` may be a run directory: its checkpoint.pt (the last save, at an epoch's end or at a
    stop), else its backbone.pt; info's `path` is the file read."""
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in ("checkpoint.pt", "backbone.pt")
                 if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise UserError(f"{path}: a folder without checkpoint.pt or backbone.pt")
        path = found[0]
    obj = safe_load(path)
    try:
        backbone, info = _backbone_from(obj, vit_heads)
    except UserError as e:
        raise UserError(f"--ckpt {path}: {e}") from None
    return backbone, dict(info, path=os.path.abspath(path))


def _backbone_from(obj, vit_heads):
    if not isinstance(obj, dict):
        raise UserError(f"a {type(obj).__name__}, not a dict of weights; known layouts: "
                        f"{KNOWN_LAYOUTS}")
    train_args, container = {}, None
    if obj.get("format") == FORMAT:  # ours: the online / query backbone is `backbone.*`
        state, prefix, train_args = obj["model"], "backbone.", obj["args"]
        kind = "vit" if "backbone.class_token" in state else "resnet"
        layout = f"cleanssl {obj['method']} checkpoint"
    else:
        container = next((k for k in ("state_dict", "model", "teacher")
                          if isinstance(obj.get(k), dict)), None)
        state = obj[container] if container else obj
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        layout, kind, prefix = find_backbone(state)
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    sources = {k: k for k in weights}  # torchvision's key -> the key under the prefix
    if kind == "resnet":
        arch, small = infer_arch(weights)
        backbone = resnet_backbone(arch, cifar_stem=small)
        details = f"{'small-image' if small else 'ImageNet'} stem"
    else:  # export_backbone records a ViT's heads in the metadata, mocov3.py in its arguments
        metadata = getattr(obj, "_metadata", {}).get("", {}) if not prefix else {}
        recorded = train_args.get("vit_heads") if train_args else metadata.get("num_heads")
        if kind == "timm_vit":
            renamed = {k: torchvision_vit_key(k) for k in weights}
            foreign = [k for k, name in renamed.items() if name is None and not k.startswith("head.")]
            if foreign:  # a distillation token, a pooled-token norm, a convolutional stem, ...
                raise UserError(f"timm-style ViT keys under '{prefix}' that torchvision's ViT has "
                                f"no place for: {', '.join(foreign[:3])}")
            sources = {name: k for k, name in renamed.items() if name}
            weights = {name: weights[k] for name, k in sources.items()}
        backbone, arch, small, details = _vit(weights, kind, layout, container, vit_heads, recorded)
    expected = backbone.state_dict()  # to load exactly: every tensor present and shaped alike
    # BN's step counters matter only with momentum=None; releases from old PyTorch lack them
    missing = [k for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or wrong:
        raise UserError(f"the weights under '{prefix}' do not fit {arch} (missing {missing[:3]}, "
                        f"other shapes {wrong[:3]})")
    backbone.load_state_dict({k: weights.get(k, v) for k, v in expected.items()})
    kept = {prefix + sources[k] for k in expected}
    depth = max(1, prefix.count("."))  # name what was dropped at the prefix's depth
    dropped = sorted({prefix + k[len(prefix):].split(".")[0] if k.startswith(prefix)
                      else ".".join(k.split(".")[:depth]) for k in state if k not in kept})
    description = (f"{layout}: {arch} ({details})"
                   + (f"; dropped (not the backbone): {', '.join(dropped)}" if dropped else ""))
    return backbone, {"arch": arch, "small_images": small, "vit": kind != "resnet",
                      "layout": layout, "prefix": prefix, "dropped": dropped,
                      "train_args": train_args, "description": description}


def _vit(weights, kind, layout, container, given, recorded):
    """(backbone, arch, small_images, details) of torchvision-keyed ViT weights, of any depth,
    patch and image size, with `given` heads (--vit-heads), else `recorded`, else `vit_heads_of`."""
    sizes = vit_layout(weights)
    width = sizes["hidden_dim"]
    heads, why = given or recorded, "--vit-heads" if given else None
    if not heads:
        heads, why = vit_heads_of(weights, width, layout, container, foreign=kind == "timm_vit")
    if width % heads:
        raise UserError(f"a ViT {width} wide cannot have {heads} heads (--vit-heads)")
    backbone = VisionTransformerBackbone(num_heads=heads, **sizes)
    try:
        arch, _ = infer_arch(weights)
    except UserError:  # not one of ARCHS, e.g. DINO's ViT-S/8: "vit_small/8", or by its sizes
        arch = next((f"{name}/{sizes['patch_size']}" for name, (w, _) in VITS.items()
                     if (w, VIT_DEPTH, VIT_MLP_RATIO * w) ==
                     (width, sizes["num_layers"], sizes["mlp_dim"])),
                    f"ViT {width} wide, {sizes['num_layers']} blocks, MLP {sizes['mlp_dim']}")
    small = sizes["image_size"] <= 64  # the rule --img-size follows
    details = (f"patch {sizes['patch_size']} at {sizes['image_size']} px, {heads} heads"
               + (f", by {why}" if why else ""))
    return backbone, arch, small, details


def vit_heads_of(weights, width, layout, container, foreign):
    """(heads, why or None) of a ViT whose checkpoint records none (see MOCOV3_VIT_HEADS). DeiT's
    layout ({'model': timm keys}) with a learned embedding at a width where DeiT's count is not
    12 is refused: DeiT's own ViT-S (6 heads) and a MoCo v3 ViT-S fine-tuned in DeiT (12,
    moco-v3 README.md:177) look alike."""
    if layout == "MoCo v3":
        return MOCOV3_VIT_HEADS, None
    position = weights["encoder.pos_embedding"]
    grid = math.isqrt(position.shape[1] - 1)
    if foreign and width % 4 == 0 and torch.allclose(
            position.float(), sincos_position_embedding(grid, width), atol=1e-5):
        return MOCOV3_VIT_HEADS, "its position embedding, MoCo v3's fixed sin-cos one"
    heads = HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise UserError(f"a ViT {width} wide: its number of heads is unknown (widths "
                        f"{', '.join(map(str, HEADS_BY_WIDTH))} are): give --vit-heads")
    if foreign and container == "model" and heads != MOCOV3_VIT_HEADS:
        raise UserError(f"a ViT {width} wide in DeiT's layout ({{'model': timm keys}}) with a "
                        f"learned position embedding: DeiT's own has {heads} heads, a MoCo v3 ViT "
                        f"fine-tuned in DeiT {MOCOV3_VIT_HEADS}, and no weight's shape tells "
                        f"them apart: name the count with --vit-heads {heads} or --vit-heads "
                        f"{MOCOV3_VIT_HEADS}")
    return heads, None
