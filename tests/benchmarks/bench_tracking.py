"""What TensorBoard and W&B cost a training run: simclr.py's step time with log.jsonl alone, with
TensorBoard events, and with W&B offline, all logging EVERY step (--log-every 1, the worst case),
in rounds that interleave the three so that a change in the machine's load falls on all; and the
size of the event files per 1,000 logged steps.

    python tests/benchmarks/bench_tracking.py                 # ResNet-18 at 32 px, CPU
    python tests/benchmarks/bench_tracking.py --rounds 5 --out tracking.json

Each run is simclr.py's own main() in this process (one thread), on synthetic images; the step
time is the epoch time over the steps (the kNN monitor off). A benchmark, not a test.
"""
import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import simclr  # noqa: E402

SINKS = {"log.jsonl alone": ["--no-tensorboard"], "+ TensorBoard": ["--tensorboard"],
         "+ W&B offline": ["--no-tensorboard", "--wandb", "bench", "--wandb-mode", "offline"]}


def step_time(run_dir, flags, steps, batch):
    argv = ["--data", "synthetic", "--arch", "resnet18", "--img-size", "32", "--workers", "0",
            "--synthetic-size", str(steps * batch), "--batch-size", str(batch), "--epochs", "1",
            "--log-every", "1", "--knn-every", "0", "--run-dir", str(run_dir), *flags]
    simclr.main(argv)
    records = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r["epoch_time"] for r in records if "step" not in r][-1] / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="steps per run (40)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_SILENT", "true")
    sinks = {name: flags for name, flags in SINKS.items()
             if "--wandb" not in flags or __import__("importlib").util.find_spec("wandb")}
    times = {name: [] for name in sinks}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n, (name, flags) in enumerate(sinks.items()):
                times[name].append(step_time(Path(tmp) / f"{r}-{n}", flags, args.steps,
                                             args.batch_size))
        events = glob.glob(os.path.join(tmp, "*", "events.out.tfevents.*"))
        event_bytes = statistics.median(os.path.getsize(f) for f in events) if events else None
    base = statistics.median(times["log.jsonl alone"])
    result = {"steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds,
              "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
              "ratio": {k: statistics.median(v) / base for k, v in times.items()},
              "event_kib_per_1000_steps": event_bytes and event_bytes / args.steps * 1000 / 1024}
    for name in times:
        print(f"{name:16s} {result['seconds_per_step'][name] * 1e3:7.1f} ms/step  "
              f"{result['ratio'][name]:.3f}x")
    if event_bytes:
        print(f"events: {result['event_kib_per_1000_steps']:.0f} KiB per 1,000 logged steps "
              f"(the args table included)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
