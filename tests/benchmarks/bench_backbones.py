"""Backbone speed: images per second of ViT-S/16 against ResNet-50 at 224 px, a forward and a
backward pass (a training step without the optimizer), both in the same run, their rounds
interleaved so that a change in the machine's load falls on both.

    python tests/benchmarks/bench_backbones.py                          # CPU, batch 8, fp32
    python tests/benchmarks/bench_backbones.py --threads 1 --rounds 7   # steadier on a busy CPU
    python tests/benchmarks/bench_backbones.py --device cuda --batch-size 128 --precision bf16
    python tests/benchmarks/bench_backbones.py --device cuda --batch-size 128 --compile

A benchmark, not a test: pytest collects test_*.py only, so this file is never run by it.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script: `common` lives at the repo root

from common.model import autocast, build_backbone, distribute, resolve_precision  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, images, precision, device):
    """Forward and backward, gradients dropped: what the backbone costs in a training step."""
    with autocast(precision, device):
        features = model(images)
    features.float().square().mean().backward()
    for p in model.parameters():
        p.grad = None


def measure(args, device):
    """{arch: [img/s per round]}: each round times `steps` steps of every arch in turn."""
    precision = resolve_precision(args.precision, device)
    models, images = {}, {}
    for arch in args.archs:
        torch.manual_seed(0)
        # wrapped as the scripts wrap it: channels_last on CUDA, torch.compile if asked
        models[arch] = distribute(build_backbone(arch), device, world_size=1,
                                  compile=args.compile)
        images[arch] = torch.randn(args.batch_size, 3, args.img_size, args.img_size,
                                   device=device)
        if device.type == "cuda":
            images[arch] = images[arch].contiguous(memory_format=torch.channels_last)
        for _ in range(args.warmup):  # allocator, cuDNN autotuning, compilation
            train_step(models[arch], images[arch], precision, device)
    rates = {arch: [] for arch in args.archs}
    for _ in range(args.rounds):
        for arch in args.archs:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(models[arch], images[arch], precision, device)
            synchronize(device)
            rates[arch].append(args.steps * args.batch_size / (time.perf_counter() - start))
    return precision, rates


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["vit_small", "resnet50"],
                   help="backbones to time; the ratio is the first's speed over the second's")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arch per round (3)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, median (3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="auto (bf16 GPU, fp32 CPU), bf16, fp16, fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile each backbone")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision, rates = measure(args, device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores")
    figures = {"machine": machine, "torch": torch.__version__, "precision": precision,
               "compile": args.compile, "img_size": args.img_size, "batch_size": args.batch_size,
               "steps": args.steps, "rounds": args.rounds, "img_per_s": rates,
               "median_img_per_s": {arch: statistics.median(r) for arch, r in rates.items()}}
    first, second = args.archs[:2] if len(args.archs) > 1 else (args.archs[0], None)
    print(f"{machine}; {precision}{', compiled' if args.compile else ''}; batch "
          f"{args.batch_size} at {args.img_size} px, forward + backward, median of "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    for arch, rate in figures["median_img_per_s"].items():
        params = sum(p.numel() for p in build_backbone(arch).parameters()) / 1e6
        print(f"  {arch:<12} {params:6.2f}M parameters  {rate:9.2f} img/s  (rounds: "
              f"{', '.join(f'{r:.2f}' for r in rates[arch])})")
    if second:  # round by round: each pair of measurements ran back to back
        ratio = statistics.median(a / b for a, b in zip(rates[first], rates[second]))
        figures["ratio"] = {"of": f"{first} / {second}", "median_per_round": ratio}
        print(f"  {first} / {second}: {ratio:.2f}x the images per second (median of the "
              f"rounds' ratios)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
