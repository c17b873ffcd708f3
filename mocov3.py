"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers.

Chen, Xie, He, ICCV 2021, arXiv 2104.02057. Official code (PyTorch): github.com/facebookresearch/moco-v3

A query encoder (backbone, projector, predictor) is trained to pick, among the keys of every image
of the global batch, the key a momentum encoder (a moving average of backbone and projector) gives
of another view of the same image; no queue, no memory bank. Both view orders are contrasted and
summed. On Vision Transformers, the paper's subject, the random patch projection is frozen, which
it finds to make training stable. The ViT recipes are MoCo v3's own (CONFIG.md: ViT-S/16 or
ViT-B/16, AdamW, batch 4096, 300 epochs: 73.2% / 76.7% linear top-1; MoCo v3's ViT-S has 12
heads). The default is the official main_moco.py's: ResNet-50 with LARS, 100 epochs, 68.9%; with
--epochs 300 or 1000 CONFIG.md's presets (72.8%, 74.6%). Images of 64 px or less switch to
solo-learn's CIFAR MoCo v3 recipe (ResNet-18 with a 3x3 stem, 1000 epochs: 93.10% on CIFAR-10).

    python mocov3.py --data synthetic --arch resnet18 --epochs 1          # CPU smoke run, 1-2 minutes
    python mocov3.py --data cifar10                                       # CIFAR recipe (solo-learn's)
    torchrun --nproc_per_node=8 mocov3.py --data /imagenet --arch vit_small --batch-size 1024
    sbatch --nodes=4 slurm/train.sbatch mocov3.py --data /imagenet --arch vit_small  # batch 4096

The method, its equations, every implementation detail with its source (deviations from the
official code included), the recipes and published results: docs/mocov3.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.args import (add_common_args, check_at_least, check_fractions, check_positive,
                         describe_lr, recipe_values, resolve_recipe)
from common.errors import UserError, exit_on_user_error
from common.augment import ViewPipeline, ssl_view
from common.model import VITS, autocast, build_backbone, is_vit, unwrap
from common.optim import build_optimizer, describe_optimizer, param_groups, set_lr, warmup_cosine
from common.dist import all_gather_tensor, get_rank
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# Sources, facebookresearch/moco-v3 at c349e6e. ResNet-50: CONFIG.md:13-19, the 100-epoch
# command, which keeps main_moco.py's defaults (:56 epochs 100, :60 batch 4096, :65 lr 0.6,
# :69 weight decay 1e-6, :99 momentum 0.99, :104 temperature 1.0, :112 LARS, :115 10 warmup
# epochs) and adds --moco-m-cos --crop-min=.2; the 300- and 1000-epoch commands (:27-33, :42-48)
# are the presets of `resnet50_preset`. Images <= 64 px: solo-learn's CIFAR config
# (vturrisi/solo-learn 9187ea3 scripts/pretrain/cifar/mocov3.yaml: ResNet-18, heads 4096 -> 256,
# T 0.2, tau 0.99 -> 1, LARS lr 0.3 x batch/256 (solo/args/pretrain.py:151-154), batch 256, wd
# 1e-6, 1000 epochs, 10 warmup epochs (solo/methods/base.py:293); its augmentations/asymmetric.yaml:
# crop (0.08, 1), no blur, solarize 0 / 0.2). Deviation: solo-learn's LARS has eta 0.02 with
# clipping (mocov3.yaml:38-41); we keep MoCo v3's (moco/optimizer.py: eta 0.001, no clipping), as
# the other scripts' solo-learn recipes do; `--lars-eta 0.02 --lars-clip` gives solo-learn's.
IMAGENET = dict(arch="resnet50", epochs=100, batch_size=4096, optimizer="lars", lr=0.6,
                weight_decay=1e-6, moco_momentum=0.99, temperature=1.0, warmup_epochs=10,
                crop_min=0.2, blur_probs=(1.0, 0.1))
SMALL_IMAGES = dict(arch="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3,
                    weight_decay=1e-6, moco_momentum=0.99, temperature=0.2, warmup_epochs=10,
                    crop_min=0.08, blur_probs=(0.0, 0.0))
# --arch vit_*: MoCo v3's ViT recipe, the same for ViT-S and ViT-B (CONFIG.md:108-117, :124-134,
# :155-164): AdamW, lr 1.5e-4 x batch/256, weight decay 0.1, 300 epochs, 40 warmup epochs,
# --stop-grad-conv1 (the frozen random patch projection), --moco-m-cos, T 0.2, crop (0.08, 1) by
# main_moco.py's default (:117); batch 4096, that of the published ViTs (CONFIG.md:183; the
# 1-node ViT-S command uses 1024). Images <= 64 px: ours (MoCo v3 has no CIFAR ViT recipe, nor
# does solo-learn): that optimizer with the CIFAR recipe's length, batch, temperature and views.
VIT = dict(recipe="ViT (MoCo v3's CONFIG.md, ViT-S/16 and ViT-B/16)", optimizer="adamw",
           epochs=300, lr=1.5e-4, weight_decay=0.1, warmup_epochs=40, temperature=0.2,
           crop_min=0.08, moco_momentum=0.99)
VIT_SMALL_IMAGES = dict(SMALL_IMAGES, recipe="ViT at <= 64 px (ours: MoCo v3's ViT optimizer, "
                        "solo-learn's CIFAR length and views)", optimizer="adamw", lr=1.5e-4,
                        weight_decay=0.1)
MOCOV3_VIT_HEADS = 12  # every MoCo v3 ViT, ViT-S included (vits.py:115-127; DeiT's ViT-S: 6)


def resnet50_preset(epochs):
    """lr, weight decay and momentum of CONFIG.md's ResNet-50 command for an epoch budget: 100
    (:13-19, main_moco.py's defaults), 300 (:27-33: lr 0.3) or 1000 (:42-48: lr 0.3, weight decay
    1.5e-6, momentum 0.996); another budget takes the next command up."""
    lr, weight_decay, momentum = ((0.6, 1e-6, 0.99) if epochs <= 100 else (0.3, 1e-6, 0.99)
                                  if epochs <= 300 else (0.3, 1.5e-6, 0.996))
    return dict(lr=lr, weight_decay=weight_decay, moco_momentum=momentum)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo v3 pre-training (Chen, Xie, He 2021). Recipe "
                                "values in brackets (ViT: the --arch vit_* recipe); with the "
                                "ImageNet recipe, --lr, --weight-decay and --moco-momentum follow "
                                "CONFIG.md's ResNet-50 command for --epochs (100, 300, 1000); a "
                                "flag given on the command line wins.")
    add_common_args(p, "mocov3", IMAGENET, SMALL_IMAGES)
    both = lambda key: f"{recipe_values(key, IMAGENET, SMALL_IMAGES)[:-1]}, ViT: {VIT[key]})"
    g = p.add_argument_group("MoCo v3")
    g.add_argument("--temperature", type=float, help="softmax temperature T; the loss is scaled "
                   "by 2T " + both("temperature"))
    g.add_argument("--moco-momentum", type=float, help="momentum encoder's m at step 0, rising "
                   "to 1 along a cosine (official: moco-m-cos; ResNet-50 1000 epochs: 0.996) "
                   + both("moco_momentum"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup " + both("warmup_epochs"))
    g.add_argument("--crop-min", type=float, help="smallest crop, as a fraction of the image area "
                   + both("crop_min"))
    g.add_argument("--blur-probs", type=float, nargs=2, metavar=("P1", "P2"),
                   help="Gaussian blur probability of view 1 and view 2 (solarize: 0 and 0.2) "
                        + recipe_values("blur_probs", IMAGENET, SMALL_IMAGES))
    g.add_argument("--hidden-dim", type=int, default=4096,
                   help="hidden width of the projector and the predictor (paper: 4096)")
    g.add_argument("--proj-dim", type=int, default=256, help="output dim of the projector and "
                   "the predictor (paper: 256)")
    g.add_argument("--vit-heads", type=int, default=MOCOV3_VIT_HEADS, help="attention heads of "
                   "a ViT (MoCo v3: 12 at every width, DeiT's and DINO's ViT-S: 6; default: 12)")
    g.add_argument("--stop-grad-conv1", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze a ViT's random patch projection (paper and CONFIG.md: on)")
    args = p.parse_args(argv)
    given = {k for k in ("lr", "weight_decay", "moco_momentum") if getattr(args, k) is not None}
    given |= {"lr"} if args.peak_lr is not None else set()  # --peak-lr sets the rate too
    args = resolve_recipe(args, IMAGENET, SMALL_IMAGES, "mocov3", (VIT, VIT_SMALL_IMAGES))
    check_positive(args, "temperature")
    check_fractions(args, "moco_momentum", "blur_probs")
    check_at_least(args, hidden_dim=1, proj_dim=1)
    # the recipe's source, printed at start (a ViT recipe's name says it; `preset`: a value
    # derived from the settings, which a resume does not compare)
    args.preset = ("solo-learn's CIFAR MoCo v3, scripts/pretrain/cifar/mocov3.yaml"
                   if args.recipe == "small-image" else None)
    if args.recipe == "ImageNet":
        preset = resnet50_preset(args.epochs)
        for key in preset.keys() - given:
            setattr(args, key, preset[key])
        args.peak_lr = args.lr * args.batch_size / 256  # the preset's lr is a base rate too
        args.preset = (f"moco-v3 CONFIG.md's ResNet-50 command for {args.epochs} epochs: "
                       + ", ".join(f"{k} {v}" for k, v in preset.items())
                       + (f" (given: {', '.join(sorted(given))})" if given else ""))
    if is_vit(args.arch) and (args.vit_heads < 1 or VITS[args.arch][0] % args.vit_heads):
        raise UserError(f"--vit-heads {args.vit_heads}: must divide {args.arch}'s width "
                        f"{VITS[args.arch][0]}")
    if not 0 < args.crop_min <= 1:
        raise UserError(f"--crop-min {args.crop_min}: a fraction of the image area, in (0, 1]")
    return args


# ------------------------------------------------------------------------------- augmentations

def mocov3_views(args):
    """BYOL's asymmetric views, as main_moco.py:261-285: crop (--crop-min, 1) + flip + colour
    jitter (0.4, 0.4, 0.2, 0.1) at p 0.8 + grayscale p 0.2, then blur (sigma 0.1-2) p 1.0 / 0.1
    and solarize p 0 / 0.2 for views 1 / 2 (small images: no blur, as solo-learn)."""
    return [ssl_view(args.img_size, scale=(args.crop_min, 1.0), jitter=(0.4, 0.4, 0.2, 0.1),
                     jitter_p=0.8, gray_p=0.2, blur_p=blur_p, solarize_p=solarize_p)
            for blur_p, solarize_p in zip(args.blur_probs, (0.0, 0.2))]


# ------------------------------------------------------------------------------- model

def mlp(widths, last_bn):
    """Linear layers without bias through `widths` (e.g. [384, 4096, 4096, 256]), each hidden one
    followed by BN and ReLU; the output by a BN without scale and shift if `last_bn` (SimCLR's
    design; builder.py:36-52). PyTorch's default Linear init, as the official heads."""
    layers = []
    for d_in, d_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-2], widths[-1], bias=False))
    if last_bn:
        layers.append(nn.BatchNorm1d(widths[-1], affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    """Base encoder (backbone, projector), predictor, and the momentum encoder: copies of
    backbone and projector (`momentum_backbone`, `momentum_projector`), updated by
    `momentum_update` only (builder.py:27-34). The heads are the official ones by backbone
    (builder.py:99-122): a ViT's projector has 3 layers and its predictor ends with the
    affine-free BN; a ResNet's projector has 2 and its predictor no last BN."""

    def __init__(self, arch, small_images, hidden_dim=4096, out_dim=256,
                 heads=MOCOV3_VIT_HEADS, stop_grad_conv1=True):
        super().__init__()
        # ResNet: zero-initialised last BN of each block (main_moco.py:186); ViT: MoCo v3's own
        # init with the frozen random patch projection (vits.py:25-51), 12 heads (:115-127)
        self.backbone = build_backbone(arch, small_images, zero_init_residual=True,
                                       vit_init="mocov3", heads=heads)
        vit = is_vit(arch)
        if vit and not stop_grad_conv1:  # --no-stop-grad-conv1: the patch projection trains
            self.backbone.conv_proj.requires_grad_(True)
        width = self.backbone.feature_dim
        self.projector = mlp([width] + [hidden_dim] * (2 if vit else 1) + [out_dim], last_bn=True)
        self.predictor = mlp([out_dim, hidden_dim, out_dim], last_bn=vit)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x1, x2):
        """Predictions q1, q2 [n, D] of the two views, one pass per view (BN statistics per
        view, builder.py:86-87)."""
        return [self.predictor(self.projector(self.backbone(x))) for x in (x1, x2)]

    @torch.no_grad()
    def momentum_update(self, m):
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter of backbone and projector
        (builder.py:57-61); the momentum encoder's BN statistics are its own forwards', as there.
        The frozen patch projection and position embedding are equal in both and stay so."""
        key = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        query = [*self.backbone.parameters(), *self.projector.parameters()]
        torch._foreach_lerp_(key, query, 1.0 - m)  # k += (1 - m)(q - k), all tensors at once

    @torch.no_grad()
    def keys(self, x1, x2):
        """The momentum encoder's keys k1, k2 [n, D] of the two views (builder.py:89-94)."""
        return [self.momentum_projector(self.momentum_backbone(x)) for x in (x1, x2)]


# ------------------------------------------------------------------------------- loss

def mocov3_loss(q1, q2, k1, k2, temperature):
    """MoCo v3's symmetric contrastive loss (builder.py:63-73, 96). q1, q2: [n, D] this process's
    predictions of views 1 and 2; k1, k2: [n, D] its momentum keys of the same views.

    The keys of every process are gathered (rank order), so a query's candidates are the N keys
    of the global batch and its positive, the other view of its own image, sits at row
    n * rank + i. With unit vectors q, k and T the temperature,
        L(q, k) = -(2T / n) sum_i log( exp(q_i . k_{n rank + i} / T) / sum_{j < N} exp(q_i . k_j / T) )
        loss = L(q1, k2) + L(q2, k1)
    The factor 2T (the official code's) cancels the 1/T that the logits put into the gradient.
    Keys get no gradient; DDP's average over processes makes each L the global batch mean.
    Works without torch.distributed (one process: rank 0, nothing gathered).
    """
    def contrastive(q, k):
        q = F.normalize(q, dim=1)                                     # [n, D]
        k = F.normalize(all_gather_tensor(k.detach()), dim=1)         # [N, D], no gradient
        logits = q @ k.T / temperature                                # [n, N]
        labels = torch.arange(len(q), device=q.device) + len(q) * get_rank()  # own images' keys
        return F.cross_entropy(logits, labels) * (2 * temperature)
    return contrastive(q1, k2) + contrastive(q2, k1)


# ------------------------------------------------------------------------------- training

def weight_decay_groups(model, optimizer, weight_decay):
    """The optimizer's parameter groups as the official code has them: LARS decays and adapts
    only the weights, not the 1-D parameters (moco/optimizer.py:27); AdamW (or SGD) decays EVERY
    parameter, biases and norms too (main_moco.py:229-230), where build_optimizer would keep
    1-D parameters out: a group flagged `lars_exclude` stays whole (common/optim.py)."""
    if optimizer == "lars":
        return param_groups(model, weight_decay)
    return [{"params": [p for p in model.parameters() if p.requires_grad],
             "weight_decay": weight_decay, "lars_exclude": False}]


@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "mocov3")  # processes, device, run directory (one run per folder), log, seed

    # data: two views per image, of different recipes
    views = ViewPipeline(mocov3_views(args), args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model (SyncBN over all GPUs, as main_moco.py:196), optimizer, schedules
    model = run.distribute(MoCoV3(args.arch, args.small_images, args.hidden_dim, args.proj_dim,
                                  args.vit_heads, args.stop_grad_conv1))
    mocov3 = unwrap(model)
    optimizer = build_optimizer(weight_decay_groups(model, args.optimizer, args.weight_decay), args)
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch

    # resume from the run directory's checkpoint (the momentum encoder is part of the model)
    start_epoch, start_batch = run.restore(model, optimizer, mocov3.backbone)
    if args.preset:
        run.print(f"recipe source: {args.preset}")
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}, weight decay {args.weight_decay:g}"
              f"{', not on 1-D parameters' if args.optimizer == 'lars' else ' on every parameter'};"
              f" {args.warmup_epochs} warmup epochs, cosine to 0); m = {args.moco_momentum} -> 1 "
              f"(cosine); T {args.temperature}; {run.steps_per_epoch} steps per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, ((x1, x2), labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            # per iteration, as main_moco.py:341-345: lr warmup then cosine, m cosine to 1
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr)
            m = warmup_cosine(step, total_steps, 0, args.moco_momentum, final=1.0)
            set_lr(optimizer, lr)
            x1, x2 = views.to_device([x1, x2], run.device, step)
            with autocast(args.precision, run.device):
                q1, q2 = model(x1, x2)                          # predictions, with gradient
                mocov3.momentum_update(m)                       # BEFORE the keys (builder.py:90)
                k1, k2 = mocov3.keys(x1, x2)                    # no gradient
            loss = mocov3_loss(q1.float(), q2.float(), k1.float(), k2.float(),
                               args.temperature)                # loss math in fp32
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            run.step_done(step, labels, torch.cat([q1, q2]), loss=loss, lr=lr, momentum=m)
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and backbone.pt; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
