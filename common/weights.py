"""The backbone inside a checkpoint: ours, or an official release of another codebase.

`load_backbone(path)` reads the file without arbitrary unpickling (`checkpoint.safe_load`),
finds the ResNet's weights in it, strips their prefix, drops what is not the backbone
(projection heads, predictors, prototypes, the momentum encoder, a queue) and returns a
torchvision ResNet with `fc` = identity, its architecture and stem inferred from the weights.
The layouts, as written by each official training script:

- cleanssl `checkpoint.pt`: {"format": ..., "model": {"backbone.*", ...}, "args": {...}}
- cleanssl `backbone.pt`, and the Barlow Twins and VICReg releases (`resnet50.pth`, written by
  their main.py / main_vicreg.py as `model.module.backbone.state_dict()`): torchvision keys
- MoCo v1/v2 (`moco_v2_800ep_pretrain.pth.tar`, main_moco.py): {"state_dict":
  {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}, "arch", "epoch", ...};
  the query encoder is the one evaluated (as in MoCo's main_lincls.py), its `fc` is the head
- SimSiam (main_simsiam.py): {"state_dict": {"module.encoder.*", "module.predictor.*"}, ...};
  `encoder.fc` is the projector
- SwAV (`swav_800ep_pretrain.pth.tar`, main_swav.py): {"module.conv1.weight", ...,
  "module.projection_head.*", "module.prototypes.weight"}
- Barlow Twins / VICReg full checkpoints (`checkpoint.pth`, `model.pth`): {"model":
  {"module.backbone.*", "module.projector.*", ...}, "optimizer", "epoch"}
- any other state dict holding exactly one torchvision ResNet under one common prefix.
"""
import torch

from common.checkpoint import FORMAT, safe_load
from common.log import UserError
from common.model import infer_arch, resnet_backbone

# (layout, prefix of the evaluated ResNet), tried in this order: a MoCo checkpoint also holds
# the key encoder, `module.encoder_k.*`, which the generic search would find as well.
KNOWN_PREFIXES = [("MoCo v1/v2", "module.encoder_q."), ("SimSiam", "module.encoder."),
                  ("Barlow Twins / VICReg full checkpoint", "module.backbone."),
                  ("SwAV", "module."), ("torchvision ResNet", "")]
KNOWN_LAYOUTS = ("a cleanssl checkpoint.pt or backbone.pt, a torchvision ResNet state dict "
                 "(Barlow Twins' and VICReg's resnet50.pth), MoCo v1/v2's and SimSiam's "
                 "checkpoint_*.pth.tar (module.encoder_q. / module.encoder.), SwAV's (module.), "
                 "Barlow Twins' and VICReg's full checkpoints (model: module.backbone.), or one "
                 "ResNet under any single prefix")


def resnet_prefixes(state):
    """Every prefix p under which `state` holds a ResNet stem and first block."""
    return sorted(k[:-len("conv1.weight")] for k in state if k.endswith("conv1.weight")
                  and k[:-len("conv1.weight")] + "layer1.0.conv1.weight" in state)


def find_resnet(state):
    """(layout name, prefix) of the ResNet in a flat state dict."""
    prefixes = resnet_prefixes(state)
    for layout, prefix in KNOWN_PREFIXES:
        if prefix in prefixes:
            return layout, prefix
    if len(prefixes) == 1:
        return f"a ResNet under '{prefixes[0]}'", prefixes[0]
    if prefixes:
        raise UserError(f"several ResNets in it (prefixes {', '.join(map(repr, prefixes))}): "
                        f"save the one to evaluate as a plain state dict")
    raise UserError(f"no ResNet found in it; known layouts: {KNOWN_LAYOUTS}")


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
        layout = f"cleanssl {obj['method']} checkpoint"
    else:
        state = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        layout, prefix = find_resnet(state)
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "conv1.weight" not in weights:
        raise UserError(f"no ResNet weights under '{prefix}'")
    arch, small = infer_arch(weights)
    backbone = resnet_backbone(arch, cifar_stem=small)
    expected = backbone.state_dict()
    # BN's step counters matter only with momentum=None; releases from old PyTorch lack them
    missing = [k for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or wrong:
        raise UserError(f"the weights under '{prefix}' do not fit {arch} (missing {missing[:3]}, "
                        f"other shapes {wrong[:3]})")
    backbone.load_state_dict({k: weights.get(k, v) for k, v in expected.items()})
    kept = {prefix + k for k in expected}
    depth = max(1, prefix.count("."))  # name what was dropped at the prefix's depth
    dropped = sorted({prefix + k[len(prefix):].split(".")[0] if k.startswith(prefix)
                      else ".".join(k.split(".")[:depth]) for k in state if k not in kept})
    description = (f"{layout}: {arch} ({'small-image' if small else 'ImageNet'} stem)"
                   + (f"; dropped (not the backbone): {', '.join(dropped)}" if dropped else ""))
    return backbone, {"arch": arch, "small_images": small, "layout": layout, "prefix": prefix,
                      "dropped": dropped, "train_args": train_args, "description": description}
