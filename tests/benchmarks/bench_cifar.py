"""CIFAR-10 epoch time: the loader path (workers decode and augment each image) against
--data-on-device (the train set held on the device as uint8, the views made there), measured in
the same run, one after the other, with the same method, model and batch. --data: CIFAR-10 as
JPEG files (an ImageFolder of train/ and val/), or cifar10 (torchvision's copy).

    python tests/benchmarks/bench_cifar.py --data /tmp/cifar10                     # a GPU: bf16
    python tests/benchmarks/bench_cifar.py --data DIR --steps 10 --batch-size 128  # a CPU check

A benchmark, not a test: pytest collects test_*.py only, so this file is never run by it.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PATHS = {"loader": [], "device": ["--data-on-device"]}


def steady_rate(run_dir, batch):
    """img/s over the second half of the logged steps (after start-up, the first epoch's
    compilation or cuDNN autotuning, and the loader's prefetch); a record's time since the
    epoch's start is step * batch / img_per_s."""
    steps = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
             if "step" in r]
    seconds = {r["step"]: r["step"] * batch / r["img_per_s"] for r in steps}
    last, first = steps[-1]["step"], steps[len(steps) // 2 - 1]["step"]
    return (last - first) * batch / (seconds[last] - seconds[first])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="cifar10, or the CIFAR-10 ImageFolder copy")
    p.add_argument("--method", default="simclr", help="the script to run (simclr)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=60, help="steps per path (60)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=None, help="the loader path's workers")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in PATHS.items():
            run_dir = Path(tmp) / name
            cmd = [sys.executable, f"{args.method}.py", "--data", args.data, "--arch", "resnet18",
                   "--img-size", "32", "--batch-size", str(args.batch_size), "--epochs", "1",
                   "--precision", args.precision, "--knn-every", "0", "--log-every", "1",
                   "--run-dir", str(run_dir), *flags,
                   *(["--workers", str(args.workers)] if args.workers is not None else [])]
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
            start = time.time()
            while proc.poll() is None:  # stop the epoch once enough steps are logged
                log = run_dir / "log.jsonl"
                if log.exists() and len(log.read_text().splitlines()) >= args.steps:
                    proc.terminate()  # SIGTERM: the run saves and stops at the next step
                    break
                time.sleep(0.2)
            proc.wait()
            rate = steady_rate(run_dir, args.batch_size)
            results[name] = {"steady_img_per_s": rate, "epoch_s_50k": 50_000 / rate,
                             "wall_s": time.time() - start, "flags": flags}
            print(f"{name:>7}: {rate:8.1f} img/s steady, a 50,000-image epoch in "
                  f"{50_000 / rate:7.1f} s", flush=True)
    results["device_over_loader"] = (results["device"]["steady_img_per_s"]
                                     / results["loader"]["steady_img_per_s"])
    print(f"--data-on-device / loader: {results['device_over_loader']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, **results}, indent=2))


if __name__ == "__main__":
    main()
