"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.

Chen, Kornblith, Norouzi, Hinton, ICML 2020, arXiv 2002.05709.
Official code (TensorFlow): github.com/google-research/simclr

Two augmented views of each image go through a ResNet and a small MLP projector; the NT-Xent loss
pulls the two views of an image together and pushes them away from the 2N - 2 other views of the
global batch. Defaults are the paper's ImageNet recipe (ResNet-50, batch 4096, LARS, lr 0.3 x
batch/256, temperature 0.1, 100 epochs: about 64.5% linear top-1 by the official README; 1000
epochs: 69.3%). Images of 64 px or less (CIFAR) switch to the CIFAR-10 recipe of the official code
(ResNet-18 with a 3x3 stem, batch 512, temperature 0.5, colour strength 0.5, no blur, 1000 epochs:
about 91% linear top-1 reported by the official README; 94.0% in the paper with a ResNet-50).
Options: multi-crop (--num-crops 2 4 --crop-sizes 160 96 --crop-scales 0.08 1 0.05 0.14, as VISSL's
multi-crop SimCLR) and SimCLR v2's 3-layer projector (--proj-layers 3).

    python simclr.py --data synthetic --arch resnet18 --epochs 1      # CPU smoke run, 1-2 minutes
    python simclr.py --data cifar10                                   # CIFAR-10 recipe
    torchrun --nproc_per_node=8 simclr.py --data /imagenet            # ImageNet recipe, one node
    sbatch slurm/train.sbatch simclr.py --data /imagenet              # Slurm

The method, its equations, every implementation detail with its source (deviations from the
official code included), both recipes and measured results: docs/simclr.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.args import (add_common_args, check_at_least, check_fractions, check_positive,
                         describe_lr, recipe_values, resolve_recipe)
from common.errors import UserError, exit_on_user_error
from common.augment import ViewPipeline, multi_crop
from common.model import (autocast, build_backbone, features_by_resolution,
                          unwrap)
from common.optim import build_optimizer, describe_optimizer, param_groups, set_lr, warmup_cosine
from common.dist import gather_with_grad, get_rank
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# The paper's ImageNet recipe (section 2.3 and appendix B) and, for images <= 64 px, the
# CIFAR-10 recipe of the official README (the paper's appendix B.9 uses the same stem,
# colour strength and temperature). Any flag given on the command line wins.
IMAGENET = dict(arch="resnet50", epochs=100, batch_size=4096, optimizer="lars", lr=0.3,
                weight_decay=1e-6, warmup_epochs=10, temperature=0.1, color_strength=1.0,
                blur_prob=0.5, proj_layers=2, proj_dim=128)
SMALL_IMAGES = dict(arch="resnet18", epochs=1000, batch_size=512, optimizer="lars", lr=1.0,
                    weight_decay=1e-4, warmup_epochs=10, temperature=0.5, color_strength=0.5,
                    blur_prob=0.0, proj_layers=2, proj_dim=128)
# --arch vit_*: SimCLR on a ViT as the MoCo v3 paper trained it (Chen, Xie, He 2021, arXiv
# 2104.02057, section 5: AdamW, batch 4096, 40 warmup epochs, the random patch projection
# frozen; Fig. 6 caption: lr 2e-4 x batch/256, weight decay 0.1 for ViT-B/16), 300 epochs, and
# the 3-layer 4096-4096-256 projector with BN and temperature 0.1 of ronghanghu/moco_v3_tpu
# (config.py:41, 52-56; models.py:12-31), whose settings follow the paper (the paper gives no
# temperature). Images <= 64 px: ours, that optimizer and head with the CIFAR recipe's length,
# batch, temperature and views (no published CIFAR ViT recipe for SimCLR).
VIT = dict(recipe="ViT (the MoCo v3 paper's for SimCLR)", optimizer="adamw", epochs=300,
           lr=2e-4, weight_decay=0.1, warmup_epochs=40, temperature=0.1, proj_layers=3,
           proj_hidden_dim=4096, proj_dim=256)
VIT_SMALL_IMAGES = dict(VIT, recipe="ViT at <= 64 px (ours: MoCo v3's for SimCLR, CIFAR length)",
                        epochs=1000, batch_size=512, warmup_epochs=10, temperature=0.5,
                        color_strength=0.5, blur_prob=0.0)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SimCLR pre-training (Chen et al. 2020). Recipe "
                                "values in brackets; a flag given on the command line wins.")
    add_common_args(p, "simclr", IMAGENET, SMALL_IMAGES)
    both = lambda key: recipe_values(key, IMAGENET, SMALL_IMAGES)
    g = p.add_argument_group("SimCLR")
    g.add_argument("--temperature", type=float, help="NT-Xent temperature tau " + both("temperature"))
    g.add_argument("--color-strength", type=float,
                   help="colour distortion strength s " + both("color_strength"))
    g.add_argument("--blur-prob", type=float, help="Gaussian blur probability " + both("blur_prob"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup " + both("warmup_epochs"))
    g.add_argument("--proj-hidden-dim", type=int, default=None, help="projector hidden width "
                   "(default: the backbone's, 2048 for ResNet-50; ViT recipe: 4096)")
    g.add_argument("--proj-dim", type=int, help="projection output dim (paper: 128; ViT: 256)")
    g.add_argument("--proj-layers", type=int, help="Linear-BN layers of the projector, ReLU "
                   "between them (default: 2, SimCLR v1; 3: SimCLR v2's head, Chen et al. 2020b, "
                   "arXiv 2006.10029, official tf2/model.py num_proj_layers; ViT recipe: 3)")
    g.add_argument("--num-crops", type=int, nargs="+", default=[2], help="crops per group "
                   "(default: 2, the paper's two views). More crops: multi-crop (SwAV, Caron et "
                   "al. 2020) as VISSL's multi-crop SimCLR, e.g. --num-crops 2 4 --crop-sizes 160 "
                   "96 --crop-scales 0.08 1 0.05 0.14: every crop gets SimCLR's augmentation and "
                   "every other crop of its image is a positive")
    g.add_argument("--crop-sizes", type=int, nargs="+",
                   help="crop size of each group in px (default: --img-size)")
    g.add_argument("--crop-scales", type=float, nargs="+", default=[0.08, 1.0], metavar="S",
                   help="area fraction of the crops, a MIN MAX pair per group (default: 0.08 1)")
    args = p.parse_args(argv)
    args = resolve_recipe(args, IMAGENET, SMALL_IMAGES, "simclr", (VIT, VIT_SMALL_IMAGES))
    check_positive(args, "temperature")
    check_fractions(args, "blur_prob")
    check_at_least(args, color_strength=0, proj_hidden_dim=1, proj_dim=1)
    args.crop_sizes = args.crop_sizes or [args.img_size]
    groups = len(args.num_crops)
    if len(args.crop_sizes) != groups or len(args.crop_scales) != 2 * groups:
        raise UserError(f"--num-crops has {groups} group(s): give as many --crop-sizes "
                        f"({len(args.crop_sizes)} given) and a MIN MAX pair of --crop-scales per "
                        f"group ({len(args.crop_scales)} values given)")
    if sum(args.num_crops) < 2 or min(args.num_crops) < 1:
        raise UserError(f"--num-crops {args.num_crops}: at least 2 crops in all (an image needs "
                        f"a positive) and every group at least 1")
    scales = args.crop_scales
    if not all(0 < lo <= hi <= 1 for lo, hi in zip(scales[::2], scales[1::2])):
        raise UserError(f"--crop-scales {scales}: each pair needs 0 < MIN <= MAX <= 1")
    if args.proj_layers < 1:
        raise UserError(f"--proj-layers {args.proj_layers}: at least 1 (the output layer)")
    return args


# ------------------------------------------------------------------------------- augmentations

def simclr_crops(args):
    """Crop + flip + colour jitter (0.8s, 0.8s, 0.8s, 0.2s) at p 0.8 + grayscale p 0.2 + blur
    p 0.5 (ImageNet only), the same distribution for every crop. By default the paper's two
    views: 2 crops of --img-size covering (0.08, 1) of the image; multi-crop: num_crops[i]
    crops of crop_sizes[i] px covering crop_scales[i] (common.multi_crop)."""
    s = args.color_strength
    scales = list(zip(args.crop_scales[::2], args.crop_scales[1::2]))
    # bicubic resize of the crop, as the official data_util.py crop_and_resize (resize_bicubic)
    return multi_crop(args.num_crops, args.crop_sizes, scales,
                      jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, gray_p=0.2,
                      blur_p=args.blur_prob, interpolation="bicubic")


# ------------------------------------------------------------------------------- model

class SimCLR(nn.Module):
    """Backbone f (ResNet or ViT) and projector g: z = g(f(x)). As in the official code, every
    linear layer of g is bias-free and followed by BN; the hidden ones by BN with shift and a
    ReLU, the last one by BN without shift (center=False). 2 layers: SimCLR v1's head; 3: SimCLR
    v2's (tf2/model.py ProjectionHead, hidden layers as wide as their input)."""

    def __init__(self, arch, small_images, hidden_dim=None, out_dim=128, proj_layers=2):
        super().__init__()
        # The official ResNet zero-initialises the last BN scale of each residual block.
        # a ViT: MoCo v3's init (frozen random patch projection, sin-cos positions)
        self.backbone = build_backbone(arch, small_images, zero_init_residual=True, vit_init="mocov3")
        hidden_dim = hidden_dim or self.backbone.feature_dim
        layers, width = [], self.backbone.feature_dim
        for _ in range(proj_layers - 1):  # hidden layers: Linear-BN-ReLU
            layers += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                       nn.ReLU(inplace=True)]
            width = hidden_dim
        self.projector = nn.Sequential(*layers, nn.Linear(width, out_dim, bias=False),
                                       nn.BatchNorm1d(out_dim))
        self.projector[-1].bias.requires_grad_(False)  # BN with scale but no shift (center=False)
        for layer in self.projector:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.01)  # the official head's initialiser

    def forward(self, crops):
        """crops: list of [n, 3, h, w]. Crops of one size share a backbone pass (BN statistics
        per resolution group; the paper's two views: one pass of 2n), the projector sees all
        crops at once. Returns z [C*n, D], crop-major."""
        return self.projector(features_by_resolution(self.backbone, crops))  # [C*n, D]


# ------------------------------------------------------------------------------- loss

def nt_xent_loss(z1, z2, temperature):
    """NT-Xent over the GLOBAL batch. z1, z2: [n, D] projections of the two views on this rank.

    With u = z / ||z|| and sim(a, b) = u_a . u_b, each of the 2N views i of the global batch has
    one positive j (the other view of its image) and 2N - 2 negatives:
        l(i, j) = -log( exp(sim(i, j) / T) / sum_{k != i} exp(sim(i, k) / T) )
    The loss is the mean of l over view-1 anchors plus the mean over view-2 anchors (summed, as
    the official objective.py; the paper writes their average, half this value). Embeddings of
    other ranks are gathered WITH gradients; each rank averages its own anchors and DDP averages
    ranks, which gives exactly the single-process gradient.
    """
    n = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2]), dim=1)                  # [2n, D] this rank's anchors
    u1_all = gather_with_grad(u[:n])                             # [N, D] view 1, all ranks
    u2_all = gather_with_grad(u[n:])                             # [N, D] view 2, all ranks
    N = u1_all.shape[0]
    logits = u @ torch.cat([u1_all, u2_all]).T / temperature     # [2n, 2N]
    own = torch.arange(n, device=u.device) + get_rank() * n      # global index of local images
    self_col = torch.cat([own, own + N])                         # [2n] column of each anchor
    logits[torch.arange(2 * n, device=u.device), self_col] = float("-inf")
    positive_col = torch.cat([own + N, own])                     # [2n] the other view
    return 2 * F.cross_entropy(logits, positive_col)             # = CE(view 1) + CE(view 2)


def multi_crop_nt_xent_loss(z, num_crops, temperature):
    """NT-Xent for C >= 2 crops per image over the GLOBAL batch: VISSL's multi-crop SimCLR loss
    (vissl/losses/multicrop_simclr_info_nce_loss.py, MultiCropSimclrInfoNCECriterion, lines
    78-148). z: [C*n, D], this rank's crops, crop-major (crop c of image i at row c*n + i).

    Every crop a is an anchor and every OTHER crop p of its image a positive, one term per pair;
    its denominator holds that positive and the negatives neg(a), the crops of all other images
    (not the anchor, not the image's other positives):
        l(a, p) = -log( e^{sim(a,p)/T} / (e^{sim(a,p)/T} + sum_{k in neg(a)} e^{sim(a,k)/T}) )
    VISSL returns the mean of l over all C(C-1)N (anchor, positive) pairs; we return TWICE that
    mean, so that for C = 2 it equals nt_xent_loss (2N anchors, one positive each, the official
    scale) and stays near 2 log(C(N-1) + 1) at initialisation whatever C. Negatives span all ranks,
    as in nt_xent_loss and VISSL's 2-crop loss; VISSL's multi-crop mask takes them from the own
    rank's crops only (lines 92-100): the same with one process. Gradients as nt_xent_loss.
    """
    C, n = num_crops, z.shape[0] // num_crops
    u = F.normalize(z, dim=1)                                    # [C*n, D] this rank's anchors
    u_all = gather_with_grad(u)                                  # [W*C*n, D] rank-major
    logits = u @ u_all.T / temperature                           # [C*n, W*C*n]
    col = torch.arange(u_all.shape[0], device=u.device)          # column (crop) index
    image = col // (C * n) * n + col % n                         # global image of each column
    own = get_rank() * C * n + torch.arange(C * n, device=u.device)  # [C*n] column of each anchor
    same = image[own][:, None] == image[None, :]                 # [C*n, W*C*n] its image's crops
    positive = same & (own[:, None] != col[None, :])             # C - 1 per row: not the anchor
    negatives = logits.masked_fill(same, float("-inf")).logsumexp(dim=1, keepdim=True)  # [C*n, 1]
    pos = logits[positive].view(C * n, C - 1)                    # [C*n, C-1]
    return 2 * (torch.logaddexp(pos, negatives) - pos).mean()    # 2 x VISSL's mean


# ------------------------------------------------------------------------------- training

@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "simclr")  # processes, device, run directory (one run per folder), log, seed

    # data: two views (or multi-crop) per image
    views = ViewPipeline(simclr_crops(args), args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedule
    model = run.distribute(SimCLR(args.arch, args.small_images, args.proj_hidden_dim,
                                  args.proj_dim, args.proj_layers))
    optimizer = build_optimizer(param_groups(model, args.weight_decay), args)
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch

    # resume from the run directory's checkpoint, or start
    start_epoch, start_batch = run.restore(model, optimizer, unwrap(model).backbone)
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}; {args.warmup_epochs} warmup "
              f"epochs, cosine to 0); crops "
              f"{' + '.join(f'{c} x {s}' for c, s in zip(args.num_crops, args.crop_sizes))} px; "
              f"{args.proj_layers}-layer projector; {run.steps_per_epoch} steps per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, (crops, labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr)
            set_lr(optimizer, lr)
            crops = views.to_device(crops, run.device, step)           # C x [n, 3, h, w]
            with autocast(args.precision, run.device):
                z = model(crops)                                       # [C*n, D], crop-major
            z = z.float()                                              # loss math in fp32
            if len(crops) == 2:                                        # the paper's two views
                loss = nt_xent_loss(*z.chunk(2), args.temperature)
            else:
                loss = multi_crop_nt_xent_loss(z, len(crops), args.temperature)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            run.step_done(step, labels, z, loss=loss, lr=lr)  # see common/run.py
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and backbone.pt; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
