"""The backbone inside a checkpoint: ours, or an official release of another codebase.

`load_backbone(path)` reads the file without arbitrary unpickling (`checkpoint.safe_load`),
finds the backbone's weights in it (a ResNet, or a ViT with torchvision's or timm's keys),
strips their prefix, drops what is not the backbone (projection heads, predictors, prototypes,
the momentum encoder, a queue) and returns a torchvision backbone (`fc` / `heads` = identity),
its architecture and stem or patch size inferred from the weights.
The layouts, as written by each official training script:

- cleanssl `checkpoint.pt`: {"format": ..., "model": {"backbone.*", ...}, "args": {...}}
- cleanssl `backbone.pt`, and the Barlow Twins and VICReg releases (`resnet50.pth`, written by
  their main.py / main_vicreg.py as `model.module.backbone.state_dict()`): torchvision keys
- MoCo v1/v2 (`moco_v2_800ep_pretrain.pth.tar`, main_moco.py): {"state_dict":
  {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}, "arch", "epoch", ...};
  the query encoder is the one evaluated (as in MoCo's main_lincls.py), its `fc` is the head
- MoCo v3 (`r-50-300ep.pth.tar`, `vit-s-300ep.pth.tar`; moco-v3 main_moco.py:310-316 saves
  {"epoch", "arch", "state_dict", "optimizer", "scaler"}): "module.base_encoder.*",
  "module.momentum_encoder.*", "module.predictor.*" (moco/builder.py:27-28, 99-122). The base
  encoder is the one evaluated, without its `fc` (ResNet) or `head` (ViT), both the projector
  (main_lincls.py:177-189). Its ViTs are timm 0.4.9 VisionTransformers (vits.py:13, 25) with 12
  heads at every width, ViT-S included (vits.py:115-127).
- SimSiam (main_simsiam.py): {"state_dict": {"module.encoder.*", "module.predictor.*"}, ...};
  `encoder.fc` is the projector
- SwAV (`swav_800ep_pretrain.pth.tar`, main_swav.py): {"module.conv1.weight", ...,
  "module.projection_head.*", "module.prototypes.weight"}
- Barlow Twins / VICReg full checkpoints (`checkpoint.pth`, `model.pth`): {"model":
  {"module.backbone.*", "module.projector.*", ...}, "optimizer", "epoch"}
- DINO (`dino_deitsmall16_pretrain.pth`, `dino_vitbase8_pretrain.pth`, ...): the teacher's
  ViT as a plain timm-keyed state dict (dino utils.py:85-107 loads it strictly into
  vision_transformer.py's VisionTransformer, :134-159; ViT-Ti/S/B have 3/6/12 heads, :236-254).
  Its full checkpoints (`checkpoint.pth`, main_dino.py:278-288) hold {"student":
  {"module.backbone.*", "module.head.*"}, "teacher": {"backbone.*", "head.*"}, "optimizer",
  "epoch", "args", "dino_loss"}; the teacher is the one evaluated, as DINO's own
  `--checkpoint_key teacher` default (eval_linear.py:264; utils.py:74-80 strips the prefixes)
- a supervised torchvision ViT (`vit_b_16`'s weights): torchvision keys, `heads.*` dropped
- any other state dict holding exactly one torchvision ResNet, or one ViT with torchvision's or
  timm's keys, under one common prefix.

timm-style keys, as DINO's and MoCo v3's ViTs write them, map one to one onto torchvision's
VisionTransformer (`TIMM_TO_TORCHVISION`): `qkv` is the [3D, D] stack of the q, k and v
projections in that order (timm reshapes its output to 3 x heads x D/heads, dino
vision_transformer.py:82), as `nn.MultiheadAttention.in_proj_weight` is; both scale by
(D/heads)**-0.5. Both use LayerNorm eps 1e-6 (dino vision_transformer.py:239-253, moco-v3
vits.py:118-125; torchvision's default, vision_transformer.py:175) and the exact (erf) GELU,
nn.GELU (dino Block, :96-105; timm 0.4.9 vision_transformer.py:222; torchvision MLPBlock, :46).
"""
import torch

from common.checkpoint import FORMAT, safe_load
from common.log import UserError
from common.model import (VIT_DEPTH, VIT_MLP_RATIO, VITS, VisionTransformerBackbone,
                          infer_arch, resnet_backbone, vit_layout)

# Per kind of backbone, a key that marks it and a second one that must sit under the same
# prefix. "vit": torchvision's keys (ours); "timm_vit": DINO's, MoCo v3's, DeiT's.
MARKERS = {"resnet": ("conv1.weight", "layer1.0.conv1.weight"),
           "vit": ("class_token", "conv_proj.weight"),
           "timm_vit": ("cls_token", "patch_embed.proj.weight")}
KIND_NAMES = {"resnet": "ResNet", "vit": "ViT", "timm_vit": "ViT"}

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
                 "(module.base_encoder.), SwAV's (module.), Barlow Twins' and VICReg's full "
                 "checkpoints (model: module.backbone.), DINO's ViT releases (timm keys: "
                 "cls_token, blocks.N.attn.qkv, ...) and full checkpoints (teacher: backbone.), "
                 "or one ResNet or ViT under any single prefix")

# MoCo v3 builds every ViT with 12 heads (vits.py:115-127); the others follow DeiT / DINO.
MOCOV3_VIT_HEADS = 12
HEADS_BY_WIDTH = {width: heads for width, heads in VITS.values()}

# timm / DINO / MoCo v3 ViT keys -> torchvision's; within block N, BLOCK_KEYS.
TIMM_TO_TORCHVISION = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
                       "patch_embed.proj.weight": "conv_proj.weight",
                       "patch_embed.proj.bias": "conv_proj.bias",
                       "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias"}
BLOCK_KEYS = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
              "attn.qkv.bias": "self_attention.in_proj_bias",
              "attn.proj": "self_attention.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.0",
              "mlp.fc2": "mlp.3"}


def torchvision_vit_key(timm_key):
    """torchvision's name of a timm-style ViT weight, or None where it has none (`head.*`, a
    distillation token, ...): `blocks.3.mlp.fc1.weight` ->
    `encoder.layers.encoder_layer_3.mlp.0.weight`."""
    if timm_key in TIMM_TO_TORCHVISION:
        return TIMM_TO_TORCHVISION[timm_key]
    if not timm_key.startswith("blocks."):
        return None
    _, block, rest = timm_key.split(".", 2)
    for timm_name, name in BLOCK_KEYS.items():
        if rest == timm_name or rest.startswith(timm_name + "."):
            return f"encoder.layers.encoder_layer_{block}.{name}{rest[len(timm_name):]}"
    return None


def backbone_prefixes(state, kind):
    """Every prefix p under which `state` holds both marker keys of `kind`."""
    first, second = MARKERS[kind]
    return sorted(k[:-len(first)] for k in state
                  if k.endswith(first) and k[:-len(first)] + second in state)


def find_backbone(state):
    """(layout name, kind, prefix) of the backbone in a flat state dict."""
    found = {kind: backbone_prefixes(state, kind) for kind in MARKERS}
    for layout, kind, prefix in KNOWN_PREFIXES:
        if prefix in found[kind]:
            return layout, kind, prefix
    candidates = [(kind, prefix) for kind, prefixes in found.items() for prefix in prefixes]
    if len(candidates) == 1:
        kind, prefix = candidates[0]
        return f"a {KIND_NAMES[kind]} under '{prefix}'", kind, prefix
    if candidates:
        kinds = sorted({KIND_NAMES[kind] for kind, _ in candidates})
        prefixes = ", ".join(sorted(repr(prefix) for _, prefix in candidates))
        raise UserError(f"several {kinds[0] if len(kinds) == 1 else 'backbone'}s in it (prefixes "
                        f"{prefixes}): save the one to evaluate as a plain state dict")
    raise UserError(f"no ResNet or ViT found in it; known layouts: {KNOWN_LAYOUTS}")


def load_backbone(path):
    """(backbone, info) from any checkpoint described above; info holds `arch`, `small_images`,
    `layout`, `dropped` (names of what was not the backbone), a one-line `description` and, for
    our checkpoints, the training arguments under `train_args`."""
    obj = safe_load(path)
    try:
        return _backbone_from(obj)
    except UserError as e:
        raise UserError(f"--ckpt {path}: {e}") from None


def _backbone_from(obj):
    if not isinstance(obj, dict):
        raise UserError(f"a {type(obj).__name__}, not a dict of weights; known layouts: "
                        f"{KNOWN_LAYOUTS}")
    train_args = {}
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
    if kind == "resnet":
        backbone, arch, small, kept, details = _resnet(weights, prefix)
    else:  # export_backbone records a ViT's heads, which no shape shows, in the metadata
        heads = getattr(obj, "_metadata", {}).get("", {}).get("num_heads") if not prefix else None
        backbone, arch, small, kept, details = _vit(weights, prefix, kind, layout, heads)
    depth = max(1, prefix.count("."))  # name what was dropped at the prefix's depth
    dropped = sorted({prefix + k[len(prefix):].split(".")[0] if k.startswith(prefix)
                      else ".".join(k.split(".")[:depth]) for k in state if k not in kept})
    description = (f"{layout}: {arch} ({details})"
                   + (f"; dropped (not the backbone): {', '.join(dropped)}" if dropped else ""))
    return backbone, {"arch": arch, "small_images": small, "layout": layout, "prefix": prefix,
                      "dropped": dropped, "train_args": train_args, "description": description}


def _load_exactly(backbone, weights, prefix, arch):
    """Load `weights` (torchvision keys) into `backbone`, every tensor present and shaped alike."""
    expected = backbone.state_dict()
    # BN's step counters matter only with momentum=None; releases from old PyTorch lack them
    missing = [k for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or wrong:
        raise UserError(f"the weights under '{prefix}' do not fit {arch} (missing {missing[:3]}, "
                        f"other shapes {wrong[:3]})")
    backbone.load_state_dict({k: weights.get(k, v) for k, v in expected.items()})
    return expected


def _resnet(weights, prefix):
    arch, small = infer_arch(weights)
    backbone = resnet_backbone(arch, cifar_stem=small)
    expected = _load_exactly(backbone, weights, prefix, arch)
    return (backbone, arch, small, {prefix + k for k in expected},
            f"{'small-image' if small else 'ImageNet'} stem")


def _vit(weights, prefix, kind, layout, heads=None):
    """A VisionTransformerBackbone of the layout the weights have (any depth, patch and image
    size; the heads, which no shape shows, as our backbone.pt records them, else from the width
    or MoCo v3's rule)."""
    if kind == "timm_vit":
        renamed = {k: torchvision_vit_key(k) for k in weights}
        foreign = [k for k, name in renamed.items() if name is None and not k.startswith("head.")]
        if foreign:  # a distillation token, a pooled-token norm, a convolutional stem, ...
            raise UserError(f"timm-style ViT keys under '{prefix}' that torchvision's ViT has no "
                            f"place for: {', '.join(foreign[:3])}")
        sources = {name: k for k, name in renamed.items() if name}
        weights = {name: weights[k] for name, k in sources.items()}
    else:
        sources = {k: k for k in weights}
    sizes = vit_layout(weights)
    width = sizes["hidden_dim"]
    heads = heads or (MOCOV3_VIT_HEADS if layout == "MoCo v3" else HEADS_BY_WIDTH.get(width))
    if heads is None:
        raise UserError(f"a ViT {width} wide: its number of heads is unknown (widths "
                        f"{', '.join(map(str, HEADS_BY_WIDTH))} are)")
    backbone = VisionTransformerBackbone(sizes["image_size"], sizes["patch_size"],
                                         sizes["num_layers"], heads, width, sizes["mlp_dim"])
    try:
        arch, _ = infer_arch(weights)
    except UserError:  # not one of ARCHS, e.g. DINO's ViT-S/8: "vit_small/8", or by its sizes
        arch = next((f"{name}/{sizes['patch_size']}" for name, (w, _) in VITS.items()
                     if (w, VIT_DEPTH, VIT_MLP_RATIO * w) ==
                     (width, sizes["num_layers"], sizes["mlp_dim"])),
                    f"ViT {width} wide, {sizes['num_layers']} blocks, MLP {sizes['mlp_dim']}")
    expected = _load_exactly(backbone, weights, prefix, arch)
    small = sizes["image_size"] <= 64  # the rule --img-size follows
    details = f"patch {sizes['patch_size']} at {sizes['image_size']} px, {heads} heads"
    return backbone, arch, small, {prefix + sources[k] for k in expected}, details
