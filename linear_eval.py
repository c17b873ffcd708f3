"""Linear evaluation of a frozen backbone: the standard protocol of self-supervised learning.

The backbone of any cleanssl checkpoint (`checkpoint.pt` of any method, or the plain
torchvision `backbone.pt`) is frozen in eval mode (BN uses its running statistics, no
gradients); a linear classifier on its pooled features is trained with SGD (momentum 0.9,
weight decay 0, cosine schedule, lr 0.1 x batch/256) on random-resized crops and flips, and
evaluated on resize + centre crop. Reported: top-1 and top-5 on the val split after the FINAL
epoch (not the best epoch). Architecture and stem are read from the checkpoint.

    python linear_eval.py --ckpt runs/simclr/<run>/checkpoint.pt --data cifar10
    python linear_eval.py --ckpt backbone.pt --data /imagenet                     # 90 epochs
    python linear_eval.py --ckpt backbone.pt --data cifar10 --cached-features     # seconds
    python linear_eval.py --ckpt backbone.pt --data cifar10 --knn                 # kNN top-1

It runs as one process (one GPU, or the CPU).
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (UserError, autocast, build_dataset, eval_transform, exit_on_user_error,
                    extract_features, infer_arch, knn_predict, linear_train_transform,
                    load_checkpoint, make_loader, resnet_backbone, resolve_precision,
                    seed_everything, setup_distributed, warmup_cosine)
from common.checkpoint import FORMAT
from common.data import default_img_size

# Protocol defaults: SimCLR's (90 epochs, lr 0.1 x batch/256, SGD momentum 0.9, no decay;
# the official repo uses batch 4096 on TPUs, 1024 fits one GPU) and, for images <= 64 px,
# the official CIFAR-10 command (100 epochs, batch 512).
IMAGENET = dict(epochs=90, batch_size=1024, lr=0.1)
SMALL_IMAGES = dict(epochs=100, batch_size=512, lr=0.1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Linear (or kNN) evaluation of a frozen backbone. "
                                "Defaults in brackets: ImageNet / images <= 64 px.")
    p.add_argument("--ckpt", required=True, help="checkpoint.pt of any cleanssl method, or backbone.pt")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, cifar10, "
                                                 "cifar100, stl10 or synthetic")
    p.add_argument("--data-dir", default="data", help="where cifar10/cifar100/stl10 live (data)")
    p.add_argument("--img-size", type=int, default=None,
                   help="default: the checkpoint's training size, else by dataset")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the head (90 / 100)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (1024 / 512)")
    p.add_argument("--lr", type=float, default=None, help="base lr, scaled x batch/256 (0.1 / 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the head (0)")
    p.add_argument("--cached-features", action="store_true",
                   help="a faster variant of the protocol: extract features once, without "
                        "augmentation (centre crops), and train the head on them in seconds")
    p.add_argument("--knn", action="store_true",
                   help="report weighted-kNN top-1 (cosine, k=200, T=0.07) instead of a linear head")
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of --knn (200)")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="vote temperature of --knn (0.07)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes (min(8, CPUs))")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the head and the data order (0)")
    p.add_argument("--synthetic-size", type=int, default=512,
                   help="training images of --data synthetic, as in pre-training (512)")
    p.add_argument("--out", default=None, help="result JSON (default: beside --ckpt, "
                                               "linear_eval.json or knn_eval.json)")
    return p.parse_args(argv)


def load_backbone(path):
    """(backbone, train_args) from our checkpoint.pt or a plain backbone state dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"--ckpt {path}: no such file") from None
    except Exception as e:
        raise UserError(f"--ckpt {path}: not a PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt = load_checkpoint(path)
        state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        arch, small = ckpt["args"]["arch"], ckpt["args"]["small_images"]
        train_args = ckpt["args"]
    elif isinstance(obj, dict) and "conv1.weight" in obj:
        state, train_args = obj, {}
        arch, small = infer_arch(state)
    else:
        raise UserError(f"--ckpt {path}: neither a cleanssl checkpoint.pt nor a ResNet backbone.pt")
    backbone = resnet_backbone(arch, cifar_stem=small)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"--ckpt {path}: does not match {arch} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return backbone, {"arch": arch, "small_images": small, **train_args}


def accuracy(logits, y, k):
    return 100.0 * (logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean().item()


@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    _, _, _, device = setup_distributed()  # a single process: no process group
    precision = resolve_precision(args.precision, device)
    seed_everything(args.seed)
    backbone, train_args = load_backbone(args.ckpt)
    backbone = backbone.to(device).eval().requires_grad_(False)
    img_size = args.img_size or train_args.get("img_size") or default_img_size(args.data)
    for key, value in (SMALL_IMAGES if img_size <= 64 else IMAGENET).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    data_kw = dict(data_dir=args.data_dir, synthetic_size=args.synthetic_size, img_size=img_size)
    val_set = build_dataset(args.data, "val", eval_transform(img_size), **data_kw)
    num_classes = len(val_set.classes)
    print(f"{train_args['arch']} ({'small-image' if train_args['small_images'] else 'ImageNet'} "
          f"stem) from {args.ckpt}; {args.data} at {img_size} px, {num_classes} classes")
    feats = lambda ds: extract_features(backbone, ds, args.batch_size, args.workers, device, precision)

    if args.knn:
        train_f, train_y = feats(build_dataset(args.data, "train", eval_transform(img_size), **data_kw))
        val_f, val_y = feats(val_set)
        pred = knn_predict(train_f, train_y, val_f, num_classes, args.knn_k, args.knn_temperature)
        result = {"knn_top1": accuracy(pred, val_y, 1), "k": args.knn_k,
                  "temperature": args.knn_temperature}
        return write_result(args, result, "knn_eval.json")

    head = nn.Linear(backbone.feature_dim, num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    if args.cached_features:
        # Features of centre crops, not normalised: the head sees what the backbone outputs.
        train_set = build_dataset(args.data, "train", eval_transform(img_size), **data_kw)
        train_f, train_y = cached(backbone, train_set, args, device, precision)
        steps_per_epoch = max(1, len(train_f) // args.batch_size)
    else:
        train_set = build_dataset(args.data, "train", linear_train_transform(img_size), **data_kw)
        loader = make_loader(train_set, args.batch_size, args.workers, seed=args.seed)
        steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training images < one batch of {args.batch_size}")
    total = args.epochs * steps_per_epoch
    print(f"linear head: SGD lr {args.lr} x {args.batch_size}/256 = {lr:g}, momentum "
          f"{args.momentum}, wd {args.weight_decay}, cosine, {args.epochs} epochs x {steps_per_epoch} steps")

    step, start = 0, time.time()
    for epoch in range(args.epochs):
        if args.cached_features:
            perm = torch.randperm(len(train_f), device=device)[:steps_per_epoch * args.batch_size]
            batches = ((train_f[idx], train_y[idx]) for idx in perm.view(steps_per_epoch, -1))
        else:
            loader.sampler.set_epoch(epoch)
            batches = ((frozen_features(backbone, x.to(device), precision), y.to(device))
                       for x, y in loader)
        loss_sum = torch.zeros((), device=device)
        for f, y in batches:
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, total, 0, lr)
            loss = F.cross_entropy(head(f), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs} train loss "
              f"{(loss_sum / steps_per_epoch).item():.4f} ({time.time() - start:.0f}s)", flush=True)

    val_f, val_y = cached(backbone, val_set, args, device, precision)
    with torch.no_grad():
        logits = head(val_f)
    result = {"top1": accuracy(logits, val_y, 1), "top5": accuracy(logits, val_y, min(5, num_classes)),
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr,
              "protocol": "cached centre-crop features" if args.cached_features
              else "random-resized-crop + flip", "reported": "final epoch"}
    return write_result(args, result, "linear_eval.json")


@torch.no_grad()
def frozen_features(backbone, x, precision):
    with autocast(precision, x.device):
        return backbone(x).float()


def cached(backbone, dataset, args, device, precision):
    """Un-normalised features [N, D] and labels of `dataset` (centre crops), in order."""
    loader = make_loader(dataset, args.batch_size, args.workers, shuffle=False, drop_last=False)
    loader.sampler.set_epoch(0)
    out = [(frozen_features(backbone, x.to(device), precision), y.to(device)) for x, y in loader]
    return torch.cat([f for f, _ in out]), torch.cat([y for _, y in out])


def write_result(args, result, default_name):
    result = {"ckpt": os.path.abspath(args.ckpt), "data": args.data, **result}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), default_name)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(" ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)), f"-> {out}")
    return result


if __name__ == "__main__":
    main()
