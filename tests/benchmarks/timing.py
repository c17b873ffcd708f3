"""The timing harness of the step-cost benchmarks (bench_dino.py, bench_mocov3.py, bench_mae.py):
their common flags, BYOL's training step (the baseline of two of them), each method's step timed
in rounds interleaved with the others' (a change in the machine's load falls on all of them), the
medians and ratios printed as JSON.

    python tests/benchmarks/timing.py --help      # the flags the three benchmarks share

A helper of the benchmarks, not a test: pytest collects test_*.py only.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# run as a script (--help): byol.py and `common` are imported from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import byol  # noqa: E402
from common.optim import build_optimizer, param_groups, set_lr  # noqa: E402


def start(p):
    """The command line of parser `p` with the common flags added after its own; --threads
    applied and torch seeded; (args, device)."""
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
    return args, device


def byol_step(args, device, arch, tau):
    """byol.py's loop body with its recipe for `arch` at --img-size, its target's EMA momentum
    `tau`: step(x1, x2), one optimizer step on two batches of views (x1 twice without x2)."""
    recipe = byol.get_args(["--data", "synthetic", "--arch", arch, "--img-size", str(args.img_size)])
    model = byol.BYOL(arch, True, recipe.hidden_dim, recipe.proj_dim).to(device).train()
    optimizer = build_optimizer(param_groups(model, recipe.weight_decay), recipe)
    set_lr(optimizer, recipe.lr * args.batch_size / 256)

    def step(x1, x2=None):
        p1, p2, z1, z2 = model(x1, x1 if x2 is None else x2)
        loss = byol.byol_loss(p1, p2, z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(tau)
    return step


def synchronize(device):
    """Wait for the device's queued work (a GPU's kernels run after the call that queued them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(args, device, steps, inputs):
    """{name: seconds per step in each round} of `steps` ({name: step}, each called as
    step(*inputs)): --warmup untimed steps of each first, then --rounds rounds of --steps timed
    steps of one method after the other."""
    for step in steps.values():
        for _ in range(args.warmup):
            step(*inputs)
    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(*inputs)
            synchronize(device)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    return seconds


def report(args, device, arch, seconds, ratios):
    """The result as JSON, printed (and written to --json): the median seconds per step of each
    method, its rounds, and for each (a, b) of `ratios` the ratio of a's median to b's."""
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {"device": str(device), "threads": torch.get_num_threads(), "arch": arch,
              "img_size": args.img_size, "batch_size": args.batch_size,
              "seconds_per_step": median, "rounds": seconds,
              **{f"ratio_{a}_over_{b}": median[a] / median[b] for a, b in ratios}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":  # --help: the common flags (tests/test_docs.py reads every script's)
    start(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
