"""SimSiam: Exploring Simple Siamese Representation Learning.

Chen, He, CVPR 2021, arXiv 2011.10566.
Official code (PyTorch): github.com/facebookresearch/simsiam

Two augmented views of each image go through the same encoder f (ResNet + projection MLP) and a
prediction MLP h; each view's prediction is pulled towards the other view's encoder output held
constant (stop-gradient). No negatives, no momentum encoder: the stop-gradient alone keeps the
outputs from collapsing, which the script watches through the std of the normalised output.
Defaults are the paper's ImageNet recipe (ResNet-50, batch 512, SGD, lr 0.05 x batch/256, weight
decay 1e-4, cosine, the predictor's lr fixed, 100 epochs: 68.1% linear top-1, official README).
Images of 64 px or less (CIFAR) switch to the paper's CIFAR-10 recipe (appendix D: ResNet-18 with a
3x3 stem, 2-layer projector, lr 0.03 x batch/256, weight decay 5e-4, no blur, 800 epochs: 91.8%
linear).

    python simsiam.py --data synthetic --arch resnet18 --epochs 1     # CPU smoke run, 1-2 minutes
    python simsiam.py --data cifar10                                  # CIFAR-10 recipe
    torchrun --nproc_per_node=8 simsiam.py --data /imagenet           # ImageNet recipe, one node
    sbatch slurm/train.sbatch simsiam.py --data /imagenet             # Slurm

The method, its equations, every implementation detail with its source (deviations from the
official code included), both recipes and measured results: docs/simsiam.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.args import (add_common_args, check_at_least, check_fractions, describe_lr,
                         recipe_values, resolve_recipe)
from common.errors import exit_on_user_error
from common.augment import ViewPipeline, ssl_view
from common.model import autocast, build_backbone, unwrap
from common.optim import build_optimizer, describe_optimizer, warmup_cosine
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# The paper's ImageNet recipe (section 3 and appendix A, the official README's command with
# --fix-pred-lr) and, for images <= 64 px, its CIFAR-10 recipe (appendix D: 2-layer projector,
# no blur). Any flag given on the command line wins.
IMAGENET = dict(arch="resnet50", epochs=100, batch_size=512, optimizer="sgd", lr=0.05,
                weight_decay=1e-4, warmup_epochs=0.0, blur_prob=0.5, proj_layers=3)
SMALL_IMAGES = dict(arch="resnet18", epochs=800, batch_size=512, optimizer="sgd", lr=0.03,
                    weight_decay=5e-4, warmup_epochs=0.0, blur_prob=0.0, proj_layers=2)
# --arch vit_*: no SimSiam ViT recipe has been published (by its authors, solo-learn, lightly,
# mmpretrain or VISSL). Ours: MoCo v3's ViT optimizer (arXiv 2104.02057 section 5; moco-v3
# CONFIG.md: AdamW, lr 1.5e-4 x batch/256, weight decay 0.1, 40 warmup epochs, 300 epochs, the
# random patch projection frozen) with SimSiam's own heads, loss and batch. Unvalidated. Images
# <= 64 px: that optimizer with the CIFAR recipe's length, batch and views.
VIT = dict(recipe="ViT (ours: MoCo v3's optimizer, SimSiam's heads)", optimizer="adamw",
           epochs=300, lr=1.5e-4, weight_decay=0.1, warmup_epochs=40)
VIT_SMALL_IMAGES = dict(SMALL_IMAGES, recipe="ViT at <= 64 px (ours: MoCo v3's optimizer, "
                        "CIFAR length)", optimizer="adamw", lr=1.5e-4, weight_decay=0.1,
                        warmup_epochs=10)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SimSiam pre-training (Chen & He 2021). Recipe "
                                "values in brackets; a flag given on the command line wins.")
    add_common_args(p, "simsiam", IMAGENET, SMALL_IMAGES)
    both = lambda key: recipe_values(key, IMAGENET, SMALL_IMAGES)
    g = p.add_argument_group("SimSiam")
    g.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the predictor's lr at the peak value while the rest follows the "
                        "cosine (default: on, as the official README's command; paper Table 1c: "
                        "68.1%% with, 67.7%% without)")
    g.add_argument("--blur-prob", type=float, help="Gaussian blur probability " + both("blur_prob"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup (paper: 0; 10 for "
                   "batches >= 1024, section 4.3; ViT recipe: 40) " + both("warmup_epochs"))
    g.add_argument("--proj-layers", type=int, choices=[2, 3],
                   help="projection MLP layers " + both("proj_layers"))
    g.add_argument("--proj-dim", type=int, default=2048,
                   help="projection hidden and output width (paper: 2048)")
    g.add_argument("--pred-hidden-dim", type=int, default=512,
                   help="prediction MLP bottleneck width (paper: 512)")
    args = p.parse_args(argv)
    args = resolve_recipe(args, IMAGENET, SMALL_IMAGES, "simsiam", (VIT, VIT_SMALL_IMAGES))
    check_fractions(args, "blur_prob")
    check_at_least(args, proj_layers=1, proj_dim=1, pred_hidden_dim=1)
    return args


# ------------------------------------------------------------------------------- augmentations

def simsiam_view(args):
    """MoCo v2's "aug+": crop (0.2, 1) + flip + colour jitter (0.4, 0.4, 0.4, 0.1) at p 0.8 +
    grayscale p 0.2 + blur p 0.5 (ImageNet only): the same distribution for both views."""
    return ssl_view(args.img_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                    gray_p=0.2, blur_p=args.blur_prob)


# ------------------------------------------------------------------------------- model

class SimSiam(nn.Module):
    """Encoder f = projector(backbone) and predictor h: p = h(f(x)), z = f(x).

    Projector: (Linear, BN, ReLU) x (layers - 1), then Linear and BN without affine: BN after
    every layer, as the official builder. Its width is the paper's 2048 for every backbone (the
    official builder takes the backbone's width, also 2048 for ResNet-50, 512 for ResNet-18).
    Predictor: the 2048 -> 512 -> 2048 bottleneck Linear-BN-ReLU-Linear, no BN on its output.
    PyTorch's default initialisation everywhere, as the official code."""

    def __init__(self, arch, small_images, proj_layers=3, dim=2048, pred_dim=512):
        super().__init__()
        # The official builder zero-initialises the last BN scale of each residual block.
        # a ViT: MoCo v3's init (frozen random patch projection, sin-cos positions)
        self.backbone = build_backbone(arch, small_images, zero_init_residual=True, vit_init="mocov3")
        layers, width = [], self.backbone.feature_dim
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
            width = dim
        # The official output layer has a bias it freezes (never trained); BN without affine
        # subtracts the batch (or running) mean, which removes any constant: no bias is the same.
        layers += [nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim, affine=False)]
        self.projector = nn.Sequential(*layers)
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim))

    def forward(self, x1, x2):
        # One view per pass, so BN normalises each view over its own batch, as the official code.
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        return self.predictor(z1), self.predictor(z2), z1, z2


# ------------------------------------------------------------------------------- loss

def simsiam_loss(p1, p2, z1, z2):
    """Symmetrised negative cosine similarity with stop-gradient on z. p*, z*: [n, D].

        D(p, z) = -cos(p, sg(z)) = -(p / ||p||) . (z / ||z||)     (z a constant)
        L = 1/2 D(p1, z2) + 1/2 D(p2, z1),   averaged over the batch

    The minimum is -1. Each sample's term depends on that sample alone: each rank averages
    its own samples and DDP averages ranks, which is the mean over the global batch.
    """
    z1, z2 = z1.detach(), z2.detach()                           # stop-gradient: [n, D] constants
    d12 = -F.cosine_similarity(p1, z2, dim=1)                   # [n] view 1 predicts view 2
    d21 = -F.cosine_similarity(p2, z1, dim=1)                   # [n] view 2 predicts view 1
    return 0.5 * d12.mean() + 0.5 * d21.mean()


# ------------------------------------------------------------------------------- training

def simsiam_optimizer(model, args):
    """--optimizer (official: SGD, momentum 0.9) with weight decay on EVERY parameter, BN and
    biases included (paper appendix A; unlike LARS methods there is no exclusion; with
    --optimizer lars or adamw, build_optimizer excludes 1-D parameters). Two groups:
    the predictor, flagged `fix_lr` if its rate stays at the peak, and everything else."""
    model = unwrap(model)
    predictor = list(model.predictor.parameters())
    rest = [p for name, p in model.named_parameters() if not name.startswith("predictor.")]
    groups = [{"params": rest, "fix_lr": False, "weight_decay": args.weight_decay},
              {"params": predictor, "fix_lr": args.fix_pred_lr, "weight_decay": args.weight_decay}]
    return build_optimizer(groups, args)


def set_simsiam_lr(optimizer, lr, peak_lr):
    """The scheduled `lr` for every group but those flagged `fix_lr`, which keep `peak_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = peak_lr if group["fix_lr"] else lr

@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "simsiam")  # processes, device, run directory (one run per folder), log, seed

    # data: two views per image
    views = ViewPipeline([simsiam_view(args)] * 2, args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedule (SyncBN with several GPU processes, as the official code)
    model = run.distribute(SimSiam(args.arch, args.small_images, args.proj_layers, args.proj_dim,
                                   args.pred_hidden_dim))
    optimizer = simsiam_optimizer(model, args)
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch

    # resume from the run directory's checkpoint, or start
    start_epoch, start_batch = run.restore(model, optimizer, unwrap(model).backbone)
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}; {args.warmup_epochs} warmup "
              f"epochs, cosine to 0; predictor "
              f"{'fixed at ' + format(args.peak_lr, 'g') if args.fix_pred_lr else 'cosine too'}); "
              f"{run.steps_per_epoch} steps per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, ((x1, x2), labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            # Cosine per iteration; the official code steps it once per epoch (the same curve,
            # smoother, and a mid-epoch resume needs no special case).
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr)
            # the fixed predictor rate warms up with the rest (a warmup: ViT recipe, big batches)
            set_simsiam_lr(optimizer, lr, args.peak_lr if step >= warmup_steps else lr)
            x1, x2 = views.to_device([x1, x2], run.device, step)
            with autocast(args.precision, run.device):
                p1, p2, z1, z2 = model(x1, x2)
            p1, p2, z1, z2 = p1.float(), p2.float(), z1.float(), z2.float()  # loss math in fp32
            loss = simsiam_loss(p1, p2, z1, z2)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            # the paper's collapse monitor reads z of both views (common/run.py embedding_std)
            run.step_done(step, labels, torch.cat([z1, z2]), loss=loss, lr=lr)
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and backbone.pt; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
