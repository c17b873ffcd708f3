"""BYOL: Bootstrap Your Own Latent, a new approach to self-supervised learning.

Grill, Strub, Altché, Tallec, Richemond et al., NeurIPS 2020, arXiv 2006.07733.
Official code (JAX): github.com/google-deepmind/deepmind-research, folder byol

An online network (ResNet, projector, predictor) predicts the projection that a target network
(ResNet, projector) gives of another view of the same image. The target receives no gradients: it
is an exponential moving average of the online network, its momentum tau rising from tau_base to 1
along a cosine. No negatives. Defaults are the paper's ImageNet recipe (ResNet-50, batch 4096,
LARS, lr 0.2 x batch/256, tau_base 0.996, 1000 epochs: 74.3% linear top-1); a shorter --epochs
takes the official config's preset for that budget (100 epochs: lr 0.45, tau_base 0.99, about 66.5%
in the SimSiam paper's table 4). Images of 64 px or less (CIFAR) switch to a CIFAR-10 recipe
(ResNet-18 with a 3x3 stem, batch 512, lr 1.0 x batch/256, tau_base 0.996, no blur, 800 epochs:
91.9% linear top-1 reported by the BYOL-HPC reproduction).

    python byol.py --data synthetic --arch resnet18 --epochs 1        # CPU smoke run, 1-2 minutes
    python byol.py --data cifar10                                     # CIFAR-10 recipe
    torchrun --nproc_per_node=8 byol.py --data /imagenet              # ImageNet recipe, one node
    sbatch slurm/train.sbatch byol.py --data /imagenet                # Slurm

The method, its equations, every implementation detail with its source (deviations from the
official code included), both recipes and measured results: docs/byol.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.args import (add_common_args, check_at_least, check_fractions, describe_lr,
                         recipe_values, resolve_recipe)
from common.errors import exit_on_user_error
from common.augment import ViewPipeline, ssl_view
from common.model import autocast, build_backbone, unwrap
from common.optim import build_optimizer, describe_optimizer, param_groups, set_lr, warmup_cosine
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# The paper's ImageNet recipe (section 3.3 and appendix C; the official configs/byol.py) and,
# for images <= 64 px, the CIFAR-10 recipe of the BYOL-HPC reproduction (ResNet-18, batch 512,
# --lr_init 2.0 = 1.0 x 512/256, tau_base 0.996, wd 1e-6, 800 epochs: 91.9% linear top-1).
# The paper gives no CIFAR recipe; solo-learn's CIFAR BYOL also drops blur and keeps the
# solarisation asymmetry. Any flag given on the command line wins.
IMAGENET = dict(arch="resnet50", epochs=1000, batch_size=4096, optimizer="lars", lr=0.2,
                weight_decay=1.5e-6, tau_base=0.996, warmup_epochs=10, blur_probs=(1.0, 0.1),
                solarize_probs=(0.0, 0.2))
SMALL_IMAGES = dict(arch="resnet18", epochs=800, batch_size=512, optimizer="lars", lr=1.0,
                    weight_decay=1e-6, tau_base=0.996, warmup_epochs=10, blur_probs=(0.0, 0.0),
                    solarize_probs=(0.0, 0.2))
# --arch vit_*: BYOL on a ViT as the MoCo v3 paper trained it (arXiv 2104.02057, section 5:
# AdamW, batch 4096, 40 warmup epochs, the random patch projection frozen; Fig. 6 caption:
# lr 1e-4 x batch/256, weight decay 0.03 for ViT-B/16; appendix A: BYOL's own heads), 300
# epochs. The paper states no EMA momentum: tau_base 0.99, BYOL's official 300-epoch preset
# (and MoCo v3's). Images <= 64 px: ours, that optimizer with the CIFAR recipe's length,
# batch, tau and views (no published CIFAR ViT recipe for BYOL).
VIT = dict(recipe="ViT (the MoCo v3 paper's for BYOL)", optimizer="adamw", epochs=300, lr=1e-4,
           weight_decay=0.03, warmup_epochs=40, tau_base=0.99)
VIT_SMALL_IMAGES = dict(VIT, recipe="ViT at <= 64 px (ours: MoCo v3's for BYOL, CIFAR length)",
                        epochs=800, batch_size=512, warmup_epochs=10, tau_base=0.996,
                        blur_probs=(0.0, 0.0))


def imagenet_preset(epochs):
    """tau_base, base lr and weight decay of the official config for an ImageNet epoch budget
    (presets at 40, 100, 300 and 1000 epochs; another budget takes tau and lr of the next preset
    up, and weight decay 1.5e-6 only from 1000 epochs, 1e-6 below)."""
    tau_base, lr = ((0.97, 0.45) if epochs <= 40 else (0.99, 0.45) if epochs <= 100
                    else (0.99, 0.3) if epochs <= 300 else (0.996, 0.2))
    return dict(tau_base=tau_base, lr=lr, weight_decay=1.5e-6 if epochs >= 1000 else 1e-6)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="BYOL pre-training (Grill et al. 2020). Recipe "
                                "values in brackets; with the ImageNet recipe, --lr, --tau-base "
                                "and --weight-decay follow the official preset for --epochs (the "
                                "bracketed values are the 1000-epoch ones); a flag given on the "
                                "command line wins.")
    add_common_args(p, "byol", IMAGENET, SMALL_IMAGES)
    both = lambda key: recipe_values(key, IMAGENET, SMALL_IMAGES)
    g = p.add_argument_group("BYOL")
    g.add_argument("--tau-base", type=float, help="EMA momentum at step 0, rising to 1 along a "
                   "cosine (ImageNet presets: 0.97 / 0.99 / 0.99 / 0.996 for 40 / 100 / 300 / "
                   "1000 epochs) " + both("tau_base"))
    g.add_argument("--tau-schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine (default): tau rises from --tau-base to 1 (paper, section 3.3); "
                        "constant: tau stays --tau-base, as MoCo's key encoder")
    g.add_argument("--blur-probs", type=float, nargs=2, metavar=("P1", "P2"),
                   help="Gaussian blur probability of view 1 and view 2 " + both("blur_probs"))
    g.add_argument("--solarize-probs", type=float, nargs=2, metavar=("P1", "P2"),
                   help="solarisation probability of view 1 and view 2 " + both("solarize_probs"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup " + both("warmup_epochs"))
    g.add_argument("--hidden-dim", type=int, default=4096,
                   help="hidden width of the projector and the predictor (paper: 4096)")
    g.add_argument("--proj-dim", type=int, default=256, help="projection output dim (paper: 256)")
    args = p.parse_args(argv)
    given = {k for k in ("tau_base", "lr", "weight_decay") if getattr(args, k) is not None}
    given |= {"lr"} if args.peak_lr is not None else set()  # --peak-lr sets the rate too
    args = resolve_recipe(args, IMAGENET, SMALL_IMAGES, "byol", (VIT, VIT_SMALL_IMAGES))
    check_fractions(args, "tau_base", "blur_probs", "solarize_probs")
    check_at_least(args, hidden_dim=1, proj_dim=1)
    args.preset = None
    if args.recipe == "ImageNet":
        preset = imagenet_preset(args.epochs)
        for key in preset.keys() - given:
            setattr(args, key, preset[key])
        args.peak_lr = args.lr * args.batch_size / 256  # the preset's lr is a base rate too
        args.preset = (f"official ImageNet preset for {args.epochs} epochs: "
                       + ", ".join(f"{k} {v}" for k, v in preset.items()))
        if given:
            args.preset += f" (given on the command line: {', '.join(sorted(given))})"
    return args


# ------------------------------------------------------------------------------- augmentations

def byol_views(args):
    """Crop (0.08, 1) + flip + colour jitter (0.4, 0.4, 0.2, 0.1) at p 0.8 + grayscale p 0.2,
    then the asymmetric part: blur p 1.0 / 0.1 and solarize p 0.0 / 0.2 for views 1 / 2
    (small images: no blur, which removes most of 32 px images' detail). The crop is resized
    bicubically, as the official utils/dataset.py."""
    return [ssl_view(args.img_size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                     gray_p=0.2, blur_p=blur_p, solarize_p=solarize_p, interpolation="bicubic")
            for blur_p, solarize_p in zip(args.blur_probs, args.solarize_probs)]


# ------------------------------------------------------------------------------- model

def mlp(in_dim, hidden_dim, out_dim):
    """Linear (with bias) - BN - ReLU - Linear (no bias); the output is not batch-normalised."""
    net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                        nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=False))
    for layer in (net[0], net[3]):  # Haiku's default: normal, std 1/sqrt(fan_in), cut at 2 std
        std = 1 / math.sqrt(layer.in_features)
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(net[0].bias)
    return net


def target_momentum(step, total_steps, tau_base, schedule="cosine"):
    """tau at `step`: tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, the same cosine as the
    learning rate's, rising from tau_base to 1; or tau_base throughout (`constant`)."""
    if schedule == "constant":
        return tau_base
    return warmup_cosine(step, total_steps, 0, tau_base, final=1.0)


@torch.no_grad()
def ema_update(online, target, tau):
    """target <- tau * target + (1 - tau) * online for every parameter. The BN running
    statistics are copied instead. The official code keeps the target's own BN state, updated
    by its own forward passes; both ways give the same outputs, since the target runs in
    training mode and normalises with batch statistics, and only the online network is kept."""
    # one fused call per list (a handful of kernels, not two per tensor): p_t += (1-tau)(p_o - p_t)
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - tau)
    if buffers := list(target.buffers()):  # a ViT backbone has none
        torch._foreach_copy_(buffers, list(online.buffers()))


class BYOL(nn.Module):
    """Online network: backbone f, projector g, predictor q. Target network: its own copies of
    f and g (`target_backbone`, `target_projector`), updated by `update_target` only. (The
    official code also trains a linear classifier on the detached embedding, for monitoring
    only; the kNN monitor and linear_eval.py take its place here.)"""

    def __init__(self, arch, small_images, hidden_dim=4096, out_dim=256):
        super().__init__()
        # The official ResNet zero-initialises the last BN scale of each residual block, but its
        # README says the paper's results were obtained without it: we follow the paper.
        # a ViT: MoCo v3's init (frozen random patch projection, sin-cos positions)
        self.backbone = build_backbone(arch, small_images, zero_init_residual=False, vit_init="mocov3")
        self.projector = mlp(self.backbone.feature_dim, hidden_dim, out_dim)
        self.predictor = mlp(out_dim, hidden_dim, out_dim)
        # Deviation: the target starts as a copy of the online network; the official code draws
        # it with its own seed and notes no significant difference (byol_experiment.py)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x1, x2):
        """Predictions p1, p2 of the online network and projections z1, z2 of the target.
        Each view is a separate forward pass (BN statistics per view), as in the official code."""
        p1, p2 = (self.predictor(self.projector(self.backbone(x))) for x in (x1, x2))
        with torch.no_grad():  # the target is in training mode too: BN uses batch statistics
            z1, z2 = (self.target_projector(self.target_backbone(x)) for x in (x1, x2))
        return p1, p2, z1, z2

    def update_target(self, tau):
        ema_update(self.backbone, self.target_backbone, tau)
        ema_update(self.projector, self.target_projector, tau)


# ------------------------------------------------------------------------------- loss

def byol_loss(p1, p2, z1, z2):
    """BYOL's symmetric regression loss. p1, p2: [B, D] online predictions of views 1 and 2;
    z1, z2: [B, D] target projections of views 1 and 2 (gradients stopped here).

    With n(x) = x / ||x||, each view's prediction regresses the other view's target projection:
        L = mean_batch( ||n(p1) - n(sg(z2))||^2 + ||n(p2) - n(sg(z1))||^2 )
          = mean_batch( 2 - 2 cos(p1, z2) + 2 - 2 cos(p2, z1) )          in [0, 8]
    The two view orders are SUMMED, as the official code does (their average halves the
    gradient). Per-sample terms: DDP's gradient average over ranks gives the global mean.
    """
    def regression(p, z):                                         # [B]
        return (F.normalize(p, dim=1) - F.normalize(z.detach(), dim=1)).pow(2).sum(dim=1)
    return (regression(p1, z2) + regression(p2, z1)).mean()


# ------------------------------------------------------------------------------- training

@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "byol")  # processes, device, run directory (one run per folder), log, seed

    # data: two views per image
    views = ViewPipeline(byol_views(args), args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedules (the target's parameters do not require grad: not optimised)
    model = run.distribute(BYOL(args.arch, args.small_images, args.hidden_dim, args.proj_dim))
    optimizer = build_optimizer(param_groups(model, args.weight_decay), args)
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch

    # resume from the run directory's checkpoint (the target is part of the model), or start
    start_epoch, start_batch = run.restore(model, optimizer, unwrap(model).backbone)
    if args.preset:  # ImageNet: the official preset for the epoch budget
        run.print(args.preset)
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}; {args.warmup_epochs} warmup "
              f"epochs, cosine to 0); tau = {args.tau_base} "
              f"{'-> 1 (cosine)' if args.tau_schedule == 'cosine' else 'constant'}; "
              f"{run.steps_per_epoch} steps per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, ((x1, x2), labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr)
            tau = target_momentum(step, total_steps, args.tau_base, args.tau_schedule)
            set_lr(optimizer, lr)
            x = torch.cat(views.to_device([x1, x2], run.device, step))
            with autocast(args.precision, run.device):
                p1, p2, z1, z2 = model(*x.chunk(2))                    # views apart (BN per view)
            loss = byol_loss(p1.float(), p2.float(), z1.float(), z2.float())  # loss math in fp32
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            unwrap(model).update_target(tau)  # the EMA step comes AFTER the online update
            run.step_done(step, labels, torch.cat([z1, z2]), loss=loss, lr=lr, tau=tau)
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and the online backbone; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
