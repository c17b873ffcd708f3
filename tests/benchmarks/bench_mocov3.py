"""Step cost of MoCo v3 against MoCo v2: seconds per training step of mocov3.py's and moco.py's
loop bodies (forward, momentum update, keys, loss, backward, optimizer step; MoCo v2's enqueue),
each with its small-image recipe's model and optimizer on a ResNet-18 at 32 px, on the same
random views, in the same process, their rounds interleaved so that a change in the machine's load
falls on both. No data loading: the two scripts' loaders and views cost the same.

    python tests/benchmarks/bench_mocov3.py                       # CPU, batch 32, fp32
    python tests/benchmarks/bench_mocov3.py --threads 1 --rounds 7
    python tests/benchmarks/bench_mocov3.py --device cuda --batch-size 512

A benchmark, not a test: pytest collects test_*.py only, so this file is never run by it.
"""
import argparse
import sys
from pathlib import Path

import torch

# run as a script: the methods, `common` and tests.benchmarks.timing are imported from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import moco  # noqa: E402
import mocov3  # noqa: E402
from common.optim import build_optimizer, set_lr  # noqa: E402
from tests.benchmarks import timing  # noqa: E402


def mocov3_step(args, device):
    """mocov3.py's loop body with its CIFAR recipe (heads 4096 -> 256, LARS, T 0.2)."""
    recipe = mocov3.get_args(["--data", "synthetic", "--img-size", str(args.img_size)])
    model = mocov3.MoCoV3("resnet18", True, recipe.hidden_dim, recipe.proj_dim).to(device).train()
    optimizer = build_optimizer(mocov3.weight_decay_groups(model, "lars", recipe.weight_decay),
                                recipe)
    set_lr(optimizer, recipe.lr * args.batch_size / 256)

    def step(x1, x2):
        q1, q2 = model(x1, x2)
        model.momentum_update(0.99)
        k1, k2 = model.keys(x1, x2)
        loss = mocov3.mocov3_loss(q1, q2, k1, k2, recipe.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def moco_step(args, device):
    """moco.py's loop body with its CIFAR recipe (MLP head 512 -> 128, queue 4096, 8 BN groups
    with shuffled keys, SGD, T 0.1)."""
    recipe = moco.get_args(["--data", "synthetic", "--img-size", str(args.img_size),
                            "--batch-size", str(args.batch_size), "--queue-size", "4096"])
    model = moco.MoCo("resnet18", True, None, recipe.proj_dim, recipe.queue_size,
                      recipe.bn_splits).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params, "weight_decay": recipe.weight_decay}], recipe)
    set_lr(optimizer, recipe.lr * args.batch_size / 256)
    seed = iter(range(10**9))

    def step(x1, x2):
        model.momentum_update(recipe.moco_momentum)
        (q,) = model(x1)
        k = model.keys(x2, next(seed))
        loss = moco.moco_loss(q, k, model.queue, recipe.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.enqueue(k)
    return step


def main():
    args, device = timing.start(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    views = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
             for _ in range(2)]
    steps = {"mocov3": mocov3_step(args, device), "moco": moco_step(args, device)}
    timing.report(args, device, "resnet18", timing.seconds_per_step(args, device, steps, views),
                  [("mocov3", "moco")])


if __name__ == "__main__":
    main()
