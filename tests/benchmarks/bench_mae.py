"""Step cost of MAE against BYOL on the same Vision Transformer: seconds per training step of
mae.py's and byol.py's loop bodies (MAE: mask noise, forward of the visible quarter through the
encoder and of every position through the decoder, loss, backward, AdamW step; BYOL: two online
and two target passes of the whole image, loss, backward, AdamW step, EMA update), each with its
ViT recipe at 32 px (patch 4: 64 patches, 16 of them seen by MAE's encoder), on the same random
images, in the same process, their rounds interleaved so that a change in the machine's load
falls on both. No data loading: MAE's one crop costs less than BYOL's two views.

    python tests/benchmarks/bench_mae.py                          # CPU, vit_small, batch 32, fp32
    python tests/benchmarks/bench_mae.py --threads 1 --rounds 5
    python tests/benchmarks/bench_mae.py --device cuda --batch-size 256

A benchmark, not a test: pytest collects test_*.py only, so this file is never run by it.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script: the methods and `common` live at the repo root

import byol  # noqa: E402
import mae  # noqa: E402
from common.optim import build_optimizer, param_groups, set_lr  # noqa: E402


def mae_step(args, device):
    """mae.py's loop body with its small-image recipe (decoder 512 wide, 8 blocks, 16 heads;
    mask 0.75, normalised pixels; AdamW betas (0.9, 0.95))."""
    recipe = mae.get_args(["--data", "synthetic", "--arch", args.arch, "--img-size",
                           str(args.img_size)])
    model = mae.MAE(args.arch, True, args.img_size, recipe.decoder_dim, recipe.decoder_depth,
                    recipe.decoder_heads).to(device).train()
    optimizer = mae.mae_optimizer(model, recipe)
    set_lr(optimizer, recipe.lr * args.batch_size / 256)
    patches, steps = (args.img_size // model.patch_size) ** 2, iter(range(10**9))

    def step(images):
        noise = mae.mask_noise(0, next(steps), len(images), patches, 0, len(images)).to(device)
        pred, mask, _ = model(images, noise, recipe.mask_ratio)
        loss = mae.mae_loss(images, pred, mask, model.patch_size, recipe.norm_pix_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def byol_step(args, device):
    """byol.py's loop body with its ViT recipe at <= 64 px (heads 4096 -> 256, AdamW, MoCo v3's
    ViT initialisation); both views are the same images here (their cost does not depend on
    what they show)."""
    recipe = byol.get_args(["--data", "synthetic", "--arch", args.arch, "--img-size",
                            str(args.img_size)])
    model = byol.BYOL(args.arch, True, recipe.hidden_dim, recipe.proj_dim).to(device).train()
    optimizer = build_optimizer(param_groups(model, recipe.weight_decay), recipe)
    set_lr(optimizer, recipe.lr * args.batch_size / 256)

    def step(images):
        p1, p2, z1, z2 = model(images, images)
        loss = byol.byol_loss(p1, p2, z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(0.99)
    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small", help="the ViT of both (vit_small)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per method per round (3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds, median (5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    steps = {"mae": mae_step(args, device), "byol": byol_step(args, device)}
    for step in steps.values():
        for _ in range(args.warmup):
            step(images)
    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(images)
            synchronize(device)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {"device": str(device), "threads": torch.get_num_threads(), "arch": args.arch,
              "img_size": args.img_size, "batch_size": args.batch_size,
              "seconds_per_step": median, "rounds": seconds,
              "ratio_mae_over_byol": median["mae"] / median["byol"]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
