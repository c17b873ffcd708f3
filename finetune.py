"""Fine-tuning a pre-trained Vision Transformer end to end, MAE's and DeiT's way, and MAE's linear
probe; on one process, one node (torchrun) or a Slurm job (srun), and resumable, as every script.

He, Chen, Xie, Li, Dollár, Girshick, "Masked Autoencoders Are Scalable Vision Learners", CVPR
2022, arXiv 2111.06377; official code github.com/facebookresearch/mae (main_finetune.py,
main_linprobe.py), whose recipe is DeiT's (Touvron et al., ICML 2021, arXiv 2012.12877) plus
layer-wise lr decay (BEiT, arXiv 2106.08254).

- `--protocol finetune` (default): every weight trained, AdamW with layer-wise lr decay 0.65,
  stochastic depth 0.1, RandAugment (2 ops, magnitude 9), random erasing 0.25, mixup 0.8 /
  cutmix 1.0, label smoothing 0.1, 100 epochs, batch 1024, lr 5e-4 x batch/256, the mean of the
  patch tokens through a new LayerNorm: MAE's ViT-B/16 recipe (FINETUNE.md), 83.6% top-1 from
  MAE's 1600-epoch ViT-B. The same recipe fine-tunes DINO's, MoCo v3's and our other ViTs.
- `--protocol linear`: MAE's linear probe: the frozen backbone's class token through a BatchNorm
  without scale and shift into a linear head, LARS, lr 0.1 x batch/256, batch 16384, 90 epochs:
  68.0% (paper) / 67.8% (repository) for that ViT-B.

`--ckpt`: any ViT checkpoint linear_eval.py reads (ours, or a DINO, MoCo v3 or timm-keyed release;
common/weights.py). The run directory gets args.json, log.jsonl, checkpoint.pt (the fine-tuned
classifier; the same command resumes) and result.json: docs/evaluation.md.

    python finetune.py --ckpt runs/mae/<run>/backbone.pt --data cifar10
    torchrun --nproc_per_node=8 finetune.py --ckpt runs/mae/<run>/backbone.pt --data /imagenet
    sbatch --nodes=4 slurm/train.sbatch finetune.py --ckpt backbone.pt --data /imagenet --protocol linear
"""
import argparse
import contextlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from common.args import check_at_least, check_rates, default_run_dir, default_workers
from common.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, default_img_size, make_loader
from common.dist import get_rank, get_world_size, setup_distributed
from common.errors import UserError, exit_on_user_error
from common.evaluation import accuracy, add_system_args, dino_eval_transform
from common.knn import extract_features
from common.model import autocast, distribute, unwrap
from common.optim import LARS, param_groups, set_lr, warmup_cosine
from common.run import Run
from common.vit import add_stochastic_depth
from common.weights import load_backbone

# ------------------------------------------------------------------------------- arguments

# Fine-tuning, facebookresearch/mae at efb2a80: FINETUNE.md:113-124 (ViT-B/16: 100 epochs, batch
# 32 x 8 GPUs x 4 accumulation = 1024, blr 5e-4 x batch/256, layer decay 0.65, weight decay
# 0.05, drop path 0.1, reprob 0.25, mixup 0.8, cutmix 1.0); main_finetune.py: min lr 1e-6 (:73),
# 5 warmup epochs (:76), RandAugment rand-m9-mstd0.5-inc1 (:82), label smoothing 0.1 (:84),
# global pooling (:114-115). ViT-L/H take blr 1e-3, layer decay 0.75, drop path 0.2 / 0.3, 50
# epochs (FINETUNE.md:84-110); our widest is ViT-B. Images <= 64 px: ours (no published CIFAR
# recipe, solo-learn's has none either): the ViT-B recipe at batch 256.
FINETUNE = dict(epochs=100, batch_size=1024, lr=5e-4, min_lr=1e-6, warmup_epochs=5,
                weight_decay=0.05, layer_decay=0.65, drop_path=0.1, smoothing=0.1, mixup=0.8,
                cutmix=1.0, reprob=0.25, randaug_ops=2, randaug_magnitude=9, pool="avg")
FINETUNE_SMALL = dict(FINETUNE, batch_size=256)
# MAE's linear probe: FINETUNE.md:137-155 (batch 512 x 32 GPUs = 16384, blr 0.1, weight decay 0,
# 90 epochs, --cls_token) and main_linprobe.py: 10 warmup epochs (:66), min lr 0 (:63), crop +
# flip only (:132-136), BatchNorm without affine, eps 1e-6, before the head (:222), LARS (:252).
# Images <= 64 px: ours, linear_eval.py's small-image length and batch (SimCLR's CIFAR command).
LINEAR = dict(epochs=90, batch_size=16384, lr=0.1, min_lr=0.0, warmup_epochs=10,
              weight_decay=0.0, layer_decay=1.0, drop_path=0.0, smoothing=0.0, mixup=0.0,
              cutmix=0.0, reprob=0.0, randaug_ops=0, randaug_magnitude=0, pool="cls")
LINEAR_SMALL = dict(LINEAR, epochs=100, batch_size=512)
RECIPES = {("finetune", False): FINETUNE, ("finetune", True): FINETUNE_SMALL,
           ("linear", False): LINEAR, ("linear", True): LINEAR_SMALL}
# Head initialisation: truncated normal, std 2e-5 to fine-tune (main_finetune.py:257), 0.01 to
# probe (main_linprobe.py:218); bias 0 (timm's ViT init)
HEAD_STD = {"finetune": 2e-5, "linear": 0.01}
# timm's RandAugment fills what a rotation or shear uncovers with the mean colour (timm 0.3.2
# create_transform: img_mean); torchvision's would fill black
FILL = [round(255 * m) for m in IMAGENET_MEAN]
# timm's magnitudes count in tenths of each operation's range (its _LEVEL_DENOM): m9 is 9/10 of
# the way; torchvision's count in bins of linspace(0, range, bins): 11 bins make 9 mean the same
MAGNITUDE_LEVELS = 10


def get_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description="Fine-tune a pre-trained ViT, or "
                                "MAE's linear probe. Defaults in brackets: fine-tuning ImageNet "
                                "/ <= 64 px; linear probe ImageNet / <= 64 px. A flag given wins.")
    val = lambda k: "(" + " / ".join(str(RECIPES[key][k]) for key in RECIPES) + ")"
    g = p.add_argument_group("checkpoint and data")
    g.add_argument("--ckpt", required=True, help="a ViT's checkpoint.pt or backbone.pt (any "
                   "method; a run directory: its checkpoint.pt), or a DINO, MoCo v3 or "
                   "timm-keyed ViT release")
    g.add_argument("--vit-heads", type=int, help="attention heads, which no weight's shape shows "
                   "(default: as recorded, else as linear_eval.py infers them)")
    g.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or "
                   "cifar10, cifar100, stl10, synthetic")
    g.add_argument("--data-dir", default="data", help="where cifar10/cifar100/stl10 live (data)")
    g.add_argument("--img-size", type=int, help="default: the checkpoint's training size, else "
                   "32 for a patch-4 ViT, else by dataset (ImageFolder 224)")
    g.add_argument("--workers", type=int, default=default_workers(), help="loader processes per "
                   f"rank (default: this process's CPUs minus one, {default_workers()} here)")
    g.add_argument("--synthetic-size", type=int, default=512, help="train images of synthetic")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=["finetune", "linear"], default="finetune",
                   help="finetune: MAE's fine-tuning (main_finetune.py); linear: MAE's linear "
                        "probe (main_linprobe.py) (finetune)")
    g.add_argument("--pool", choices=["avg", "cls"], help="features: avg, the mean of the last "
                   "block's patch tokens through a new LayerNorm (MAE's --global_pool); cls, the "
                   "class token after the final LayerNorm (--cls_token) " + val("pool"))
    g.add_argument("--epochs", type=int, help="training epochs " + val("epochs"))
    g.add_argument("--batch-size", type=int, help="GLOBAL batch size " + val("batch_size"))
    g.add_argument("--lr", type=float, help="base lr, x batch/256 " + val("lr"))
    g.add_argument("--min-lr", type=float, help="lr at the end of the cosine, absolute "
                   + val("min_lr"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup from 0 "
                   + val("warmup_epochs"))
    g.add_argument("--weight-decay", type=float, help="AdamW's (LARS's) weight decay, none on "
                   "biases, norms, class token and position embedding " + val("weight_decay"))
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay: block i of n trains "
                   "at lr x decay^(n - i), the embeddings at decay^(n + 1), the head at lr "
                   + val("layer_decay"))
    g.add_argument("--drop-path", type=float, help="stochastic depth, rising linearly to this "
                   "rate in the last block " + val("drop_path"))
    g.add_argument("--smoothing", type=float, help="label smoothing " + val("smoothing"))
    g.add_argument("--mixup", type=float, help="mixup's Beta alpha, 0: off " + val("mixup"))
    g.add_argument("--cutmix", type=float, help="cutmix's Beta alpha, 0: off; with both, each "
                   "batch takes one of them at p 0.5 " + val("cutmix"))
    g.add_argument("--reprob", type=float, help="random erasing probability (per-pixel normal "
                   "values) " + val("reprob"))
    g.add_argument("--randaug-ops", type=int, help="RandAugment's operations per image, 0: off "
                   + val("randaug_ops"))
    g.add_argument("--randaug-magnitude", type=int, help="RandAugment's magnitude in tenths of "
                   "each operation's range, timm's scale (m9) " + val("randaug_magnitude"))
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate on the val split "
                   "every N epochs and report the best epoch beside the final one (0: final only; "
                   "MAE's scripts evaluate every epoch)")
    g.add_argument("--seed", type=int, default=0, help="seed of the head, order, augmentations (0)")
    add_system_args(p, "finetune", "run")
    args = p.parse_args(argv)
    check_at_least(args, img_size=1, workers=0, seed=0, log_every=1, stop_at_step=1)
    args.run_dir = args.run_dir or default_run_dir("finetune")
    return args


def resolve_recipe(args, small_images):
    """Fill the flags not given from the protocol's recipe for the image size; check them."""
    for key, value in RECIPES[args.protocol, small_images].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_at_least(args, epochs=1, batch_size=1)
    check_rates(args)
    if args.protocol == "linear" and (args.drop_path or args.mixup or args.cutmix or args.reprob
                                      or args.randaug_ops or args.smoothing):
        raise UserError("--protocol linear trains a head on a frozen backbone with crops and "
                        "flips only: no --drop-path, --mixup, --cutmix, --reprob, --randaug-ops "
                        "or --smoothing")
    if not 0 <= args.randaug_magnitude <= MAGNITUDE_LEVELS:
        raise UserError(f"--randaug-magnitude {args.randaug_magnitude}: from 0 to "
                        f"{MAGNITUDE_LEVELS}, in tenths of each operation's range")
    if min(args.mixup, args.cutmix, args.reprob, args.drop_path, args.smoothing) < 0:
        raise UserError("--mixup, --cutmix, --reprob, --drop-path and --smoothing must be >= 0")
    args.peak_lr = args.lr * args.batch_size / 256


# ------------------------------------------------------------------------------- augmentations

def train_transform(args):
    """Fine-tuning (timm's create_transform as main_finetune.py calls it, util/datasets.py:31-49):
    random resized crop (0.08, 1) bicubic, flip, RandAugment, normalisation, random erasing with
    per-pixel normal values (timm's 'pixel' mode). The probe: crop and flip only
    (main_linprobe.py:132-136). All torchvision's v2 transforms."""
    crop = [v2.RandomResizedCrop(args.img_size, scale=(0.08, 1.0),
                                 interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip()]
    if args.randaug_ops:
        crop.append(v2.RandAugment(args.randaug_ops, args.randaug_magnitude, MAGNITUDE_LEVELS + 1,
                                   interpolation=v2.InterpolationMode.BICUBIC, fill=FILL))
    erase = [v2.RandomErasing(args.reprob, scale=(0.02, 1 / 3), value="random")] if args.reprob else []
    return v2.Compose([*crop, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), *erase, v2.ToPureTensor()])


def batch_mixing(args, num_classes):
    """(images, labels) -> (images, soft targets [n, C]): mixup or cutmix (torchvision's v2; with
    both, one of the two at p 0.5 per batch, timm's Mixup with switch_prob 0.5 as
    main_finetune.py:222-225 builds it), then label smoothing: y (1 - eps) + eps / C."""
    ops = [op(alpha=alpha, num_classes=num_classes)
           for op, alpha in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if alpha > 0]
    mix = v2.RandomChoice(ops) if ops else None

    def apply(images, labels):
        if mix is None:
            targets = F.one_hot(labels, num_classes).float()
        else:
            images, targets = mix(images, labels)
        return images, targets * (1 - args.smoothing) + args.smoothing / num_classes
    return apply


@contextlib.contextmanager
def step_random_state(seed, step, device):
    """The step's random draws (mixup / cutmix, stochastic depth) from a seed of (--seed, step,
    rank), the global generators' states kept aside: a run resumed mid-epoch draws what an
    uninterrupted one draws (the global CPU generator's state there also depends on when the
    loader, re-created by the resume, drew its own seed)."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(((seed * 1_000_003 + step) * 10_007 + get_rank()) % 2**63)
        yield


# ------------------------------------------------------------------------------- model

class ViTClassifier(nn.Module):
    """A ViT and a linear head (models_vit.py:20-53). `pool` avg: the mean of the last block's
    patch tokens through `fc_norm`, a new LayerNorm, the final norm removed (:26-32, :46-48);
    cls: the class token after the final norm (:49-51). `probe`: MAE's linear probe, the
    backbone frozen (and in eval mode) and the head a BatchNorm without affine before the
    linear layer (main_linprobe.py:220-227)."""

    def __init__(self, backbone, num_classes, pool, probe):
        super().__init__()
        self.backbone, self.pool, self.probe = backbone, pool, probe
        width = backbone.hidden_dim
        if pool == "avg":  # frozen with the backbone in the probe (main_linprobe.py:224-227)
            self.fc_norm = nn.LayerNorm(width, eps=1e-6).requires_grad_(not probe)
            backbone.encoder.ln = nn.Identity()
        linear = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(linear.weight, std=HEAD_STD["linear" if probe else "finetune"])
        nn.init.zeros_(linear.bias)
        self.head = (nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), linear)
                     if probe else linear)
        backbone.requires_grad_(not probe)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.train(mode and not self.probe)
        return self

    def forward(self, images):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.probe):
            tokens = self.backbone.encoder.layers(self.backbone.embed(images))  # [N, 1+L, D]
            features = (self.fc_norm(tokens[:, 1:].mean(dim=1)) if self.pool == "avg"
                        else self.backbone.encoder.ln(tokens)[:, 0])          # [N, D]
        return self.head(features)


def layer_id(name, depth):
    """The layer of a parameter for the lr decay (util/lr_decay.py:64-76): 0 for the class
    token, position embedding and patch projection, i + 1 for block i, depth + 1 for the rest
    (final norm, fc_norm, head)."""
    if name in ("backbone.class_token", "backbone.encoder.pos_embedding") or name.startswith(
            "backbone.conv_proj."):
        return 0
    if name.startswith("backbone.encoder.layers.encoder_layer_"):
        return int(name.split(".")[3].rsplit("_", 1)[1]) + 1
    return depth + 1


def layer_decay_groups(model, weight_decay, layer_decay):
    """Parameter groups of layer-wise lr decay (util/lr_decay.py:15-61, after BEiT): a group per
    (layer, decayed or not), its `lr_scale` layer_decay ** (depth + 1 - layer), which set_lr
    multiplies in; weight decay on every parameter but the 1-D ones, the class token and the
    position embedding (timm's no_weight_decay, main_finetune.py:284)."""
    depth, groups = len(model.backbone.encoder.layers), {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        no_decay = param.ndim == 1 or name in ("backbone.class_token",
                                               "backbone.encoder.pos_embedding")
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - layer), "lars_exclude": no_decay})
        group["params"].append(param)
    return list(groups.values())


# ------------------------------------------------------------------------------- loss

def soft_target_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (timm's SoftTargetCrossEntropy, main_finetune.py:292):
        loss = -(1/n) sum_i sum_c y_ic log softmax(z_i)_c
    logits z: [n, C]; targets y: [n, C], each row summing to 1 (mixed, smoothed labels). With
    one-hot targets smoothed by eps, it is the label-smoothed cross-entropy."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


# ------------------------------------------------------------------------------- training

@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    device = setup_distributed()  # before the data: one rank downloads, the others wait
    backbone, source = load_backbone(args.ckpt, args.vit_heads)
    if not source["vit"]:
        raise UserError(f"--ckpt {args.ckpt}: a {source['arch']}; finetune.py fine-tunes ViTs "
                        f"(a ResNet: linear_eval.py --finetune)")
    args.ckpt, args.arch = source["path"], source["arch"]
    args.img_size = (args.img_size or source["train_args"].get("img_size")
                     or (32 if source["small_images"] else default_img_size(args.data)))
    if args.img_size % backbone.patch_size:
        raise UserError(f"--img-size {args.img_size}: not a multiple of {backbone.patch_size} px")
    args.small_images = args.img_size <= 64
    resolve_recipe(args, args.small_images)
    probe = args.protocol == "linear"

    # data: labelled train images augmented per sample (seeded by seed, epoch, image), val crops
    kw = dict(data_dir=args.data_dir, synthetic_size=args.synthetic_size, img_size=args.img_size)
    val_set = build_dataset(args.data, "val", dino_eval_transform(args.img_size), **kw)
    train_set = build_dataset(args.data, "train", train_transform(args), **kw)
    classes = list(val_set.classes)
    run = Run(args, "finetune")  # the run directory: one run per folder, its log
    train_set.bad_log = run.bad_log
    loader = make_loader(train_set, run.batch_per_rank, args.workers, seed=args.seed, seeded=True)
    if len(loader) == 0:
        raise UserError(f"{len(train_set)} train images < one batch of {args.batch_size}: lower --batch-size")
    run.steps_per_epoch = len(loader)
    mix = batch_mixing(args, len(classes))

    # model (stochastic depth added to torchvision's blocks), optimizer, schedule
    add_stochastic_depth(backbone, args.drop_path)
    model = distribute(ViTClassifier(backbone, len(classes), args.pool, probe), device,
                       get_world_size(), sync_bn="off", channels_last=args.channels_last)
    classifier = unwrap(model)
    if probe:  # LARS on the head (util/lars.py; its 1-D parameters neither decayed nor adapted)
        optimizer = LARS(param_groups(classifier.head, args.weight_decay), lr=0.0)
    else:  # AdamW, betas (0.9, 0.999) (main_finetune.py:287)
        optimizer = torch.optim.AdamW(layer_decay_groups(classifier, args.weight_decay,
                                                         args.layer_decay), lr=0.0)
    total_steps, warmup_steps = args.epochs * len(loader), args.warmup_epochs * len(loader)
    best = run.ckpt["best"] if run.ckpt else None  # the best epoch evaluated (--eval-every)
    start_epoch, _ = run.restore(model, optimizer, extra_state=lambda: {"best": best})
    run.print(f"{args.ckpt}: {source['description']}")
    run.print(f"{args.protocol} ({'MAE main_linprobe.py' if probe else 'MAE main_finetune.py'}"
              f", {'small-image recipe: ours' if args.img_size <= 64 else 'ImageNet recipe'}) on "
              f"{len(train_set)} images of {args.data} at {args.img_size} px, {len(classes)} "
              f"classes; lr = {args.lr:g} x {args.batch_size}/256 = {args.peak_lr:g} "
              f"({'LARS' if probe else f'AdamW, layer decay {args.layer_decay}'}, weight decay "
              f"{args.weight_decay}, {args.warmup_epochs} warmup epochs, cosine to "
              f"{args.min_lr:g}); {args.pool} features; {args.epochs} epochs x {len(loader)} "
              f"steps; {get_world_size()} process(es) on {device}")

    def evaluate():  # top-1, top-5 on the val split, sharded over the ranks
        classifier.eval()
        logits, labels = extract_features(classifier, val_set, run.batch_per_rank, args.workers,
                                          device, args.precision, normalize=False)
        return accuracy(logits, labels, 1), accuracy(logits, labels, 5)

    final = None
    for epoch in range(start_epoch, args.epochs):
        model.train()
        for i, (images, labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr, final=args.min_lr)
            set_lr(optimizer, lr)  # x each group's lr_scale (util/lr_sched.py:16-20)
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            if device.type == "cuda" and args.channels_last:
                images = images.to(memory_format=torch.channels_last)
            with step_random_state(args.seed, step, device):
                images, targets = mix(images, labels)
                with autocast(args.precision, device):
                    logits = model(images)
            loss = soft_target_cross_entropy(logits.float(), targets)  # loss math in fp32
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            run.step_done(step, loss=loss, lr=lr)
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        evaluated = {}
        if epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            final = evaluate()
            evaluated = {"val_top1": final[0], "val_top5": final[1]}
            if best is None or final[0] > best["top1"]:
                best = {"epoch": epoch + 1, "top1": final[0], "top5": final[1]}
        if run.end_epoch(**evaluated):  # True: a stop signal, saved
            return None

    top1, top5 = final or evaluate()  # evaluated again only if resumed after the last epoch
    result = {"ckpt": args.ckpt, "data": args.data, "protocol": args.protocol, "pool": args.pool,
              "train_images": len(train_set), "epochs": args.epochs,
              "batch_size": args.batch_size, "top1": top1, "top5": top5,
              "reported": "after the final epoch"}
    if args.eval_every:
        result.update(best_top1=best["top1"], best_top5=best["top5"], best_epoch=best["epoch"])
    if get_rank() == 0:
        for path in filter(None, [os.path.join(args.run_dir, "result.json"), args.out]):
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
    run.finish(f"top1 {top1:.2f} top5 {top5:.2f} -> {args.run_dir}/result.json")
    return result


if __name__ == "__main__":
    main()
