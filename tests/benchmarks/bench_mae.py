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
import sys
from pathlib import Path

import torch

# run as a script: the methods, `common` and tests.benchmarks.timing are imported from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mae  # noqa: E402
from common.optim import set_lr  # noqa: E402
from tests.benchmarks import timing  # noqa: E402


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small", help="the ViT of both (vit_small)")
    args, device = timing.start(p)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    # BYOL: its ViT recipe at <= 64 px (heads 4096 -> 256, AdamW, MoCo v3's ViT initialisation);
    # both views are the same images here (their cost does not depend on what they show)
    steps = {"mae": mae_step(args, device), "byol": timing.byol_step(args, device, args.arch, 0.99)}
    timing.report(args, device, args.arch, timing.seconds_per_step(args, device, steps, [images]),
                  [("mae", "byol")])


if __name__ == "__main__":
    main()
