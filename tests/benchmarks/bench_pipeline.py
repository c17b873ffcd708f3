"""Input-pipeline benchmark: images per second that one CPU core turns into training views with
each ViewPipeline mode, and, on a CUDA machine, the device side of --gpu-aug and whole BYOL steps.

    python tests/benchmarks/bench_pipeline.py                          # CPU table, a few minutes
    python tests/benchmarks/bench_pipeline.py --e2e --json bench.json  # + byol.py runs (GPU)
    python tests/benchmarks/bench_pipeline.py --no-cpu --e2e fast,gpu+compile,gpu+nchw

A benchmark, not a test: pytest collects test_*.py only, so this file is never run by it.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script: `common` and `byol` live at the repo root

import byol  # noqa: E402
from common.augment import ViewPipeline, multi_crop
from common.model import autocast, distribute, unwrap
from common.optim import LARS, param_groups
from common.gpu_aug import gpu_augment  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "train"
IMAGE_SIZE = (500, 375)  # a typical ImageNet photo, saved at JPEG quality 90
MODES = ("torchvision", "fast", "gpu")
TARGETS = {"fast": 2.5, "gpu": 8.0}  # minimum speed-up over torchvision, images/s per core


def recipes():
    # BYOL's views come from byol.py itself, so the benchmark follows any change to its recipe
    byol_args = SimpleNamespace(img_size=224, blur_probs=byol.IMAGENET["blur_probs"],
                                solarize_probs=byol.IMAGENET["solarize_probs"])
    return {"byol 2x224": byol.byol_views(byol_args),
            "swav 2x224+6x96": multi_crop([2, 6], [224, 96], [(0.14, 1.0), (0.05, 0.14)],
                                          jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2,
                                          blur_p=0.5)}


# ------------------------------------------------------------------------------- images

def make_images(n, out_dir):
    """n JPEGs of ImageNet's typical size in out_dir (those already there are reused).
    Returns the paths and a line saying where the pixels came from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("*.jpg"))
    if len(existing) >= n:
        return existing[:n], f"{n} existing JPEGs in {out_dir}"
    if CIFAR.is_dir():
        # round-robin over the classes, so that a small n still mixes colours and textures
        per_class = [sorted(d.glob("*.jpg")) for d in sorted(CIFAR.iterdir()) if d.is_dir()]
        sources = [per_class[i % len(per_class)][i // len(per_class)] for i in range(n)]
        small = (Image.open(path).convert("RGB") for path in sources)
        origin = f"real CIFAR-10 JPEGs ({CIFAR}) upscaled bicubic"
    else:
        rng = np.random.default_rng(0)
        small = (Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
                 for _ in range(n))
        origin = f"synthetic smooth random images (bicubic-upscaled noise; no {CIFAR})"
    paths = []
    for i, img in enumerate(small):
        paths.append(out_dir / f"{i:05d}.jpg")
        img.resize(IMAGE_SIZE, Image.Resampling.BICUBIC).save(paths[-1], quality=90)
    return paths, f"{n} JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} q90 from {origin}"


# ------------------------------------------------------------------------------- CPU

def images_per_s(pipeline, paths):
    """One pass as a loader worker does it: open, decode, convert, make every view."""
    torch.manual_seed(0)  # all pipelines draw the same crops, flips and coin tosses
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as f:
            pipeline(f.convert("RGB"))
    return len(paths) / (time.perf_counter() - start)


def bench_cpu(paths, rounds):
    torch.set_num_threads(1)  # per-core figures: a loader worker is one single-threaded process
    results = {}
    for name, recs in recipes().items():
        pipelines = {mode: ViewPipeline(recs, mode) for mode in MODES}
        for pipeline in pipelines.values():  # warm-up: page cache, allocators, lazy imports
            images_per_s(pipeline, paths)
        rates = {mode: [] for mode in MODES}
        for r in range(rounds):
            # interleaved, so that a noisy minute slows all three; rotated, so that none
            # always runs first
            for mode in MODES[r % 3:] + MODES[:r % 3]:
                rates[mode].append(images_per_s(pipelines[mode], paths))
        reference = statistics.median(rates["torchvision"])
        results[name] = {mode: {"img_per_s": statistics.median(rates[mode]),
                                "ms_per_image": 1000 / statistics.median(rates[mode]),
                                "ratio": statistics.median(rates[mode]) / reference,
                                "rounds": rates[mode]} for mode in MODES}
    return results


def print_cpu(results):
    for name, rows in results.items():
        print(f"\n{name}: medians, torch threads 1, one process")
        print(f"  {'pipeline':<12} {'ms/image':>9} {'img/s/core':>11} {'vs torchvision':>15}")
        for mode, row in rows.items():
            print(f"  {mode:<12} {row['ms_per_image']:>9.2f} {row['img_per_s']:>11.1f} "
                  f"{row['ratio']:>14.2f}x")
        for mode, target in TARGETS.items():
            ratio = rows[mode]["ratio"]
            print(f"  target {mode} >= {target}x: {'met' if ratio >= target else 'NOT met'} "
                  f"({ratio:.2f}x)")


# ------------------------------------------------------------------------------- GPU

def seconds_per_call(fn, iters, warmup=3):
    for _ in range(warmup):  # cuDNN autotuning, compilation, allocator growth
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def gpu_augment_rates(batch, iters):
    """Images/s of the device side of --gpu-aug: each BYOL view's augmentation alone, and
    to_device as the training step runs it (upload from pinned memory, augment, normalise)."""
    recs = recipes()["byol 2x224"]
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda")
    generator = torch.Generator().manual_seed(0)
    rates = {f"gpu_augment, byol view {i}, batch {batch}":
             batch / seconds_per_call(lambda: gpu_augment(x.clone(), recipe, generator), iters)
             for i, recipe in enumerate(recs, 1)}
    pipeline = ViewPipeline(recs, "gpu")
    host = [x.cpu().pin_memory() for _ in recs]
    rates[f"to_device, byol 2 views, batch {batch} (images/s)"] = batch / seconds_per_call(
        lambda: pipeline.to_device(host, torch.device("cuda"), 0), iters)
    return rates


def model_step_rate(batch, iters, compile, channels_last):
    """BYOL ResNet-50 steps as byol.py's main() runs them, on random normalised views."""
    device = torch.device("cuda")
    model = distribute(byol.BYOL("resnet50", False, 4096, 256), device, 1, compile,
                       channels_last=channels_last)
    optimizer = LARS(param_groups(model, 1e-6), lr=0.45, momentum=0.9)
    x = torch.randn(2 * batch, 3, 224, 224, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with autocast("bf16", device):
            p1, p2, z1, z2 = model(*x.chunk(2))
        loss = byol.byol_loss(p1.float(), p2.float(), z1.float(), z2.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        unwrap(model).update_target(0.99)

    return batch / seconds_per_call(step, iters)


def image_folder(paths, root, n_train):
    """The JPEGs, repeated to n_train, as an ImageFolder of 10 classes (and a small val/)."""
    for split, n in (("train", n_train), ("val", 100)):
        for i in range(n):
            folder = root / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths[i % len(paths)], folder / f"{i:06d}.jpg")
    return root


E2E_FLAGS = {"torchvision": ["--torchvision-aug"], "fast": [], "gpu": ["--gpu-aug"],
             "compile": ["--compile"], "nchw": ["--no-channels-last"]}


def byol_run_rates(root, run_dir, batch, flags):
    """img/s of a 1-epoch byol.py run: its last logged figure, which averages from the epoch's
    start (start-up and compilation included), and the steady rate over the last 40% of the
    steps (after the loader's prefetched batches, filled during start-up, are used up)."""
    cmd = [sys.executable, "byol.py", "--data", str(root), "--arch", "resnet50", "--img-size",
           "224", "--precision", "bf16", "--batch-size", str(batch), "--epochs", "1",
           "--knn-every", "0", "--log-every", "10", "--run-dir", str(run_dir), *flags]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        print(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
        return None, None
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "step" in r]
    # a record's time since the epoch's start is step * batch / img_per_s
    seconds = {r["step"]: r["step"] * batch / r["img_per_s"] for r in steps}
    last = steps[-1]["step"]
    first = min(s for s in seconds if s >= 0.6 * last)
    if first == last:
        return steps[-1]["img_per_s"], None
    return steps[-1]["img_per_s"], (last - first) * batch / (seconds[last] - seconds[first])


def bench_gpu(args, paths, tmp):
    torch.backends.cudnn.benchmark = True  # as setup_distributed() sets it for the scripts
    results = gpu_augment_rates(args.batch_size, args.iters)
    for config in args.model_step:
        name = f"model step alone, {config} (bf16, batch {args.batch_size})"
        results[name] = model_step_rate(args.batch_size, args.iters, "compile" in config,
                                        not config.startswith("nchw"))
        torch.cuda.empty_cache()  # one model's cached blocks are of no use to the next
        print(f"  {name:<62} {results[name]:9.0f} img/s", flush=True)
    if args.e2e:
        root = image_folder(paths, tmp / "imagefolder", args.e2e_steps * args.batch_size)
        for config in args.e2e:
            flags = [f for part in config.split("+") for f in E2E_FLAGS[part]]
            last, steady = byol_run_rates(root, tmp / f"run-{config}", args.batch_size, flags)
            name = f"byol.py {config} ({' '.join(flags) or 'defaults'})"
            results[name + ": whole epoch"] = last
            results[name + ": steady"] = steady
            print(f"  {name:<62} {last or 0:9.0f} img/s epoch, {steady or 0:6.0f} steady",
                  flush=True)
    print(f"\n{torch.cuda.get_device_name()}, {os.cpu_count()} CPUs")
    for name, rate in results.items():
        print(f"  {name:<62} {'failed' if rate is None else f'{rate:9.0f} img/s'}")
    return results


def step_configs(text):
    configs = [c.strip() for c in text.split(",") if c.strip()]
    for config in configs:
        if config not in STEP_CONFIGS:
            raise argparse.ArgumentTypeError(f"{config!r}: one of {', '.join(STEP_CONFIGS)}")
    return configs


STEP_CONFIGS = ("channels_last", "nchw", "channels_last+compile", "nchw+compile")


def e2e_configs(text):
    configs = [c.strip() for c in text.split(",") if c.strip()]
    for config in configs:
        parts = config.split("+")
        if parts[0] not in MODES or any(p not in ("compile", "nchw") for p in parts[1:]):
            raise argparse.ArgumentTypeError(
                f"{config!r}: a pipeline ({', '.join(MODES)}) optionally followed by +compile "
                f"and/or +nchw")
    return configs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200, help="JPEGs per pass (default 200)")
    p.add_argument("--image-dir", type=Path, help="keep the JPEGs here and reuse them next time")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, median (default 3)")
    p.add_argument("--batch-size", type=int, default=256, help="GPU batch per view (default 256)")
    p.add_argument("--iters", type=int, default=20, help="timed GPU iterations (default 20)")
    p.add_argument("--no-cpu", action="store_true", help="skip the per-core CPU table")
    p.add_argument("--model-step", type=step_configs, default=list(STEP_CONFIGS),
                   help="model-step configurations to time on the GPU, comma-separated "
                        f"(default: all of {','.join(STEP_CONFIGS)}; '' for none)")
    p.add_argument("--e2e", type=e2e_configs, nargs="?", const=["torchvision", "fast", "gpu"],
                   help="also time 1-epoch byol.py runs (GPU), one per comma-separated config: a "
                        "pipeline (torchvision, fast, gpu), +compile for --compile, +nchw for "
                        "--no-channels-last; e.g. 'fast,gpu,gpu+compile,gpu+nchw' (default when "
                        "given alone: torchvision,fast,gpu)")
    p.add_argument("--e2e-steps", type=int, default=100,
                   help="steps of each byol.py run (default 100)")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        paths, origin = make_images(args.images, args.image_dir or tmp / "jpeg")
        print(f"images: {origin}")
        results = {"images": origin}
        if not args.no_cpu:
            results["cpu"] = bench_cpu(paths, args.rounds)
            print_cpu(results["cpu"])
        if torch.cuda.is_available():
            results["gpu"] = {"device": torch.cuda.get_device_name(),
                              **bench_gpu(args, paths, tmp)}
        else:
            print("\nno CUDA device: GPU measurements skipped")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
