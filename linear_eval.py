"""Evaluation of a pre-trained backbone: linear probe, semi-supervised fine-tuning, kNN; on one
process, one node (torchrun) or a Slurm job (srun), and resumable, as the training scripts.

- linear (default): the backbone frozen in eval mode (BN keeps its running statistics), a linear
  head on its pooled features (a ViT's: the class token, or DINO's with `--vit-features dino`)
  trained with SGD (momentum 0.9, no weight decay, cosine, lr 0.1 x batch/256, a ViT's 3; ImageNet
  90 epochs, batch 1024; <= 64 px 100, 512) on random-resized crops and flips; val centre crops.
- `--cached-features`: centre-crop features extracted once, the head trained in seconds.
- `--finetune`: semi-supervised: backbone and head trained together on 1% or 10% of the labels
  (`--train-percent`, or a published list `--train-subset`), with VICReg's, Barlow Twins' or
  SimCLR's recipe (`--recipe`).
- `--knn`: weighted kNN top-1 (cosine, T=0.07; Wu et al. 2018) at k = 10, 20, 100, 200 (DINO's
  eval_knn.py), from one feature pass; `--eval-only HEAD`:
  top-1/top-5 with a saved `linear_head.pt` (or DINO's or MoCo v3's released head), no training.

`--ckpt`: any cleanssl checkpoint.pt or backbone.pt (ResNet, ResNeXt or ViT), or an official
MoCo v1/v2/v3, SimSiam, SwAV, Barlow Twins, VICReg or DINO release (common/weights.py), never
unpickling code. The run directory gets args.json, log.jsonl, checkpoint.pt (the same command
resumes), linear_head.pt, result.json and, fine-tuned, backbone.pt: docs/evaluation.md.

    python linear_eval.py --ckpt runs/simclr/<run>/checkpoint.pt --data cifar10
    torchrun --nproc_per_node=8 linear_eval.py --ckpt runs/byol/<run>/checkpoint.pt --data /imagenet
    sbatch slurm/train.sbatch linear_eval.py --ckpt runs/byol/<run>/backbone.pt --data /imagenet
    python linear_eval.py --ckpt moco_v2_800ep_pretrain.pth.tar --data /imagenet     # an official release
    python linear_eval.py --ckpt backbone.pt --data cifar10 --knn
"""
import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from common.args import check_at_least, check_rates, default_run_dir, default_workers, save_args
from common.checkpoint import export_backbone
from common.data import build_dataset, default_img_size, eval_transform, make_loader
from common.dist import all_gather_tensor, get_rank, get_world_size, setup_distributed
from common.errors import UserError, exit_on_user_error
from common.evaluation import (DinoLinearFeatures, accuracy, add_system_args, dino_eval_transform,
                               head_layer, labelled_subset, linear_train_transform, read_head,
                               save_head)
from common.knn import extract_features, knn_predict
from common.model import autocast, distribute, is_vit, unwrap
from common.optim import warmup_cosine
from common.run import Run
from common.weights import load_backbone

# ------------------------------------------------------------------------------- arguments

# Linear protocol: MoCo v3's main_lincls.py (SGD momentum 0.9, lr 0.1 x batch/256, batch 1024,
# 90 epochs, cosine, no decay; the official SimCLR command: the same at batch 4096 with weight
# decay 1e-6) and, for images <= 64 px, the official SimCLR CIFAR-10 command (100 epochs, 512).
LINEAR = dict(epochs=90, batch_size=1024, lr=0.1, lr_backbone=0.0, weight_decay=0.0,
              nesterov=False)
LINEAR_SMALL = dict(LINEAR, epochs=100, batch_size=512)
# Semi-supervised fine-tuning, per recipe and fraction of the labels. Base learning rates, x
# batch/256 as everywhere here: at the official batch of 256 they are the official values.
EVALUATE_PY = dict(batch_size=256, epochs=20, weight_decay=0.0, nesterov=False)
SIMCLR_B5 = dict(batch_size=4096, lr=0.05, lr_backbone=0.05, weight_decay=0.0, nesterov=True)
FINETUNE = {
    # facebookresearch/vicreg README, evaluate.py (SGD momentum 0.9, cosine): 1% and 10%
    "vicreg": {1: dict(EVALUATE_PY, lr=0.08, lr_backbone=0.03),
               10: dict(EVALUATE_PY, lr=0.1, lr_backbone=0.01)},
    # facebookresearch/barlowtwins README, evaluate.py: the 1% command (the only one published)
    "barlow": {1: dict(EVALUATE_PY, lr=0.5, lr_backbone=0.005)},
    # SimCLR paper, appendix B.5: Nesterov momentum 0.9, batch 4096, lr 0.05 x batch/256 for
    # all weights, no warmup, no weight decay; 60 epochs on 1% of the labels, 30 on 10%
    "simclr": {1: dict(SIMCLR_B5, epochs=60), 10: dict(SIMCLR_B5, epochs=30)},
}


def get_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description="Linear probe, semi-supervised "
                                "fine-tuning, kNN or evaluation-only of a pre-trained backbone.")
    g = p.add_argument_group("checkpoint and data")
    g.add_argument("--ckpt", required=True, help="checkpoint.pt or backbone.pt of any cleanssl "
                   "method (a run directory: its checkpoint.pt), or an official release: a MoCo "
                   "v1/v2, SimSiam, SwAV, Barlow Twins or VICReg ResNet, a MoCo v3 ResNet or ViT "
                   "(its pre-training, linear or DeiT-converted file), a DINO ViT or ResNet (e.g. "
                   "moco_v2_800ep_pretrain.pth.tar, vit-s-300ep.pth.tar, "
                   "dino_deitsmall8_pretrain.pth)")
    g.add_argument("--vit-heads", type=int, help="a ViT's attention heads, which no weight's "
                   "shape shows (default: as recorded, or 12 for a MoCo v3 ViT, known by its "
                   "layout or sin-cos position embedding, else DeiT's 3 / 6 / 12 for ViT-Ti/S/B)")
    g.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or "
                   "cifar10, cifar100, stl10, synthetic")
    g.add_argument("--data-dir", default="data", help="where cifar10/cifar100/stl10 live (data)")
    g.add_argument("--img-size", type=int, default=None,
                   help="default: the checkpoint's training size, else 32 for a small-image "
                   "(3x3) stem, else by dataset (ImageFolder 224, CIFAR 32, STL-10 96)")
    subset = g.add_mutually_exclusive_group()
    subset.add_argument("--train-percent", type=float, help="train on a class-balanced, seeded "
                        "PERCENT of the labelled train images (as the published 1%%/10%% ImageNet "
                        "lists: the same count of every class, one more for some)")
    subset.add_argument("--train-subset", metavar="FILE", help="train on the images this file "
                        "lists, one file name per line (the published lists, e.g. "
                        "google-research/simclr imagenet_subsets/1percent.txt) or class/file name")
    g.add_argument("--subset-seed", type=int, default=0, help="seed of --train-percent's draw (0)")
    g.add_argument("--workers", type=int, default=default_workers(), help="loader processes per "
                   "rank (default: this process's share of the CPUs minus one, "
                   f"{default_workers()} here)")
    g.add_argument("--synthetic-size", type=int, default=512, help="train images of --data "
                   "synthetic, as in pre-training (512)")
    g = p.add_argument_group("protocol (default: linear probe of the frozen backbone)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--cached-features", action="store_true", help="train the head on features "
                      "of centre crops extracted once: seconds, not the standard protocol")
    mode.add_argument("--finetune", action="store_true", help="semi-supervised protocol: train "
                      "backbone and head, BN in train mode (synchronised across GPUs)")
    mode.add_argument("--knn", action="store_true", help="weighted-kNN top-1 instead of a head")
    mode.add_argument("--eval-only", metavar="HEAD", help="evaluate the backbone with this saved "
                      "linear_head.pt, or an official head (DINO's *_linearweights.pth, MoCo v3's "
                      "linear-*.pth.tar), on the val split; no training")
    g.add_argument("--recipe", choices=sorted(FINETUNE), default="vicreg", help="--finetune "
                   "recipe, for the nearest of 1%% and 10%% of the labels (vicreg): VICReg's or "
                   "Barlow Twins' evaluate.py command, or SimCLR's appendix B.5 (their values: "
                   "docs/evaluation.md)")
    g.add_argument("--vit-features", choices=["cls", "dino"], help="a ViT's "
                   "features: cls, the final class token (MoCo v3's probe, lr 3); dino, DINO's "
                   "probe's: class tokens of 4 blocks (ViT-B: 1 + mean patch), lr 0.001, val "
                   "resized bicubically (cls; --eval-only: the head's)")
    g.add_argument("--knn-k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbours "
                   "of --knn, each voting on the same features (DINO's eval_knn.py: 10 20 100 "
                   "200); the last one's top-1 is knn_top1 (200: Wu et al.'s, the kNN monitor's)")
    g.add_argument("--knn-temperature", type=float, default=0.07, help="vote temperature (0.07)")
    g = p.add_argument_group("optimisation (defaults: linear ImageNet / images <= 64 px / the "
                             "--finetune recipe)")
    g.add_argument("--epochs", type=int, help="training epochs (90 / 100 / recipe)")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch size (1024 / 512 / recipe)")
    g.add_argument("--lr", type=float, help="base lr of the head, x batch/256 (0.1 / 0.1 / recipe)")
    g.add_argument("--lr-backbone", type=float, help="--finetune: base lr of the backbone, x "
                   "batch/256 (recipe)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov momentum (off; on in the simclr recipe)")
    g.add_argument("--weight-decay", type=float, help="weight decay (0)")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate on the val split "
                   "every N epochs and report the best epoch beside the final one (0: final only)")
    g.add_argument("--seed", type=int, default=0, help="seed of the head and the data order (0)")
    add_system_args(p, "linear_eval", "evaluation")
    args = p.parse_args(argv)
    if args.train_percent is not None and not 0 < args.train_percent <= 100:
        raise UserError(f"--train-percent {args.train_percent}: must be in (0, 100]")
    check_at_least(args, img_size=1, workers=0, seed=0, log_every=1, stop_at_step=1, eval_every=0,
                   knn_k=1)
    check_rates(args)  # those given, before any data is read; again once the protocol fills them
    args.run_dir = args.run_dir or default_run_dir("linear_eval")
    return args


def resolve_protocol(args, labelled_percent):
    """Fill the flags not given from the linear protocol or the fine-tuning recipe (by the
    fraction of labels trained on); returns the name of what was used."""
    if args.finetune:
        table = FINETUNE[args.recipe]
        fraction = min(table, key=lambda f: abs(math.log(f / labelled_percent)))
        recipe, name = table[fraction], f"{args.recipe}'s {fraction}% recipe"
    else:
        recipe = LINEAR_SMALL if args.img_size <= 64 else LINEAR
        # a ViT's head: MoCo v3's main_lincls.py command for ViTs (CONFIG.md: --lr=3), or with
        # DINO's features DINO's eval_linear.py defaults (lr 0.001, 100 epochs; :265-269)
        vit_recipe, vit_name = ((dict(lr=0.001, epochs=100), ", DINO's ViT features: lr 0.001")
                                if args.vit_features == "dino" else (dict(lr=3.0), ", ViT: lr 3"))
        # a ViT by its weights (main), so that DINO's patch-8 "vit_small/8" is one too
        vit = args.vit if getattr(args, "vit", None) is not None else is_vit(args.arch)
        recipe = dict(recipe, **vit_recipe) if vit else recipe
        name = (f"linear protocol ({'images <= 64 px' if args.img_size <= 64 else 'ImageNet'}"
                f"{vit_name if vit else ''})")
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_at_least(args, epochs=1, batch_size=1)
    check_rates(args)
    return name


# ------------------------------------------------------------------------------- model

class Classifier(nn.Module):
    """A linear head on the backbone's pooled features. Unless fine-tuned, the backbone is
    frozen: no gradients, and in eval mode whatever `train()` says (BN normalises with the
    running statistics of pre-training, which never change)."""

    def __init__(self, backbone, num_classes, finetune):
        super().__init__()
        self.backbone, self.finetune = backbone.requires_grad_(finetune), finetune
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)  # as the official evaluation scripts
        nn.init.zeros_(self.head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.train(mode and self.finetune)
        return self

    def forward(self, x, features_given=False):
        if features_given:  # --cached-features: x holds the backbone's features
            return self.head(x)
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            features = self.backbone(x)
        return self.head(features)


# ------------------------------------------------------------------------------- evaluation

@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    device = setup_distributed()  # before the data: one rank downloads, the others wait
    backbone, source = load_backbone(args.ckpt, args.vit_heads)
    args.ckpt, args.arch, args.small_images, args.vit = (source["path"], source["arch"],
                                                         source["small_images"], source["vit"])
    head_file = read_head(args.eval_only) if args.eval_only else {}
    args.vit_features = (args.vit_features or (head_file.get("vit_features") if args.vit else None)
                         or "cls")  # --eval-only: a ViT's features are its head's
    backbone = DinoLinearFeatures(backbone) if args.vit_features == "dino" else backbone
    # the val (and feature) transform: DINO's resizes bicubically (common/evaluation.py)
    eval_tf = dino_eval_transform if args.vit_features == "dino" else eval_transform
    # a backbone with the small-image stem was trained on images <= 64 px: 32 unless told
    args.img_size = (args.img_size or source["train_args"].get("img_size") or head_file.get(
        "img_size") or (32 if args.small_images else default_img_size(args.data)))
    if args.img_size % getattr(backbone, "patch_size", 1):  # a ViT's: before any data is read
        raise UserError(f"--img-size {args.img_size}: not a multiple of {backbone.patch_size} px")

    # data: the val split; the labelled train images (a subset for semi-supervised evaluation)
    kw = dict(data_dir=args.data_dir, synthetic_size=args.synthetic_size, img_size=args.img_size)
    val_set = build_dataset(args.data, "val", eval_tf(args.img_size), **kw)
    classes = list(val_set.classes)
    train_set, labelled = [], 100.0
    if not args.eval_only:
        augment = not (args.cached_features or args.knn)
        train_all = build_dataset(args.data, "train", (linear_train_transform if augment
                                                       else eval_tf)(args.img_size), **kw)
        train_set = labelled_subset(train_all, args.train_percent, args.train_subset,
                                    args.subset_seed)
        labelled = 100.0 * len(train_set) / len(train_all)
    protocol = (f"{resolve_protocol(args, labelled)} on {len(train_set)} train images "
                f"({labelled:.3g}% of the labels)")
    # the run directory: one evaluation per folder (another's settings are refused), its log
    run = Run(args, "linear_eval")
    if not args.eval_only:
        train_all.bad_log = run.bad_log
    backbone = backbone.to(device)
    run.print(f"{args.ckpt}: {source['description']}")
    run.print(f"{args.data} at {args.img_size} px, {len(classes)} classes, {len(val_set)} val "
              f"images; {get_world_size()} process(es) on {device}")

    def features(dataset, what, normalize=False):  # [N, D] and labels, sharded over the ranks
        unwrap(backbone).eval()
        return extract_features(backbone, dataset, run.batch_per_rank, args.workers, device,
                                args.precision, normalize, what)

    if args.knn:  # each rank votes for its share of the val images; every image counts once
        train_f, train_y = features(train_set, "train features", normalize=True)
        val_f, val_y = features(val_set, "val features", normalize=True)
        mine = slice(get_rank(), None, get_world_size())
        top1 = {}  # per k, from the one feature pass, as DINO's eval_knn.py (:238-241)
        for k in args.knn_k:
            votes = knn_predict(train_f, train_y, val_f[mine], len(classes), k,
                                args.knn_temperature)
            correct = all_gather_tensor((votes.argmax(1) == val_y[mine]).sum()[None]).sum()
            top1[str(k)] = 100.0 * correct.item() / len(val_set)
        several = len(args.knn_k) > 1
        if several:
            run.print("kNN top-1 by k: " + ", ".join(f"{k} {v:.2f}" for k, v in top1.items()))
        return finish(args, run, {"protocol": "weighted kNN", "knn_top1": top1[str(args.knn_k[-1])],
                                  "k": args.knn_k if several else args.knn_k[0],
                                  "temperature": args.knn_temperature,
                                  **({"knn_top1_by_k": top1} if several else {})})
    if args.eval_only:
        head = head_layer(head_file, args.eval_only, backbone.feature_dim, classes).to(device)
        if head_file["classes"] is None:  # an official head: its k-th class, --data's k-th
            run.print(f"{head_file['protocol']}: no class names; class k is --data's k-th class "
                      f"folder in sorted order, as the official scripts' ImageFolder")
        val_f, val_y = features(val_set, "val features")
        logits = head(val_f).detach()
        return finish(args, run, {"protocol": f"eval-only ({head_file.get('protocol')})",
                                  "head": os.path.abspath(args.eval_only),
                                  "top1": accuracy(logits, val_y, 1),
                                  "top5": accuracy(logits, val_y, 5)})
    return train(args, run, backbone, train_set, val_set, classes, protocol, features)


def train(args, run, backbone, train_set, val_set, classes, protocol, features):
    """Train the head (and with --finetune the backbone), evaluate, save head and result."""
    cached, device = args.cached_features, run.device
    name = "fine-tuned" if args.finetune else "cached centre-crop features" if cached else "linear"
    if cached:  # features never change: extracted once, centre crops, not normalised
        train_set = TensorDataset(*(t.cpu() for t in features(train_set, "train features")))
    loader = make_loader(train_set, run.batch_per_rank, 0 if cached else args.workers,
                         seed=args.seed, seeded=not cached)  # crops seeded by (seed, epoch, image)
    if len(loader) == 0:
        raise UserError(f"{len(train_set)} train images < one batch of {args.batch_size}: lower --batch-size")
    run.steps_per_epoch = len(loader)
    val = None if args.finetune else features(val_set, "val features")  # frozen: computed once

    model = Classifier(backbone, len(classes), args.finetune)
    # Fine-tuning normalises over the global batch (SyncBN on GPUs), as SimCLR's fine-tuning
    # command (--global_bn=True); the official evaluate.py of Barlow Twins and VICReg keeps
    # per-GPU BN: with a global batch of 256 over 8 GPUs, 32 images per BN.
    model = distribute(model, device, get_world_size(), sync_bn="global" if args.finetune
                       else "off", channels_last=args.channels_last)
    scale = args.batch_size / 256
    groups = [{"params": unwrap(model).head.parameters(), "peak_lr": args.lr * scale}]
    if args.finetune:
        groups.append({"params": unwrap(model).backbone.parameters(),
                       "peak_lr": args.lr_backbone * scale})
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=args.momentum, nesterov=args.nesterov,
                                weight_decay=args.weight_decay)
    total_steps = args.epochs * run.steps_per_epoch

    best = run.ckpt["best"] if run.ckpt else None  # the best epoch evaluated (--eval-every)
    start_epoch, _ = run.restore(model, optimizer, extra_state=lambda: {"best": best})
    lrs = " / ".join(f"{g['peak_lr'] / scale:g} x {args.batch_size}/256 = {g['peak_lr']:g}"
                     for g in groups)
    run.print(f"{protocol}: {name}, SGD{' Nesterov' if args.nesterov else ''} lr "
              f"({'head / backbone' if args.finetune else 'head'}) {lrs}, momentum "
              f"{args.momentum}, wd {args.weight_decay}, cosine, {args.epochs} epochs x "
              f"{run.steps_per_epoch} steps")

    def evaluate():  # top-1, top-5 on the val split
        f, y = val or features(val_set, "val features")
        logits = unwrap(model).head(f).detach()
        return accuracy(logits, y, 1), accuracy(logits, y, 5)

    final = None
    for epoch in range(start_epoch, args.epochs):
        model.train()
        for i, (x, y) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda" and args.channels_last and not cached:
                x = x.to(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, total_steps, 0, group["peak_lr"])
            with autocast(args.precision, device):
                logits = model(x, features_given=cached)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            run.step_done(step, loss=loss, lr=optimizer.param_groups[0]["lr"])  # common/run.py
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        # end of epoch: the val split when due, the summary, checkpoint
        evaluated = {}
        if epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            final = evaluate()
            evaluated = {"val_top1": final[0], "val_top5": final[1]}
            if best is None or final[0] > best["top1"]:
                best = {"epoch": epoch + 1, "top1": final[0], "top5": final[1]}
        if run.end_epoch(**evaluated):  # True: a stop signal, saved
            return None

    # outputs: the head with its class names, the fine-tuned backbone, the result
    top1, top5 = final or evaluate()  # evaluated again only if resumed after the last epoch
    if get_rank() == 0:
        save_head(unwrap(model).head, os.path.join(args.run_dir, "linear_head.pt"), classes,
                  arch=args.arch, small_images=args.small_images, img_size=args.img_size,
                  ckpt=args.ckpt, protocol=name, vit_features=args.vit_features)
        if args.finetune:
            export_backbone(unwrap(model).backbone, os.path.join(args.run_dir, "backbone.pt"))
    result = {"protocol": name, "recipe": protocol, "train_images": len(train_set),
              "epochs": args.epochs, "batch_size": args.batch_size, "top1": top1, "top5": top5,
              "reported": "top1/top5: after the final epoch"}
    if args.eval_every:
        result.update(best_top1=best["top1"], best_top5=best["top5"], best_epoch=best["epoch"],
                      reported=result["reported"] + f"; best_*: the best of the epochs "
                      f"evaluated (every {args.eval_every})")
    return finish(args, run, result)


def finish(args, run, result):
    """Write the result JSON and, without training, args.json (rank 0); print the result, leave
    the process group; return the result."""
    result = {"ckpt": args.ckpt, "data": args.data, **result}
    if get_rank() == 0:
        if not os.path.exists(os.path.join(args.run_dir, "args.json")):  # --knn, --eval-only
            save_args(args, os.path.join(args.run_dir, "args.json"), "linear_eval")
        for path in filter(None, [os.path.join(args.run_dir, "result.json"), args.out]):
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
    run.finish(" ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float))
               + f" -> {args.run_dir}/result.json")
    return result


if __name__ == "__main__":
    main()
