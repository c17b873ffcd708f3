"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction.

Zbontar, Jing, Misra, LeCun, Deny, ICML 2021, arXiv 2103.03230.
Official code (PyTorch): github.com/facebookresearch/barlowtwins

Two augmented views of each image go through the same ResNet and a wide MLP projector. The loss
drives the cross-correlation matrix of the two views' embeddings, each feature standardised over
the global batch, towards the identity: its diagonal to 1 (invariance to the augmentations), its
off-diagonal to 0 (redundancy reduction). No negatives, no predictor, no target network. Defaults
are the official ImageNet recipe (ResNet-50, projector 8192-8192-8192, batch 2048, LARS, lr 0.2 for
weights and 0.0048 for biases and BN x batch/256, lambda 0.0051, 1000 epochs: 73.2% linear top-1 in
the paper, 73.5% for the released checkpoint). Images of 64 px or less (CIFAR) switch to a CIFAR-10
recipe; the paper has none, so ours takes solo-learn's (ResNet-18 with a 3x3 stem, projector
2048-2048-2048, batch 256, lr 0.3 x batch/256, wd 1e-4, no blur, 1000 epochs: 92.1% linear top-1 in
solo-learn's results table).

    python barlow.py --data synthetic --arch resnet18 --epochs 1      # CPU smoke run, 1-2 minutes
    python barlow.py --data cifar10                                   # CIFAR-10 recipe
    torchrun --nproc_per_node=8 barlow.py --data /imagenet            # ImageNet recipe, one node
    sbatch slurm/train.sbatch barlow.py --data /imagenet              # Slurm

The method, its equations, every implementation detail with its source (deviations from the
official code included), both recipes and measured results: docs/barlow.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse

import torch
import torch.nn as nn

from common.args import (add_common_args, check_at_least, check_fractions, describe_lr,
                         recipe_values, resolve_recipe)
from common.errors import UserError, exit_on_user_error
from common.augment import ViewPipeline, ssl_view
from common.model import autocast, build_backbone, unwrap
from common.optim import build_optimizer, describe_optimizer, param_groups, set_lr, warmup_cosine
from common.dist import all_reduce_with_grad, get_world_size
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# The official ImageNet recipe (the defaults of the official main.py) and, for images <= 64 px,
# a CIFAR-10 recipe. There is no official one: ours takes solo-learn's CIFAR Barlow Twins
# settings (projector 2048-2048-2048, the width CIFAR re-implementations use, batch 256, lr 0.3
# x batch/256, wd 1e-4, lambda 0.0051, no blur, solarize 0 / 0.2, 1000 epochs) and gives biases
# and BN the official ratio of rates, 0.3 x 0.0048 / 0.2. solo-learn also scales the loss by 0.1
# and uses a LARS with eta 0.02 and lr clipping; we keep the official optimizer (eta 0.001, no
# clipping) and the unscaled loss. Any flag given on the command line wins.
IMAGENET = dict(arch="resnet50", epochs=1000, batch_size=2048, optimizer="lars", lr=0.2,
                lr_biases=0.0048, weight_decay=1e-6, warmup_epochs=10, lambd=0.0051,
                projector="8192-8192-8192", blur_probs=(1.0, 0.1), solarize_probs=(0.0, 0.2))
SMALL_IMAGES = dict(arch="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3,
                    lr_biases=0.0072, weight_decay=1e-4, warmup_epochs=10, lambd=0.0051,
                    projector="2048-2048-2048", blur_probs=(0.0, 0.0), solarize_probs=(0.0, 0.2))
# --arch vit_*: no Barlow Twins ViT recipe has been published (by its authors, solo-learn,
# lightly, mmpretrain or VISSL). Ours: MoCo v3's ViT optimizer (arXiv 2104.02057 section 5;
# moco-v3 CONFIG.md: AdamW, lr 1.5e-4 x batch/256, weight decay 0.1, 40 warmup epochs, 300
# epochs, the random patch projection frozen), one rate for biases and norms too, with Barlow
# Twins' own projector, loss and batch. Unvalidated. Images <= 64 px: that optimizer with the
# CIFAR recipe's length, batch, projector and views.
VIT = dict(recipe="ViT (ours: MoCo v3's optimizer, Barlow Twins' projector)", optimizer="adamw",
           epochs=300, lr=1.5e-4, lr_biases=1.5e-4, weight_decay=0.1, warmup_epochs=40)
VIT_SMALL_IMAGES = dict(SMALL_IMAGES, recipe="ViT at <= 64 px (ours: MoCo v3's optimizer, "
                        "CIFAR length)", optimizer="adamw", lr=1.5e-4, lr_biases=1.5e-4,
                        weight_decay=0.1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Barlow Twins pre-training (Zbontar et al. 2021). "
                                "Recipe values in brackets; a flag given on the command line wins.")
    add_common_args(p, "barlow", IMAGENET, SMALL_IMAGES)
    both = lambda key: recipe_values(key, IMAGENET, SMALL_IMAGES)
    g = p.add_argument_group("Barlow Twins", "--lr is the weights' base rate (paper: 0.2) and "
                             "--weight-decay defaults to the official code's 1e-6 (the paper "
                             "states 1.5e-6)")
    g.add_argument("--lr-biases", type=float, help="base learning rate of biases and BN "
                   "parameters, x batch/256 (paper: 0.0048) " + both("lr_biases"))
    g.add_argument("--lambd", type=float, help="weight lambda of the off-diagonal (redundancy "
                   "reduction) term; the paper writes 5e-3, the official code uses 0.0051 "
                   + both("lambd"))
    g.add_argument("--projector", help="projector widths, dash-separated: Linear (no bias)-BN-"
                   "ReLU for each width but the last, then Linear (no bias) " + both("projector"))
    g.add_argument("--blur-probs", type=float, nargs=2, metavar=("P1", "P2"),
                   help="Gaussian blur probability of view 1 and view 2 " + both("blur_probs"))
    g.add_argument("--solarize-probs", type=float, nargs=2, metavar=("P1", "P2"),
                   help="solarisation probability of view 1 and view 2 " + both("solarize_probs"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup " + both("warmup_epochs"))
    args = resolve_recipe(p.parse_args(argv), IMAGENET, SMALL_IMAGES, "barlow",
                          (VIT, VIT_SMALL_IMAGES))
    widths = args.projector.split("-")
    if not all(w.isdigit() and int(w) > 0 for w in widths):
        raise UserError(f"--projector {args.projector}: expected widths like 8192-8192-8192")
    check_fractions(args, "blur_probs", "solarize_probs")
    check_at_least(args, lambd=0, lr_biases=0)
    return args


# ------------------------------------------------------------------------------- augmentations

def barlow_views(args):
    """Crop (0.08, 1, bicubic as the official code) + flip + colour jitter (0.4, 0.4, 0.2, 0.1)
    at p 0.8 + grayscale p 0.2, then the asymmetric part: blur p 1.0 / 0.1 and solarize p 0.0 /
    0.2 for views 1 / 2 (small images: no blur, which removes most of 32 px images' detail)."""
    return [ssl_view(args.img_size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                     gray_p=0.2, blur_p=blur_p, solarize_p=solarize_p,
                     interpolation="bicubic")
            for blur_p, solarize_p in zip(args.blur_probs, args.solarize_probs)]


# ------------------------------------------------------------------------------- model

class BarlowTwins(nn.Module):
    """ResNet backbone f and projector g: z = g(f(x)). The projector of the official code: for
    each width but the last, Linear (no bias) - BN - ReLU; then Linear (no bias). The BN without
    scale or shift that standardises z before the cross-correlation is computed in the loss."""

    def __init__(self, arch, small_images, projector="8192-8192-8192"):
        super().__init__()
        # The official code builds its ResNet-50 with zero_init_residual=True.
        # a ViT: MoCo v3's init (frozen random patch projection, sin-cos positions)
        self.backbone = build_backbone(arch, small_images, zero_init_residual=True, vit_init="mocov3")
        sizes = [self.backbone.feature_dim] + [int(w) for w in projector.split("-")]
        layers = []
        for d_in, d_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)

    def forward(self, x1, x2):
        """Projections z1, z2 [n, D] of the two views. Each view is a separate pass through the
        network (BN statistics per view), as in the official code."""
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))


# ------------------------------------------------------------------------------- loss

def barlow_twins_loss(z1, z2, lambd, eps=1e-5):
    """Barlow Twins loss over the GLOBAL batch of N. z1, z2: [n, D] projections of the two views
    on this rank. Returns (loss, on-diagonal term, off-diagonal term).

    Each feature is standardised with the global batch's mean and biased variance (+ eps): what
    the official BatchNorm1d(affine=False), a SyncBN under DDP, computes in training mode. Then
        C_ij = sum_b z1_bi z2_bj / N     (standardised z; cross-correlation of the views, [D, D])
        L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2
    Sums over ranks go through all_reduce_with_grad, whose backward sums too. Every rank computes
    the same L(S) of S = sum_r s_r, so the backward hands each rank's partial sum s_r the sum over
    ranks of dL/dS = world x dL/dS, and rank r's gradient is g_r = world x dL/dS ds_r/dtheta. DDP
    averages: (1/world) sum_r g_r = dL/dS sum_r ds_r/dtheta = dL/dtheta, the gradient of one
    process holding the whole batch. The official code all-reduces C in place, which autograd
    does not see: s_r gets dL/dS only, and the result is 1/world of dL/dtheta (a peer library
    shipped that bug). LARS's trust ratio makes the weights' steps almost blind to that factor;
    biases and BN, which it does not adapt, take steps world times larger here.
    """
    N = z1.shape[0] * get_world_size()
    z = torch.stack([z1, z2])                                             # [2, n, D]
    mean = all_reduce_with_grad(z.sum(dim=1, keepdim=True)) / N          # [2, 1, D]
    var = all_reduce_with_grad((z - mean).pow(2).sum(dim=1, keepdim=True)) / N  # [2, 1, D]
    z = (z - mean) / torch.sqrt(var + eps)                                # [2, n, D]
    c = all_reduce_with_grad(z[0].T @ z[1]) / N                          # [D, D]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    off_diag = c.masked_fill(eye, 0.0).pow(2).sum()
    return on_diag + lambd * off_diag, on_diag, off_diag


# ------------------------------------------------------------------------------- training

def barlow_optimizer(model, args):
    """LARS (official: momentum 0.9, eta 0.001) on the official code's two groups: weights
    (decayed, adapted) and 1-D parameters (biases and BN: neither). set_lr multiplies the second
    group's rate by its `lr_scale`, lr_biases / lr (0.0048 / 0.2 on ImageNet)."""
    groups = param_groups(model, args.weight_decay)
    groups[1]["lr_scale"] = args.lr_biases / args.lr
    return build_optimizer(groups, args)


@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "barlow")  # processes, device, run directory (one run per folder), log, seed

    # data: two views per image
    views = ViewPipeline(barlow_views(args), args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedule: both groups warm up, then follow a cosine to 0.001 x their peak
    model = run.distribute(BarlowTwins(args.arch, args.small_images, args.projector))
    optimizer = barlow_optimizer(model, args)
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch

    # resume from the run directory's checkpoint, or start
    start_epoch, start_batch = run.restore(model, optimizer, unwrap(model).backbone)
    run.print(f"{describe_lr(args)}, biases and BN {args.lr_biases} x {args.batch_size}/256 = "
              f"{args.peak_lr * args.lr_biases / args.lr:g} ({describe_optimizer(args)}; "
              f"{args.warmup_epochs} warmup epochs, cosine to 0.001 x); lambda {args.lambd}; "
              f"{run.steps_per_epoch} steps per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, ((x1, x2), labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr,
                               final=0.001 * args.peak_lr)
            set_lr(optimizer, lr)  # biases and BN: lr x lr_biases / lr
            x = torch.cat(views.to_device([x1, x2], run.device, step))
            with autocast(args.precision, run.device):
                z1, z2 = model(*x.chunk(2))                            # views apart (BN per view)
            # loss math in fp32 (the official code computes C under autocast)
            loss, on_diag, off_diag = barlow_twins_loss(z1.float(), z2.float(), args.lambd)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            run.step_done(step, labels, torch.cat([z1, z2]), loss=loss, on_diag=on_diag,
                          off_diag=off_diag, lr=lr, lr_biases=optimizer.param_groups[1]["lr"])
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and backbone.pt; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
