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
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script: the methods and `common` live at the repo root

import moco  # noqa: E402
import mocov3  # noqa: E402
from common.optim import build_optimizer, set_lr  # noqa: E402


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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    views = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
             for _ in range(2)]
    steps = {"mocov3": mocov3_step(args, device), "moco": moco_step(args, device)}
    for step in steps.values():
        for _ in range(args.warmup):
            step(*views)
    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(*views)
            synchronize(device)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {"device": str(device), "threads": torch.get_num_threads(), "arch": "resnet18",
              "img_size": args.img_size, "batch_size": args.batch_size,
              "seconds_per_step": median, "rounds": seconds,
              "ratio_mocov3_over_moco": median["mocov3"] / median["moco"]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
