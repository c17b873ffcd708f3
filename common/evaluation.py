"""What only the evaluation scripts need (a method script never loads it): system flags, labelled
subsets, saved linear heads (ours and the official releases'), DINO's linear-evaluation features."""
import argparse
import os

import torch
import torch.nn as nn
from torchvision import transforms as T

from common.args import add_tracking_args
from common.checkpoint import atomic_save, safe_load
from common.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform, labels_of
from common.errors import UserError
from common.vit import VisionTransformerBackbone


def add_system_args(p, script, what):
    """The system flags of linear_eval.py and finetune.py (`script`), whose run directory holds
    one `what` (evaluation, run), and the tracking flags (common/args.py)."""
    g = p.add_argument_group("system")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last weights and batches on CUDA (on)")
    g.add_argument("--run-dir", help=f"output folder (default: runs/{script}/<Slurm job id or "
                   "timestamp>); the same command with the same folder resumes its checkpoint.pt")
    g.add_argument("--log-every", type=int, default=50, help="a log line every N steps (50)")
    g.add_argument("--stop-at-step", type=int, metavar="N", help="save and exit as a stop signal "
                   "would once N steps are done (to end a job at a known point)")
    g.add_argument("--allow-changes", nargs="+", default=[], metavar="FLAG", help="resuming: "
                   f"accept these flags differing from the run directory's {what}")
    g.add_argument("--out", help="also write the result JSON to this file")
    add_tracking_args(p)


def linear_train_transform(size):
    """Random resized crop + flip: the standard linear-evaluation training augmentation."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def dino_eval_transform(size):
    """`eval_transform` (resize, centre crop) with DINO's bicubic resize: its linear and kNN
    evaluations resize with interpolation=3, PIL's bicubic (eval_linear.py:65-70,
    eval_knn.py:33), where main_lincls.py and ours use the default, bilinear."""
    transform = eval_transform(size)
    transform.transforms[0].interpolation = T.InterpolationMode.BICUBIC
    return transform


def accuracy(logits, y, k):
    """Top-k accuracy (%) of scores [N, C] against labels [N]."""
    k = min(k, logits.shape[1])
    return 100.0 * (logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean().item()


def class_balanced_indices(targets, percent, seed=0):
    """Sorted indices of a seeded, class-balanced floor(N * percent / 100) of the items, built as
    the published 1% and 10% ImageNet lists are: every class gets the same count L (all its
    images if it has fewer), a seeded choice of the classes one more, to reach the total
    exactly; within a class, the images are drawn at random."""
    targets = torch.as_tensor(targets)
    labels, counts = targets.unique(return_counts=True)
    total = int(len(targets) * percent / 100)
    level = 0  # the largest L whose quotas fit in the total
    while level < counts.max() and counts.clamp(max=level + 1).sum() <= total:
        level += 1
    quota = counts.clamp(max=level)
    g = torch.Generator().manual_seed(seed)
    room = (counts > level).nonzero().flatten()
    quota[room[torch.randperm(len(room), generator=g)[:total - quota.sum()]]] += 1
    members = torch.argsort(targets, stable=True).split(counts.tolist())  # by class, in order
    chosen = [m[torch.randperm(len(m), generator=g)[:q]] for m, q in zip(members, quota.tolist())]
    return torch.cat(chosen).sort().values.tolist()


def listed_indices(dataset, path):
    """Sorted indices of the images of an ImageFolder named in the text file `path`, one per
    line, by file name (the published lists: `n01440764_10026.JPEG`) or class/file name."""
    if not hasattr(dataset, "samples"):
        raise UserError("--train-subset lists file names: it needs an ImageFolder --data")
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"--train-subset {path}: {e.strerror}") from None
    index, ambiguous = {}, set()
    for i, (file, _) in enumerate(dataset.samples):
        name = os.path.basename(file)
        if name in index:
            ambiguous.add(name)
        index[name] = index[os.path.relpath(file, dataset.root)] = i
    unknown = [n for n in names if n not in index or n in ambiguous]
    if unknown:
        raise UserError(f"--train-subset {path}: {len(unknown)} of its {len(names)} names are not "
                        f"(or not uniquely) in {dataset.root}, e.g. {unknown[0]}")
    return sorted({index[n] for n in names})


def labelled_subset(dataset, percent=None, list_file=None, seed=0):
    """The labelled training images of semi-supervised evaluation: those listed in `list_file`,
    else a class-balanced `percent`, else all; the same on every rank and in every run."""
    if list_file is None and percent is None:
        return dataset
    targets = labels_of(dataset)
    idx = (listed_indices(dataset, list_file) if list_file
           else class_balanced_indices(targets, percent, seed))
    subset = torch.utils.data.Subset(dataset, idx)
    subset.classes, subset.targets = dataset.classes, [int(targets[i]) for i in idx]
    return subset


HEAD_FORMAT = "cleanssl-linear-head-v1"
# The official linear heads, which carry no class names: (where their weights are, the features
# they read, a ViT's). DINO's *_linearweights.pth: eval_linear.py:141-148 saves its DDP-wrapped
# LinearClassifier (:237-251, `linear`) under `state_dict`, trained on DINO's ViT features
# (:165-170). MoCo v3's linear-*.pth.tar: main_lincls.py:319-325 saves the whole DDP-wrapped
# model, the frozen backbone and its classifier, `head` for a ViT, `fc` for a ResNet (:156-161).
OFFICIAL_HEADS = {"DINO's eval_linear.py head": ("module.linear.", "dino"),
                  "MoCo v3's main_lincls.py head": ("module.head.", "cls"),
                  "MoCo v3's main_lincls.py ResNet head": ("module.fc.", None)}


def save_head(head, path, classes, **info):
    """linear_head.pt: a trained linear classifier's weights, its class names, and `info` (the
    architecture, image size and protocol it was trained with)."""
    atomic_save({"format": HEAD_FORMAT, "weight": head.weight.detach().cpu(),
                 "bias": head.bias.detach().cpu(), "classes": list(classes), **info}, path)


def read_head(path):
    """The contents of a linear_head.pt, or of an official head in the same form, `classes`
    None and `protocol` naming it."""
    saved = safe_load(path)
    if isinstance(saved, dict) and saved.get("format") == HEAD_FORMAT:
        return saved
    state = saved.get("state_dict") if isinstance(saved, dict) else None
    for name, (prefix, features) in OFFICIAL_HEADS.items():
        if isinstance(state, dict) and {prefix + "weight", prefix + "bias"} <= state.keys():
            return {"weight": state[prefix + "weight"], "bias": state[prefix + "bias"],
                    "classes": None, "vit_features": features, "protocol": name}
    raise UserError(f"{path}: not a linear_head.pt written by linear_eval.py, nor DINO's or "
                    f"MoCo v3's released linear head")


def head_layer(saved, path, feature_dim, classes):
    """The nn.Linear of a read linear_head.pt, checked against the features and class names."""
    if saved["classes"] not in (None, list(classes)):
        raise UserError(f"{path}: trained on {len(saved['classes'])} classes "
                        f"({', '.join(saved['classes'][:3])}, ...), not those of --data "
                        f"({len(classes)}: {', '.join(classes[:3])}, ...)")
    if len(saved["weight"]) != len(classes):  # an official head's, which names no classes
        raise UserError(f"{path}: a head for {len(saved['weight'])} classes, --data has "
                        f"{len(classes)}")
    if saved["weight"].shape[1] != feature_dim:
        raise UserError(f"{path}: a head for {saved['weight'].shape[1]}-d features, the "
                        f"backbone gives {feature_dim}-d")
    head = nn.Linear(feature_dim, len(classes))
    head.load_state_dict({"weight": saved["weight"], "bias": saved["bias"]})
    return head


class DinoLinearFeatures(nn.Module):
    """A ViT whose features are what DINO's linear evaluation reads (eval_linear.py:160-170;
    its --n_last_blocks and --avgpool_patchtokens, :256-260): below ViT-B's width, the class
    tokens of the last 4 blocks, concatenated; from ViT-B on, the last block's class token and
    the mean of its patch tokens, interleaved as DINO's reshape leaves them (c_0, m_0, c_1, m_1,
    ...). Each block's tokens pass through the final LayerNorm (get_intermediate_layers)."""

    def __init__(self, vit):
        if not isinstance(vit, VisionTransformerBackbone):
            raise UserError("--vit-features dino reads a ViT's tokens: this backbone is not a ViT")
        super().__init__()
        self.vit, self.patch_size = vit, vit.patch_size
        self.last_blocks, self.mean_patch = (4, False) if vit.hidden_dim < 768 else (1, True)
        self.feature_dim = vit.hidden_dim * (self.last_blocks + self.mean_patch)

    def forward(self, images):
        tokens, outputs, blocks = self.vit.embed(images), [], self.vit.encoder.layers
        for i, block in enumerate(blocks):
            tokens = block(tokens)
            if len(blocks) - i <= self.last_blocks:
                outputs.append(self.vit.encoder.ln(tokens))
        features = torch.cat([t[:, 0] for t in outputs], dim=1)  # [N, D x last_blocks]
        if self.mean_patch:  # [N, D, 2] -> [N, 2D]
            features = torch.stack([features, outputs[-1][:, 1:].mean(1)], dim=2).flatten(1)
        return features
