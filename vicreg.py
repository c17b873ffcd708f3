"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning.

Bardes, Ponce, LeCun, ICLR 2022, arXiv 2105.04906.
Official code: github.com/facebookresearch/vicreg

Two augmented views of each image go through a ResNet and an expander MLP; the loss has three terms
and no negatives: invariance (mean squared distance between the two embeddings of an image),
variance (a hinge keeping the std of every embedding dimension over the batch above 1) and
covariance (pushes the off-diagonal covariances of the embedding dimensions to 0). Defaults are the
paper's ImageNet recipe (ResNet-50, expander 8192-8192-8192, batch 2048, LARS, lr 0.2 x batch/256,
coefficients 25 / 25 / 1, 1000 epochs: 73.2% linear top-1). Images of 64 px or less (CIFAR) switch
to a CIFAR-10 recipe (ResNet-18 with a 3x3 stem, expander 2048-2048-2048, batch 256, lr 0.3, wd
1e-4, no blur, 1000 epochs: solo-learn reports 92.1% linear top-1 with its online linear probe).

    python vicreg.py --data synthetic --arch resnet18 --epochs 1      # CPU smoke run, 1-2 minutes
    python vicreg.py --data cifar10                                   # CIFAR-10 recipe
    torchrun --nproc_per_node=8 vicreg.py --data /imagenet            # ImageNet recipe, one node
    sbatch slurm/train.sbatch vicreg.py --data /imagenet              # Slurm

The method, its equations, every implementation detail with its source (deviations from the
official code included), both recipes and measured results: docs/vicreg.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.args import (add_common_args, check_at_least, check_fractions, describe_lr,
                         recipe_values, resolve_recipe)
from common.errors import UserError, exit_on_user_error
from common.augment import ViewPipeline, ssl_view
from common.model import autocast, build_backbone, unwrap
from common.optim import build_optimizer, describe_optimizer, param_groups, set_lr, warmup_cosine
from common.dist import gather_with_grad
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# The paper's ImageNet recipe (the official main_vicreg.py and its README's 1000-epoch command:
# batch 2048, base lr 0.2; 1000 epochs as the paper's result, where the code's default is 100).
# For images <= 64 px there is no official recipe: these are solo-learn's CIFAR settings (ResNet-18,
# expander 2048-2048-2048 as the peers use on CIFAR, batch 256, lr 0.3 x batch/256, wd 1e-4, 1000
# epochs). solo-learn's LARS has eta 0.02 and lr clipping and its CIFAR views are symmetric (crop
# scale 0.2-1, solarize 0.1 on both); we keep the official optimizer and the official asymmetric
# views, minus the blur that erases most of a 32 px image. Any flag given on the command line wins.
IMAGENET = dict(arch="resnet50", epochs=1000, batch_size=2048, optimizer="lars", lr=0.2,
                weight_decay=1e-6, warmup_epochs=10, expander="8192-8192-8192",
                blur_probs=(1.0, 0.1), solarize_probs=(0.0, 0.2))
SMALL_IMAGES = dict(arch="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3,
                    weight_decay=1e-4, warmup_epochs=10, expander="2048-2048-2048",
                    blur_probs=(0.0, 0.0), solarize_probs=(0.0, 0.2))
# --arch vit_*: no VICReg ViT recipe has been published (by its authors, solo-learn, lightly,
# mmpretrain or VISSL). Ours: MoCo v3's ViT optimizer (arXiv 2104.02057 section 5; moco-v3
# CONFIG.md: AdamW, lr 1.5e-4 x batch/256, weight decay 0.1, 40 warmup epochs, 300 epochs, the
# random patch projection frozen) with VICReg's own expander, loss and batch. Unvalidated.
# Images <= 64 px: that optimizer with the CIFAR recipe's length, batch, expander and views.
VIT = dict(recipe="ViT (ours: MoCo v3's optimizer, VICReg's expander)", optimizer="adamw",
           epochs=300, lr=1.5e-4, weight_decay=0.1, warmup_epochs=40)
VIT_SMALL_IMAGES = dict(SMALL_IMAGES, recipe="ViT at <= 64 px (ours: MoCo v3's optimizer, "
                        "CIFAR length)", optimizer="adamw", lr=1.5e-4, weight_decay=0.1)
TERMS = ("loss", "invariance", "variance", "covariance")  # logged; the three terms unweighted


def get_args(argv=None):
    p = argparse.ArgumentParser(description="VICReg pre-training (Bardes et al. 2022). Recipe "
                                "values in brackets; a flag given on the command line wins.")
    add_common_args(p, "vicreg", IMAGENET, SMALL_IMAGES)
    both = lambda key: recipe_values(key, IMAGENET, SMALL_IMAGES)
    g = p.add_argument_group("VICReg", "--lr: the paper's base rates for small batches (appendix "
                             "C.4) are 0.8 at batch 128, 0.5 at 256, 0.4 at 512 (the official "
                             "README's batch-512 command uses 0.3)")
    g.add_argument("--sim-coeff", type=float, default=25.0,
                   help="invariance coefficient lambda (paper: 25)")
    g.add_argument("--std-coeff", type=float, default=25.0,
                   help="variance coefficient mu (paper: 25)")
    g.add_argument("--cov-coeff", type=float, default=1.0,
                   help="covariance coefficient nu (paper: 1)")
    g.add_argument("--expander", help="expander widths, dash-separated: Linear-BN-ReLU per hidden "
                   "width, then a Linear without bias (the official --mlp) " + both("expander"))
    g.add_argument("--blur-probs", type=float, nargs=2, metavar=("P1", "P2"),
                   help="Gaussian blur probability of view 1 and view 2 " + both("blur_probs"))
    g.add_argument("--solarize-probs", type=float, nargs=2, metavar=("P1", "P2"),
                   help="solarisation probability of view 1 and view 2 " + both("solarize_probs"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup " + both("warmup_epochs"))
    args = resolve_recipe(p.parse_args(argv), IMAGENET, SMALL_IMAGES, "vicreg",
                          (VIT, VIT_SMALL_IMAGES))
    widths = args.expander.split("-")
    if not all(w.isdigit() and int(w) > 0 for w in widths):
        raise UserError(f"--expander {args.expander}: expected positive widths joined by '-', "
                        f"e.g. 8192-8192-8192")
    check_fractions(args, "blur_probs", "solarize_probs")
    check_at_least(args, sim_coeff=0, std_coeff=0, cov_coeff=0)
    return args


# ------------------------------------------------------------------------------- augmentations

def vicreg_views(args):
    """The Barlow Twins views, as the official code: bicubic crop (0.08, 1) + flip + colour
    jitter (0.4, 0.4, 0.2, 0.1) at p 0.8 + grayscale p 0.2, then blur p 1.0 / 0.1 and solarize
    p 0.0 / 0.2 for views 1 / 2 (small images: no blur)."""
    return [ssl_view(args.img_size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                     gray_p=0.2, blur_p=blur_p, solarize_p=solarize_p,
                     interpolation="bicubic")
            for blur_p, solarize_p in zip(args.blur_probs, args.solarize_probs)]


# ------------------------------------------------------------------------------- model

def expander_mlp(in_dim, spec):
    """'8192-8192-8192' -> Linear(in, 8192) - BN - ReLU - Linear(8192, 8192) - BN - ReLU -
    Linear(8192, 8192, no bias), PyTorch's default initialisation, as the official Projector."""
    dims = [in_dim] + [int(w) for w in spec.split("-")]
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1], bias=False))


class VICReg(nn.Module):
    """Backbone f (ResNet or ViT) and expander h (the paper's name for the projector):
    z = h(f(x))."""

    def __init__(self, arch, small_images, expander="8192-8192-8192"):
        super().__init__()
        # The official ResNet zero-initialises the last BN scale of each residual block.
        # a ViT: MoCo v3's init (frozen random patch projection, sin-cos positions)
        self.backbone = build_backbone(arch, small_images, zero_init_residual=True, vit_init="mocov3")
        self.expander = expander_mlp(self.backbone.feature_dim, expander)

    def forward(self, x1, x2):
        """Embeddings z1, z2 [n, D] of the two views. Each view is a separate forward pass (BN
        statistics per view), as in the official code, within one call (one DDP forward)."""
        return tuple(self.expander(self.backbone(x)) for x in (x1, x2))


# ------------------------------------------------------------------------------- loss

def vicreg_loss(z1, z2, sim_coeff, std_coeff, cov_coeff, eps=1e-4):
    """VICReg loss. z1, z2: [n, D] embeddings of the two views on this rank (fp32).
    Returns (loss, invariance, variance, covariance), the three terms unweighted.

        loss = sim_coeff * s(Z1, Z2) + std_coeff * (v(Z1) + v(Z2)) / 2 + cov_coeff * (c(Z1) + c(Z2))
        s = mean_{i,d} (z1_id - z2_id)^2                   on this rank's n images
        v(Z) = mean_d relu(1 - sqrt(Var_i z_id + eps))     unbiased variance over the global N
        c(Z) = sum_{d != e} C_de^2 / D,  C = (Z - mean)^T (Z - mean) / (N - 1)
    As the official code, v and c use the GLOBAL batch, gathered from all ranks WITH gradients:
    every rank computes the same v and c, and the gather's backward sums each slice's gradient
    over ranks, so DDP's average gives the single-process gradient. s stays local: DDP's average
    of equal per-rank means is the global mean.
    """
    invariance = F.mse_loss(z1, z2)                                # local batch
    z1, z2 = gather_with_grad(z1), gather_with_grad(z2)            # [N, D] all ranks, with grad
    N, D = z1.shape
    z1, z2 = z1 - z1.mean(dim=0), z2 - z2.mean(dim=0)              # [N, D] centred

    def hinge(z):                                                  # mean_d relu(1 - std_d)
        return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()

    def off_diagonal(z):                                           # sum_{d != e} C_de^2 / D
        c = z.T @ z / (N - 1)                                      # [D, D]
        eye = torch.eye(D, dtype=torch.bool, device=c.device)
        return c.masked_fill(eye, 0.0).pow(2).sum() / D

    variance = hinge(z1) / 2 + hinge(z2) / 2                       # averaged over the branches
    covariance = off_diagonal(z1) + off_diagonal(z2)               # summed, as the official code
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, invariance, variance, covariance


# ------------------------------------------------------------------------------- training

@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "vicreg")  # processes, device, run directory (one run per folder), log, seed

    # data: two views per image
    views = ViewPipeline(vicreg_views(args), args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedule: one lr for both parameter groups, as the official code
    model = run.distribute(VICReg(args.arch, args.small_images, args.expander))
    optimizer = build_optimizer(param_groups(model, args.weight_decay), args)
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch

    # resume from the run directory's checkpoint, or start
    start_epoch, start_batch = run.restore(model, optimizer, unwrap(model).backbone)
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}; {args.warmup_epochs} warmup "
              f"epochs, cosine to {0.001 * args.peak_lr:g}); loss = {args.sim_coeff} x "
              f"invariance + {args.std_coeff} x variance + {args.cov_coeff} x covariance; "
              f"{run.steps_per_epoch} steps per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, ((x1, x2), labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            # warmup from 0, then cosine down to 0.001 x peak, as the official code
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr,
                               final=0.001 * args.peak_lr)
            set_lr(optimizer, lr)
            x = torch.cat(views.to_device([x1, x2], run.device, step))
            with autocast(args.precision, run.device):
                z1, z2 = model(*x.chunk(2))                            # views apart (BN per view)
            # The official code computes the loss under fp16 autocast; NaN losses are reported
            # with it (vicreg#27): the variance and covariance math runs in fp32 here.
            loss, *terms = vicreg_loss(z1.float(), z2.float(), args.sim_coeff, args.std_coeff,
                                       args.cov_coeff)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            # logged: the loss, its three terms unweighted (the invariance is this rank's; the
            # variance and covariance the global batch's), the lr; see common/run.py
            run.step_done(step, labels, torch.cat([z1, z2]), **dict(zip(TERMS, [loss, *terms])),
                          lr=lr)
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and backbone.pt; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
