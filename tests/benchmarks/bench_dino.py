"""Step cost of DINO against BYOL: seconds per training step of dino.py's and byol.py's loop
bodies (forward of student and teacher, loss, centre, backward, clipping, optimizer step, EMA),
each with its small-image recipe's model and optimizer on a ResNet-18 at 32 px, on the same
random views, in the same process, their rounds interleaved so that a change in the machine's
load falls on all of them. DINO twice: 2 global crops only (its CIFAR recipe) and 2 global + 6
local crops of 14 px (96/224 of 32 px). No data loading: the loaders are not compared.

    python tests/benchmarks/bench_dino.py                        # CPU, batch 32, fp32
    python tests/benchmarks/bench_dino.py --threads 1 --rounds 7
    python tests/benchmarks/bench_dino.py --device cuda --batch-size 256

A benchmark, not a test: pytest collects test_*.py only, so this file is never run by it.
"""
import argparse
import sys
from pathlib import Path

import torch

# run as a script: the methods, `common` and tests.benchmarks.timing are imported from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dino  # noqa: E402
from common.optim import build_optimizer, param_groups, set_lr  # noqa: E402
from tests.benchmarks import timing  # noqa: E402


def dino_step(args, device, local_crops):
    """dino.py's loop body with its CIFAR recipe (head 2048 -> 256 -> 4096, LARS, no clipping:
    clipped here at 3.0 as its ViT recipes, to count the clipping's cost), `local_crops` crops of
    14 px besides the 2 global ones."""
    recipe = dino.get_args(["--data", "synthetic", "--img-size", str(args.img_size),
                            "--local-crops", str(local_crops)])
    model = dino.DINO("resnet18", True, recipe.out_dim, recipe.hidden_dim,
                      recipe.bottleneck_dim).to(device).train()
    optimizer = build_optimizer(param_groups(model, recipe.weight_decay), recipe)
    set_lr(optimizer, recipe.lr * args.batch_size / 256)
    student = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=device).manual_seed(1)
    locals_ = [torch.randn(args.batch_size, 3, recipe.local_crop_size, recipe.local_crop_size,
                           device=device, generator=g) for _ in range(local_crops)]

    def step(x1, x2):
        student_out, teacher_out = model([x1, x2, *locals_])
        loss, _ = dino.dino_loss(student_out, teacher_out, model.center, recipe.student_temp,
                                 recipe.teacher_temp)
        model.center.copy_(dino.next_center(teacher_out, model.center, recipe.center_momentum))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dino.clip_per_parameter(student, 3.0)
        optimizer.step()
        model.update_teacher(0.9995)
    return step


def main():
    args, device = timing.start(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    views = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
             for _ in range(2)]
    # byol.py's CIFAR recipe (projector and predictor 4096 -> 256, LARS)
    steps = {"byol": timing.byol_step(args, device, "resnet18", 0.996),
             "dino_2+0": dino_step(args, device, 0),
             "dino_2+6": dino_step(args, device, 6)}
    timing.report(args, device, "resnet18", timing.seconds_per_step(args, device, steps, views),
                  [("dino_2+0", "byol"), ("dino_2+6", "byol")])


if __name__ == "__main__":
    main()
