"""Linear-evaluation benchmark: what one CPU core makes of the protocol's transforms, and
linear_eval.py end to end, the standard protocol against --cached-features in the same run.

    python tests/benchmarks/bench_linear_eval.py                      # per-core transforms
    python tests/benchmarks/bench_linear_eval.py --data DIR --ckpt backbone.pt --epochs 2

A benchmark, not a test: pytest collects test_*.py only, so this file is never run by it.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script: `common` lives at the repo root

from common.data import eval_transform  # noqa: E402
from common.evaluation import linear_train_transform  # noqa: E402
from tests.benchmarks.bench_pipeline import make_images  # noqa: E402


def per_core(paths, rounds):
    """Images per second one single-threaded process opens, decodes and transforms (the train
    crop-and-flip and the val resize-and-centre-crop at 224 px): the median of the rounds."""
    torch.set_num_threads(1)
    rates = {"train (random-resized crop + flip)": [], "val (resize 256 + centre crop)": []}
    for _ in range(rounds):
        for name, transform in zip(rates, (linear_train_transform(224), eval_transform(224))):
            start = time.perf_counter()
            for path in paths:
                with Image.open(path) as f:
                    transform(f.convert("RGB"))
            rates[name].append(len(paths) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def end_to_end(args, out):
    """linear_eval.py with the standard protocol and with --cached-features, same flags."""
    results = {}
    for name, extra in (("standard", []), ("cached", ["--cached-features"])):
        run_dir = Path(out) / name
        start = time.time()
        subprocess.run([sys.executable, str(REPO / "linear_eval.py"), "--ckpt", args.ckpt,
                        "--data", args.data, "--epochs", str(args.epochs), "--batch-size",
                        str(args.batch_size), "--workers", str(args.workers), "--log-every",
                        "100000", "--run-dir", str(run_dir), *extra], check=True, cwd=REPO)
        epochs = [json.loads(line) for line in open(run_dir / "log.jsonl")]
        results[name] = {"wall_s": time.time() - start,
                         "epoch_img_per_s": [r["img_per_s"] for r in epochs]}
    results["wall_ratio"] = results["standard"]["wall_s"] / results["cached"]["wall_s"]
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200, help="JPEGs per pass (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, median (default 3)")
    p.add_argument("--data", help="also run linear_eval.py end to end on this --data")
    p.add_argument("--ckpt", help="the backbone of the end-to-end runs")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths, origin = make_images(args.images, Path(tmp) / "images")
        figures = {"images": origin, "per_core_img_per_s": per_core(paths, args.rounds)}
        if args.data:
            figures["end_to_end"] = end_to_end(args, tmp)
    for name, rate in figures["per_core_img_per_s"].items():
        print(f"{name}: {rate:.0f} images/s per core ({1000 / rate:.2f} ms/image)")
    if args.data:
        e2e = figures["end_to_end"]
        for name in ("standard", "cached"):
            print(f"{name}: {e2e[name]['wall_s']:.0f} s, epochs at "
                  f"{', '.join(f'{r:.3g}' for r in e2e[name]['epoch_img_per_s'])} img/s")
        print(f"standard / cached wall time: {e2e['wall_ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
