"""DINO: Emerging Properties in Self-Supervised Vision Transformers (self-DIstillation, NO labels).

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, ICCV 2021, arXiv 2104.14294.
Official code (PyTorch): github.com/facebookresearch/dino

A student network (backbone, 3-layer MLP head, L2 normalisation, a weight-normalised last layer
of K = 65536 outputs) learns to match, by cross-entropy, the softmax a teacher network gives of
another view of the same image. The teacher is an exponential moving average of the student; its
outputs are centred (minus a running mean over the global batch) and sharpened (temperature 0.04
against the student's 0.1), which together avoid collapse. Only the 2 global crops go through
the teacher; every crop (2 global + 8 local) through the student; no crop is compared with
itself. The teacher is the model DINO keeps and evaluates. Defaults are the official
main_dino.py's (ViT-S/16, AdamW, batch 512 on 8 GPUs, 100 epochs: the README's vanilla run,
69.3% kNN and 74.0% linear top-1). --arch resnet50 takes the README's ResNet-50 command (SGD);
images of 64 px or less (CIFAR) take solo-learn's CIFAR DINO (ResNet-18, 2 crops of 32 px, LARS,
1000 epochs: 89.5% top-1 with solo-learn's online linear classifier).

    python dino.py --data synthetic --arch resnet18 --epochs 1        # CPU smoke run, 1-2 minutes
    python dino.py --data cifar10                                     # CIFAR-10 recipe
    torchrun --nproc_per_node=8 dino.py --data /imagenet              # ViT-S/16 recipe, one node
    sbatch slurm/train.sbatch dino.py --data /imagenet                # Slurm

The method, its equations, every implementation detail with its source (deviations from the
official code included), the recipes and published results: docs/dino.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.args import (add_common_args, check_at_least, check_fractions, check_positive,
                         describe_lr, resolve_recipe)
from common.errors import UserError, exit_on_user_error
from common.augment import ViewPipeline, ssl_view
from common.model import VIT_PATCH, autocast, build_backbone, features_by_resolution, is_vit, unwrap
from common.optim import build_optimizer, describe_optimizer, param_groups, set_lr, warmup_cosine
from common.dist import all_reduce_with_grad, get_world_size
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# ViT-S/16, the default: main_dino.py's defaults (facebookresearch/dino at 7c446df), which the
# README's vanilla run uses (README.md:163-166: 8 GPUs x 64 images, 100 epochs, 69.3% kNN, 74.0%
# linear): out_dim 65536 (:55), norm_last_layer (:57), teacher momentum 0.996 (:61), teacher
# temperature 0.04 without warmup (:68-75), weight decay 0.04 -> 0.4 (:82-86), clipping 3.0
# (:87), 64 images per GPU (:90), 100 epochs (:92), last layer frozen 1 epoch (:93), lr 5e-4 x
# batch/256 (:96, :239), 10 warmup epochs (:99), min lr 1e-6 (:101), AdamW (:103), drop path
# 0.1 (:105), global crops (0.4, 1) (:108), 8 local crops (0.05, 0.4) (:112-115), blur 1.0 /
# 0.1 / 0.5 and solarisation 0.2 on the second global crop (:434-456). The README's boosted run
# (73.3% / 76.0%, README.md:185-202) is --epochs 300 --teacher-temp 0.07
# --warmup-teacher-temp-epochs 30 --no-norm-last-layer at batch 1024 (16 GPUs).
IMAGENET = dict(arch="vit_small", epochs=100, batch_size=512, optimizer="adamw", lr=5e-4,
                min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                tau_base=0.996, teacher_temp=0.04, warmup_teacher_temp=0.04,
                warmup_teacher_temp_epochs=0, out_dim=65536, norm_last_layer=True, clip_grad=3.0,
                freeze_last_layer_epochs=1, drop_path=0.1, local_crops=8,
                global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                blur_probs=(1.0, 0.1, 0.5), solarize_prob=0.2)
# --arch resnet50 (any ResNet at 224 px): the README's ResNet-50 command (README.md:204-208:
# SGD, lr 0.03 x batch/256, weight decay 1e-4 constant, global crops (0.14, 1), local (0.05,
# 0.14)); the rest main_dino.py's defaults (no stochastic depth: main_dino.py:175-178).
RESNET = dict(IMAGENET, arch="resnet50", optimizer="sgd", lr=0.03, weight_decay=1e-4,
              weight_decay_end=1e-4, drop_path=0.0, global_crops_scale=(0.14, 1.0),
              local_crops_scale=(0.05, 0.14))
RESNET_RECIPE = "ImageNet, ResNet (the README's ResNet-50 command)"
# Images <= 64 px: solo-learn's CIFAR DINO (vturrisi/solo-learn at 9187ea3; the paper has none):
# scripts/pretrain/cifar/dino.yaml:16-24 (ResNet-18, head 2048 -> 256, 4096 outputs, teacher
# momentum 0.9995 -> 1), :31-42 (LARS, batch 256, lr 0.3 x batch/256, weight decay 1e-6,
# warmup-cosine), :51 (1000 epochs); solo/methods/dino.py:198-223 (no clipping, last layer
# frozen 1 epoch, norm_last_layer, teacher temperature 0.07 without warmup); base.py:291-293
# (10 warmup epochs, min lr 0); augmentations/asymmetric.yaml (two 32 px crops (0.08, 1), no
# blur, solarisation 0.2 on the second). Not solo-learn's: its LARS (eta 0.02, clipped: give
# --lars-eta 0.02 --lars-clip), we keep DINO's own (utils.py:557, eta 0.001, no clipping).
SMALL_IMAGES = dict(IMAGENET, arch="resnet18", epochs=1000, batch_size=256, optimizer="lars",
                    lr=0.3, min_lr=0.0, weight_decay=1e-6, weight_decay_end=1e-6, tau_base=0.9995,
                    teacher_temp=0.07, out_dim=4096, clip_grad=0.0, drop_path=0.0, local_crops=0,
                    global_crops_scale=(0.08, 1.0), blur_probs=(0.0, 0.0, 0.0))
# --arch vit_*: at 224 px the official recipe above (the README trains vit_base with the same
# defaults, README.md:174-181). Images <= 64 px: ours (no published CIFAR DINO ViT):
# main_dino.py's ViT optimizer with the CIFAR recipe's length, batch, head, momentum (0.9995 is
# also main_dino.py's advice at batch 256, :62-63) and views.
VIT = dict(recipe="ImageNet, ViT (main_dino.py's defaults)")
VIT_SMALL_IMAGES = dict(recipe="ViT at <= 64 px (ours: main_dino.py's ViT optimizer, the CIFAR "
                        "recipe's length, batch, head and views)", optimizer="adamw", lr=5e-4,
                        min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0,
                        drop_path=0.1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="DINO pre-training (Caron et al. 2021). Recipe "
                                "values in brackets: ViT-S/16 (the default; --arch vit_* at 224 "
                                "px), ResNet-50 (--arch resnet50: the README's SGD command, lr "
                                "0.03, wd 1e-4, crops 0.14-1 / 0.05-0.14), small images (<= 64 "
                                "px: solo-learn's CIFAR DINO). A flag given on the command line "
                                "wins.")
    add_common_args(p, "dino", IMAGENET, SMALL_IMAGES)
    val = lambda key: (f"(ViT-S/16: {IMAGENET[key]}, ResNet-50: {RESNET[key]}, small images: "
                       f"{SMALL_IMAGES[key]})")
    g = p.add_argument_group("DINO")
    g.add_argument("--out-dim", type=int, help="outputs K of the head's last layer " + val("out_dim"))
    g.add_argument("--hidden-dim", type=int, default=2048, help="width of the head's MLP (2048)")
    g.add_argument("--bottleneck-dim", type=int, default=256, help="the MLP's output, L2-normalised "
                   "before the last layer (256)")
    g.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, help="the last "
                   "layer's weight norm fixed at 1 (on); --no-norm-last-layer learns it: better "
                   "but less stable, the README's advice for ViT-S only " + val("norm_last_layer"))
    g.add_argument("--use-bn-in-head", action="store_true", help="BatchNorm after the head's "
                   "hidden layers (main_dino.py's --use_bn_in_head; off in every published run)")
    g.add_argument("--tau-base", type=float, help="teacher EMA momentum at step 0, rising to 1 "
                   "along a cosine (main_dino.py: 0.9995 for a batch of 256) " + val("tau_base"))
    g.add_argument("--teacher-temp", type=float, help="teacher temperature after its warmup (the "
                   "boosted run: 0.07; above 0.07 is unstable) " + val("teacher_temp"))
    g.add_argument("--warmup-teacher-temp", type=float, help="teacher temperature at epoch 0 "
                   + val("warmup_teacher_temp"))
    g.add_argument("--warmup-teacher-temp-epochs", type=int, help="epochs of the teacher "
                   "temperature's linear warmup (the boosted run: 30) "
                   + val("warmup_teacher_temp_epochs"))
    g.add_argument("--student-temp", type=float, default=0.1, help="student temperature (0.1)")
    g.add_argument("--center-momentum", type=float, default=0.9, help="EMA momentum of the centre "
                   "of the teacher's outputs (0.9)")
    g.add_argument("--weight-decay-end", type=float, help="weight decay at the end of its cosine "
                   "from --weight-decay (1-D parameters: never) " + val("weight_decay_end"))
    g.add_argument("--min-lr", type=float, help="lr at the end of the cosine, absolute "
                   + val("min_lr"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup " + val("warmup_epochs"))
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm of each student "
                   "parameter at this value, 0: no clipping " + val("clip_grad"))
    g.add_argument("--freeze-last-layer-epochs", type=float, help="epochs during which the "
                   "student's last layer gets no update " + val("freeze_last_layer_epochs"))
    g.add_argument("--drop-path", type=float, help="stochastic depth of the student's ViT blocks "
                   "(the teacher has none; ViTs only) " + val("drop_path"))
    g.add_argument("--local-crops", type=int, help="local crops per image, 0: two global crops "
                   "only " + val("local_crops"))
    g.add_argument("--global-crops-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area fraction of the 2 global crops (--img-size px) "
                   + val("global_crops_scale"))
    g.add_argument("--local-crops-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area fraction of the local crops " + val("local_crops_scale"))
    g.add_argument("--local-crop-size", type=int, help="local crop size in px (96 at 224 px; "
                   "default 96/224 of --img-size, a whole number of ViT patches)")
    g.add_argument("--blur-probs", type=float, nargs=3, metavar=("G1", "G2", "L"), help="Gaussian "
                   "blur probability of global crop 1, global crop 2, local crops "
                   + val("blur_probs"))
    g.add_argument("--solarize-prob", type=float, help="solarisation probability of global crop 2 "
                   + val("solarize_prob"))
    args = p.parse_args(argv)
    resnet = args.arch is not None and not is_vit(args.arch)
    args = resolve_recipe(args, RESNET if resnet else IMAGENET, SMALL_IMAGES, "dino",
                          (VIT, VIT_SMALL_IMAGES))
    if args.recipe == "ImageNet":  # resolve_recipe's name for the 224 px recipe, ViT or ResNet
        args.recipe = RESNET_RECIPE if resnet else VIT["recipe"]
    patch = VIT_PATCH[args.small_images][0] if is_vit(args.arch) else 1
    if args.local_crop_size is None:
        args.local_crop_size = max(patch, round(args.img_size * 96 / 224 / patch) * patch)
    check(args, patch)
    return args


def check(args, patch):
    """One line for a setting the method cannot run with (`patch`: a ViT's patch size, else 1)."""
    if args.img_size % patch or args.local_crop_size % patch:
        raise UserError(f"--img-size {args.img_size} and --local-crop-size {args.local_crop_size}"
                        f": a ViT needs multiples of its {patch} px patches")
    check_positive(args, "teacher_temp", "warmup_teacher_temp", "student_temp")
    check_fractions(args, "tau_base", "center_momentum", "blur_probs", "solarize_prob")
    for flag, (lo, hi) in (("--global-crops-scale", args.global_crops_scale),
                           ("--local-crops-scale", args.local_crops_scale)):
        if not 0 < lo <= hi <= 1:
            raise UserError(f"{flag} {lo} {hi}: needs 0 < MIN <= MAX <= 1")
    check_at_least(args, local_crops=0, clip_grad=0, out_dim=1, hidden_dim=1, bottleneck_dim=1,
                   warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0)
    if args.drop_path and not is_vit(args.arch):
        raise UserError(f"--drop-path {args.drop_path}: stochastic depth is for ViTs, not "
                        f"{args.arch}")


# ------------------------------------------------------------------------------- augmentations

def dino_views(args):
    """DINO's crops (main_dino.py:419-464): every crop bicubically resized, flipped, colour
    jittered (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2; global crop 1 blurred with p 1.0,
    global crop 2 with p 0.1 and solarised with p 0.2, the local crops blurred with p 0.5
    (radius ~ U(0.1, 2), PIL's filter as utils.py:36-54). Small images: no blur."""
    colour = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, interpolation="bicubic")
    blur_1, blur_2, blur_local = args.blur_probs
    local = ssl_view(args.local_crop_size, args.local_crops_scale, blur_p=blur_local, **colour)
    return [ssl_view(args.img_size, args.global_crops_scale, blur_p=blur_1, **colour),
            ssl_view(args.img_size, args.global_crops_scale, blur_p=blur_2,
                     solarize_p=args.solarize_prob, **colour),
            *[local] * args.local_crops]


# ------------------------------------------------------------------------------- model

class WeightNormLinear(nn.Module):
    """A bias-free linear layer whose rows are v_k / ||v_k|| times g_k: torch's
    weight_norm(nn.Linear(in, out, bias=False)) as DINO's head uses it (vision_transformer.py:276),
    with its parameter names (`weight_g` [out, 1], `weight_v` [out, in]). g starts at 1 (:277)
    and, with `fixed_norm` (norm_last_layer), never trains (:278-279): the outputs are then
    cosines of the normalised input with every row. v keeps nn.Linear's default initialisation:
    DINO creates the layer after its trunc-normal init (:275-276)."""

    def __init__(self, in_dim, out_dim, fixed_norm=True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear.reset_parameters
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    def forward(self, x):
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class Head(nn.Module):
    """DINO's head (vision_transformer.py:257-291, 3 layers): Linear-GELU-Linear-GELU-Linear to
    the bottleneck (with `use_bn`, a BatchNorm after each hidden Linear), truncated-normal
    weights (std 0.02), zero biases; L2 normalisation; the weight-normalised last layer."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True,
                 use_bn=False):
        super().__init__()
        bn = lambda: [nn.BatchNorm1d(hidden_dim)] if use_bn else []
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), *bn(), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), *bn(), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, features):
        return self.last_layer(F.normalize(self.mlp(features), dim=1))


class DINO(nn.Module):
    """Student (`student_backbone`, `student_head`, with stochastic depth in a ViT) and teacher
    (`backbone`, `head`: the model DINO keeps and evaluates, so it holds the plain names that
    backbone.pt and linear_eval.py read), and `center`, the running mean of the teacher's
    outputs (a buffer: saved with the model, resumed with it)."""

    def __init__(self, arch, small_images, out_dim, hidden_dim=2048, bottleneck_dim=256,
                 norm_last_layer=True, drop_path=0.0, use_bn_in_head=False):
        super().__init__()
        # main_dino.py:176 builds torchvision's ResNet as it is (no zero-init residual)
        self.student_backbone = build_backbone(arch, small_images, zero_init_residual=False)
        if is_vit(arch):  # DINO's ViT initialisation (common/vit.py, imported for ViTs only)
            from common.vit import add_stochastic_depth, dino_vit_init
            dino_vit_init(self.student_backbone)
        self.student_head = Head(self.student_backbone.feature_dim, out_dim, hidden_dim,
                                 bottleneck_dim, norm_last_layer, use_bn_in_head)
        # the teacher starts as the student (main_dino.py:207-208), gets no gradients (:209-211)
        # and no stochastic depth (:166)
        self.backbone = copy.deepcopy(self.student_backbone).requires_grad_(False)
        self.head = copy.deepcopy(self.student_head).requires_grad_(False)
        if is_vit(arch) and drop_path:
            add_stochastic_depth(self.student_backbone, drop_path)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, crops):
        """crops: the 2 global crops, then the local ones, each [n, 3, h, w]. Crops of one size
        share a backbone pass (utils.py:594-629). Returns the student's outputs for every crop
        [V*n, K] and the teacher's for the 2 global crops only [2n, K], crop-major."""
        with torch.no_grad():  # only the 2 global views pass through the teacher (:318)
            teacher = self.head(features_by_resolution(self.backbone, crops[:2]))
        student = self.student_head(features_by_resolution(self.student_backbone, crops))
        return student, teacher

    @torch.no_grad()
    def update_teacher(self, tau):
        """teacher <- tau * teacher + (1 - tau) * student, parameters only (main_dino.py:347-350):
        a ResNet teacher keeps the BN statistics of its own forward passes."""
        student = [*self.student_backbone.parameters(), *self.student_head.parameters()]
        teacher = [*self.backbone.parameters(), *self.head.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - tau)


# ------------------------------------------------------------------------------- loss

def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """DINO's loss (main_dino.py:380-404). student_out: [V*n, K], the V crops of n images
    (crop-major, the 2 global crops first); teacher_out: [2n, K], the 2 global crops; center:
    [1, K]. With P_t = softmax((teacher_t - c) / tau_t), no gradient (centring and sharpening),
    and P_s = softmax(student_s / tau_s):
        L = 1 / (2 (V - 1)) sum_{t in {0, 1}} sum_{s != t} mean_n( -sum_k P_t,k log P_s,k )
    a crop is never compared with itself. Per sample: DDP's gradient average gives the gradient
    of the global batch's loss. Also returns the teacher's mean entropy H(P_t), a collapse
    monitor (0: one output takes all; ln K: uniform); mean KL(P_t || P_s) = L - H(P_t).
    """
    n = teacher_out.shape[0] // 2
    crops = student_out.shape[0] // n
    teacher_log_p = F.log_softmax((teacher_out - center) / teacher_temp, dim=1).detach()  # [2n, K]
    teacher_p = teacher_log_p.exp()
    student_log_p = F.log_softmax(student_out / student_temp, dim=1)                     # [V*n, K]
    loss = 0.0
    for t in range(2):
        for s in range(crops):
            if s != t:
                cross_entropy = -(teacher_p[t * n:(t + 1) * n]
                                  * student_log_p[s * n:(s + 1) * n]).sum(dim=1)         # [n]
                loss = loss + cross_entropy.mean()
    entropy = -(teacher_p * teacher_log_p).sum(dim=1).mean()
    return loss / (2 * (crops - 1)), entropy


@torch.no_grad()
def next_center(teacher_out, center, momentum):
    """c <- m c + (1 - m) mean(teacher outputs of the GLOBAL batch), main_dino.py:406-416:
    the sum of this process's [2n, K] outputs is all-reduced over the processes and divided by
    their total count. Returns the new centre [1, K]."""
    total = all_reduce_with_grad(teacher_out.sum(dim=0, keepdim=True))  # [1, K], every process
    return center * momentum + total / (teacher_out.shape[0] * get_world_size()) * (1 - momentum)


def teacher_temperature(epoch, warmup_temp, temp, warmup_epochs):
    """The teacher temperature of `epoch`, main_dino.py:374-378: np.linspace(warmup_temp, temp,
    warmup_epochs) over the first warmup_epochs epochs (it reaches `temp` at the last of them),
    then `temp`."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:  # np.linspace(a, b, 1) is [a]
        return warmup_temp
    if epoch == warmup_epochs - 1:  # np.linspace's last point is b exactly
        return temp
    return epoch * ((temp - warmup_temp) / (warmup_epochs - 1)) + warmup_temp  # np.linspace's


# ------------------------------------------------------------------------------- training

@torch.no_grad()
def clip_per_parameter(parameters, max_norm):
    """Scale each parameter's gradient to norm <= max_norm on its own, not the global norm
    (utils.py:132-141: clip / (norm + 1e-6), applied when below 1); no host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))
        torch._foreach_mul_(grads, (max_norm / (norms + 1e-6)).clamp(max=1.0).unbind(0))


@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "dino")  # processes, device, run directory (one run per folder), log, seed

    # data: 2 global crops and --local-crops local ones of each image
    views = ViewPipeline(dino_views(args), args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedules (the teacher's parameters do not require grad: not optimised)
    model = run.distribute(DINO(args.arch, args.small_images, args.out_dim, args.hidden_dim,
                                args.bottleneck_dim, args.norm_last_layer, args.drop_path,
                                args.use_bn_in_head))
    dino = unwrap(model)
    optimizer = build_optimizer(param_groups(model, args.weight_decay), args)
    student = [p for p in model.parameters() if p.requires_grad]
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch
    freeze_steps = round(args.freeze_last_layer_epochs * run.steps_per_epoch)
    ln_k = math.log(args.out_dim)  # the entropy of a uniform teacher
    run.watch_collapse("teacher_entropy", low=0.05 * ln_k, high=ln_k - 0.05,
                       why=f"healthy from 5% of ln K to 0.05 nats under ln K = ln {args.out_dim} "
                           f"= {ln_k:.4g}: near 0 one output takes all, near ln K the teacher is "
                           f"uniform")

    # resume from the run directory's checkpoint (teacher and centre are part of the model);
    # the kNN monitor, --probe and backbone.pt read the TEACHER's backbone, as DINO evaluates it
    start_epoch, start_batch = run.restore(model, optimizer, dino.backbone)
    teacher_temp = (f"{args.warmup_teacher_temp:g} -> {args.teacher_temp:g} over "
                    f"{args.warmup_teacher_temp_epochs} epochs" if args.warmup_teacher_temp_epochs
                    else f"{args.teacher_temp:g}, no warmup")
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}; {args.warmup_epochs} warmup "
              f"epochs, cosine to {args.min_lr:g}); weight decay {args.weight_decay:g} -> "
              f"{args.weight_decay_end:g}; tau {args.tau_base} -> 1; teacher temperature "
              f"{teacher_temp}; crops 2 x {args.img_size} + "
              f"{args.local_crops} x {args.local_crop_size} px; last layer frozen for "
              f"{freeze_steps} steps; {run.steps_per_epoch} steps per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        teacher_temp = teacher_temperature(epoch, args.warmup_teacher_temp, args.teacher_temp,
                                           args.warmup_teacher_temp_epochs)
        for i, (crops, labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr, final=args.min_lr)
            wd = warmup_cosine(step, total_steps, 0, args.weight_decay, final=args.weight_decay_end)
            tau = warmup_cosine(step, total_steps, 0, args.tau_base, final=1.0)
            set_lr(optimizer, lr)
            for group in optimizer.param_groups:  # the weights' decay; 1-D parameters keep 0
                group["weight_decay"] = 0.0 if group["lars_exclude"] else wd
            crops = views.to_device(crops, run.device, step)           # V x [n, 3, h, w]
            with autocast(args.precision, run.device):
                student_out, teacher_out = model(crops)
            student_out, teacher_out = student_out.float(), teacher_out.float()  # loss in fp32
            loss, entropy = dino_loss(student_out, teacher_out, dino.center, args.student_temp,
                                      teacher_temp)
            dino.center.copy_(next_center(teacher_out, dino.center, args.center_momentum))
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
            if args.clip_grad:
                clip_per_parameter(student, args.clip_grad)
            if step < freeze_steps:  # the STUDENT's last layer: no update (utils.py:144-149)
                for p in dino.student_head.last_layer.parameters():
                    p.grad = None
            run.scaler.step(optimizer)
            run.scaler.update()
            dino.update_teacher(tau)  # the EMA step comes AFTER the student's update
            run.step_done(step, labels, loss=loss, teacher_entropy=entropy,
                          kl=loss.detach() - entropy, lr=lr, weight_decay=wd, tau=tau,
                          teacher_temp=teacher_temp, last_layer_frozen=step < freeze_steps)
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and the teacher's backbone; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
